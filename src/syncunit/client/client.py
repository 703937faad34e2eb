"""``SyncClient``: runs sync units against a server into a local SQLite file.

It learns units, streams and local table schemas from the server's catalog,
so it shares no Python code with the server, and needs only the standard
library's sqlite3 and httpx. One unit run is one HTTP request.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from syncunit.client import bootstrap, sessions
from syncunit.client.live import LiveWatcher
from syncunit.client.outbox import NumberAhead, Outbox
from syncunit.client.prefetch import FramePrefetch
from syncunit.client.reactive import Dispatch, LiveQuery, QueryWatcher, Rows
from syncunit.client.scheduler import RetryPolicy, Scheduler, SyncStatus, subscription_id
from syncunit.client.status import StatusFeed
from syncunit.client.store import LocalStore, quote
from syncunit.errors import (
    AuthError,
    LocalStoreError,
    NetworkError,
    ProblemError,
    ProtocolError,
    SyncError,
    problem_error,
)
from syncunit.ids import uuid7
from syncunit.protocol import (
    PROTOCOL_VERSION,
    Catalog,
    CatalogFrame,
    Chunk,
    Encoding,
    End,
    Failure,
    Mutation,
    PushResults,
    SnapshotOffer,
    StreamInfo,
    StreamStart,
    Subscription,
    SyncRequest,
    UnitInfo,
    content_type,
    decode_catalog,
    decode_problem,
    encode_request,
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
COMPRESS_ABOVE = 16 * 1024
#: A first copy of at least this many rows builds the local secondary indexes at its end.
DEFER_INDEXES_ABOVE = 5000
#: Responses in a row that the server ended early without a chunk before a run gives up.
MAX_IDLE_CONTINUATIONS = 3
log = logging.getLogger("syncunit.client")


@dataclass
class SyncResult:
    """What one unit run did."""

    unit: str
    rows_in: dict[str, int] = field(default_factory=dict)
    rows_removed: dict[str, int] = field(default_factory=dict)
    rows_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    requests: int = 0
    resets: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)  # streams copied from a snapshot file
    applied: int = 0
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_in(self) -> int:
        return sum(self.rows_in.values())

    @property
    def total_removed(self) -> int:
        return sum(self.rows_removed.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 4)
        return out


class SyncClient:
    """Syncs units of a syncunit server into a local SQLite database.

    ``token`` is a bearer token, or a function returning one (asked before the
    first request and again whenever the server answers 401, so an expired
    token is refreshed without failing the sync). ``transport`` is any
    ``httpx.BaseTransport`` (real HTTP by default; tests pass fault-injecting
    ones). ``chunk_size`` asks the server for a chunk size.
    ``local_db`` is a file path, ``":memory:"``, a ``LocalStore``, or an open
    sqlite3-compatible connection (for example from ``sqlcipher3``, keyed, for an
    encrypted local store).
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
        timeout: float = 60.0,
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
    ) -> None:
        self.store = local_db if isinstance(local_db, LocalStore) else LocalStore(local_db)
        self.outbox = Outbox(self.store)
        self.push_batch = push_batch
        #: With more than one batch to push, number the next batch while the server
        #: applies the current one (False: one after the other).
        self.pipeline = True
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
        self._sync_lock = threading.Lock()
        self._sync_owner: int | None = None  # the thread running a sync
        self._cancel = threading.Event()
        self._closed = False
        self.scheduler = Scheduler(self, retry=retry or RetryPolicy(), clock=clock)
        self.scheduler.periodic = sync_every
        self._live: LiveWatcher | None = None
        self.encoding: Encoding = encoding
        self.chunk_size = chunk_size
        #: Accept a prebuilt file for a large first copy (falls back to rows by itself).
        self.snapshots = snapshots and bootstrap.can_apply()
        self._offers: list[SnapshotOffer] = []
        self.on_progress = on_progress
        headers = {"Accept-Encoding": ACCEPT_ENCODING, "User-Agent": "syncunit-client/0.1"}
        self._token_provider: TokenProvider | None = None
        self.http = httpx.Client(
            base_url=server_url.rstrip("/"),
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
        )
        self._set_token(token)
        self.client_id = self.store.client_id()

    # -- lifecycle -----------------------------------------------------------------------

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker and the live watcher, then close the database.

        A running sync has ``timeout`` seconds to finish; then it is cancelled (its
        connection closed: what it applied stays, the rest is fetched next time).
        The database is closed only once no sync runs. Not from a sync callback.
        """
        if self._closed:
            return
        if self._sync_owner == threading.get_ident():
            raise SyncError("close() cannot be called from inside a sync (a callback)")
        self._closed = True
        if self._watcher is not None:
            self._watcher.close()
        if self._live is not None:
            self._live.stop()
        if not self.scheduler.stop(timeout):
            self._cancel.set()
            self.http.close()
            self.scheduler.stop(None)
        if not self._sync_lock.acquire(timeout=timeout):  # a sync on an app thread
            self._cancel.set()
            self.http.close()
            self._sync_lock.acquire()
        try:
            self.http.close()
            self.store.close()
        finally:
            self._sync_lock.release()

    # -- sync moments -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the background worker: pending work from before a restart resumes,
        and the ``sync_on_start`` unit is queued."""
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
        (returns False). ``discard_pending`` drops every other waiting run (not
        the running one).
        """
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
        return sessions.logout(self, clear=clear, push=push)

    def push_parked(self) -> int:
        """Push the parked changes the current principal owns; return how many applied.

        A session bound to another principal is refused by the server (403) and
        stays parked; a network failure leaves the rest for the next ``login``.
        """
        return sessions.push_parked(self)

    def _set_token(self, token: str | TokenProvider | None) -> None:
        self._token_provider = token if callable(token) else None
        if isinstance(token, str):
            self.http.headers["Authorization"] = f"Bearer {token}"
        else:
            self.http.headers.pop("Authorization", None)

    def set_online(self, online: bool) -> None:
        """Tell the engine about connectivity. Coming back online retries at once and
        triggers the ``sync_on_reconnect`` unit with ``discard_pending``."""
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
        self._feed.tell(lambda: self.status, self.on_status, self.dispatch)

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
        if self._watcher is None:
            self._watcher = QueryWatcher(self.store)
        return self._watcher.watch(sql, params, callback, dispatch=dispatch or self.dispatch)

    def watch(self, unit: str, *, on_change: Callable[[str], None] | None = None) -> None:
        """Listen for server changes in ``unit``'s scope, or in a held subscription's;
        each one triggers ``unit`` (or calls ``on_change``), whose runs then refresh
        every held subscription too. Reconnects by itself; stopped by ``close()``."""
        self.refresh_subscriptions_with.add(unit)
        if self._live is not None:
            self._live.stop()
        self._live = LiveWatcher(self, unit, on_change or self._trigger_quietly)
        self._live.start()

    def _trigger_quietly(self, unit: str) -> None:
        self.trigger(unit)

    def _emit(self, callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.exception("a sync event callback failed")

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
        row = dict(values)
        if row.get(stream.key) is None:
            row[stream.key] = uuid7()
        names = ", ".join(quote(c) for c in row)
        marks = ", ".join("?" * len(row))
        errors = self.store.errors
        with _translated(f"cannot insert into {table}", errors), self.store.atomic() as c:
            c.execute(f"INSERT INTO {quote(table)} ({names}) VALUES ({marks})", list(row.values()))
        return row[stream.key]

    def update(self, table: str, key: Any, values: Mapping[str, Any]) -> None:
        """Change columns of a local row."""
        stream = self._local_stream(table)
        sets = ", ".join(f"{quote(c)} = ?" for c in values)
        if not sets:
            raise LocalStoreError(f"update of {table} {key!r} names no column to change")
        errors = self.store.errors
        with _translated(f"cannot update {table}", errors), self.store.atomic() as c:
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
        catalog = self.catalog()
        stream = next((s for s in catalog.streams if s.local_table == table), None)
        if stream is None:
            raise LocalStoreError(f"{table!r} is not a synced local table")
        return stream

    # -- catalog -------------------------------------------------------------------------

    def catalog(self, *, refresh: bool = False) -> Catalog:
        """The server's catalog (cached locally); local tables are created or migrated."""
        cached = None if refresh else self.store.catalog()
        if cached is not None:
            return cached
        response = self._send("GET", "/v1/catalog")
        try:
            body = response.read()
        finally:
            response.close()
        catalog = decode_catalog(body)
        self.store.apply_catalog(catalog)
        return catalog

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
        the server no longer has (the catalog is fetched, then they are sent).

        ``params`` are the values of the unit's client parameters: the run
        opens (or refreshes) a subscription, whose cursors and rows are its
        own, so opening it again is a delta. It stays until ``unsubscribe``,
        or until it has not been synced for ``keep_for`` seconds.
        """
        if self._sync_owner == threading.get_ident():
            raise SyncError(
                f"sync({unit!r}) was called from inside a sync (a callback);"
                " use trigger() to run it after this one"
            )
        if self._closed:
            raise SyncError("the client is closed")
        sub_id = subscription_id(unit, params)
        opened = False
        result = SyncResult(unit=sub_id)
        started = time.perf_counter()
        self._emit(self.on_start, sub_id)
        self._feed.idle()
        self._status_changed()
        try:
            with self._sync_lock, self._owned():
                self._expire()
                opened = bool(params) and sub_id not in {s[0] for s in self.store.subscriptions()}
                if params:
                    self.store.open_subscription(
                        sub_id, unit, sub_id.partition("?")[2], self.clock(), keep_for
                    )
                # Without a catalog (a first sync) the server sends it inside the response;
                # changes waiting without one (an upgraded device file) need it first.
                catalog = self.store.catalog()
                if catalog is None and self.store.query("SELECT 1 FROM syncunit_outbox LIMIT 1"):
                    result.requests += 1
                    catalog = self.catalog(refresh=True)
                try:
                    self._run_unit(unit, catalog, result, params)
                except ProblemError as exc:
                    if exc.code == "unit-forbidden" and catalog is not None:
                        self._forget_unit(unit, catalog)
                    if exc.code != "schema-changed":
                        raise
                    # Pending mutations under an old schema: migrate first, then send them.
                    result.requests += 1
                    catalog = self.catalog(refresh=True)
                    self._run_unit(unit, catalog, result, params)
        except Exception as exc:
            if opened and isinstance(exc, ProblemError) and not exc.retryable:
                # Refused (a malformed value, a 403): nothing to hold, and an Online
                # run must not carry it. A network failure keeps it, to be retried.
                with self._sync_lock:
                    self._unsubscribe(unit, params or {})
            result.seconds = time.perf_counter() - started
            # Offline is a status: only the first network failure is an error event.
            if not (isinstance(exc, NetworkError) and self.scheduler.offline_detected):
                self._emit(self.on_error, unit, exc)
            self._feed.failed(unit, exc)
            self._status_changed()
            raise
        result.seconds = time.perf_counter() - started
        self.store.complete_unit(sub_id, json.dumps(result.to_dict()))
        self._feed.idle()
        self._emit(self.on_complete, result)
        self._status_changed()
        return result

    # -- subscriptions ---------------------------------------------------------------------

    def subscriptions(self) -> list[tuple[str, dict[str, Any]]]:
        """The units the app holds open with parameter values: (unit, params)."""
        return [(unit, json.loads(raw)) for _, unit, raw, _, _ in self.store.subscriptions()]

    def unsubscribe(self, unit: str, params: Mapping[str, Any]) -> int:
        """Close a subscription: its rows that no other subscription or stream holds
        are removed, with its cursors. Returns the number of rows removed."""
        with self._sync_lock:
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
        with self._sync_lock:
            return self._expire()

    def _expire(self) -> list[str]:
        now = self.clock()
        gone = []
        for sub_id, unit, raw, used_at, keep_for in self.store.subscriptions():
            if keep_for is not None and now - used_at > keep_for:
                self._unsubscribe(unit, json.loads(raw))
                gone.append(sub_id)
        return gone

    def _held(self, unit_name: str, catalog: Catalog | None) -> list[Subscription]:
        """Every held subscription, with its cursors, to refresh beside ``unit_name``."""
        if catalog is None or unit_name not in self.refresh_subscriptions_with:
            return []
        subs = []
        for sub_id, unit, raw, _, _ in self.store.subscriptions():
            info = catalog.unit(unit)
            if info is None:
                continue
            cursors = self.store.subscription_cursors(sub_id, info.streams)
            subs.append(Subscription(id=sub_id, unit=unit, params=json.loads(raw), cursors=cursors))
        return subs

    @contextmanager
    def _owned(self) -> Iterator[None]:
        self._sync_owner = threading.get_ident()
        try:
            yield
        finally:
            self._sync_owner = None

    def _run_unit(
        self,
        unit_name: str,
        catalog: Catalog | None,
        result: SyncResult,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        unit = None if catalog is None else catalog.unit(unit_name)
        push_streams = [] if unit is None or catalog is None else [
            s for s in catalog.streams if s.local_table in unit.push
        ]  # fmt: skip
        tables = [s.local_table for s in push_streams]
        rounds = 1
        if push_streams:
            rounds += self.outbox.count(tables) // self.push_batch
        sending = self.outbox.count(tables) if push_streams else 0
        left: list[Path] = []
        ahead: NumberAhead | None = None
        for round_ in range(rounds):
            # The batch numbered while the server applied the last one, or a fresh one.
            mutations = ahead.next_batch() if ahead is not None else []
            if not mutations and push_streams:
                mutations = self.outbox.prepare(push_streams, self.push_batch)
            ahead = None
            if mutations:
                self._feed.sending(unit_name, len(mutations), sending)
                self._status_changed()
                if self.pipeline and round_ + 1 < rounds:
                    ahead = NumberAhead(self.outbox, push_streams, self.push_batch)
            complete, chunks = self._request(
                unit_name, unit, catalog, mutations, result, params, ahead=ahead
            )
            if catalog is None:  # the first response brought it: continue with its cursors
                catalog = self.store.catalog()
                unit = None if catalog is None else catalog.unit(unit_name)
            if self._offers:
                # Large first copies came as files: apply them, then a delta from there.
                offers, self._offers = self._offers, []
                left = bootstrap.apply_offers(self, offers, result)
                catalog = self.store.catalog()
                unit = None if catalog is None else catalog.unit(unit_name)
                complete, chunks = self._request(
                    unit_name, unit, catalog, [], result, params, snapshots=not left
                )
                if self._offers:
                    raise ProtocolError("the server offered a snapshot again after one failed")
            idle = 0
            while not complete:
                # The server ends a response after a bounded time: continue from the
                # cursors just stored. Responses that bring nothing, again and again,
                # mean something is wrong: give up (the next run resumes).
                idle = 0 if chunks else idle + 1
                if idle >= MAX_IDLE_CONTINUATIONS:
                    raise NetworkError(
                        f"the server ended {idle} responses of {unit_name!r} early without"
                        " sending anything; applied chunks are kept"
                    )
                complete, chunks = self._request(
                    unit_name, unit, catalog, [], result, params, snapshots=False
                )
            for part in left:  # copied row by row instead: a cut download is not resumed
                part.unlink(missing_ok=True)
            if not push_streams or not self.outbox.count(tables):
                break

    def _forget_unit(self, unit_name: str, catalog: Catalog) -> None:
        """The principal may no longer run ``unit_name``: remove what its streams brought.

        Rows with local changes not yet pushed stay (with their outbox entries);
        the streams' cursors go, so a unit still allowed later downloads afresh.
        """
        unit = catalog.unit(unit_name)
        for name in unit.streams if unit is not None else []:
            info = catalog.stream(name)
            if info is None:
                continue
            # complete: applied in place at once (an incomplete reset would go to a shadow table)
            empty = Chunk(
                stream=name, columns=[], data=[], removed=[], cursor="", reset=True, complete=True
            )
            self.store.apply_chunk(info, empty)
            with self.store.atomic() as c:
                c.execute("DELETE FROM syncunit_cursors WHERE stream = ?", (name,))
        log.info("unit %r is no longer allowed: its local rows were removed", unit_name)

    def _request(
        self,
        unit_name: str,
        unit: UnitInfo | None,
        catalog: Catalog | None,
        mutations: list[Mutation],
        result: SyncResult,
        params: Mapping[str, Any] | None = None,
        *,
        snapshots: bool = True,
        ahead: NumberAhead | None = None,
    ) -> tuple[bool, int]:
        """One request; returns whether the server completed the run, and the chunks it sent.

        ``ahead`` numbers the next batch in a thread while this request is on its
        way and the server applies it; it is done before the response is read.
        """
        stream_names = unit.streams if unit is not None and unit.direction != "push" else []
        self._offers = []
        holder = subscription_id(unit_name, params) if params else None
        if not stream_names:
            cursors = {}
        elif holder:
            cursors = self.store.subscription_cursors(holder, stream_names)
        else:
            cursors = self.store.cursors(stream_names)
        request = SyncRequest(
            protocol=PROTOCOL_VERSION,
            client_id=self.client_id,
            schema_hash="" if catalog is None else catalog.schema_hash,
            cursors=cursors,
            mutations=mutations,
            chunk_size=self.chunk_size,
            snapshots=self.snapshots and snapshots and not holder,
            params=dict(params or {}),
            subscriptions=self._held(unit_name, catalog) if stream_names else [],
        )
        body = encode_request(request, self.encoding)
        with ahead if ahead is not None else contextlib.nullcontext():
            response = self._post(unit_name, body, len(mutations), result)
        try:
            return self._read_frames(response, catalog, result, holder)
        finally:
            result.bytes_in += response.num_bytes_downloaded
            response.close()

    def _post(
        self, unit_name: str, body: bytes, mutations: int, result: SyncResult
    ) -> httpx.Response:
        headers = {
            "Content-Type": content_type(self.encoding),
            "Accept": content_type(self.encoding),
        }
        if len(body) > COMPRESS_ABOVE:
            body = gzip.compress(body, compresslevel=5, mtime=0)
            headers["Content-Encoding"] = "gzip"
        result.bytes_out += len(body)
        result.rows_out += mutations
        result.requests += 1
        return self._send("POST", f"/v1/sync/{unit_name}", content=body, headers=headers)

    def _read_frames(
        self,
        response: httpx.Response,
        catalog: Catalog | None,
        result: SyncResult,
        holder: str | None = None,
    ) -> tuple[bool, int]:
        deferred: dict[str, StreamInfo] = {}  # streams whose indexes wait for the copy's end
        try:
            with self.store.bulk():
                end, chunks = self._apply_frames(response, catalog, result, deferred, holder)
        except httpx.HTTPError as exc:
            raise NetworkError(f"the sync of {result.unit!r} was cut: {exc}") from exc
        finally:
            for info in deferred.values():
                self.store.restore_indexes(info)
        if end is None:
            raise NetworkError(
                f"the sync of {result.unit!r} ended early; applied chunks are kept and"
                " the next run resumes from the last one"
            )
        return end.complete, chunks

    def _apply_frames(
        self,
        response: httpx.Response,
        catalog: Catalog | None,
        result: SyncResult,
        deferred: dict[str, StreamInfo],
        holder: str | None = None,
    ) -> tuple[End | None, int]:
        """Apply frames as they arrive; return the response's end frame (None: it was
        cut) and how many chunks it brought.

        A reader thread receives and decodes the next frames while this thread
        writes the current chunk into SQLite (which runs without the GIL).
        """
        total = done = chunks = 0
        # A full stream is replaced whole: its chunks apply in one local transaction,
        # opened at its start and committed with its last chunk (or rolled back).
        whole = contextlib.ExitStack()
        with whole, FramePrefetch(response, self.encoding) as frames:
            for frame in frames:
                if self._cancel.is_set():
                    raise SyncError("the sync was cancelled by close(); applied chunks are kept")
                if isinstance(frame, CatalogFrame):
                    # A first sync, or the server's schema changed: migrate, then apply.
                    catalog = frame.catalog
                    self.store.apply_catalog(catalog)
                    continue
                if isinstance(frame, End):
                    return frame, chunks
                if isinstance(frame, Failure):
                    raise problem_error(frame.status, frame.code, frame.title, frame.detail)
                if catalog is None:
                    raise ProtocolError("the server sent changes before its catalog")
                if isinstance(frame, Chunk):
                    chunks += 1
                    info = catalog.stream(frame.stream)
                    if info is None:
                        raise ProtocolError(f"server sent unknown stream {frame.stream!r}")
                    sub = frame.subscription or holder
                    upserted, removed = (
                        self.store.apply_chunk(info, frame, sub)
                        if sub
                        else self.store.apply_chunk(info, frame)
                    )
                    t = info.local_table
                    result.rows_in[t] = result.rows_in.get(t, 0) + upserted
                    result.rows_removed[t] = result.rows_removed.get(t, 0) + removed
                    if frame.reset:
                        result.resets.append(frame.stream)
                    done += upserted + len(frame.removed)
                    if frame.complete:
                        whole.close()
                        if frame.stream in deferred:
                            self.store.restore_indexes(deferred.pop(frame.stream))
                    self._emit(self.on_progress, result.unit, done, max(total, done))
                    self._feed.downloaded(result.unit, done, total)
                    self._status_changed()
                elif isinstance(frame, StreamStart):
                    total += frame.total
                    info = catalog.stream(frame.stream)
                    if info is not None and info.mode == "full" and frame.reset:
                        whole.enter_context(self.store.atomic())
                    if (
                        frame.copy
                        and frame.total >= DEFER_INDEXES_ABOVE
                        and info is not None
                        and self.store.suspend_indexes(info)
                    ):
                        deferred[frame.stream] = info
                    self._emit(self.on_progress, result.unit, done, total)
                elif isinstance(frame, PushResults):
                    self._on_push_results(frame, catalog, result)
                elif isinstance(frame, SnapshotOffer):
                    self._offers.append(frame)
        return None, chunks

    def _on_push_results(self, frame: PushResults, catalog: Catalog, result: SyncResult) -> None:
        if self.store.get_fact("bound") != self.client_id:
            # The server has bound this session to its principal: parked later, its
            # changes can be offered to whoever logs in (the server refuses others).
            with self.store.atomic():
                self.store.set_fact("bound", self.client_id)
        applied, kept = self.outbox.complete(frame, catalog.streams)
        if self._feed.upload is not None:
            self._feed.answered(len(frame.results))
            self._status_changed()
        result.applied += applied
        for change in kept:
            target = result.conflicts if change.status == "conflict" else result.rejected
            target.append(change.to_dict())

    # -- http -------------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        provider = self._token_provider
        if provider is not None and "Authorization" not in self.http.headers:
            self._ask_token(provider)
        try:
            return self._send_once(method, path, **kwargs)
        except AuthError as exc:
            if exc.status != 401 or provider is None:
                raise
        self._ask_token(provider)  # expired: ask again, once
        return self._send_once(method, path, **kwargs)

    def _ask_token(self, provider: TokenProvider) -> None:
        try:
            token = provider()
        except Exception as exc:
            raise AuthError(401, "token-provider", "the token provider failed", str(exc)) from exc
        self.http.headers["Authorization"] = f"Bearer {token}"

    def _send_once(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self._cancel.is_set():
            raise SyncError("the client is closing")
        try:
            request = self.http.build_request(method, path, **kwargs)
            response = self.http.send(request, stream=True)
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: closed by close()
            raise NetworkError(f"cannot reach the server: {exc}") from exc
        if response.status_code >= 400:
            try:
                body = response.read()
            except httpx.HTTPError as exc:
                raise NetworkError(f"the server's error response was cut: {exc}") from exc
            finally:
                response.close()
            problem = decode_problem(body)
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
            raise problem_error(
                problem.status, problem.code, problem.title, problem.detail, **extra
            )
        return response


@contextmanager
def _translated(what: str, errors: tuple[type[Exception], ...]) -> Iterator[None]:
    """Driver errors of an app write become ``LocalStoreError`` (nothing was written)."""
    try:
        yield
    except errors as exc:
        raise LocalStoreError(f"{what}: {exc}") from exc
