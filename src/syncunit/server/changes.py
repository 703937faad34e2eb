"""Reading a stream's changes since a cursor, as bounded chunks.

For a delta stream the server works in passes. A first copy (``full``) walks
the rows in scope in key order. Later passes send, since the cursor's version:

1. **removals**: keys that were in the client's scope at some moment since the
   cursor and are not now, proven from tombstones' old values along the
   filter's join paths (``removals``), streamed in key order;
2. **upserts**: rows in scope whose own version, or the version of any joined
   row, is newer (``shape``); in keyset order on (effective version, key), so
   chunk borders neither skip nor repeat ties.

Both phases are streamed in chunks and resumable after any of them; memory is
bounded by the chunk size. Queries are planned per stream shape in ``shape``
and go through the scope's indexes, so a delta costs the changes in scope. A
full stream (an aggregate) is sent, in chunks, only when a hash of its rows
differs from the client's.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import itertools
import json
import logging
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnClause, ColumnElement

from syncunit.protocol import Chunk, StreamStart
from syncunit.server.cursor import Cursor, decode_cursor, encode_cursor
from syncunit.server.removals import old_images, removal_keys
from syncunit.server.shape import StreamShape
from syncunit.server.store import ServerStore, tombstones
from syncunit.units import VERSION, Stream, logical_type

log = logging.getLogger("syncunit.server")

MAX_FULL_STREAM_ROWS = 100_000
#: A first copy walks the base table in key order (from its resume key) when the
#: scope is at least 1/N of the rows that walk reads; a smaller scope is found
#: through the filter's index and sorted.
FULL_SCAN_SHARE = 4
#: A delta whose base table changed in at most this many rows since the cursor (all
#: scopes together) finds the changed rows through the version index alone, rather
#: than through the pinned scope's (scope column, version) index: a few entries at
#: the index's end cost less than one seek per pinned key (a hospital's doctors),
#: whose B-trees deepen with the table. Past it, other scopes' writes would cost.
FEW_CHANGES = 500


_decode_row = msgspec.json.Decoder(list[Any]).decode


def _iso(v: Any) -> Any:
    # Text as it is: PostgreSQL's for a value Python cannot hold ('infinity').
    return v if v is None or isinstance(v, str) else v.isoformat()


def _str(v: Any) -> Any:
    return str(v) if v is not None else None


def _json(v: Any) -> Any:
    return json.dumps(v) if v is not None else None


def _duration(v: Any) -> Any:
    return msgspec.to_builtins(v) if v is not None else None  # ISO 8601: 'P1DT7200S'


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "datetime": _iso,
    "date": _iso,
    "time": _iso,
    "interval": _duration,
    "decimal": _str,
    "uuid": _str,
    "json": _json,
}


def _enum_label(type_: sa.Enum) -> Callable[[Any], Any]:
    """A Python enum's member as the label its column stores (its name, unless
    ``values_callable`` says otherwise), which a device writes back: not its value."""
    labels = type_._valid_lookup
    return lambda v: labels.get(v, v)


def wire_converters(stream: Stream) -> list[tuple[int, Callable[[Any], Any]]]:
    """Per column of ``stream`` (by position) whose values do not travel as the
    database driver reads them, the function that makes them travel (an ISO date, a
    decimal's text, a duration's ISO 8601 text, JSON as text, an enum's label): every
    row the server sends goes through them."""
    out = []
    for i, expr in enumerate(stream.columns.values()):
        if (lt := logical_type(expr.type)) in _CONVERTERS:
            out.append((i, _CONVERTERS[lt]))
        elif isinstance(expr.type, sa.Enum) and expr.type.enum_class is not None:
            out.append((i, _enum_label(expr.type)))
    return out


def to_wire(value: Any) -> Any:
    """One server value as it travels and is stored locally."""
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, dt.timedelta):
        return msgspec.to_builtins(value)
    return value


SINCE, AFTER_EV, AFTER_KEY = "syncunit_since", "syncunit_after_ev", "syncunit_after_key"
KEYS = "syncunit_keys"
#: On PostgreSQL a delta with at most this many candidate keys reads them first and
#: its rows by those keys: the planner cannot estimate the candidates' union (it
#: guessed 110,000 rows for 100 at 100k) and would hash-join the whole scope.
KEYED_CANDIDATES = 1000


@dataclass(frozen=True)
class _DeltaQueries:
    removals: sa.Select[Any]
    removals_after: sa.Select[Any]
    upserts: sa.Select[Any]
    upserts_after: sa.Select[Any]
    count: sa.Select[Any]
    count_after: sa.Select[Any]
    #: Up to ``KEYED_CANDIDATES + 1`` candidate keys, and the upserts by those keys.
    candidates: sa.Select[Any] | None = None
    keyed: _DeltaQueries | None = None


def params_hash(stream: Stream, params: Mapping[str, Any]) -> str:
    used = {k: to_wire(params.get(k)) for k in stream.parameters}
    return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:16]


class StreamReader:
    """Reads one stream for one principal; yields ``StreamStart`` then ``Chunk`` frames."""

    def __init__(
        self,
        store: ServerStore,
        stream: Stream,
        params: Mapping[str, Any],
        *,
        chunk_size: int,
        json_rows: bool = False,
    ) -> None:
        self.store = store
        self.stream = stream
        self.params = {k: params[k] for k in stream.parameters}
        self.chunk_size = chunk_size
        self.phash = params_hash(stream, params)
        self.shape = StreamShape(stream)
        self.columns = list(stream.columns)
        self.converters = wire_converters(stream)
        # Where the store can read every column raw, rows skip SQLAlchemy's result
        # processing (and datetimes their parse and format round trip).
        raw = [store.raw_column(expr) for expr in stream.columns.values()]
        self.raw = stream.mode == "delta" and all(r is not None for r in raw)
        self.plain = [expr.label(name) for name, expr in stream.columns.items()]
        self.selected = [
            (r if self.raw and r is not None else expr).label(name)
            for (name, expr), r in zip(stream.columns.items(), raw, strict=True)
        ]
        #: A first copy's rows as one JSON text per chunk, written by the database (for
        #: a client that asked, ``json_rows``, on a store that can): no Python object
        #: per value on the server. None: rows are read as tuples.
        self.json_row = (
            store.json_row([r for r in raw if r is not None]) if json_rows and self.raw else None
        )

    # -- entry point ---------------------------------------------------------------

    def frames(
        self, conn: Connection, watermark: int, epoch: str, horizon: int, token: str | None
    ) -> Generator[StreamStart | Chunk, None, None]:
        s = self.stream
        cur = decode_cursor(token)
        valid = self._valid(conn, cur, watermark, epoch, horizon)
        if s.mode == "full":
            yield from self._full_stream(conn, epoch, cur if valid else None)
            return
        reset = token is not None and not valid
        if not valid or cur is None:
            cur = self._cursor(epoch, "full", since=None, high=watermark)
        elif cur.phase == "done":
            if cur.since == watermark:
                yield StreamStart(stream=s.name, total=0, reset=False)
                yield self._chunk([], [], cur, complete=True)
                return
            cur = self._cursor(epoch, "removals", since=cur.since, high=watermark)
        # A pass resumed from an earlier request began at an older watermark: rows
        # behind its keyset position may have changed, been deleted or left the
        # scope since. Finish it, then catch up to this snapshot with a delta pass.
        catch_up = cur.high < watermark
        if cur.phase == "full":
            yield from self._full_pass(conn, cur, reset, final=not catch_up)
        else:
            yield from self._delta_pass(conn, cur, final=not catch_up)
        if catch_up:
            since = self._cursor(epoch, "removals", since=cur.high, high=watermark)
            yield from self._delta_pass(conn, since)

    def continues(
        self, conn: Connection, token: str | None, watermark: int, epoch: str, horizon: int
    ) -> bool:
        """Whether the cursor ``token`` is valid here: same definition, scope and epoch,
        and still within the stream's tombstones (else the stream copies afresh)."""
        return self._valid(conn, decode_cursor(token), watermark, epoch, horizon)

    def _valid(
        self, conn: Connection, cur: Cursor | None, watermark: int, epoch: str, horizon: int
    ) -> bool:
        """Whether ``cur`` can be continued here (else the stream is copied afresh)."""
        s = self.stream
        if cur is None or (cur.epoch, cur.definition, cur.params) != (
            epoch,
            s.definition_hash,
            self.phash,
        ):
            return False
        if s.mode == "full":
            return True
        # Tombstones above ``since`` (or, for a first copy, above ``high``, where its
        # catch-up starts) must still exist, and keep every column the removals read;
        # a cursor ahead of this database comes from another copy of it.
        # Rows created before creation stamps were kept must not be paired with
        # tombstones from before then (an upgrade's transition).
        tracked, stamped = self.store.stream_horizon(conn, s)
        horizon = max(horizon, tracked)
        low = cur.high if cur.since is None else cur.since
        return (
            cur.phase in ("full", "removals", "upserts", "done")
            and horizon <= low <= cur.high <= watermark
            and (
                stamped is None
                or low >= stamped
                or self.store.creation_proven(conn, s, low, stamped)
            )
        )

    def _cursor(self, epoch: str, phase: Any, **kw: Any) -> Cursor:
        return Cursor(epoch, self.stream.definition_hash, self.phash, phase, **kw)

    # -- queries ---------------------------------------------------------------------

    def rows_select(self, *, drive_by_base: bool = False, raw: bool = False) -> sa.Select[Any]:
        """The stream's rows (see ``StreamShape.rows``); ``raw`` selects the store's raw
        forms of the columns (what ``_partitions`` reads from the cursor)."""
        return self.shape.rows(self.selected if raw else self.plain, drive_by_base=drive_by_base)

    def _effective_version(self) -> ColumnElement[Any]:
        return self.shape.effective_version(self.store.greatest)

    def _candidates(
        self, since: Any, *, pinned: bool = True, key: ColumnElement[Any] | None = None
    ) -> sa.CompoundSelect[Any]:
        def images(table: sa.Table) -> Any:
            return old_images(self.store, self.shape, table, since, "joined")

        return self.shape.candidates(
            since, images, pinned=pinned, key=key, each_key=self.store.pins_each_key
        )

    def _rowid(self, conn: Connection) -> ColumnElement[Any] | None:
        """On SQLite, the base table's ``rowid`` (None for a ``WITHOUT ROWID`` table,
        or on another database). Changed rows found and read by it cost one B-tree
        each, where a key that is not the rowid (text, say) costs its index and then
        the table: about a third of a delta's page reads in a large table."""
        if self.store.dialect != "sqlite":
            return None
        base = self.stream.base
        cache_key = ("rowid", base.name)
        has = self.store.query_cache.get(cache_key)
        if has is None:
            try:
                conn.exec_driver_sql(f'SELECT rowid FROM "{base.name}" LIMIT 0').all()
                has = True
            except sa.exc.OperationalError:
                has = False
            self.store.query_cache[cache_key] = has
        return ColumnClause("rowid", sa.Integer, _selectable=base) if has else None

    def _few_changes(self, conn: Connection, since: int) -> bool:
        """Whether the base table changed in at most ``FEW_CHANGES`` rows since ``since``
        (read from the version index); always False for a stream without a pinned
        scope, whose candidates come by version anyway."""
        if self.shape.driver is None:
            return False
        version = self.stream.base.c[VERSION]
        return self._at_most_few(
            conn, since, ("few", self.stream.base.name), lambda after: version > after
        )

    def _few_tombstones(self, conn: Connection, since: int) -> bool:
        """Whether the filter's tables have at most ``FEW_CHANGES`` tombstones since
        ``since`` (read from the (table, version) index); asked only of a store that
        reads the pinned scope key by key (``pins_each_key``), where a seek per
        pinned key costs more than reading a few tombstones. False otherwise: the
        removals read through the scope."""
        if self.shape.driver is None or not self.store.pins_each_key:
            return False

        def recent(after: Any) -> ColumnElement[bool]:
            names = [t.name for t in self.shape.filter_tables()]
            return sa.and_(tombstones.c.table_name.in_(names), tombstones.c.version > after)

        s = self.stream
        return self._at_most_few(conn, since, ("few tombstones", s.name, s.definition_hash), recent)

    def _at_most_few(
        self,
        conn: Connection,
        since: int,
        key: tuple[str, ...],
        recent: Callable[[Any], ColumnElement[bool]],
    ) -> bool:
        """Whether at most ``FEW_CHANGES`` rows meet ``recent(since)``, reading at most
        one more; the probe is built (``recent`` called) once per ``key``, ``since``
        bound."""
        probe = self.store.query_cache.get(key)
        if probe is None:
            after = sa.bindparam(SINCE, type_=sa.BigInteger)
            rows = sa.select(sa.literal(1)).where(recent(after)).limit(FEW_CHANGES + 1)
            probe = sa.select(sa.func.count()).select_from(rows.subquery())
            self.store.query_cache[key] = probe
        return bool(conn.execute(probe, {SINCE: since}).scalar_one() <= FEW_CHANGES)

    def _removals(self, since: Any, after: Any, *, restricted: bool = True) -> sa.Select[Any]:
        in_scope = self.rows_select(drive_by_base=True)
        return removal_keys(self.store, self.shape, in_scope, since, after, restricted=restricted)

    # -- passes ----------------------------------------------------------------------

    def _full_pass(
        self, conn: Connection, cur: Cursor, reset: bool, *, final: bool = True
    ) -> Iterator[Any]:
        """A first copy in key order, resumable after any chunk."""
        pk = self.stream.key_column
        self.store.before_long_read(conn)  # the walk reads the whole scope
        # The scope's size comes from its index alone. Rows of the table past the key
        # are what a walk in key order reads: all of them for a new copy, the rest of
        # the key range for a resumed one.
        scope = conn.execute(self.shape.count(), self.params).scalar_one()
        ahead = sa.select(sa.func.count()).select_from(self.stream.base)
        if cur.after:
            ahead = ahead.where(pk > cur.after[0])
        # Most of what a key-order walk reads is in scope: walk (no sort, rows stream at
        # once). A small scope: let the filter's index find it, then sort it.
        drive = scope * FULL_SCAN_SHARE >= conn.execute(ahead).scalar_one()
        q = self.rows_select(drive_by_base=drive, raw=True)
        total = scope
        if cur.after:
            q = q.where(pk > cur.after[0])
            # The rows left, counted along the path that reads them: with the key in the
            # filter, the scope's index alone would not do (a read of the whole scope).
            left = sa.select(sa.func.count()).select_from(q.subquery())
            total = conn.execute(left, self.params).scalar_one()
        yield StreamStart(stream=self.stream.name, total=total, reset=reset, copy=True)
        sent = False
        for rows, text, count, last in self._copy_rows(conn, q, pk):
            cur = msgspec.structs.replace(cur, after=[last])
            yield self._chunk(rows, [], cur, reset=reset and not sent, json=(text, count))
            sent = True
        done = self._cursor(cur.epoch, "done", since=cur.high, high=cur.high)
        yield self._chunk([], [], done, reset=reset and not sent, complete=final)

    def _copy_rows(
        self, conn: Connection, q: sa.Select[Any], pk: ColumnElement[Any]
    ) -> Iterator[tuple[Sequence[Any], str, int, Any]]:
        """A first copy's rows in key order, chunk by chunk, each as ``(rows, json text,
        rows in the text, last key)``: tuples and no text, or the store's JSON and no
        tuples. A value the JSON cannot carry exactly ends the JSON read; the rest of
        the copy then comes as tuples, from the last key sent."""
        key_index = self.columns.index(self.stream.key)
        if self.json_row is not None:
            as_json = q.with_only_columns(self.json_row, maintain_column_froms=True)
            last: Any = None
            try:
                for rows in self._partitions(conn, as_json.order_by(pk), raw=True):
                    last = _decode_row(rows[-1][0])[key_index]
                    yield (), "[" + ",".join([r[0] for r in rows]) + "]", len(rows), last
                return
            except Exception as exc:
                if not self.store.json_row_refused(exc):
                    raise
                log.info("%s: a value JSON cannot carry exactly, rows as tuples", self.stream.name)
            if last is not None:
                q = q.where(pk > last)
        for rows in self._partitions(conn, q.order_by(pk)):
            yield rows, "", 0, rows[-1][key_index]

    def _delta_queries(
        self,
        *,
        pinned: bool = True,
        rowid: ColumnElement[Any] | None = None,
        restricted: bool = True,
    ) -> _DeltaQueries:
        """The stream's delta statements, built once per store with bind parameters
        (SQLAlchemy then reuses their compiled form; a delta costs its SQL only).

        ``pinned=False``: the base table's own changed rows come from its version
        index rather than through the pinned scope (``FEW_CHANGES``); the scope
        filter still selects the rows, so both give the same rows in the same order.
        ``rowid``: the changed rows are found and read by it (``_rowid``).
        ``restricted=False``: the removals read every tombstone of the filter's
        tables since the cursor rather than through the pinned scope
        (``_few_tombstones``); the same keys either way.
        """
        cache_key = (
            "delta",
            self.stream.name,
            self.stream.definition_hash,
            pinned,
            rowid is not None,
            restricted,
        )
        queries = self.store.query_cache.get(cache_key)
        if queries is None:
            s = self.stream
            since = sa.bindparam(SINCE, type_=sa.BigInteger)
            ev = self._effective_version()
            upserts = (
                self.rows_select(drive_by_base=True, raw=True)
                .add_columns(ev.label("_ev"))
                .where(
                    (s.key_column if rowid is None else rowid).in_(
                        self._candidates(since, pinned=pinned, key=rowid)
                    )
                )
            )
            after_ev = sa.bindparam(AFTER_EV, type_=sa.BigInteger)
            after_key = sa.bindparam(AFTER_KEY, type_=s.key_column.type)

            removals = self._removals(since, None, restricted=restricted)
            removals_after = self._removals(since, after_key, restricted=restricted)

            def queries_of(rows: sa.Select[Any], **more: Any) -> _DeltaQueries:
                resumed = rows.where(
                    sa.or_(ev > after_ev, sa.and_(ev == after_ev, s.key_column > after_key))
                )
                return _DeltaQueries(
                    removals=removals,
                    removals_after=removals_after,
                    upserts=rows.order_by(ev, s.key_column),
                    upserts_after=resumed.order_by(ev, s.key_column),
                    count=sa.select(sa.func.count()).select_from(rows.subquery()),
                    count_after=sa.select(sa.func.count()).select_from(resumed.subquery()),
                    **more,
                )

            queries = queries_of(upserts)
            if self.store.dialect == "postgresql":
                by_keys = (
                    self.rows_select(drive_by_base=True, raw=True)
                    .add_columns(ev.label("_ev"))
                    .where(s.key_column.in_(sa.bindparam(KEYS, expanding=True)))
                )
                found = self._candidates(since, pinned=pinned).subquery()
                queries = queries_of(
                    upserts,
                    candidates=sa.select(found.c[0]).limit(KEYED_CANDIDATES + 1),
                    keyed=queries_of(by_keys),
                )
            self.store.query_cache[cache_key] = queries
        return queries

    def _delta_pass(self, conn: Connection, cur: Cursor, *, final: bool = True) -> Iterator[Any]:
        """Removals, then upserts, each streamed in chunks and resumable after any."""
        s = self.stream
        since = cur.since or 0
        q = self._delta_queries(
            pinned=not self._few_changes(conn, since),
            rowid=self._rowid(conn),
            restricted=not self._few_tombstones(conn, since),
        )
        params: dict[str, Any] = {**self.params, SINCE: since}
        if q.candidates is not None and q.keyed is not None:
            found = list(conn.execute(q.candidates, params).scalars())
            if len(found) <= KEYED_CANDIDATES:  # the same keys, in the same snapshot
                q, params = q.keyed, {**params, KEYS: found}
        gone_iter: Iterator[Sequence[Any]] = iter(())
        if cur.phase == "removals":
            removals, gone_params = q.removals, params
            if cur.after:
                removals, gone_params = q.removals_after, {**params, AFTER_KEY: cur.after[0]}
            gone_iter = self._partitions(conn, removals, gone_params, raw=False)
        upserts, count, up_params = q.upserts, q.count, params
        if cur.phase == "upserts" and cur.after:
            upserts, count = q.upserts_after, q.count_after
            up_params = {**params, AFTER_EV: cur.after[0], AFTER_KEY: cur.after[1]}
        first_gone = next(gone_iter, None)
        rows_iter = self._partitions(conn, upserts, up_params)
        first = next(rows_iter, None)
        # The total, for progress: counted only when a phase has more than one chunk.
        total = 0
        if first_gone is not None:
            total += len(first_gone)
            if len(first_gone) == self.chunk_size:
                counted = sa.select(sa.func.count()).select_from(
                    (q.removals_after if cur.phase == "removals" and cur.after else q.removals)
                    .order_by(None)
                    .subquery()
                )
                total = conn.execute(counted, gone_params).scalar_one()
        if first is not None:
            more = len(first) == self.chunk_size
            total += conn.execute(count, up_params).scalar_one() if more else len(first)
        yield StreamStart(stream=s.name, total=total, reset=False)
        for keys in itertools.chain([first_gone] if first_gone is not None else [], gone_iter):
            part = [k[0] for k in keys]
            cur = msgspec.structs.replace(cur, phase="removals", after=[part[-1]])
            yield self._chunk([], part, cur)
        cur = msgspec.structs.replace(
            cur, phase="upserts", after=cur.after if cur.phase == "upserts" else None
        )
        key_index = self.columns.index(s.key)
        for rows in itertools.chain([first] if first is not None else [], rows_iter):
            last = rows[-1]
            cur = msgspec.structs.replace(cur, after=[last[-1], last[key_index]])
            yield self._chunk([r[:-1] for r in rows], [], cur)
        done = self._cursor(cur.epoch, "done", since=cur.high, high=cur.high)
        yield self._chunk([], [], done, complete=final)

    def has_changes(
        self, conn: Connection, watermark: int, epoch: str, horizon: int, token: str | None
    ) -> bool:
        """Whether a sync with ``token`` would bring anything: a reset, a first copy, or a
        change in scope. Reads at most one row of each delta query (for live waiters)."""
        s = self.stream
        cur = decode_cursor(token)
        if s.mode == "full" or cur is None or cur.phase != "done":
            # A full stream is compared whole; a pass under way has more to send.
            frames = self.frames(conn, watermark, epoch, horizon, token)
            try:
                start = next(frames, None)
            finally:
                frames.close()  # its open cursor, before the snapshot ends
            return isinstance(start, StreamStart) and (start.total > 0 or start.reset)
        if not self._valid(conn, cur, watermark, epoch, horizon):
            return True  # a reset
        if cur.since == watermark:
            return False
        q = self._delta_queries()
        params = {**self.params, SINCE: cur.since or 0}
        for query in (q.removals, q.upserts):
            if conn.execute(query.limit(1), params).first() is not None:
                return True
        return False

    def _full_stream(self, conn: Connection, epoch: str, cur: Cursor | None) -> Iterator[Any]:
        """Compare a hash of the rows with the client's; send them all, in chunks, if
        they differ. The client applies a full stream's chunks in one transaction.

        A copy that a response ended early (or a cut) left part-way is resumed
        after the rows sent, if the rows still hash the same; else it starts
        again, whole (``reset``). Rows come in key order, so their order, and the
        hash, do not depend on the plan.
        """
        s = self.stream
        query = self._full_query()
        digest = hashlib.sha256()
        rows_seen = 0
        key = list(s.columns).index(s.key)
        for rows in self._partitions(conn, query):
            rows_seen += len(rows)
            if rows_seen > MAX_FULL_STREAM_ROWS:
                raise ValueError(
                    f"full stream {s.name!r} has more than {MAX_FULL_STREAM_ROWS} rows;"
                    " declare it as a delta stream"
                )
            columns = self._columnar(rows)
            if None in columns[key]:
                # Checked before a row is sent: a device would keep NULL-keyed rows apart
                # from every update, so the stream fails instead, and says what to change.
                raise ValueError(
                    f"full stream {s.name!r}: a row has a NULL key {s.key!r}; filter such"
                    f" rows out (WHERE ... IS NOT NULL) or key the stream on a column"
                    " that is never NULL"
                )
            for row in zip(*columns, strict=True):  # chunk size does not matter
                digest.update(msgspec.msgpack.encode(row))
        content = digest.hexdigest()[:24]
        if cur is not None and cur.phase == "content" and cur.content == content:
            yield StreamStart(stream=s.name, total=0, reset=False)
            yield self._chunk([], [], cur, complete=True)
            return
        skip = 0  # rows the client has of this very content (a copy under way)
        if cur is not None and cur.phase == "copy" and cur.content == content and cur.after:
            skip = cur.after[0] if 0 < cur.after[0] < rows_seen else 0
        reset = skip == 0
        new = self._cursor(epoch, "content", content=content)
        yield StreamStart(stream=s.name, total=rows_seen - skip, reset=reset)
        sent = 0
        for rows in self._partitions(conn, query):
            before, sent = sent, sent + len(rows)
            if sent <= skip:
                continue
            part = rows[skip - before :] if before < skip else rows
            # Until the last row, the cursor says how far the copy got: a response
            # ended early continues from there, and the copy is never taken as whole.
            at = (
                new
                if sent == rows_seen
                else self._cursor(epoch, "copy", content=content, after=[sent])
            )
            first = reset and before == 0
            yield self._chunk(part, [], at, reset=first, complete=sent == rows_seen)
        if rows_seen == 0:
            yield self._chunk([], [], new, reset=True, complete=True)

    def _full_query(self) -> sa.Select[Any]:
        """A full stream's query, its rows in key order."""
        s = self.stream
        assert s.query is not None
        cache_key = ("full", s.name, s.definition_hash)
        query = self.store.query_cache.get(cache_key)
        if query is None:
            rows = s.query.subquery()
            query = sa.select(*rows.c).order_by(rows.c[s.key])
            self.store.query_cache[cache_key] = query
        return query

    # -- frames ----------------------------------------------------------------------

    def _partitions(
        self,
        conn: Connection,
        query: sa.Select[Any],
        params: Mapping[str, Any] | None = None,
        *,
        raw: bool | None = None,
    ) -> Iterator[Sequence[Any]]:
        """The query's rows in batches of ``chunk_size``, never all in memory."""
        params = self.params if params is None else params
        if self.raw if raw is None else raw:
            result = conn.execute(query, params)
            cursor = result.cursor  # the DBAPI cursor: plain tuples, converted by _columnar
            try:
                while rows := cursor.fetchmany(self.chunk_size):
                    yield rows
            finally:
                result.close()
            return
        # Per statement: Connection.execution_options() would stick to the connection.
        result = conn.execute(query, params, execution_options={"yield_per": self.chunk_size})
        cursor = result.cursor
        try:  # a server-side cursor on PostgreSQL: closed even when the reader stops early
            yield from result.partitions(self.chunk_size)
        finally:
            result.close()
            if getattr(cursor, "closed", True) is False:
                # Its connection died: closing it failed (SQLAlchemy logs that and goes
                # on) and left it open, to warn when collected. Again, it sees the
                # connection gone and is only marked closed.
                with suppress(Exception):
                    cursor.close()

    def _columnar(self, rows: Any) -> list[list[Any]]:
        if not rows:
            return []
        data: list[Any] = list(zip(*rows, strict=True))
        if not self.raw:
            for i, conv in self.converters:
                data[i] = [conv(v) for v in data[i]]
        return data

    def _chunk(
        self,
        rows: Any,
        removed: list[Any],
        cur: Cursor,
        *,
        reset: bool = False,
        complete: bool = False,
        json: tuple[str, int] = ("", 0),
    ) -> Chunk:
        return Chunk(
            stream=self.stream.name,
            columns=self.columns if rows or json[1] else [],
            data=self._columnar(rows),
            removed=[to_wire(k) for k in removed],
            cursor=encode_cursor(cur),
            reset=reset,
            complete=complete,
            json_rows=json[0],
            json_count=json[1],
        )
