"""``SyncClient``: runs sync units against a server into a local SQLite file.

It learns units, streams and local table schemas from the server's catalog,
so it shares no Python code with the server, and needs only the standard
library's sqlite3 and httpx. One unit run is one HTTP request, but for the
exceptions ``SyncClient.sync`` lists.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from syncunit.client import bootstrap, sessions
from syncunit.client.abort import AbortableBackend, abortable_transport
from syncunit.client.live import LiveWatcher
from syncunit.client.outbox import Outbox
from syncunit.client.reactive import Dispatch, LiveQuery, QueryWatcher, Rows
from syncunit.client.result import SyncResult
from syncunit.client.rowjson import bad_value
from syncunit.client.run import (
    UnitRun,
    forbidden_unit,
    forget_unit,
    held,
    refused_own_params,
    syncunit_answer,
)
from syncunit.client.scheduler import RetryPolicy, Scheduler, SyncStatus, subscription_id
from syncunit.client.status import StatusFeed
from syncunit.client.store import LocalStore, quote
from syncunit.client.store import connect as _connect
from syncunit.errors import (
    AuthError,
    LocalStoreError,
    NetworkError,
    ProblemError,
    ProtocolError,
    SyncCancelled,
    SyncError,
    UnknownUnitError,
    problem_error,
)
from syncunit.ids import uuid7
from syncunit.protocol import (
    INT64_MAX,
    INT64_MIN,
    JSON,
    PRINCIPAL_TAG,
    PROBLEM_CODES,
    PROTOCOL_VERSION,
    PUSH_LIMITS,
    QUEUES_PUSHES,
    Catalog,
    Encoding,
    PushLimits,
    StreamInfo,
    decode_catalog,
    decode_problem,
)

try:
    import zstandard  # noqa: F401

    ACCEPT_ENCODING = "zstd, gzip"
except ImportError:  # pragma: no cover
    ACCEPT_ENCODING = "gzip"

__all__ = ["ProgressCallback", "SyncClient", "SyncResult", "TokenProvider"]

ProgressCallback = Callable[[str, int, int], None]
#: Returns a bearer token; asked before the first request and again after a 401.
TokenProvider = Callable[[], str]
#: A first copy of at least this many rows builds the local secondary indexes at its end.
DEFER_INDEXES_ABOVE = 5000
log = logging.getLogger("syncunit.client")
#: The principal of a session whose answers named two (no tag, hex, is this word).
AMBIGUOUS = "ambiguous"

#: Seconds an idle connection is kept for the next request (httpx's default). A server
#: should keep its side open longer (``syncunit serve`` does, 75 s): a request that goes
#: out as the server closes the connection gets no answer, and is sent once more.
IDLE_CONNECTION_S = 5.0


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS context every ``SyncClient`` of the process shares: httpx's default
    (certifi's CA bundle, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` as set when it is
    first made), made once. Loading the CA bundle takes about 40 ms, and each client
    made its own, whatever its URL. To trust another CA, give the client a
    ``transport=httpx.HTTPTransport(verify=...)``."""
    return httpx.create_ssl_context()


