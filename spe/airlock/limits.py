"""Rate and concurrency limits of export writes (in-process), on the DP service's buckets.

Contract:

* :meth:`ExportLimits.write` admits one export write (a draft opened, a file uploaded, a
  submission) of ``token_key`` under ``permit_id`` or raises
  :class:`~spe.dp.limits.RateLimited` (HTTP 429 with ``Retry-After``): per token
  (``airlock_token_writes_per_minute``, ``airlock_token_write_burst``) and per permit, all its
  researchers together (``airlock_permit_writes_per_minute``, ``airlock_permit_write_burst``).
  A refused write takes from neither bucket.
* :meth:`ExportLimits.upload` is a context manager around one streamed upload: the write
  above plus at most ``airlock_token_concurrent_uploads`` uploads of one token at once,
  refused before the first byte is read.
* Refusals are raised inside an audited route, so each is in the audit log as a refusal.
* State lives in the process (one API process per SPE); keys are dropped least recently used
  beyond :data:`spe.dp.limits.MAX_KEYS`.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator

from spe.config import Settings
from spe.dp.limits import MAX_KEYS, RateLimited, TokenBucket


class ExportLimits:
    """The export-write limits of one API process (see module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._tokens: OrderedDict[str, TokenBucket] = OrderedDict()
        self._permits: OrderedDict[str, TokenBucket] = OrderedDict()
        self._uploading: dict[str, int] = {}

    @staticmethod
    def _bucket(table: OrderedDict[str, TokenBucket], key: str, per_minute: float,
                burst: int) -> TokenBucket:
        bucket = table.get(key)
        if bucket is None:
            bucket = table[key] = TokenBucket(rate=per_minute / 60.0, burst=burst)
            while len(table) > MAX_KEYS:
                table.popitem(last=False)
        table.move_to_end(key)
        return bucket

    def _take(self, permit_id: str, token_key: str) -> None:
        """Take one write from both buckets (lock held) or raise, taking from neither."""
        s = self.settings
        token = self._bucket(self._tokens, token_key, s.airlock_token_writes_per_minute,
                             s.airlock_token_write_burst)
        wait = token.take()
        if wait:
            raise RateLimited("This token's export rate limit is reached; retry later.", wait)
        permit = self._bucket(self._permits, permit_id, s.airlock_permit_writes_per_minute,
                              s.airlock_permit_write_burst)
        wait = permit.take()
        if wait:
            token.tokens += 1.0  # refused: the token's write is given back
            raise RateLimited("This permit's export rate limit is reached; retry later.", wait)

    def write(self, permit_id: str, token_key: str) -> None:
        """Admit one export write or raise RateLimited."""
        with self._lock:
            self._take(permit_id, token_key)

    @contextlib.contextmanager
    def upload(self, permit_id: str, token_key: str) -> Iterator[None]:
        """Admit one streamed upload for the duration of the block or raise RateLimited."""
        with self._lock:
            busy = self._uploading.get(token_key, 0)
            if busy >= self.settings.airlock_token_concurrent_uploads:
                raise RateLimited("This token is already uploading the most files it may at "
                                  "once; wait for one to finish.", 1.0)
            self._take(permit_id, token_key)
            self._uploading[token_key] = busy + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._uploading.get(token_key, 1) - 1
                if left > 0:
                    self._uploading[token_key] = left
                else:
                    self._uploading.pop(token_key, None)
