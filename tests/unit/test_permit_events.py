"""In-process delivery of permit events: ordered, isolated from failing subscribers."""

from __future__ import annotations

from datetime import UTC, datetime

from permits.events import EventBus, EventKind, PermitEventRecord


def _event(i: int) -> PermitEventRecord:
    return PermitEventRecord(id=i, permit_id="p", kind=EventKind.SUSPENDED, version=i,
                             status="suspended", time=datetime.now(UTC))


def test_subscribers_get_events_in_order_and_failures_are_contained() -> None:
    bus = EventBus()
    seen: list[int] = []

    def broken(_event: PermitEventRecord) -> None:
        raise RuntimeError("consumer bug")

    bus.subscribe(broken)
    unsubscribe = bus.subscribe(lambda e: seen.append(e.id))
    bus.publish([_event(3), _event(1), _event(2)])
    assert seen == [1, 2, 3]
    unsubscribe()
    bus.publish([_event(4)])
    assert seen == [1, 2, 3]
    unsubscribe()  # idempotent
