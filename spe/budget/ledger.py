"""Reserve-then-run privacy accounting per permit.

Contract (every function runs inside the caller's ``db.write()`` transaction, so the charge,
the account update and the audit entry commit together):

* :func:`reserve` locks the permit's account row (``BEGIN IMMEDIATE`` on SQLite, ``SELECT ...
  FOR UPDATE`` on PostgreSQL), checks the per-query cap, the permit's total caps and the
  optional per-person cap, then records a ``reserved`` charge and raises ``spent`` by the full
  cost. Nothing is ever refunded: a charge only moves to ``released`` or ``failed``. Because
  the check and the increment happen under one lock, no interleaving of concurrent requests can
  overspend, and a crash after commit leaves the budget charged with ``spent == sum(charges)``.
* Amounts are exact integers: epsilon in units of 1e-9, delta in units of 1e-18; costs round
  up and caps round down.
* An idempotency key names one charge per permit: :func:`find_charge` lets the caller replay
  the stored answer instead of charging again.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from permits.terms import PermitTerms
from spe.budget.models import BudgetAccount, BudgetCharge
from spe.db.base import utcnow
from spe.errors import BudgetExceeded

EPS_UNIT = Decimal("1e-9")
DELTA_UNIT = Decimal("1e-18")
RESERVED, RELEASED, FAILED = "reserved", "released", "failed"


def _units(value: float, unit: Decimal, rounding: str) -> int:
    return int((Decimal(repr(float(value))) / unit).to_integral_value(rounding=rounding))


def eps_units(value: float, *, up: bool = True) -> int:
    return _units(value, EPS_UNIT, ROUND_CEILING if up else ROUND_FLOOR)


def delta_units(value: float, *, up: bool = True) -> int:
    return _units(value, DELTA_UNIT, ROUND_CEILING if up else ROUND_FLOOR)


def from_eps_units(units: int) -> float:
    return float(Decimal(units) * EPS_UNIT)


def from_delta_units(units: int) -> float:
    return float(Decimal(units) * DELTA_UNIT)


@dataclass(frozen=True)
class BudgetSnapshot:
    permit_id: str
    epsilon_total: float
    delta_total: float
    max_epsilon_per_query: float
    epsilon_spent: float
    delta_spent: float
    queries: int
    per_person_epsilon: float | None = None
    person_spent: float | None = None

    @property
    def epsilon_remaining(self) -> float:
        return max(0.0, self.epsilon_total - self.epsilon_spent)

    @property
    def delta_remaining(self) -> float:
        return max(0.0, self.delta_total - self.delta_spent)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "permit_id": self.permit_id,
            "epsilon_total": self.epsilon_total, "epsilon_spent": self.epsilon_spent,
            "epsilon_remaining": self.epsilon_remaining,
            "delta_total": self.delta_total, "delta_spent": self.delta_spent,
            "delta_remaining": self.delta_remaining,
            "max_epsilon_per_query": self.max_epsilon_per_query, "queries": self.queries,
        }
        if self.per_person_epsilon is not None:
            out["per_person_epsilon"] = self.per_person_epsilon
            out["person_epsilon_spent"] = self.person_spent
        return out


def _lock_account(session: Session, permit_id: str) -> BudgetAccount:
    dialect = session.get_bind().dialect.name
    values = {"permit_id": permit_id, "spent_epsilon_units": 0, "spent_delta_units": 0,
              "queries": 0, "updated_at": utcnow()}
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        session.execute(pg_insert(BudgetAccount).values(**values).on_conflict_do_nothing())
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        session.execute(sqlite_insert(BudgetAccount).values(**values).on_conflict_do_nothing())
    account = session.execute(
        select(BudgetAccount).where(BudgetAccount.permit_id == permit_id)
        .with_for_update().execution_options(populate_existing=True)
    ).scalar_one()
    return account


def _person_spent(session: Session, permit_id: str, actor: str) -> int:
    total = session.execute(
        select(func.coalesce(func.sum(BudgetCharge.epsilon_units), 0))
        .where(BudgetCharge.permit_id == permit_id, BudgetCharge.actor == actor)
    ).scalar_one()
    return int(total)


def lock(session: Session, permit_id: str) -> BudgetAccount:
    """Lock and return the permit's account (created empty on first use)."""
    return _lock_account(session, permit_id)


def find_charge(session: Session, permit_id: str, idempotency_key: str) -> BudgetCharge | None:
    return session.execute(
        select(BudgetCharge).where(BudgetCharge.permit_id == permit_id,
                                   BudgetCharge.idempotency_key == idempotency_key)
    ).scalar_one_or_none()


