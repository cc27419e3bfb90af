"""Budget ledger tables.

``budget_accounts`` holds one row per permit: what has been spent, in exact integer units
(epsilon in 1e-9, delta in 1e-18; costs are rounded up, caps down, so integer comparison can
never overspend). ``budget_charges`` holds one row per charged query; a charge is created in
the same transaction that raises the account's spent totals, so ``spent == sum(charges)``
always holds (checked by :func:`spe.budget.ledger.check_ledger`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from spe.db.base import Base, UTCDateTime, utcnow

BIG = BigInteger().with_variant(Integer, "sqlite")


class BudgetAccount(Base):
    __tablename__ = "budget_accounts"

    permit_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    spent_epsilon_units: Mapped[int] = mapped_column(BIG, default=0)
    spent_delta_units: Mapped[int] = mapped_column(BIG, default=0)
    queries: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BudgetCharge(Base):
    __tablename__ = "budget_charges"
    __table_args__ = (UniqueConstraint("permit_id", "idempotency_key",
                                       name="uq_budget_charges_idem"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    permit_id: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str] = mapped_column(String(255), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    epsilon_units: Mapped[int] = mapped_column(BIG)
    delta_units: Mapped[int] = mapped_column(BIG)
    state: Mapped[str] = mapped_column(String(16))  # reserved | released | failed
    plan_hash: Mapped[str] = mapped_column(String(64))
    sql_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
