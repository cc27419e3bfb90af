"""Rate and concurrency limits of the DP service and its API (in-process).

Contract:

* :class:`TokenBucket` admits ``rate`` events per second with bursts of ``burst``; refusing
  costs nothing and returns the seconds until the next event would be admitted.
* :class:`Limits` holds, per key, one bucket and one in-flight counter:

  - per permit: DP queries that touch data (not dry runs), so every probe costs time as well
    as budget (``dp_permit_queries_per_minute``, ``dp_permit_query_burst``);
  - per token: every DP request (query, dry run, budget read) of one token
    (``api_token_requests_per_minute``, ``api_token_burst``) and the requests it has in
    flight at once (``api_token_concurrency``).

  A refusal raises :class:`RateLimited` (HTTP 429 with ``Retry-After``); the caller audits it.
* :meth:`Limits.first_sighting` says whether an SQL text (by its SHA-256) is seen for the
  first time under a permit, so refusals record the SQL text once and only its hash on every
  retry.
* Refusals by a token's own limits are folded so a client retrying in a loop cannot flood the
  audit log: :meth:`Limits.fold_refusal` lets one refusal per token per ``fold_seconds`` be
  written and counts the others; the next written entry (the next refusal after the window,
  or :meth:`Limits.take_folded` on the token's next admitted request) carries that count.
  Every refusal is thus in the log, individually or in a count, except the last count of a
  token that is never used again.
* State lives in the process (one API process per SPE); a restart starts with full buckets.
  Keys are dropped least-recently-used beyond :data:`MAX_KEYS`, so memory stays bounded.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from spe.config import Settings
from spe.errors import SPEError

MAX_KEYS = 10_000
FOLD_SECONDS = 1.0


class RateLimited(SPEError):
    """Too many requests: the rate or concurrency limit of the token or permit is reached."""

    status, code, title = 429, "too-many-requests", "Too many requests"

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = max(1, math.ceil(retry_after))
        self.headers = {"Retry-After": str(self.retry_after)}


@dataclass
class TokenBucket:
    rate: float  # events per second
    burst: int
    tokens: float = field(default=-1.0)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = float(self.burst)

    def take(self, now: float | None = None) -> float:
        """0.0 when admitted (one token taken), else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class _Folded:
    written_at: float = -math.inf
    pending: int = 0


class _Lru(OrderedDict[str, object]):
    def touch(self, key: str, factory: type | None = None, **kw: object) -> object:
        value = self.get(key)
        if value is None:
            value = factory(**kw) if factory is not None else True
            self[key] = value
            while len(self) > MAX_KEYS:
                self.popitem(last=False)
        self.move_to_end(key)
        return value


class Limits:
    """The limits of one API process (see module docstring)."""

    def __init__(self, settings: Settings, fold_seconds: float = FOLD_SECONDS) -> None:
        self.settings = settings
        self.fold_seconds = fold_seconds
        self._folds = _Lru()
        self._lock = threading.Lock()
        self._permit_buckets = _Lru()
        self._token_buckets = _Lru()
        self._in_flight: dict[str, int] = {}
        self._seen_sql = _Lru()

    def permit_query(self, permit_id: str) -> None:
        """Admit one data-touching query of ``permit_id`` or raise RateLimited."""
        s = self.settings
        with self._lock:
            bucket = self._permit_buckets.touch(
                permit_id, TokenBucket, rate=s.dp_permit_queries_per_minute / 60.0,
                burst=s.dp_permit_query_burst)
            assert isinstance(bucket, TokenBucket)
            wait = bucket.take()
        if wait:
            raise RateLimited("This permit's query rate limit is reached; retry later.", wait)

    def enter(self, token_key: str) -> None:
        """Admit one DP request of ``token_key`` (rate and concurrency) or raise RateLimited;
        an admitted request must call :meth:`leave` when it ends."""
        s = self.settings
        with self._lock:
            bucket = self._token_buckets.touch(
                token_key, TokenBucket, rate=s.api_token_requests_per_minute / 60.0,
                burst=s.api_token_burst)
            assert isinstance(bucket, TokenBucket)
            busy = self._in_flight.get(token_key, 0)
            concurrent = busy >= s.api_token_concurrency
            wait = 1.0 if concurrent else bucket.take()
            if not wait:
                self._in_flight[token_key] = busy + 1
        if concurrent:
            raise RateLimited("This token already has the most requests in flight that it "
                              "may have; wait for one to finish.", wait)
        if wait:
            raise RateLimited("This token's request rate limit is reached; retry later.", wait)

    def leave(self, token_key: str) -> None:
        with self._lock:
            left = self._in_flight.get(token_key, 1) - 1
            if left > 0:
                self._in_flight[token_key] = left
            else:
                self._in_flight.pop(token_key, None)

    @contextlib.contextmanager
    def token_request(self, token_key: str) -> Iterator[None]:
        """:meth:`enter` for the duration of the block."""
        self.enter(token_key)
        try:
            yield
        finally:
            self.leave(token_key)

    def fold_refusal(self, token_key: str, now: float | None = None) -> int | None:
        """None: count this refusal, write nothing now. Otherwise write an entry for it that
        also stands for the returned number of earlier refusals folded into it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            fold = self._folds.touch(token_key, _Folded)
            assert isinstance(fold, _Folded)
            if now - fold.written_at < self.fold_seconds:
                fold.pending += 1
                return None
            folded, fold.pending, fold.written_at = fold.pending, 0, now
            return folded

    def take_folded(self, token_key: str) -> int:
        """The token's folded refusals not yet written (reset to 0): the caller writes them."""
        with self._lock:
            fold = self._folds.get(token_key)
            if not isinstance(fold, _Folded) or not fold.pending:
                return 0
            folded, fold.pending = fold.pending, 0
            return folded

    def first_sighting(self, permit_id: str, sql_sha256: str) -> bool:
        """True the first time this SQL (by hash) is seen under ``permit_id`` here."""
        key = f"{permit_id}\x00{sql_sha256}"
        with self._lock:
            if key in self._seen_sql:
                self._seen_sql.move_to_end(key)
                return False
            self._seen_sql.touch(key)
            return True
