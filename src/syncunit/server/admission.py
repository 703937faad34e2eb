"""Admission: how many requests a principal may send, and how many syncs run at once.

* ``RateLimiter``: a token bucket per principal (``rate`` requests a second,
  ``burst`` at once); over it, the request gets 429 with ``Retry-After``.
* ``SyncSlots``: at most ``total`` syncs hold a database connection at once,
  and at most ``per_principal`` of one principal; a sync that finds no slot
  gets 503 with ``Retry-After`` at once, instead of waiting on the database
  pool (and failing everybody else's requests when the pool runs dry).

A slot is held while the sync reads or writes the database, not while its
response waits for a slow client: see ``streaming``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from sqlalchemy.engine import Engine

__all__ = ["RateLimiter", "Slot", "SyncSlots", "default_sync_slots"]


class RateLimiter:
    """A token bucket per key. ``check(key)`` returns None (go) or seconds to wait."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, key: str) -> float | None:
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            wait = None
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:  # forget the longest idle
                self._buckets.popitem(last=False)
        return wait


class Slot:
    """One running sync's hold on the database; ``release()`` may be called twice."""

    def __init__(self, owner: SyncSlots, principal: str) -> None:
        self._owner = owner
        self._principal = principal
        self._held = True

    def release(self) -> None:
        self._owner._release(self)


class SyncSlots:
    """Counts the syncs running at once, in total and per principal."""

    def __init__(self, total: int, per_principal: int) -> None:
        if total < 1 or per_principal < 1:
            raise ValueError("sync slots must be at least 1")
        self.total = total
        self.per_principal = per_principal
        self._lock = threading.Lock()
        self._used = 0
        self._by_principal: dict[str, int] = {}

    @property
    def used(self) -> int:
        return self._used

    def try_acquire(self, principal: str) -> Slot | str:
        """A slot, or why there is none (``"server"`` or ``"principal"``)."""
        with self._lock:
            if self._used >= self.total:
                return "server"
            mine = self._by_principal.get(principal, 0)
            if mine >= self.per_principal:
                return "principal"
            self._used += 1
            self._by_principal[principal] = mine + 1
        return Slot(self, principal)

    def _release(self, slot: Slot) -> None:
        with self._lock:
            if not slot._held:
                return
            slot._held = False
            self._used -= 1
            left = self._by_principal[slot._principal] - 1
            if left:
                self._by_principal[slot._principal] = left
            else:
                del self._by_principal[slot._principal]


def default_sync_slots(engine: Engine) -> int:
    """Concurrent syncs the engine's connection pool can serve without anyone waiting.

    A few connections stay free for authentication lookups and live checks.
    """
    pool = engine.pool
    size = getattr(pool, "size", None)
    overflow = getattr(pool, "_max_overflow", None)
    if callable(size) and isinstance(overflow, int):
        capacity = int(size()) + max(overflow, 0)
        return max(1, capacity - 3)
    return 8
