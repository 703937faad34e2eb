"""Sync moments: a persistent queue of unit runs and the one worker that runs them.

``SyncClient.trigger(unit)`` puts the unit in ``syncunit_queue`` (not twice:
a unit already waiting is not queued again) and returns at once; a single
background worker runs the queue in order, one sync at a time. A run that
fails on the network (or a 5xx, or a local database that was busy, full or
failing: a retryable ``LocalStoreError``) stays queued and is retried with
exponential backoff and jitter, while the units behind it go ahead; errors that
retrying cannot fix (401, 403, 422, bad requests) end the run and are reported.
The queue lives in the local database, so pending work survives a restart; when
it cannot be written (a full disk), the worker waits as long as for a failed run.
The workers of every client of the database share it, and a worker holds the
device's sync lock while a unit it took runs, so a unit seen running by the
lock's holder was left by a process that died, and runs again.

Offline is a status, not an error storm: while the device is offline the
worker waits; any sync the server answers ends it; ``set_online(True)``
retries at once and runs the configured reconnect unit with
``discard_pending`` (the waiting runs it covers are dropped), as the method's
Online unit does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from syncunit.errors import DeviceBusy, NetworkError, SyncCancelled, SyncUnitError

if TYPE_CHECKING:
    import sqlite3

    from syncunit.client.client import SyncClient
    from syncunit.protocol import UnitInfo

__all__ = ["RetryPolicy", "Scheduler", "SyncStatus", "split_subscription", "subscription_id"]


def subscription_id(unit: str, params: Mapping[str, Any] | None) -> str:
    """The key of a unit run with parameter values: ``Unit?{"name":value}`` (or the unit)."""
    if not params:
        return unit
    return unit + "?" + json.dumps(dict(params), sort_keys=True, separators=(",", ":"))


def split_subscription(entry: str) -> tuple[str, dict[str, Any] | None]:
    """The unit and parameter values of a ``subscription_id``."""
    unit, sep, raw = entry.partition("?")
    return (unit, json.loads(raw)) if sep else (unit, None)


log = logging.getLogger("syncunit.client")


def _pulled(unit: UnitInfo) -> set[str]:
    """The streams a run of ``unit`` pulls."""
    return set() if unit.direction == "push" else set(unit.streams)


#: The queue's table (created by the local store's migrations).
DDL = [
    "CREATE TABLE IF NOT EXISTS syncunit_queue ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, unit TEXT NOT NULL,"
    " state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,"
    " next_at REAL NOT NULL DEFAULT 0, last_error TEXT, queued_at REAL NOT NULL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS ix_syncunit_queue_pending"
    " ON syncunit_queue (unit) WHERE state = 'pending'",
]

State = Literal["idle", "syncing", "offline", "retrying"]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``base * factor**(attempt-1)``, capped, ±``jitter``.

    ``max_attempts`` None retries until the unit succeeds (offline-first); a
    number gives up after that many attempts and reports the error.
    """

    base_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.2
    max_attempts: int | None = None

    def delay(self, attempt: int, rand: float) -> float:
        """Seconds to wait before attempt ``attempt + 1``; ``rand`` is uniform in [0, 1)."""
        raw = min(self.max_delay, self.base_delay * self.factor ** max(0, attempt - 1))
        return raw * (1.0 + self.jitter * (2.0 * rand - 1.0))


@dataclass(frozen=True)
class Progress:
    """How far a transfer of ``unit`` is: ``done`` of ``total`` (an estimate that may grow)."""

    unit: str
    done: int
    total: int


@dataclass(frozen=True)
class SyncStatus:
    """A snapshot an app can poll: what the sync engine is doing and what waits."""

    state: State
    online: bool
    unit: str | None = None  # the unit running now
    queued: list[str] = field(default_factory=list)
    pending_mutations: int = 0
    rejected: int = 0
    last_error: str | None = None
    last_error_unit: str | None = None
    next_retry_in: float | None = None
    #: Rows of the running unit applied so far, of those the server announced.
    download: Progress | None = None
    #: Mutations of the running unit answered by the server, of those being sent.
    upload: Progress | None = None


#: A server's ``Retry-After`` is followed up to this many seconds.
MAX_RETRY_AFTER = 3600.0


