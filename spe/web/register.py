"""The public permit register: what every access body has issued, without personal data.

Each entry holds the access body, the permit's reference and project title, the purposes, the
holder *organisation* (withheld when the holder is a natural person), the dataset names, the
access period and the effective status. Never the persons entitled to process the data, the
principal investigator, the representative, the justification or the technical terms.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, select

from permits.models import Permit, PermitVersion
from permits.states import effective_status
from spe.db import Database

NATURAL_PERSON = "(a natural person: not published)"


def entries(db: Database, access_body: str | None = None) -> list[dict[str, Any]]:
    query = (select(Permit.id, Permit.access_body, Permit.status, Permit.valid_from,
                    Permit.valid_until, PermitVersion.snapshot)
             .join(PermitVersion, and_(PermitVersion.permit_id == Permit.id,
                                       PermitVersion.version == Permit.version))
             .order_by(Permit.seq))
    if access_body:
        query = query.where(Permit.access_body == access_body)
    now = datetime.now(UTC)
    with db.read() as s:
        rows = s.execute(query).all()
    out = []
    for pid, body, status, valid_from, valid_until, snap in rows:
        holder = snap.get("holder") or {}
        out.append({
            "id": pid, "access_body": body, "reference": snap.get("reference"),
            "title": snap.get("title"), "purposes": list(snap.get("purposes") or []),
            "holder_organisation": (NATURAL_PERSON if holder.get("kind") == "natural_person"
                                    else holder.get("organisation")),
            "datasets": [d.get("dataset") for d in snap.get("datasets") or []],
            "valid_from": valid_from.isoformat(), "valid_until": valid_until.isoformat(),
            "status": effective_status(status, valid_from, valid_until, now).value,
        })
    return out
