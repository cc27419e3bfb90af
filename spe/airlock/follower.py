"""The airlock's durable reader of the permit event stream.

Contract: :class:`EventFollower` reads ``permit_events`` after its cursor (a file under
``<data_dir>/airlock/permit_events.cursor``, replaced atomically, so nothing is missed across
restarts, as the hub service does for workspaces) and closes the open export requests of every
permit that was suspended, revoked or expired (:meth:`AirlockService.close_for_permit`, which is
idempotent). The API runs it every ``POLL_SECONDS`` in a thread besides the in-process
subscription, so a change made by another process (the CLI, another API worker) is acted on
too. ``run_once()`` returns how many events it read.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from permits.events import EventKind, poll
from spe.airlock.service import AirlockService

logger = logging.getLogger("spe.airlock")

POLL_SECONDS = 5.0
ENDING = frozenset({EventKind.SUSPENDED, EventKind.REVOKED, EventKind.EXPIRED})


class EventFollower:
    def __init__(self, service: AirlockService, cursor_file: Path | None = None) -> None:
        self.service = service
        self.cursor_file = cursor_file or (service.settings.data_dir / "airlock"
                                           / "permit_events.cursor")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _cursor(self) -> int:
        try:
            return int(self.cursor_file.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _save(self, value: int) -> None:
        self.cursor_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.cursor_file.with_suffix(".tmp")
        tmp.write_text(str(value))
        tmp.replace(self.cursor_file)

    def run_once(self) -> int:
        with self._lock:
            after = self._cursor()
            with self.service.db.read() as session:
                events = poll(session, after, limit=500)
            if not events:
                return 0
            for pid in dict.fromkeys(e.permit_id for e in events if e.kind in ENDING):
                self.service.close_for_permit(pid)
            self._save(events[-1].id)
            return len(events)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.run_once()
            except Exception:  # the loop must survive a database hiccup
                logger.exception("airlock permit event poll failed")

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="airlock-events",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