class Scheduler:
    """The queue and its worker thread. ``step()`` runs one due unit (tests drive it).

    Due times are wall-clock times (the queue outlives the process), so the clock's
    steps move them: one set while the clock was ahead is brought back with it (in
    this process), and none is ever further than the longest wait the policy and a
    server may ask for (``_keep_due_times_near``).
    """

    def __init__(
        self,
        client: SyncClient,
        *,
        retry: RetryPolicy,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.client = client
        self.retry = retry
        self.clock = clock
        self.rand = rand
        self.online = True
        self.offline_detected = False
        self.current: str | None = None
        self.last_error: str | None = None
        self.last_error_unit: str | None = None
        self.periodic: tuple[str, float] | None = None
        #: After ``step()`` itself failed (the queue's own writes: a full disk, a database
        #: locked): the clock time the worker tries again, and the unit it was moving.
        self._resume_at: float | None = None
        self._moving: str | None = None
        self._next_periodic: float | None = None
        self._last_now: float | None = None  # the clock when last read (its steps back)
        self._cond = threading.Condition()
        self._starting = threading.Lock()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- the queue ------------------------------------------------------------------------

    def enqueue(self, unit: str, *, discard_pending: bool = False) -> bool:
        """Queue ``unit``; False if it was already waiting. ``discard_pending`` drops the
        waiting runs it covers (``_discard_covered``)."""
        with self.client.store.atomic() as c:
            if discard_pending:
                self._discard_covered(c, unit)
            cur = c.execute(
                "INSERT OR IGNORE INTO syncunit_queue (unit, state, next_at, queued_at)"
                " VALUES (?, 'pending', 0, ?)",
                (unit, self.clock()),
            )
            added = cur.rowcount > 0
        self.wake()
        return added

    def queued(self) -> list[str]:
        rows = self.client.store.query(
            "SELECT unit FROM syncunit_queue WHERE state = 'pending' ORDER BY id"
        )
        return [r[0] for r in rows]

    def busy_with(self, unit: str) -> bool:
        """Whether ``unit`` is queued or running, seen in one consistent moment."""
        with self.client.store.lock:  # step() moves a unit from queued to running under it
            return self.current == unit or unit in self.queued()

    def next_due(self) -> float | None:
        rows = self.client.store.query(
            "SELECT min(next_at) FROM syncunit_queue WHERE state = 'pending'"
        )
        return None if rows[0][0] is None else float(rows[0][0])

    def _discard_covered(self, c: sqlite3.Connection, by: str) -> list[str]:
        """Drop, in transaction ``c``, the waiting runs a run of ``by`` does as well (the
        method's discard-pending: a complete sync makes them needless); return them.

        Covered: a unit each of whose pulled streams ``by`` pulls and each of whose
        pushed tables it pushes; a run with parameters whose subscription is held and
        refreshed by ``by``'s runs (the use the run meant is recorded: ``keep_for``
        counts from it). Anything else (a subscription not held yet, a unit ``by``
        does not do, any unit while the catalog is unknown) stays queued, to run after.
        """
        by_unit, by_params = split_subscription(by)
        catalog = self.client.store.catalog()
        info = None if catalog is None else catalog.unit(by_unit)
        if catalog is None or info is None:
            return []
        pulls = set() if by_params else _pulled(info)  # a subscription's: its values only
        refreshed = (
            {r[0] for r in c.execute("SELECT id FROM syncunit_subscriptions")}
            if by_unit in self.client.refresh_subscriptions_with and info.direction != "push"
            else set()
        )  # the subscriptions its runs carry (``run.held``)
        dropped = []
        for rid, unit, queued_at in c.execute(
            "SELECT id, unit, queued_at FROM syncunit_queue WHERE state = 'pending' AND unit != ?",
            (by,),
        ).fetchall():
            name, params = split_subscription(unit)
            other = catalog.unit(name)
            if params:
                if unit not in refreshed:
                    continue
                c.execute(
                    "UPDATE syncunit_subscriptions SET used_at = max(used_at, ?) WHERE id = ?",
                    (queued_at, unit),
                )
            elif other is None or not (
                _pulled(other) <= pulls and set(other.push) <= set(info.push)
            ):
                continue
            c.execute("DELETE FROM syncunit_queue WHERE id = ?", (rid,))
            dropped.append(unit)
        if dropped:
            log.info("%s covers the waiting runs of %s: dropped", by, ", ".join(dropped))
        return dropped

    def _recover(self, c: sqlite3.Connection) -> None:
        """Runs left running by a worker that is gone (its process died) go back to the
        queue, first. Called holding the device's sync lock, which a worker holds for
        as long as it has a row running (``step``): one seen then has no worker."""
        for rid, unit in c.execute(
            "SELECT id, unit FROM syncunit_queue WHERE state = 'running'"
        ).fetchall():
            log.info("%s was left running by a worker that is gone: it runs again", unit)
            c.execute("DELETE FROM syncunit_queue WHERE state = 'pending' AND unit = ?", (unit,))
            c.execute("UPDATE syncunit_queue SET state = 'pending' WHERE id = ?", (rid,))

    # -- running ----------------------------------------------------------------------------

    def _keep_due_times_near(self) -> float:
        """The clock now, the due times kept near it (see the class); returns it."""
        now = self.clock()
        back = 0.0 if self._last_now is None else self._last_now - now
        self._last_now = now
        if self._next_periodic is not None and self.periodic is not None:
            self._next_periodic = min(self._next_periodic - max(0.0, back), now + self.periodic[1])
        furthest = now + max(self.retry.max_delay * (1.0 + self.retry.jitter), MAX_RETRY_AFTER)
        far = self.client.store.query(
            "SELECT 1 FROM syncunit_queue WHERE state = 'pending' AND next_at > ? LIMIT 1",
            (furthest,),
        )
        if back > 1.0 or far:
            with self.client.store.atomic() as c:
                if back > 1.0:  # the clock stepped back: so do the times set before
                    c.execute(
                        "UPDATE syncunit_queue SET next_at = next_at - ?"
                        " WHERE state = 'pending' AND next_at > 0",
                        (back,),
                    )
                c.execute(
                    "UPDATE syncunit_queue SET next_at = ? WHERE state = 'pending' AND next_at > ?",
                    (furthest, furthest),
                )
        return now

    def step(self) -> bool:
        """Run the first due unit, if any and if online; return whether one ran.

        The run holds the device's sync lock (``devicelock.py``: this client's runs and
        those of any other client of the database wait) from the moment its row leaves
        the queue until the row is gone or waits again: so a row seen running by the
        lock's holder is one whose worker is gone, and goes back to the queue.
        """
        now = self._keep_due_times_near()
        self._tick_periodic(now)
        if not self.online:
            return False
        due = self.client.store.query(
            "SELECT id, unit, attempts FROM syncunit_queue WHERE state = 'pending'"
            " AND next_at <= ? ORDER BY id LIMIT 1",
            (now,),
        )
        left = self.client.store.query("SELECT 1 FROM syncunit_queue WHERE state = 'running'")
        if not due and not left:
            return False
        try:
            with self.client._exclusive(
                f"sync of {due[0][1]!r}" if due else "recovery of the sync queue"
            ):
                return self._run_first(now)
        except SyncCancelled:  # close() ended the wait for the lock: nothing was taken
            return False
        except DeviceBusy as exc:  # another client of the database held it too long
            if not due:
                return False
            rid, unit, attempts = due[0]
            self.client._emit(self.client.on_error, unit, exc)  # as the run's sync() would
            self._failed(rid, unit, attempts + 1, exc, taken=False)
            return True

    def _run_first(self, now: float) -> bool:
        """``step`` holding the device's sync lock."""
        try:
            with self.client.store.atomic() as c:
                self._recover(c)
                row = c.execute(
                    "SELECT id, unit, attempts FROM syncunit_queue WHERE state = 'pending'"
                    " AND next_at <= ? ORDER BY id LIMIT 1",
                    (now,),
                ).fetchone()
                if row is None:
                    return False
                rid, unit, attempts = row
                # Set under the store's lock, with the row leaving the queue: status()
                # (which takes the lock) sees the unit either queued or running.
                self.current = self._moving = unit
                c.execute("UPDATE syncunit_queue SET state = 'running' WHERE id = ?", (rid,))
        except BaseException:
            self.current = None
            raise
        try:
            self.client.sync(*split_subscription(unit))
        except SyncCancelled:
            self._requeue(rid, unit)
        except Exception as exc:
            self._failed(rid, unit, attempts + 1, exc)
        else:  # sync() cleared offline_detected
            with self.client.store.atomic() as c:
                c.execute("DELETE FROM syncunit_queue WHERE id = ?", (rid,))
        finally:
            self.current = None
            self.client._status_changed()
        return True

    def _requeue(self, rid: int, unit: str) -> None:
        """A run close() cancelled waits again, due at once, its attempts unchanged:
        not a failure, and the next ``start()`` runs it first."""
        with self.client.store.atomic() as c:
            c.execute("DELETE FROM syncunit_queue WHERE state = 'pending' AND unit = ?", (unit,))
            c.execute(
                "UPDATE syncunit_queue SET state = 'pending', next_at = 0 WHERE id = ?", (rid,)
            )

    def _failed(
        self, rid: int, unit: str, attempts: int, exc: Exception, *, taken: bool = True
    ) -> None:
        """Run ``rid`` failed: retried later, or dropped. ``taken`` False: it failed before
        it left the queue (waiting for the device's lock), and another worker may have
        taken it since, which this leaves alone."""
        state = "running" if taken else "pending"
        self.last_error = str(exc)
        self.last_error_unit = unit
        retryable = isinstance(exc, SyncUnitError) and bool(getattr(exc, "retryable", False))
        if not isinstance(exc, SyncUnitError):
            log.error("sync of %s failed unexpectedly", unit, exc_info=exc)
        give_up = self.retry.max_attempts is not None and attempts >= self.retry.max_attempts
        if isinstance(exc, NetworkError):
            if give_up and self.offline_detected:
                # sync() kept quiet about this retry (offline is a status), but dropping
                # the unit is final: the app must hear about it.
                self.client._emit(self.client.on_error, unit, exc)
            self.offline_detected = True
        with self.client.store.atomic() as c:
            if retryable and not give_up:
                delay = self.retry.delay(attempts, self.rand())
                # A server that says when to come back (429, 503) is not asked sooner.
                extra = getattr(exc, "extra", None) or {}
                delay = max(delay, min(float(extra.get("retry_after", 0)), MAX_RETRY_AFTER))
                if taken:  # one waiting row a unit: a trigger made meanwhile is this one
                    c.execute(
                        "DELETE FROM syncunit_queue WHERE state = 'pending' AND unit = ?", (unit,)
                    )
                c.execute(
                    "UPDATE syncunit_queue SET state = 'pending', attempts = ?, next_at = ?,"
                    " last_error = ? WHERE id = ? AND state = ?",
                    (attempts, self.clock() + delay, str(exc), rid, state),
                )
            else:
                c.execute("DELETE FROM syncunit_queue WHERE id = ? AND state = ?", (rid, state))

    def _tick_periodic(self, now: float) -> None:
        if self.periodic is None:
            return
        unit, every = self.periodic
        if self._next_periodic is None:
            self._next_periodic = now + every
        elif now >= self._next_periodic:
            self._next_periodic = now + every
            self._moving = unit
            with self.client.store.atomic() as c:
                c.execute(
                    "INSERT OR IGNORE INTO syncunit_queue (unit, state, next_at, queued_at)"
                    " VALUES (?, 'pending', 0, ?)",
                    (unit, now),
                )

    def set_online(self, online: bool, *, reconnect: str | None = None) -> bool:
        """Record connectivity; True if this is a change from offline to online.

        Coming back, ``reconnect`` is queued in place of the waiting runs it covers
        (the method's discard-pending: ``_discard_covered``), in the same transaction,
        before the worker may run again: it can never start a unit about to be dropped.
        """
        came_back = online and (not self.online or self.offline_detected)
        if came_back:
            self.offline_detected = False
            with self.client.store.atomic() as c:
                if reconnect:
                    self._discard_covered(c, reconnect)
                    c.execute(
                        "INSERT OR IGNORE INTO syncunit_queue (unit, state, next_at, queued_at)"
                        " VALUES (?, 'pending', 0, ?)",
                        (reconnect, self.clock()),
                    )
                c.execute("UPDATE syncunit_queue SET next_at = 0 WHERE state = 'pending'")
        self.online = online
        self.wake()
        return came_back

    # -- the worker thread -----------------------------------------------------------------

    def start(self) -> None:
        """Start the one worker (app threads may call this at the same time)."""
        with self._starting:
            if self._thread is not None and self._thread.is_alive():
                return
            # Runs another process left running are put back by the worker (``step``),
            # under the device's lock: not here, where one may still be running.
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="syncunit-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Ask the worker to stop and wait up to ``timeout`` (None: for as long as it
        takes); return whether it ended. The worker may stop itself (from a callback)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            return False
        self._thread = None
        return True

    def finish_due(self, timeout: float) -> None:
        """Give the worker up to ``timeout`` seconds to run the units due now: queued
        before this call and not waiting for a retry. Units queued later, and any
        left when the time is up, stay queued for the next ``start()``."""
        if not self.running or self._thread is threading.current_thread():
            return
        last = self.client.store.query("SELECT max(id) FROM syncunit_queue")[0][0]
        deadline = time.monotonic() + timeout
        while last is not None and self.running and self.online and not self.offline_detected:
            due = self.client.store.query(
                "SELECT 1 FROM syncunit_queue WHERE id <= ?"
                " AND (state = 'running' OR next_at <= ?) LIMIT 1",
                (last, self.clock()),
            )
            left = deadline - time.monotonic()
            if not due or left <= 0:
                return
            with self._cond:
                self._cond.wait(min(left, 0.05))

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        failures = 0  # of step() itself, in a row
        while not self._stop:
            try:
                # A unit a failed step left marked running: the next step puts it back.
                self._moving = None
                ran = self.step()
            except Exception as exc:  # the worker must survive anything
                failures += 1
                wait: float | None = self._step_failed(exc, failures)
            else:
                if failures:
                    log.info("the sync worker runs its queue again")
                    failures, self._resume_at = 0, None
                if ran:
                    continue
                wait = self._wait_time()
            with self._cond:
                if not self._stop:
                    self._cond.wait(wait)

    def _step_failed(self, exc: Exception, failures: int) -> float:
        """``step()`` itself failed: the queue's own bookkeeping could not be written (a
        full disk, a database locked by the app past the busy timeout). Return how long
        to wait: the retry policy's delay, as for a failed run (trying again at once
        would spin). The first failure of a run of them is logged and reported to
        ``on_error``; ``set_online(True)`` or a trigger tries again sooner."""
        delay = self.retry.delay(failures, self.rand())
        self._resume_at = self.clock() + delay
        unit = self._moving
        if unit is None:  # failed before it picked one (BEGIN): the first waiting
            with contextlib.suppress(SyncUnitError):
                unit = next(iter(self.queued()), None)
        self.last_error, self.last_error_unit = str(exc), unit
        if failures == 1:
            log.error(
                "the sync worker cannot run its queue (it tries again in %.1f s): %s",
                delay, exc, exc_info=None if isinstance(exc, SyncUnitError) else exc,
            )  # fmt: skip
            if unit is not None:
                self.client._emit(self.client.on_error, unit, exc)
        self.client._status_changed()
        return delay

    def _wait_time(self) -> float | None:
        now = self.clock()
        waits: list[float] = []
        due = self.next_due() if self.online else None
        if due is not None:
            waits.append(max(0.0, due - now))
        if self.periodic is not None and self._next_periodic is not None:
            waits.append(max(0.0, self._next_periodic - now))
        # Woken at least hourly: a clock that stepped is looked at again (``step``).
        return min(*waits, MAX_RETRY_AFTER) if waits else None

    # -- status --------------------------------------------------------------------------------

    def status(self) -> SyncStatus:
        with self.client.store.lock:  # the running unit and the queue, seen together
            current, queued, due = self.current, self.queued(), self.next_due()
        if self._resume_at is not None and due is not None:  # the worker waits after a failure
            due = max(due, self._resume_at)
        state: State
        if current is not None:
            state = "syncing"
        elif not self.online or self.offline_detected:
            state = "offline"
        elif due is not None and due > self.clock():
            state = "retrying"
        else:
            state = "idle"
        return SyncStatus(
            state=state,
            online=self.online,
            unit=current,
            queued=queued,
            pending_mutations=self.client.outbox.count(),
            rejected=len(self.client.outbox.rejected()),
            last_error=self.last_error,
            last_error_unit=self.last_error_unit,
            next_retry_in=None if due is None else max(0.0, due - self.clock()),
        )