def reserve(session: Session, terms: PermitTerms, *, actor: str, epsilon: float, delta: float,
            plan_hash: str, sql_sha256: str, idempotency_key: str | None = None
            ) -> BudgetCharge:
    """Charge (epsilon, delta) to the permit or raise BudgetExceeded (see module doc)."""
    budget = terms.budget
    e, d = eps_units(epsilon), delta_units(delta)
    if e > eps_units(budget.max_epsilon_per_query, up=False):
        raise BudgetExceeded(
            f"This query costs epsilon {epsilon:.6g}, above the permit's per-query maximum "
            f"{budget.max_epsilon_per_query:.6g}. Ask for a smaller epsilon.")
    account = _lock_account(session, terms.permit_id)
    cap_e, cap_d = eps_units(budget.epsilon, up=False), delta_units(budget.delta, up=False)
    if account.spent_epsilon_units + e > cap_e or account.spent_delta_units + d > cap_d:
        left_e = from_eps_units(max(0, cap_e - account.spent_epsilon_units))
        left_d = from_delta_units(max(0, cap_d - account.spent_delta_units))
        raise BudgetExceeded(
            f"This query costs (epsilon {epsilon:.6g}, delta {delta:.3g}); the permit has "
            f"(epsilon {left_e:.6g}, delta {left_d:.3g}) left.")
    if budget.per_person_epsilon is not None:
        spent = _person_spent(session, terms.permit_id, actor)
        if spent + e > eps_units(budget.per_person_epsilon, up=False):
            raise BudgetExceeded(
                f"This query would exceed your personal epsilon cap of "
                f"{budget.per_person_epsilon:.6g} under this permit.")
    charge = BudgetCharge(
        id=uuid.uuid4().hex, permit_id=terms.permit_id, actor=actor,
        idempotency_key=idempotency_key, epsilon_units=e, delta_units=d, state=RESERVED,
        plan_hash=plan_hash, sql_sha256=sql_sha256, created_at=utcnow(),
    )
    session.add(charge)
    account.spent_epsilon_units += e
    account.spent_delta_units += d
    account.queries += 1
    account.updated_at = utcnow()
    session.flush()
    return charge


def finish(session: Session, charge_id: str, *, released: bool,
           result: dict[str, Any] | None = None, error: str | None = None) -> BudgetCharge:
    """Move a reserved charge to released (storing the answer for replay) or failed.

    The charged amount never changes here: no refunds once data were touched.
    """
    charge = session.execute(
        select(BudgetCharge).where(BudgetCharge.id == charge_id).with_for_update()
    ).scalar_one()
    charge.state = RELEASED if released else FAILED
    charge.result = result
    charge.error = error
    charge.finished_at = utcnow()
    session.flush()
    return charge


def snapshot(session: Session, terms: PermitTerms, actor: str | None = None
             ) -> BudgetSnapshot:
    account = session.get(BudgetAccount, terms.permit_id)
    spent_e = account.spent_epsilon_units if account else 0
    spent_d = account.spent_delta_units if account else 0
    person = None
    if terms.budget.per_person_epsilon is not None and actor is not None:
        person = from_eps_units(_person_spent(session, terms.permit_id, actor))
    return BudgetSnapshot(
        permit_id=terms.permit_id, epsilon_total=terms.budget.epsilon,
        delta_total=terms.budget.delta, max_epsilon_per_query=terms.budget.max_epsilon_per_query,
        epsilon_spent=from_eps_units(spent_e), delta_spent=from_delta_units(spent_d),
        queries=account.queries if account else 0,
        per_person_epsilon=terms.budget.per_person_epsilon, person_spent=person,
    )


def check_ledger(session: Session, permit_id: str) -> bool:
    """True when the account's totals equal the sum of its charges (consistency check)."""
    account = session.get(BudgetAccount, permit_id)
    row = session.execute(
        select(func.coalesce(func.sum(BudgetCharge.epsilon_units), 0),
               func.coalesce(func.sum(BudgetCharge.delta_units), 0), func.count())
        .where(BudgetCharge.permit_id == permit_id)
    ).one()
    if account is None:
        return int(row[2]) == 0
    return (int(row[0]) == account.spent_epsilon_units
            and int(row[1]) == account.spent_delta_units and int(row[2]) == account.queries)


def recent_charges(session: Session, permit_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """The permit's newest charges (one per DP query), newest first: when, what it cost and
    its state (``released``: answered; ``failed``: refunded; ``reserved``: running). No SQL
    text and no person: only what the budget itself records."""
    rows = session.execute(
        select(BudgetCharge).where(BudgetCharge.permit_id == permit_id)
        .order_by(BudgetCharge.created_at.desc(), BudgetCharge.id).limit(limit)).scalars()
    return [{"id": c.id, "created_at": c.created_at, "state": c.state,
             "epsilon": from_eps_units(c.epsilon_units),
             "delta": from_delta_units(c.delta_units)} for c in rows]
