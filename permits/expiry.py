"""Expiry at ``valid_until``: the effective status is already ``expired`` on every read (see
``permits.states``); the sweeper *records* it.

``ExpirySweeper(service, interval)`` runs ``service.expire_due()`` every ``interval`` seconds
in a daemon thread (``start()`` / ``stop()``), or on demand with ``run_once()`` (tests, CLI).
Each expiry writes a version, an ``expired`` event and an audit entry by ``system``, revokes
the permit's workspace tokens, and removes its Keycloak group (retried on later sweeps if
Keycloak is down). A sweep that fails is logged and retried at the next interval.
"""

from __future__ import annotations

import logging
import threading

from permits.service import PermitService

logger = logging.getLogger("permits.expiry")

DEFAULT_INTERVAL_SECONDS = 5.0


class ExpirySweeper:
    def __init__(self, service: PermitService,
                 interval: float = DEFAULT_INTERVAL_SECONDS) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.service = service
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run_once(self) -> list[str]:
        """One sweep now; returns the ids of the permits it expired."""
        with self._lock:
            expired = self.service.expire_due()
        if expired:
            logger.info("permits expired", extra={"fields": {"count": len(expired)}})
        return expired

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:  # keep sweeping; the next round retries
                logger.exception("permit expiry sweep failed")

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="permit-expiry", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
