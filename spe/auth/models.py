"""Control-plane tables of the identity package.

* ``auth_signing_keys``: the SPE's own keys for workspace tokens (Ed25519). The private key is
  stored as PKCS#8 PEM encrypted with a key derived from ``settings.secret_key``, so the
  database alone does not yield it. A key signs while it is the newest un-retired key and
  verifies until ``retire_at`` (set on rotation to outlive every token it signed).
* ``auth_workspace_grants``: one row per minted workspace token (by ``jti``), bound to
  (person, permit, workspace). A token is accepted only while its row exists, is not revoked
  and has not expired.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from spe.db.base import Base, UTCDateTime


class SigningKey(Base):
    __tablename__ = "auth_signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(16))
    public_key_pem: Mapped[str] = mapped_column(Text)
    private_key_enc: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    retire_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WorkspaceGrant(Base):
    __tablename__ = "auth_workspace_grants"
    __table_args__ = (
        Index("ix_auth_workspace_grants_permit_id", "permit_id"),
        Index("ix_auth_workspace_grants_workspace_id", "workspace_id"),
    )

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str] = mapped_column(String(255))
    username: Mapped[str] = mapped_column(String(255))
    permit_id: Mapped[str] = mapped_column(String(64))
    workspace_id: Mapped[str] = mapped_column(String(128))
    kid: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_reason: Mapped[str | None] = mapped_column(String(255), nullable=True)


__all__ = ["Base", "SigningKey", "WorkspaceGrant"]
