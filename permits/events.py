"""The permit event stream: a persisted outbox plus in-process delivery.

Contract
--------
* ``append(session, ...)`` writes one event in the caller's transaction, so the event exists
  if and only if the change it describes committed. Ids come from a single head row that stays
  locked until commit, so ids are gapless and become visible in increasing order: a consumer
  that remembers the last id it saw and asks for ``id > last`` never misses one.
  Call it *after* ``spe.audit.record`` in the same transaction (one lock order everywhere).
* ``poll(session, after_id, limit)``: events with ``id > after_id`` in id order. Other
  processes (JupyterHub) poll the table or ``GET /v1/permit-events?after=N``.
* ``subscribe(callback)``: in-process consumers (workspaces, query engine, airlock) get every
  event this process commits, right after the commit, in id order. Callbacks must be quick and
  must not raise (exceptions are logged and swallowed). ``subscribe`` returns an unsubscribe
  function. Delivery is at-most-once per process; consumers that must not miss an event across
  restarts poll from their own stored cursor instead.

Kinds: issued, amended, suspended, resumed, revoked, expired, extended.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from permits.models import PermitEvent, PermitEventHead

logger = logging.getLogger("permits.events")


class EventKind(StrEnum):
    ISSUED = "issued"
    AMENDED = "amended"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    REVOKED = "revoked"
    EXPIRED = "expired"
    EXTENDED = "extended"


@dataclass(frozen=True)
class PermitEventRecord:
    """An event as consumers see it."""

    id: int
    permit_id: str
    kind: EventKind
    version: int
    status: str
    time: datetime


Callback = Callable[[PermitEventRecord], None]


def _record(row: PermitEvent) -> PermitEventRecord:
    return PermitEventRecord(id=int(row.id), permit_id=row.permit_id, kind=EventKind(row.kind),
                             version=row.version, status=row.status, time=row.time)


def append(session: Session, *, permit_id: str, kind: EventKind, version: int, status: str,
           time: datetime) -> PermitEventRecord:
    """Write one event in ``session``'s transaction and return it (with its id)."""
    new_id = session.execute(
        update(PermitEventHead)
        .where(PermitEventHead.id == 1)
        .values(last_id=PermitEventHead.last_id + 1)
        .returning(PermitEventHead.last_id)
    ).scalar_one_or_none()
    if new_id is None:
        raise RuntimeError("permit event head missing: run `spe db upgrade`")
    row = PermitEvent(id=int(new_id), permit_id=permit_id, kind=kind.value, version=version,
                      status=status, time=time)
    session.add(row)
    session.flush()
    return _record(row)


def poll(session: Session, after_id: int = 0, limit: int = 100) -> list[PermitEventRecord]:
    """Events with ``id > after_id`` in id order, at most ``limit``."""
    rows = session.execute(
        select(PermitEvent).where(PermitEvent.id > after_id).order_by(PermitEvent.id).limit(limit)
    ).scalars()
    return [_record(r) for r in rows]


class EventBus:
    """In-process fan-out of committed events to subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[Callback] = []
        self._lock = threading.Lock()

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def publish(self, events: Iterable[PermitEventRecord]) -> None:
        """Deliver committed events (call only after the transaction committed)."""
        with self._lock:
            subscribers = list(self._subscribers)
        for event in sorted(events, key=lambda e: e.id):
            for callback in subscribers:
                try:
                    callback(event)
                except Exception:  # a consumer's bug must not break the permit API
                    logger.exception("permit event subscriber failed",
                                     extra={"fields": {"event_id": event.id,
                                                       "kind": event.kind.value}})


BUS = EventBus()
subscribe = BUS.subscribe
publish = BUS.publish
