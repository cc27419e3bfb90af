"""Read-only questions other packages ask about permits, so none of them queries the permit
tables (``permits.models``) itself: the tables stay this package's to change.

Contract: each function takes an open SQLAlchemy session (the caller's transaction) and
returns plain values; none writes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from permits.models import Permit, PermitPerson, PermitVersion


def permits_naming(session: Session, person: str) -> list[tuple[str, str]]:
    """(permit id, reference) of every permit whose newest version names ``person``, newest
    permit first (whatever its status: filter with ``permits.service.permit_is_active``)."""
    rows = session.execute(
        select(Permit.id, Permit.reference)
        .join(PermitPerson, PermitPerson.permit_id == Permit.id)
        .where(PermitPerson.username == person).order_by(Permit.seq.desc())).all()
    return [(str(pid), str(ref)) for pid, ref in rows]


def version_snapshot(session: Session, permit_id: str, version: int) -> dict[str, Any] | None:
    """The stored snapshot of one version of a permit (None when there is no such version)."""
    row = session.get(PermitVersion, (permit_id, version))
    return dict(row.snapshot) if row is not None else None
