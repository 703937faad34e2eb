"""Reading a stream's changes since a cursor, as bounded chunks.

For a delta stream the server works in passes. A first copy (``full``) walks
the rows in scope in key order. Later passes send, since the cursor's version:

1. **removals**: keys from tombstones of the base or a joined table (deleted
   rows, and updates of a column a filter or join reads) whose *old* values
   were in the client's scope, unless the row is in scope now;
2. **upserts**: rows in scope whose own version, or the version of any joined
   row, is newer; in keyset order on (effective version, key), so chunk
   borders neither skip nor repeat ties.

Every query is driven by a version index, so a delta costs the changes, not
the table. A full stream (an aggregate) is re-read and sent only when a hash
of its rows differs from the client's.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import itertools
import json
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import BinaryExpression, ColumnElement

from syncunit.protocol import Chunk, StreamStart
from syncunit.server.cursor import Cursor, decode_cursor, encode_cursor
from syncunit.server.store import ServerStore, tombstones
from syncunit.units import VERSION, Join, Stream, logical_type

MAX_FULL_STREAM_ROWS = 100_000
#: A first copy walks the whole base table in key order when at least 1/N of it
#: is in scope; a smaller scope is found through the filter's index and sorted.
FULL_SCAN_SHARE = 4


def _iso(v: Any) -> Any:
    return v.isoformat() if v is not None else None


def _str(v: Any) -> Any:
    return str(v) if v is not None else None


def _json(v: Any) -> Any:
    return json.dumps(v) if v is not None else None


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "datetime": _iso,
    "date": _iso,
    "time": _iso,
    "decimal": _str,
    "uuid": _str,
    "json": _json,
}


def to_wire(value: Any) -> Any:
    """One server value as it travels and is stored locally."""
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    return value


SINCE, AFTER_EV, AFTER_KEY = "syncunit_since", "syncunit_after_ev", "syncunit_after_key"


@dataclass(frozen=True)
class _DeltaQueries:
    removals: sa.Select[Any]
    removals_after: sa.Select[Any]
    upserts: sa.Select[Any]
    upserts_after: sa.Select[Any]
    count: sa.Select[Any]
    count_after: sa.Select[Any]


def _equi_link(join: Join) -> tuple[sa.Column[Any], sa.Column[Any]] | None:
    """For ``ON joined.col = other.col``: (the joined table's column, the other's), or None."""
    on = join.on
    if not isinstance(on, BinaryExpression) or on.operator is not operators.eq:
        return None
    left, right = on.left, on.right
    if not (isinstance(left, sa.Column) and isinstance(right, sa.Column)):
        return None
    if left.table is join.table and right.table is not join.table:
        return left, right
    if right.table is join.table and left.table is not join.table:
        return right, left
    return None


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
    ) -> None:
        self.store = store
        self.stream = stream
        self.params = {k: params[k] for k in stream.parameters}
        self.chunk_size = chunk_size
        self.phash = params_hash(stream, params)
        self.columns = list(stream.columns)
        self.converters: list[tuple[int, Callable[[Any], Any]]] = [
            (i, _CONVERTERS[lt])
            for i, expr in enumerate(stream.columns.values())
            if (lt := logical_type(expr.type)) in _CONVERTERS
        ]
        # Where the store can read every column raw, rows skip SQLAlchemy's result
        # processing (and datetimes their parse and format round trip).
        raw = [store.raw_column(expr) for expr in stream.columns.values()]
        self.raw = stream.mode == "delta" and all(r is not None for r in raw)
        self.plain = [expr.label(name) for name, expr in stream.columns.items()]
        self.selected = [
            (r if self.raw and r is not None else expr).label(name)
            for (name, expr), r in zip(stream.columns.items(), raw, strict=True)
        ]

    # -- entry point ---------------------------------------------------------------

    def frames(
        self, conn: Connection, watermark: int, epoch: str, horizon: int, token: str | None
    ) -> Generator[StreamStart | Chunk, None, None]:
        s = self.stream
        cur = decode_cursor(token)
        valid = (
            cur is not None
            and cur.epoch == epoch
            and cur.definition == s.definition_hash
            and cur.params == self.phash
        )
        if s.mode == "full":
            yield from self._full_stream(conn, epoch, cur if valid else None)
            return
        horizon = max(horizon, self.store.stream_horizon(conn, s))
        if valid and cur is not None:
            # Tombstones above ``since`` (or, for a first copy, above ``high``, where
            # its catch-up starts) must still exist; a cursor ahead of this database
            # comes from another copy of it.
            low = cur.high if cur.since is None else cur.since
            valid = (
                cur.phase in ("full", "removals", "upserts", "done")
                and horizon <= low <= cur.high <= watermark
            )
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

    def _cursor(self, epoch: str, phase: Any, **kw: Any) -> Cursor:
        return Cursor(epoch, self.stream.definition_hash, self.phash, phase, **kw)

    # -- queries ---------------------------------------------------------------------

    def rows_select(self, *, drive_by_base: bool = False, raw: bool = False) -> sa.Select[Any]:
        """The stream's rows. ``drive_by_base`` hides the filter from the planner.

        Wrapped in ``coalesce(filter, false)`` (same rows), the filter can no
        longer turn the outer joins into inner ones and drive the query through a
        joined table's index: the base table stays the outer loop, walked by key
        or reached by key lookups. Deltas (keys from the candidates) and large
        first copies (the key order with no sort) want that. ``raw`` selects the
        store's raw forms of the columns (what ``_partitions`` reads from the cursor).
        """
        s = self.stream
        from_: Any = s.base
        for j in s.joins:
            from_ = from_.outerjoin(j.table, j.on)
        q = sa.select(*(self.selected if raw else self.plain)).select_from(from_)
        if s.where is not None:
            q = q.where(sa.func.coalesce(s.where, sa.false()) if drive_by_base else s.where)
        return q

    def _count_select(self) -> sa.Select[Any]:
        """``count(*)`` of the rows in scope, joining only what the filter reads."""
        s = self.stream
        need: list[sa.Table] = []
        for c in visitors.iterate(s.where) if s.where is not None else ():
            if isinstance(c, sa.Column) and isinstance(c.table, sa.Table) and c.table is not s.base:
                need += [t for t in self._path(c.table) if t not in need]
        from_: Any = s.base
        for j in s.joins:
            if j.table in need:
                from_ = from_.outerjoin(j.table, j.on)
        q = sa.select(sa.func.count()).select_from(from_)
        return q if s.where is None else q.where(s.where)

    def _effective_version(self) -> ColumnElement[Any]:
        return self.store.greatest(*(t.c[VERSION] for t in self.stream.tables))

    def _path(self, target: sa.Table) -> list[sa.Table]:
        """The joined tables needed to reach ``target`` from the base table."""
        by_table = {j.table.name: j for j in self.stream.joins}
        need: list[sa.Table] = []
        todo = [target]
        while todo:
            t = todo.pop()
            if t is self.stream.base or t in need:
                continue
            need.append(t)
            for e in visitors.iterate(by_table[t.name].on):
                if isinstance(e, sa.Column) and isinstance(e.table, sa.Table) and e.table is not t:
                    todo.append(e.table)
        return need

    def _candidates(self, since: Any) -> sa.CompoundSelect[Any]:
        """Keys of base rows whose own row or a joined row changed after ``since``.

        Each part starts from a table's version index. For equi-joins it is a
        chain of ``IN`` subqueries (changed specialties -> their doctors -> their
        appointments), which every planner runs inside out, index by index.
        """
        s = self.stream
        pk = s.key_column
        parts = [sa.select(pk).where(s.base.c[VERSION] > since)]
        by_table = {j.table.name: j for j in s.joins}
        for j in s.joins:
            chain = self._in_chain(j.table, since)
            if chain is not None:
                parts.append(chain)
                continue
            from_: Any = s.base
            for t in reversed(self._path(j.table)):
                from_ = from_.join(t, by_table[t.name].on)
            parts.append(sa.select(pk).select_from(from_).where(j.table.c[VERSION] > since))
        return sa.union(*parts)

    def _in_chain(self, table: sa.Table, since: Any) -> sa.Select[Any] | None:
        """``SELECT key WHERE fk IN (SELECT ... WHERE table.version > since)``, or None
        when a join on the way is not a plain equality."""
        by_table = {j.table.name: j for j in self.stream.joins}
        link = _equi_link(by_table[table.name])
        if link is None:
            return None
        own, parent_col = link
        sub = sa.select(own).where(table.c[VERSION] > since)
        while parent_col.table is not self.stream.base:
            link = _equi_link(by_table[parent_col.table.name])
            if link is None:
                return None
            own, next_parent = link
            sub = sa.select(own).where(parent_col.in_(sub))
            parent_col = next_parent
        return sa.select(self.stream.key_column).where(parent_col.in_(sub))

    def _removals(self, since: Any, after: Any) -> sa.Select[Any]:
        s = self.stream
        pk = s.key_column
        by_table = {j.table.name: j for j in s.joins}
        parts: list[sa.Select[Any]] = []
        # A joined row can only move base rows out of scope if the filter reads it,
        # or reads a table joined through it.
        relevant: set[str] = {s.base.name}
        for c in visitors.iterate(s.where) if s.where is not None else ():
            if isinstance(c, sa.Column) and isinstance(c.table, sa.Table) and c.table is not s.base:
                relevant.update(t.name for t in self._path(c.table))
        for t in s.tables:
            if t.name not in relevant:
                continue
            old = self._old_image(t, since)

            def swap(e: Any, t: sa.Table = t, old: Any = old) -> Any:
                if isinstance(e, sa.Column) and e.table is t:
                    return old.c[e.name]
                return None

            def sub(clause: Any, swap: Any = swap) -> Any:
                return visitors.replacement_traverse(clause, {}, swap)

            if t is s.base:
                from_: Any = old
                lenient: list[ColumnElement[bool]] = []
                for j in s.joins:
                    from_ = from_.outerjoin(j.table, sub(j.on))
                    jpk = next(iter(j.table.primary_key.columns))
                    lenient += [j.table.c[VERSION] > since, jpk.is_(None)]
                cond: Any = sa.true() if s.where is None else sub(s.where)
                if s.where is not None and lenient:
                    cond = sa.or_(cond, *lenient)
                parts.append(sa.select(old.c[pk.name].label("k")).select_from(from_).where(cond))
            else:
                path = self._path(t)
                from_ = s.base
                for jt in reversed(path):
                    target = old if jt is t else jt
                    from_ = from_.join(target, sub(by_table[jt.name].on))
                for j in s.joins:
                    if j.table not in path:
                        from_ = from_.outerjoin(j.table, sub(j.on))
                parts.append(sa.select(pk.label("k")).select_from(from_).where(sub(s.where)))
        gone = sa.union(*parts).subquery("gone")
        in_scope = (
            self.rows_select(drive_by_base=True)
            .with_only_columns(sa.literal(1))
            .where(pk == gone.c.k)
        )
        q = sa.select(gone.c.k).where(~in_scope.exists()).order_by(gone.c.k)
        if after is not None:
            q = q.where(gone.c.k > after)
        return q

    def _old_image(self, table: sa.Table, since: Any) -> Any:
        ts = tombstones.alias(f"ts_{table.name}")
        recorded = self.stream.scope_columns().get(table.name, set())
        cols = [
            self.store.old_value(ts.c.old, c).label(c.name)
            for c in table.columns
            if c.name in recorded or c.primary_key
        ]
        return (
            sa.select(*cols)
            .where(ts.c.table_name == table.name, ts.c.version > since)
            .subquery(f"old_{table.name}")
        )

    # -- passes ----------------------------------------------------------------------

    def _full_pass(
        self, conn: Connection, cur: Cursor, reset: bool, *, final: bool = True
    ) -> Iterator[Any]:
        """A first copy in key order, resumable after any chunk."""
        pk = self.stream.key_column
        counted = self._count_select()
        if cur.after:
            counted = counted.where(pk > cur.after[0])
        total = conn.execute(counted, self.params).scalar_one()
        yield StreamStart(stream=self.stream.name, total=total, reset=reset, copy=True)
        # Most of the table in scope: walk it in key order (no sort, rows stream at
        # once). A small scope: let the filter's index find it, then sort it.
        table_rows = conn.execute(sa.select(sa.func.count()).select_from(self.stream.base))
        drive = total * FULL_SCAN_SHARE >= table_rows.scalar_one()
        q = self.rows_select(drive_by_base=drive, raw=True)
        if cur.after:
            q = q.where(pk > cur.after[0])
        key_index = self.columns.index(self.stream.key)
        sent = False
        for rows in self._partitions(conn, q.order_by(pk)):
            after = [rows[-1][key_index]]
            cur = msgspec.structs.replace(cur, after=after)
            yield self._chunk(rows, [], cur, reset=reset and not sent)
            sent = True
        done = self._cursor(cur.epoch, "done", since=cur.high, high=cur.high)
        yield self._chunk([], [], done, reset=reset and not sent, complete=final)

    def _delta_queries(self) -> _DeltaQueries:
        """The stream's delta statements, built once per store with bind parameters
        (SQLAlchemy then reuses their compiled form; a delta costs its SQL only)."""
        cache_key = ("delta", self.stream.name, self.stream.definition_hash)
        queries = self.store.query_cache.get(cache_key)
        if queries is None:
            s = self.stream
            since = sa.bindparam(SINCE, type_=sa.BigInteger)
            ev = self._effective_version()
            upserts = (
                self.rows_select(drive_by_base=True, raw=True)
                .add_columns(ev.label("_ev"))
                .where(s.key_column.in_(self._candidates(since)))
            )
            after_ev = sa.bindparam(AFTER_EV, type_=sa.BigInteger)
            after_key = sa.bindparam(AFTER_KEY, type_=s.key_column.type)
            resumed = upserts.where(
                sa.or_(ev > after_ev, sa.and_(ev == after_ev, s.key_column > after_key))
            )
            queries = _DeltaQueries(
                removals=self._removals(since, None),
                removals_after=self._removals(since, after_key),
                upserts=upserts.order_by(ev, s.key_column),
                upserts_after=resumed.order_by(ev, s.key_column),
                count=sa.select(sa.func.count()).select_from(upserts.subquery()),
                count_after=sa.select(sa.func.count()).select_from(resumed.subquery()),
            )
            self.store.query_cache[cache_key] = queries
        return queries

    def _delta_pass(self, conn: Connection, cur: Cursor, *, final: bool = True) -> Iterator[Any]:
        s = self.stream
        q = self._delta_queries()
        params: dict[str, Any] = {**self.params, SINCE: cur.since or 0}
        removed_keys: list[Any] = []
        if cur.phase == "removals":
            removals = q.removals
            if cur.after:
                removals, params[AFTER_KEY] = q.removals_after, cur.after[0]
            removed_keys = [r[0] for r in conn.execute(removals, params)]
        upserts, count = q.upserts, q.count
        if cur.phase == "upserts" and cur.after:
            upserts, count = q.upserts_after, q.count_after
            params[AFTER_EV], params[AFTER_KEY] = cur.after
        rows_iter = self._partitions(conn, upserts, params)
        first = next(rows_iter, None)
        total = len(removed_keys) + (len(first) if first is not None else 0)
        if first is not None and len(first) == self.chunk_size:  # more than one chunk: count
            total = len(removed_keys) + conn.execute(count, params).scalar_one()
        yield StreamStart(stream=s.name, total=total, reset=False)
        for i in range(0, len(removed_keys), self.chunk_size):
            part = removed_keys[i : i + self.chunk_size]
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

    def _full_stream(self, conn: Connection, epoch: str, cur: Cursor | None) -> Iterator[Any]:
        s = self.stream
        assert s.query is not None
        rows = conn.execute(s.query, self.params).fetchmany(MAX_FULL_STREAM_ROWS + 1)
        if len(rows) > MAX_FULL_STREAM_ROWS:
            raise ValueError(
                f"full stream {s.name!r} has more than {MAX_FULL_STREAM_ROWS} rows;"
                " declare it as a delta stream"
            )
        data = self._columnar(rows)
        digest = hashlib.sha256(msgspec.msgpack.encode(data)).hexdigest()[:24]
        if cur is not None and cur.phase == "content" and cur.content == digest:
            yield StreamStart(stream=s.name, total=0, reset=False)
            yield self._chunk([], [], cur, complete=True)
            return
        new = self._cursor(epoch, "content", content=digest)
        yield StreamStart(stream=s.name, total=len(rows), reset=True)
        yield Chunk(
            stream=s.name,
            columns=self.columns,
            data=data,
            removed=[],
            cursor=encode_cursor(new),
            reset=True,
            complete=True,
        )

    # -- frames ----------------------------------------------------------------------

    def _partitions(
        self, conn: Connection, query: sa.Select[Any], params: Mapping[str, Any] | None = None
    ) -> Iterator[Sequence[Any]]:
        """The query's rows in batches of ``chunk_size``, never all in memory."""
        params = self.params if params is None else params
        if self.raw:
            result = conn.execute(query, params)
            cursor = result.cursor  # the DBAPI cursor: plain tuples, converted by _columnar
            try:
                while rows := cursor.fetchmany(self.chunk_size):
                    yield rows
            finally:
                result.close()
            return
        result = conn.execution_options(yield_per=self.chunk_size).execute(query, params)
        yield from result.partitions(self.chunk_size)

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
    ) -> Chunk:
        return Chunk(
            stream=self.stream.name,
            columns=self.columns if rows else [],
            data=self._columnar(rows),
            removed=[to_wire(k) for k in removed],
            cursor=encode_cursor(cur),
            reset=reset,
            complete=complete,
        )