class SyncClient:
    """Syncs units of a syncunit server into a local SQLite database.

    ``token`` is a bearer token, or a function returning one (asked before the
    first request and again whenever the server answers 401, so an expired
    token is refreshed without failing the sync). ``transport`` is any
    ``httpx.BaseTransport`` (real HTTP by default; tests pass fault-injecting
    ones). ``chunk_size`` asks the server for a chunk size.
    ``local_db`` is a file path, ``":memory:"``, a ``LocalStore``, or an open
    sqlite3-compatible connection (for example from ``sqlcipher3``, keyed, for an
    encrypted local store). ``snapshots`` accepts prebuilt files for large first
    copies (never on an encrypted store: the file would hold its rows in the clear).
    """

    def __init__(
        self,
        server_url: str,
        local_db: str | Path | LocalStore | sqlite3.Connection | Any,
        *,
        token: str | TokenProvider | None = None,
        transport: httpx.BaseTransport | None = None,
        encoding: Encoding = "msgpack",
        chunk_size: int | None = None,
        timeout: float | None = 60.0,
        on_progress: ProgressCallback | None = None,
        on_start: Callable[[str], None] | None = None,
        on_complete: Callable[[SyncResult], None] | None = None,
        on_error: Callable[[str, Exception], None] | None = None,
        on_status: Callable[[SyncStatus], None] | None = None,
        dispatch: Dispatch | None = None,
        push_batch: int = 2000,
        retry: RetryPolicy | None = None,
        sync_on_start: str | None = None,
        sync_on_login: str | None = None,
        sync_on_reconnect: str | None = None,
        sync_every: tuple[str, float] | None = None,
        clock: Callable[[], float] = time.time,
        snapshots: bool = True,
        refresh_subscriptions_with: Sequence[str] | None = None,
        lock_timeout: float = 300.0,
    ) -> None:
        _check_numbers(
            push_batch=push_batch, chunk_size=chunk_size, timeout=timeout, lock_timeout=lock_timeout
        )
        if isinstance(token, str):
            _check_token(token)  # before anything is opened
        if not isinstance(server_url, str) or not server_url.startswith(("http://", "https://")):
            raise ValueError(
                f"server_url must be the server's http:// or https:// URL, not {server_url!r}"
            )
        if encoding not in ("msgpack", "json"):
            raise ValueError(f"encoding must be 'msgpack' or 'json', not {encoding!r}")
        self.store = local_db if isinstance(local_db, LocalStore) else LocalStore(local_db)
        self.outbox = Outbox(self.store)
        self.push_batch = push_batch
        #: With more than one batch to push, number the next batch while the server
        #: applies the current one (False: one after the other).
        self.pipeline = True
        #: The server said (in its last sync answer) that it queues a push behind the
        #: one before it: a push-only unit then sends each batch without waiting.
        self._queues_pushes = False
        #: The server's bounds on a push (``protocol.PUSH_LIMITS``), from its last answer;
        #: None until one said them (batches are then sized under the defaults, and no
        #: change is refused on the device).
        self.push_limits: PushLimits | None = None
        #: (client id, tag) of the principal the server last said this session is
        #: (``protocol.PRINCIPAL_TAG``); kept in the device database once per session.
        self._principal: tuple[str, str] | None = None
        self.on_start = on_start
        self.on_complete = on_complete
        self.on_error = on_error
        #: Called with a new ``SyncStatus`` whenever it changes (through ``dispatch``).
        self.on_status = on_status
        #: Hands status and ``watch_query`` calls to the app's UI thread (None: call directly).
        self.dispatch = dispatch
        self._feed = StatusFeed()
        self._watcher: QueryWatcher | None = None
        self.sync_on_start = sync_on_start
        self.sync_on_login = sync_on_login
        self.sync_on_reconnect = sync_on_reconnect
        #: Units whose runs refresh every held subscription in the same request.
        self.refresh_subscriptions_with = set(
            refresh_subscriptions_with
            if refresh_subscriptions_with is not None
            else [u for u in (sync_on_reconnect,) if u]
        )
        self.clock = clock
        #: This object's runs (``close`` waits for it); reentrant: the worker holds it
        #: around the sync() of a queued unit (``Scheduler.step``).
        self._sync_lock = threading.RLock()
        #: Seconds a run waits for another sync of the same database file to end.
        self.lock_timeout = lock_timeout
        self._sync_owner: int | None = None  # the thread running a sync
        self._callbacks = threading.local()  # .depth: callbacks running on this thread
        self._cancel = threading.Event()
        self._closed = False
        self.scheduler = Scheduler(self, retry=retry or RetryPolicy(), clock=clock)
        self.scheduler.periodic = sync_every
        self._live: LiveWatcher | None = None
        self.encoding: Encoding = encoding
        self.chunk_size = chunk_size
        #: Accept a prebuilt file for a large first copy (falls back to rows by itself).
        #: Never for an encrypted store: the file would hold its rows in the clear on disk.
        self.snapshots = snapshots and bootstrap.can_apply() and not self.store.encrypted
        self.on_progress = on_progress
        headers = {"Accept-Encoding": ACCEPT_ENCODING, "User-Agent": "syncunit-client/0.1"}
        self._token_provider: TokenProvider | None = None
        limits = httpx.Limits(  # httpx's defaults, said here
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=IDLE_CONNECTION_S,
        )
        #: Cuts the connections of the built-in transport, to cancel a blocked read
        #: (None with an app's own ``transport``: closing it is all close() can do).
        self._connections: AbortableBackend | None = None
        if transport is None:
            transport, self._connections = abortable_transport(tls_context(), limits)
        self.http = httpx.Client(
            base_url=server_url.rstrip("/"),
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=limits,
            verify=tls_context(),
        )
        self._set_token(token)
        self.client_id = self.store.client_id()

    # -- lifecycle -----------------------------------------------------------------------

    def connect(self, **kwargs: Any) -> sqlite3.Connection:
        """A new sqlite3 connection to this client's database, for the app's own SQL
        (``kwargs`` go to ``sqlite3.connect``): set up so that every write through it is
        recorded (``syncunit.client.connect``). The app closes it."""
        self._check_open()
        if self.store.path is None:
            raise LocalStoreError(
                "this client's database was given as a connection (or is in memory):"
                " open connections of your own with sqlite3.connect and run"
                " PRAGMA recursive_triggers = ON on each"
            )
        return _connect(self.store.path, **kwargs)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker and the live watcher, then close the database.

        Units already triggered and due (not waiting for a retry, not offline) run
        first, and a running sync finishes, within ``timeout`` seconds; then it is
        cancelled: its connection is cut (a server that does not answer is not waited
        for), what it applied stays, the rest is fetched next time, and its unit stays
        queued, with what still waits, for the next ``start()``. A cancelled run is not
        an error: ``on_error`` is not called; a ``sync()`` on an app thread raises
        ``SyncCancelled``. The database is closed only once no sync runs, and after a
        background WAL checkpoint under way has ended. Not from a sync callback.
        """
        if self._closed:
            return
        if self._sync_owner == threading.get_ident():
            raise SyncError("close() cannot be called from inside a sync (a callback)")
        deadline = time.monotonic() + timeout
        self.scheduler.finish_due(timeout)
        self._closed = True
        if self._watcher is not None:
            self._watcher.close()
        if self._live is not None:
            self._live.stop()
        if not self.scheduler.stop(max(0.0, deadline - time.monotonic())):
            self._abort()
            self.scheduler.stop(None)
        if not self._sync_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self._abort()  # a sync on an app thread
            self._sync_lock.acquire()
        try:
            self.http.close()
            self.store.close()
        finally:
            self._sync_lock.release()

    def _abort(self) -> None:
        """Cancel the running sync: it stops at its next step, or at once if it waits
        on the network (its connection is cut)."""
        self._cancel.set()
        if self._connections is not None:
            self._connections.abort()
        self.http.close()

    def _check_open(self) -> None:
        """Refuse a call that needs the database or the server once ``close()`` ran."""
        if self._closed:
            raise SyncError("the client is closed: make a new SyncClient to use the database")

    # -- sync moments -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the background worker: pending work from before a restart resumes,
        and the ``sync_on_start`` unit is queued."""
        self._check_open()
        self.scheduler.start()
        if self.sync_on_start:
            self.scheduler.enqueue(self.sync_on_start)

    def trigger(
        self,
        unit: str,
        *,
        discard_pending: bool = False,
        params: Mapping[str, Any] | None = None,
    ) -> bool:
        """Queue ``unit`` (with its ``params``) to run in the background and return at once.

        A unit with the same parameter values already waiting is not queued twice
        (returns False). ``discard_pending`` drops the waiting runs this unit's run
        does as well (the units whose streams it pulls and tables it pushes, the
        held subscriptions it refreshes); the others, and the running one, stay.
        """
        self._check_open()
        _check_subscription(params, None)
        added = self.scheduler.enqueue(
            subscription_id(unit, params), discard_pending=discard_pending
        )
        self.scheduler.start()
        self._status_changed()
        return added

    def login(self, token: str | TokenProvider) -> SyncResult | None:
        """Use ``token`` from now on and run the ``sync_on_login`` unit, blocking.

        Changes a principal left behind at ``logout`` (parked) are offered to the
        server first: those of this principal are pushed, the others stay parked.
        """
        self._check_open()
        self._set_token(token)
        self.push_parked()
        return self.sync(self.sync_on_login) if self.sync_on_login else None

    def logout(self, *, clear: bool = True, push: bool = True) -> int:
        """End this principal's session on the device; return how many changes were kept.

        With ``push`` the pending changes are pushed first, while the credentials
        still work. What cannot be pushed now (offline, say) is kept for the
        principal: parked, out of the next principal's sight, and pushed by a later
        ``login`` of the same principal (the server tells: it binds a session to
        its principal). ``clear`` removes every synced row and the sync state, so
        the next principal sees nothing of this one (``clear=False`` keeps them,
        for the same person coming back). The device gets a new client id; the
        worker stops and the token is forgotten.
        """
        self._check_open()
        return sessions.logout(self, clear=clear, push=push)

    def push_parked(self) -> int:
        """Push the parked changes the current principal owns; return how many applied.

        A session bound to another principal is refused by the server (403) and
        stays parked; a network failure leaves the rest for the next ``login``.
        """
        self._check_open()
        return sessions.push_parked(self)

    def _set_token(self, token: str | TokenProvider | None) -> None:
        if isinstance(token, str):
            _check_token(token)
        self._token_provider = token if callable(token) else None
        if isinstance(token, str):
            self.http.headers["Authorization"] = f"Bearer {token}"
        else:
            self.http.headers.pop("Authorization", None)

    def set_online(self, online: bool) -> None:
        """Tell the engine about connectivity. Coming back online retries at once and
        triggers the ``sync_on_reconnect`` unit with ``discard_pending`` (see ``trigger``)."""
        came_back = self.scheduler.set_online(online, reconnect=self.sync_on_reconnect)
        if came_back and self.sync_on_reconnect:
            self.scheduler.start()
        self._status_changed()

    @property
    def status(self) -> SyncStatus:
        """What the engine is doing: idle, syncing, offline or retrying, what waits,
        how far the running unit's download and upload are, and the last error."""
        return self._feed.complete(self.scheduler.status())

    def _status_changed(self) -> None:
        """Tell ``on_status`` about a new status (not twice the same one)."""
        here = self.on_status is not None and self.dispatch is None  # called on this thread
        listener = self._status_callback if here else self.on_status
        self._feed.tell(lambda: self.status, listener, self.dispatch)

    def _status_callback(self, status: SyncStatus) -> None:
        if self.on_status is not None:
            with self._calling_back():
                self.on_status(status)

    def watch_query(
        self,
        sql: str,
        params: Sequence[Any] | dict[str, Any] = (),
        callback: Callable[[Rows], None] | None = None,
        *,
        dispatch: Dispatch | None = None,
    ) -> LiveQuery:
        """Run ``sql`` on the local database now and each time its result changes.

        ``callback(rows)`` gets the rows at once, then again (coalesced) after a
        sync or a local write changes a table the query reads and the rows
        differ. ``dispatch`` (default: the client's) hands each call to the app's
        UI thread; the ``LiveQuery`` returned is also an iterator of results and
        stops with ``cancel()`` or ``close()``.
        """
        self._check_open()
        if self._watcher is None:
            self._watcher = QueryWatcher(self.store)
        return self._watcher.watch(sql, params, callback, dispatch=dispatch or self.dispatch)

    def watch(self, unit: str, *, on_change: Callable[[str], None] | None = None) -> None:
        """Listen for server changes in ``unit``'s scope, or in a held subscription's;
        each one triggers ``unit`` (or calls ``on_change``), whose runs then refresh
        every held subscription too. Reconnects by itself; stopped by ``close()``.

        A live poll carries no parameter values: a unit whose streams take client
        parameters cannot be watched (``RequestRejected``, ``invalid-parameter``, at
        once if the catalog is known; watch a unit that refreshes the subscription
        instead, Online say). A unit the server does not know or refuses the
        parameters of, or a URL that is no syncunit server, stops the watching; a
        token it refuses (401, 403) or a network failure is retried. Each failure
        goes to ``on_error`` and ``status.last_error``, as a failed run's does."""
        self._check_open()
        catalog = self.store.catalog()
        needs = [] if catalog is None else _client_params(catalog, unit)
        if needs:
            raise problem_error(
                400,
                "invalid-parameter",
                PROBLEM_CODES["invalid-parameter"][1],
                f"unit {unit!r} takes client parameters ({', '.join(needs)}), which a live"
                " poll cannot carry: watch a unit without them that refreshes the held"
                " subscriptions (the reconnect unit, Online say)",
                unit=unit,
            )
        self.refresh_subscriptions_with.add(unit)
        if self._live is not None:
            self._live.stop()
        self._live = LiveWatcher(self, unit, on_change or self._trigger_quietly)
        self._live.start()

    def _trigger_quietly(self, unit: str) -> None:
        if not self._closed:  # a change seen as close() stopped the watcher
            self.trigger(unit)

    def _emit(self, callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            with self._calling_back():
                callback(*args)
        except Exception:
            log.exception("a sync event callback failed")

    @contextmanager
    def _calling_back(self) -> Iterator[None]:
        """Mark this thread as running a sync callback: ``sync()`` refuses to start in one
        (on the worker it would run a whole unit inside another's events)."""
        self._callbacks.depth = getattr(self._callbacks, "depth", 0) + 1
        try:
            yield
        finally:
            self._callbacks.depth -= 1

    def _in_callback(self) -> bool:
        return bool(getattr(self._callbacks, "depth", 0))

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- local writes ----------------------------------------------------------------------

    def insert(self, table: str, values: Mapping[str, Any]) -> Any:
        """Insert a row into a local table; a UUIDv7 key is made if none is given.

        Plain SQL on the local table works the same: triggers record the change.
        """
        stream = self._local_stream(table)
        row = _values(table, values)
        if row.get(stream.key) is None:
            row[stream.key] = uuid7()
        names = ", ".join(quote(c) for c in row)
        marks = ", ".join("?" * len(row))
        errors = self.store.errors
        with _translated(f"cannot insert into {table}", errors, row), self.store.atomic() as c:
            c.execute(f"INSERT INTO {quote(table)} ({names}) VALUES ({marks})", list(row.values()))
        return row[stream.key]

    def update(self, table: str, key: Any, values: Mapping[str, Any]) -> None:
        """Change columns of a local row."""
        stream = self._local_stream(table)
        values = _values(table, values)
        sets = ", ".join(f"{quote(c)} = ?" for c in values)
        if not sets:
            raise LocalStoreError(f"update of {table} {key!r} names no column to change")
        errors = self.store.errors
        with _translated(f"cannot update {table}", errors, values), self.store.atomic() as c:
            cur = c.execute(
                f"UPDATE {quote(table)} SET {sets} WHERE {quote(stream.key)} = ?",
                [*values.values(), key],
            )
            if cur.rowcount == 0:
                raise LocalStoreError(f"{table} has no row with key {key!r}")

    def delete(self, table: str, key: Any) -> None:
        """Delete a local row."""
        stream = self._local_stream(table)
        errors = self.store.errors
        with _translated(f"cannot delete from {table}", errors), self.store.atomic() as c:
            c.execute(f"DELETE FROM {quote(table)} WHERE {quote(stream.key)} = ?", (key,))

    def _local_stream(self, table: str) -> StreamInfo:
        """The stream of ``table``, a local table some unit pushes."""
        self._check_open()
        catalog = self.catalog()
        stream = next((s for s in catalog.streams if s.local_table == table), None)
        if stream is None:
            raise LocalStoreError(f"{table!r} is not a synced local table")
        if not any(table in u.push for u in catalog.units):
            raise LocalStoreError(
                f"{table!r} is filled from the server and no unit pushes it: a change made"
                " here would never reach the server (change the row on the server, or"
                " declare a unit that pushes the table)"
            )
        return stream

    # -- catalog -------------------------------------------------------------------------

    def catalog(self, *, refresh: bool = False) -> Catalog:
        """The server's catalog (cached locally); local tables are created or migrated."""
        self._check_open()
        return self._catalog(refresh=refresh)

    def _catalog(self, *, refresh: bool = False, result: SyncResult | None = None) -> Catalog:
        """``catalog()`` for the engine's own runs (one that close() lets finish), whose
        ``result`` counts the request."""
        cached = None if refresh else self.store.catalog()
        if cached is not None:
            return cached
        with self._device("catalog update"):
            response = self._send("GET", "/v1/catalog", result=result)
            syncunit_answer(response, "application/json", JSON)
            try:
                body = response.read()
            finally:
                response.close()
            self._queues_pushes = response.headers.get(QUEUES_PUSHES) == "1"
            catalog = decode_catalog(body)
            self.store.apply_catalog(catalog)
            self.client_id = self.store.client_id()  # renewed if no unit takes changes now
        self._report_closed()
        return catalog

    def _report_closed(self, result: SyncResult | None = None) -> None:
        """Surface the subscriptions the catalogs just applied closed (their unit no
        longer pulls on the server) to ``on_error``, and list them in ``result``."""
        for closed in self.store.take_closed_by_catalog():
            if result is not None:
                result.closed.append(closed.sub_id)
            exc = UnknownUnitError(
                404,
                "unknown-unit",
                "No such sync unit",
                f"the server's catalog no longer has a unit {closed.unit!r} that pulls:"
                f" subscription {closed.sub_id} was closed and the {closed.removed} local"
                " rows only it held were removed; sync the unit again to reopen it",
                subscription=closed.sub_id,
                unit=closed.unit,
                params=closed.params,
            )
            self._emit(self.on_error, closed.sub_id, exc)

    # -- sync ----------------------------------------------------------------------------

    def sync(
        self,
        unit: str,
        params: Mapping[str, Any] | None = None,
        *,
        keep_for: float | None = None,
    ) -> SyncResult:
        """Run ``unit`` now and return what it did.

        One request, the first sync included (the catalog comes inside the
        response), except when the outbox holds more than ``push_batch``
        mutations (then one per batch), or holds mutations made under a schema
        the server no longer has (the catalog is fetched, then they are sent);
        when the server offers a snapshot file for a first copy (one download
        per file, then the request again, a delta from the file's cursor); when
        the server ends a response early (a large copy: the run asks for the
        rest); when the device holds more subscriptions than one request may
        carry; and when the server answers 401 and the token provider is asked
        for a new token (the request goes again). ``SyncResult.requests``
        counts every one.

        ``params`` are the values of the unit's client parameters: the run
        opens (or refreshes) a subscription, whose cursors and rows are its
        own, so opening it again is a delta. It stays until ``unsubscribe``,
        or until it has not been synced for ``keep_for`` seconds: a run without
        ``keep_for`` (a triggered one) keeps the one set, ``math.inf`` clears it.
        """
        if self._sync_owner == threading.get_ident() or self._in_callback():
            raise SyncError(
                f"sync({unit!r}) was called from inside a sync (a callback);"
                " use trigger() to run it after this one"
            )
        if self._closed:
            raise SyncError("the client is closed")
        _check_subscription(params, keep_for)
        sub_id = subscription_id(unit, params)
        opened = False
        result = SyncResult(unit=sub_id)
        started = time.perf_counter()
        self._emit(self.on_start, sub_id)
        self._feed.idle()
        self._status_changed()
        try:
            with self._exclusive(f"sync of {sub_id!r}"), self._owned():
                self._expire(keep=sub_id)
                opened = bool(params) and sub_id not in {s[0] for s in self.store.subscriptions()}
                if params:
                    self.store.open_subscription(
                        sub_id, unit, sub_id.partition("?")[2], self.clock(), keep_for
                    )
                # Without a catalog (a first sync) the server sends it inside the response;
                # changes waiting without one (an upgraded device file) need it first.
                catalog = self.store.catalog()
                if catalog is None and self.store.query("SELECT 1 FROM syncunit_outbox LIMIT 1"):
                    catalog = self._catalog(refresh=True, result=result)
                try:
                    self._run_allowed(unit, catalog, result, params)
                except ProblemError as exc:
                    if exc.code != "schema-changed":
                        raise
                    # Pending mutations under an old schema: migrate first, then send them.
                    catalog = self._catalog(refresh=True, result=result)
                    self._run_allowed(unit, catalog, result, params)
        except Exception as exc:
            if self._cancel.is_set() and isinstance(
                exc, (NetworkError, ProtocolError, SyncCancelled)
            ):
                # close() cut the run (a broken connection is how it cuts one): not a
                # failure, and its unit stays queued.
                result.seconds = time.perf_counter() - started
                self._feed.idle()
                self._status_changed()
                if isinstance(exc, SyncCancelled):
                    raise
                raise SyncCancelled(f"the sync of {sub_id!r} was cancelled by close()") from exc
            if isinstance(exc, ProblemError) and (
                (opened and not exc.retryable) or (params and self._refused_own(exc, unit, sub_id))
            ):
                # Refused (a malformed value, a 403): nothing to hold, and an Online
                # run must not carry it. Values the server refuses are closed whichever
                # call opened them. A network failure keeps it, to be retried.
                with self._exclusive(f"closing subscription {sub_id!r}"):
                    self._unsubscribe(unit, params or {})
            result.seconds = time.perf_counter() - started
            # Offline is a status: only the first network failure is an error event.
            if not (isinstance(exc, NetworkError) and self.scheduler.offline_detected):
                self._emit(self.on_error, unit, exc)
            self._feed.failed(unit, exc)
            self._status_changed()
            raise
        result.seconds = time.perf_counter() - started
        catalog = self.store.catalog()
        if catalog is not None:  # changes answered or dropped meanwhile: removals they held up
            self.store.carry_out_removals(catalog.streams)
        self.store.complete_unit(sub_id, json.dumps(result.to_dict()))
        self._feed.idle()
        # The server answered: whichever thread ran it, the device is not offline (and
        # close() runs the units due again).
        self.scheduler.offline_detected = False
        self._emit(self.on_complete, result)
        self._status_changed()
        return result

    def _run_allowed(
        self,
        unit: str,
        catalog: Catalog | None,
        result: SyncResult,
        params: Mapping[str, Any] | None,
    ) -> None:
        """Run ``unit``; a unit the principal may no longer run is forgotten.

        The server refuses a whole request (403 ``unit-forbidden``) when the unit
        it names is the one run, or the unit of a subscription the request
        carries to refresh. The first ends the run with the error; the second
        closes that unit's subscriptions (surfaced to ``on_error`` and the log)
        and runs again without them. A refusal naming one held subscription (its
        values, its unit gone from the server, a stream's ``authorize`` hook)
        closes that subscription the same way.
        """
        while True:
            try:
                UnitRun(self, PROTOCOL_VERSION, DEFER_INDEXES_ABOVE).run(
                    unit, catalog, result, params
                )
                return
            except ProblemError as exc:
                if self._close_refused(exc, result):
                    continue
                if exc.code != "unit-forbidden":
                    raise
                catalog = self.store.catalog()
                named = forbidden_unit(exc)
                dropped = [] if named in (None, unit) else [
                    sub_id for sub_id, sub_unit, _, _, _ in self.store.subscriptions()
                    if sub_unit == named
                ]  # fmt: skip
                if catalog is None:
                    raise
                forget_unit(self, named or unit, catalog)
                if not dropped:
                    raise
                for sub_id in dropped:
                    log.warning("subscription %s was closed and its rows removed: %s", sub_id, exc)
                    result.closed.append(sub_id)
                    self._emit(self.on_error, sub_id, exc)

    def _refused_own(self, exc: ProblemError, unit: str, sub_id: str) -> bool:
        """Whether ``exc`` refuses the values of subscription ``sub_id`` the run opened."""
        carried = held(self, unit, self.store.catalog())
        return refused_own_params(exc, unit, any(s.id != sub_id for s in carried))

    def _close_refused(self, exc: ProblemError, result: SyncResult | None = None) -> bool:
        """Close the held subscription the server refused (named by the problem's
        ``subscription``: its parameter values, its unit gone from the server, a
        stream's ``authorize`` hook), surfaced to ``on_error`` and the log, so the run
        goes on without it. False if the problem names none held."""
        named = exc.extra.get("subscription")
        found = next(
            ((u, raw) for sub_id, u, raw, _, _ in self.store.subscriptions() if sub_id == named),
            None,
        )
        if not isinstance(named, str) or found is None:
            return False
        self._unsubscribe(found[0], json.loads(found[1]))
        log.warning("subscription %s was refused and closed: %s", named, exc)
        if result is not None:
            result.closed.append(named)
        self._emit(self.on_error, named, exc)
        return True

    # -- subscriptions ---------------------------------------------------------------------

    def subscriptions(self) -> list[tuple[str, dict[str, Any]]]:
        """The units the app holds open with parameter values: (unit, params)."""
        self._check_open()
        return [(unit, json.loads(raw)) for _, unit, raw, _, _ in self.store.subscriptions()]

    def unsubscribe(self, unit: str, params: Mapping[str, Any]) -> int:
        """Close a subscription: its rows that no other subscription or stream holds
        are removed, with its cursors. Returns the number of rows removed."""
        self._check_open()
        with self._exclusive(f"closing subscription {subscription_id(unit, params)!r}"):
            return self._unsubscribe(unit, params)

    def _unsubscribe(self, unit: str, params: Mapping[str, Any]) -> int:
        catalog = self.store.catalog()
        info = None if catalog is None else catalog.unit(unit)
        streams = [] if info is None or catalog is None else [
            s for s in catalog.streams if s.name in info.streams
        ]  # fmt: skip
        return self.store.close_subscription(subscription_id(unit, params), streams)

    def expire_subscriptions(self) -> list[str]:
        """Close the subscriptions not synced for their ``keep_for``; return their ids."""
        self._check_open()
        with self._exclusive("expiring subscriptions"):
            return self._expire()

    def _expire(self, keep: str | None = None) -> list[str]:
        """Close the subscriptions not synced for their ``keep_for`` but ``keep`` (the
        one being synced: its rows stay, whether or not the server is reached). One used
        at a time still ahead of the clock (which stepped back since) counts as used
        now."""
        now = self.clock()
        gone = []
        for sub_id, unit, raw, used_at, keep_for in self.store.subscriptions():
            if used_at > now:
                self.store.touch_subscription(sub_id, now)
            elif keep_for is not None and now - used_at > keep_for and sub_id != keep:
                self._unsubscribe(unit, json.loads(raw))
                gone.append(sub_id)
        return gone

    @contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        """Hold this client's runs and the database's (``DeviceLock``): what this object
        knows of the database is read again first, for another client may have synced
        it meanwhile (its catalog, its client id after a logout)."""
        with self._sync_lock, self._device(what):
            yield

    @contextmanager
    def _device(self, what: str) -> Iterator[None]:
        """Hold the database's sync lock (reentrant on this thread), and catch up with
        what another client of the database changed before it was taken."""
        with self.store.sync_lock.held(what, self.lock_timeout, self._cancel) as taken:
            if taken:
                self.store.reload_catalog()
                self.client_id = self.store.get_fact("client_id") or self.client_id
            yield

    @contextmanager
    def _owned(self) -> Iterator[None]:
        self._sync_owner = threading.get_ident()
        try:
            yield
        finally:
            self._sync_owner = None

    # -- http -------------------------------------------------------------------------------

    def _send(
        self, method: str, path: str, *, result: SyncResult | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send a request (``kwargs`` go to httpx); a token provider is asked for the
        token first, and again, once, when the server answers 401. Each request that
        goes out counts in ``result.requests`` (the run's), the one after a 401 too."""
        provider = self._token_provider
        if provider is not None and "Authorization" not in self.http.headers:
            self._ask_token(provider)
        try:
            return self._send_once(method, path, result, **kwargs)
        except AuthError as exc:
            if exc.status != 401 or provider is None:
                raise
        self._ask_token(provider)  # expired: ask again, once
        return self._send_once(method, path, result, **kwargs)

    def _note_principal(self, tag: str) -> None:
        """Remember which principal the server says this session is (once per change).

        Answers for one client id that name two principals (a token provider whose
        user changed) leave the session's principal ambiguous: it is then known by
        no tag (``_session_principal`` is None) for the rest of the session."""
        seen = (self.client_id, tag)
        if self._principal in (seen, (self.client_id, AMBIGUOUS)):
            return
        with self.store.atomic():
            raw = self.store.get_fact("principal")
            client_id, _, known = (raw or "").partition(" ")
            if client_id == self.client_id and known and known != tag:
                seen = (self.client_id, AMBIGUOUS)
                if known != AMBIGUOUS:
                    log.warning(
                        "the server named another principal for this session: its"
                        " parked changes will be offered by the earlier rules only"
                    )
            if raw != f"{seen[0]} {seen[1]}":
                self.store.set_fact("principal", f"{seen[0]} {seen[1]}")
        self._principal = seen

    def _session_principal(self) -> str | None:
        """The server's tag of this session's principal (``protocol.PRINCIPAL_TAG``), or
        None if no answer of this session has said it yet, or answers named two."""
        raw = self.store.get_fact("principal")
        if raw is None:
            return None
        client_id, _, tag = raw.partition(" ")
        return tag if client_id == self.client_id and tag and tag != AMBIGUOUS else None

    def _ask_token(self, provider: TokenProvider) -> None:
        """Ask ``provider`` for a token and send it from now on; an AuthError
        (``token-provider``, retryable: the provider is asked again next time) if it
        fails or returns a token that cannot be sent, which is then never stored."""
        try:
            token = provider()
        except Exception as exc:
            raise _provider_error("the token provider failed", str(exc)) from exc
        why = sessions.token_problem(token)
        if why is not None:
            # Stored, it would fail every request as a network error, and the provider
            # (asked while no header is set) would never be asked again.
            self.http.headers.pop("Authorization", None)
            raise _provider_error("the token provider returned a token that cannot be sent", why)
        self.http.headers["Authorization"] = f"Bearer {token}"

    def _send_once(
        self, method: str, path: str, result: SyncResult | None, **kwargs: Any
    ) -> httpx.Response:
        if self._cancel.is_set():
            raise SyncCancelled("the client is closing: the sync was cancelled by close()")
        if result is not None:
            result.requests += 1
        try:
            request = self.http.build_request(method, path, **kwargs)
            response = self._transmit(request)
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: closed by close()
            raise NetworkError(f"cannot reach the server: {exc}") from exc
        limits = PushLimits.parse(response.headers.get(PUSH_LIMITS))
        if limits is not None:
            self.push_limits = limits
        tag = response.headers.get(PRINCIPAL_TAG)
        if tag:
            self._note_principal(tag)
        if response.status_code >= 400:
            try:
                body = response.read()
            except httpx.HTTPError as exc:
                raise NetworkError(f"the server's error response was cut: {exc}") from exc
            finally:
                response.close()
            problem = decode_problem(body)
            if problem is None and response.status_code in (404, 405):
                # A syncunit server answers these with a problem: a plain 404 or 405 (a web
                # server's page) means the URL leads elsewhere, and no retry will fix it.
                got = response.headers.get("content-type", "").partition(";")[0].strip()
                raise ProtocolError(
                    f"{request.url} is not a syncunit server (HTTP {response.status_code}"
                    f" {response.reason_phrase}, Content-Type {got or 'missing'}):"
                    " check the server URL"
                )
            if problem is None:
                raise problem_error(
                    response.status_code,
                    "http-error",
                    response.reason_phrase,
                    body[:200].decode("utf-8", "replace"),
                )
            extra: dict[str, Any] = {}
            retry_after = response.headers.get("retry-after", "")
            if retry_after.isdigit():
                extra["retry_after"] = int(retry_after)
            if problem.unit:  # the unit refused: maybe a subscription's, not the one asked
                extra["unit"] = problem.unit
            if problem.subscription:  # the subscription of the request refused
                extra["subscription"] = problem.subscription
            raise problem_error(
                problem.status, problem.code, problem.title, problem.detail, **extra
            )
        return response

    def _transmit(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; once more if the server closed without answering.

        A kept-alive connection the server times out just as a request goes out
        ends that way. Sending again is safe: every request of the protocol is
        idempotent (a push's changes are applied once, by their seq).
        """
        try:
            return self.http.send(request, stream=True)
        except httpx.RemoteProtocolError as exc:
            if self._cancel.is_set():
                raise
            log.info("%s %s: %s; sending it again", request.method, request.url.path, exc)
        return self.http.send(request, stream=True)


@contextmanager
def _translated(
    what: str, errors: tuple[type[Exception], ...], values: Mapping[str, Any] | None = None
) -> Iterator[None]:
    """Driver errors of an app write become ``LocalStoreError`` (nothing was written);
    an integer SQLite cannot hold is named by its column."""
    caught: tuple[type[Exception], ...] = (*errors, OverflowError)
    try:
        yield
    except LocalStoreError as exc:
        cause = exc.__cause__
        if isinstance(cause, errors):  # refused by the driver inside the transaction
            raise LocalStoreError(f"{what}: {cause}") from cause
        raise
    except caught as exc:
        raise LocalStoreError(f"{what}: {bad_value(exc, values or {})}") from exc


def _values(table: str, values: Any) -> dict[str, Any]:
    """The column values of an app write, as a dict (``LocalStoreError`` if not a mapping)."""
    if not isinstance(values, Mapping):
        raise LocalStoreError(
            f"the values written to {table} must be a dict of column names to values,"
            f" not {type(values).__name__}"
        )
    return dict(values)


def _provider_error(title: str, detail: str) -> AuthError:
    """A token provider's failure: retryable, since its next answer may be good."""
    error = AuthError(401, "token-provider", title, detail)
    error.retryable = True
    return error


def _check_token(token: str) -> None:
    """Refuse a token that could never be sent as a bearer token."""
    why = sessions.token_problem(token)
    if why is not None:
        raise ValueError(f"token: {why}")


def _check_numbers(
    *, push_batch: int, chunk_size: int | None, timeout: float | None, lock_timeout: float
) -> None:
    """Refuse settings no sync could run with, when the client is made (``timeout`` None:
    no read timeout, as httpx takes it)."""
    for name, value, least in (("push_batch", push_batch, 1), ("chunk_size", chunk_size, 1)):
        if value is None and name == "chunk_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be a whole number of at least {least}, not {value!r}")
    for name, seconds, zero in (("timeout", timeout, False), ("lock_timeout", lock_timeout, True)):
        if seconds is None and name == "timeout":
            continue
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not (seconds >= 0 if zero else seconds > 0)
            or seconds == float("inf")
        ):
            bound = "zero or more" if zero else "more than zero"
            raise ValueError(f"{name} must be a number of seconds, {bound}, not {seconds!r}")


def _client_params(catalog: Catalog, unit: str) -> list[str]:
    """The names of the client parameters ``unit``'s streams take (none for a unit the
    catalog does not have)."""
    info = catalog.unit(unit)
    streams = [] if info is None else [catalog.stream(name) for name in info.streams]
    return sorted({p.name for s in streams if s is not None for p in s.params})


def _check_subscription(params: Mapping[str, Any] | None, keep_for: float | None) -> None:
    """Refuse, before anything is recorded, parameter values no request can carry and a
    ``keep_for`` that is not a number of seconds (``math.inf``: held until closed)."""
    if keep_for is not None and (
        isinstance(keep_for, bool)
        or not isinstance(keep_for, int | float)
        or not keep_for > 0  # NaN too
    ):
        raise ValueError(
            f"keep_for must be a positive number of seconds (or math.inf), not {keep_for!r}"
        )
    for name, value in (params or {}).items():
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT64_MIN <= value <= INT64_MAX:
                raise problem_error(
                    422,
                    "invalid-request",
                    "Invalid request",
                    f"parameter {name!r}: integers hold 64 bits (signed); {value} does not fit",
                )
        elif value is not None and not isinstance(value, str | float | bool):
            raise problem_error(
                422,
                "invalid-request",
                "Invalid request",
                f"parameter {name!r}: a value is a number or a string, not {type(value).__name__}",
            )
