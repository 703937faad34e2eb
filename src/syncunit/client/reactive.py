"""Reactive local queries: a query's result, handed again each time it changes.

``SyncClient.watch_query(sql, params, callback)`` returns a ``LiveQuery``. The
callback gets the query's rows at once, then again each time a write changes
a table the query reads and the rows differ from the last ones handed over:

* which tables a query reads is asked of SQLite itself (an authorizer while
  the statement is prepared), so views and joins count;
* writes through the client's connection (a sync applying chunks, the app's
  ``insert``/``update``/``delete`` or plain SQL on ``client.store.conn``) are
  seen by temporary triggers that mark their table as changed; writes by other
  connections to the same file are seen by ``PRAGMA data_version``; a write
  the triggers cannot see (a table the engine rebuilt) by the connection's
  change counter, which makes every query run again;
* one watcher thread runs the queries again, no more often than ``interval``
  seconds (a download of many chunks hands over a few results, not one per
  chunk), and only after the write's transaction has ended (it takes the
  store's lock), so a rolled-back write hands over nothing;
* ``dispatch`` hands each call to the app's UI thread: anything that takes a
  zero-argument function, such as ``loop.call_soon_threadsafe``, Kivy's
  ``lambda f: Clock.schedule_once(lambda dt: f())`` or Toga's loop. Without it
  the callback runs on the watcher thread.

A ``LiveQuery`` is also an iterator of results (blocking), for threads that
prefer to loop.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from syncunit.errors import LocalStoreError

if TYPE_CHECKING:
    from syncunit.client.store import LocalStore

log = logging.getLogger("syncunit.client")

__all__ = ["LiveQuery", "QueryWatcher"]

Rows = list[tuple[Any, ...]]
Dispatch = Callable[[Callable[[], None]], Any]

_READ = 20  # SQLITE_READ in the authorizer's action codes
_FUNCTION = "syncunit_table_changed"
_END = object()


class LiveQuery:
    """One watched query: its latest ``rows``; ``cancel()`` stops it."""

    def __init__(
        self,
        watcher: QueryWatcher,
        sql: str,
        params: Sequence[Any] | dict[str, Any],
        callback: Callable[[Rows], None] | None,
        dispatch: Dispatch | None,
        tables: frozenset[str],
    ) -> None:
        self.sql = sql
        self.params = params
        self.tables = tables  #: the tables (and views' tables) the query reads
        self.rows: Rows | None = None
        #: Why its last run failed (a table a catalog change dropped, say), or None: the
        #: other watched queries go on, and this one runs again at the next change.
        self.error: LocalStoreError | None = None
        self.cancelled = False
        self._watcher = watcher
        self._callback = callback
        self._dispatch = dispatch
        self._results: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def cancel(self) -> None:
        """Stop watching: no more calls (one already handed to ``dispatch`` may still run)."""
        if not self.cancelled:
            self.cancelled = True
            self._watcher._remove(self)
            self._results.put(_END)

    def __iter__(self) -> Iterator[Rows]:
        """Each new result, the current one first, until ``cancel()`` (blocking)."""
        while True:
            item = self._results.get()
            if item is _END:
                return
            yield item

    def _hand_over(self, rows: Rows) -> None:
        self.rows = rows
        self._results.put(rows)
        if self._callback is None:
            return
        callback = self._callback

        def call() -> None:
            if self.cancelled:
                return
            try:
                callback(rows)
            except Exception:
                log.exception("a watch_query callback failed")

        if self._dispatch is None:
            call()
        else:
            self._dispatch(call)


class QueryWatcher:
    """The live queries of one local store, and the thread that runs them again."""

    def __init__(self, store: LocalStore, *, interval: float = 0.05, poll: float = 0.5) -> None:
        self.store = store
        self.interval = interval
        self.poll = poll
        self._queries: list[LiveQuery] = []
        self._dirty: set[str] = set()
        self._everything = False
        self._cond = threading.Condition()
        self._triggers: set[str] = set()
        self._stop = False
        self._thread: threading.Thread | None = None
        with store.lock:
            conn = store.conn
            conn.create_function(_FUNCTION, 1, self._changed, deterministic=False)
            self._versions = self._counters(conn)

    # -- watching ------------------------------------------------------------------------

    def watch(
        self,
        sql: str,
        params: Sequence[Any] | dict[str, Any] = (),
        callback: Callable[[Rows], None] | None = None,
        *,
        dispatch: Dispatch | None = None,
    ) -> LiveQuery:
        """Run ``sql`` now, hand its rows over, and again each time they change."""
        with self.store.lock:
            tables, rows = self._run_reading(sql, params)
            for table in tables:
                self._track(table)
        live = LiveQuery(self, sql, params, callback, dispatch, tables)
        with self._cond:
            self._queries.append(live)
            self._start()
        live._hand_over(rows)
        return live

    def close(self) -> None:
        with self._cond:
            self._stop = True
            queries = list(self._queries)
            self._cond.notify_all()
        for live in queries:
            live.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _remove(self, live: LiveQuery) -> None:
        with self._cond:
            if live in self._queries:
                self._queries.remove(live)

    # -- what changed --------------------------------------------------------------------

    def _changed(self, table: str) -> None:
        """Called by the temporary triggers, once per changed row."""
        with self._cond:
            if table not in self._dirty:
                self._dirty.add(table)
                self._cond.notify_all()

    def notify(self, tables: Sequence[str] | None = None) -> None:
        """Say tables changed by a way the watcher cannot see (None: any table)."""
        with self._cond:
            if tables is None:
                self._everything = True
            else:
                self._dirty.update(tables)
            self._cond.notify_all()

    def _track(self, table: str) -> None:
        """Temporary triggers on ``table`` (on the client's connection only)."""
        if table in self._triggers:
            return
        name = table.replace('"', '""')
        literal = table.replace("'", "''")
        for op in ("INSERT", "UPDATE", "DELETE"):
            trigger = f"syncunit_watch_{op.lower()}_{abs(hash(table))}"
            self.store.conn.execute(
                f'CREATE TEMP TRIGGER IF NOT EXISTS "{trigger}" AFTER {op} ON main."{name}"'
                f" BEGIN SELECT {_FUNCTION}('{literal}'); END"
            )
        self._triggers.add(table)

    @staticmethod
    def _counters(conn: sqlite3.Connection) -> tuple[int, int]:
        data_version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        return data_version, conn.total_changes

    def _run_reading(
        self, sql: str, params: Sequence[Any] | dict[str, Any]
    ) -> tuple[frozenset[str], Rows]:
        """Run ``sql``; return the tables SQLite says it reads, and its rows."""
        read: set[str] = set()

        def authorize(action: int, arg1: str | None, *_: Any) -> int:
            if action == _READ and arg1 and not arg1.startswith("sqlite_"):
                read.add(arg1)
            return sqlite3.SQLITE_OK

        conn = self.store.conn
        conn.set_authorizer(authorize)
        try:
            rows = conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise LocalStoreError(f"cannot watch the query: {exc}") from exc
        finally:
            conn.set_authorizer(None)
        return frozenset(read), [tuple(r) for r in rows]

    # -- the thread ----------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="syncunit-watch", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._dirty and not self._everything and not self._stop:
                    self._cond.wait(self.poll)
                if self._stop:
                    return
            self._cond_wait_interval()
            try:
                self._refresh()
            except Exception:
                log.exception("re-running watched queries failed; tried again on the next change")

    def _cond_wait_interval(self) -> None:
        """Let a burst of writes settle: one run for many chunks."""
        with self._cond:
            if self._dirty or self._everything:
                self._cond.wait(self.interval)

    def _refresh(self) -> None:
        with self.store.lock:  # waits for a running transaction to end
            conn = self.store.conn
            versions = self._counters(conn)
            with self._cond:
                dirty, self._dirty = self._dirty, set()
                everything, self._everything = self._everything, False
                queries = list(self._queries)
            data_version, total = versions
            if data_version != self._versions[0]:
                everything = True  # another connection wrote the file
            elif total != self._versions[1] and not dirty:
                everything = True  # a write no trigger saw (a table rebuilt, say)
                self._triggers.clear()
            self._versions = versions
            if not dirty and not everything:
                return
            results = []
            for live in queries:
                if live.cancelled or not (everything or live.tables & dirty):
                    continue
                try:
                    tables, rows = self._run_reading(live.sql, live.params)
                except LocalStoreError as exc:  # this query's alone: the others go on
                    if live.error is None or str(live.error) != str(exc):
                        log.warning("a watched query failed (%s): %s", live.sql[:80], exc)
                    live.error = exc
                    continue
                live.error = None
                for table in tables - live.tables:
                    self._track(table)
                for table in live.tables:
                    self._track(table)  # again, in case the table was rebuilt
                live.tables = tables | live.tables
                if rows != live.rows:
                    results.append((live, rows))
            self._versions = self._counters(conn)
        for live, rows in results:
            live._hand_over(rows)
