"""The console's server-side sessions: the cookie carries a random token, the row everything else.

A row is keyed by the SHA-256 of the token (a copy of the table gives nobody a usable cookie).
``kind`` is ``login`` while a Keycloak login is under way (``data`` holds the PKCE verifier,
the state and the nonce) and ``user`` once it succeeded (``data`` holds the person's principal
and the ID token used as ``id_token_hint`` at logout). ``csrf`` is the session's CSRF token.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String
from sqlalchemy.orm import Mapped, mapped_column

from spe.db.base import Base, UTCDateTime


class WebSession(Base):
    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
