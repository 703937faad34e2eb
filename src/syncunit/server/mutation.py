"""Applying one pushed mutation, in its own savepoint: map, validate, authorize, decide.

Methods of ``PushApplier`` (``push.py``), kept here as a mixin: the mutation is
mapped from local to base-table columns (denormalized columns are read-only),
its values coerced, the row must be in the principal's write scope before and
after the change (checked before any business rule, so a rule's answer never
describes rows outside the scope), then the stream's conflict policy and
business rules decide. A refusal becomes a ``rejected`` or ``conflict`` result
with the server's row; a transient database failure is tried again; any other
failure rejects this mutation alone.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from syncunit.policies import Conflict, MutationContext, Reject, Resolve
from syncunit.protocol import Mutation, MutationResult, base_digest
from syncunit.server.auth import Principal
from syncunit.server.changes import wire_converters
from syncunit.server.limits import shorten
from syncunit.server.problems import database_busy
from syncunit.server.shape import StreamShape
from syncunit.server.values import Rejected, coerce, coerce_key, json_items, naive_utc
from syncunit.units import TRACKING_COLUMNS, Stream, logical_type

if TYPE_CHECKING:
    from syncunit.server.store import ServerStore
    from syncunit.units import SyncSchema

__all__ = ["ConflictFound", "MutationWrites", "Strikes"]

log = logging.getLogger("syncunit.server")

#: A mutation whose write fails for a transient reason (a lock or statement timeout, a
#: full disk: ``problems.database_busy``) is tried this many times; then the whole
#: request fails with ``database-unavailable`` (a 503 the device retries): such a
#: change is never rejected.
TRANSIENT_ATTEMPTS = 3
TRANSIENT_PAUSE = 0.05  # seconds, times the attempt number
#: A change that fails so in this many requests, over at least this many seconds, is
#: rejected (``unavailable``): the failure may be its own (its rule's query past the
#: statement timeout, say), and would otherwise hold back its device's later changes.
STRIKES = 5
PATIENCE = 300.0


class Strikes:
    """The requests in which each change failed on a transient error (this process)."""

    def __init__(self, keep: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int, str], tuple[int, float, float]] = {}
        self._keep = keep

    def strike(self, client_id: str, m: Mutation) -> tuple[int, float] | None:
        """Count a failed request of ``m``; (requests, seconds) once it has failed in
        ``STRIKES`` over ``PATIENCE`` seconds, each within ``PATIENCE`` of the one
        before (it is then forgotten), else None. A change last failed longer ago
        than that starts again from one."""
        key, now = (client_id, m.seq, m.id), self._clock()
        with self._lock:
            count, first, last = self._seen.pop(key, (0, now, now))
            if now - last > PATIENCE:
                count, first = 0, now
            count += 1
            if count >= STRIKES and now - first >= PATIENCE:
                return count, now - first
            if len(self._seen) >= self._keep:  # the oldest first: dicts keep their order
                del self._seen[next(iter(self._seen))]
            self._seen[key] = (count, first, now)
        return None


KEY = "syncunit_key"  # the bind parameter naming the row a statement works on


#: Integer types narrower than 64 bits where the database holds them so (PostgreSQL).
_NARROW = ((sa.SmallInteger, 2**15), (sa.BigInteger, 2**63), (sa.Integer, 2**31))
#: Half of a UTF-16 surrogate pair, which PostgreSQL's jsonb refuses in a string.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class _Digest:
    """A base the client sent as its digest (``Mutation.digested``): a value too large
    to send, compared by the digest of the stored value as a pull sends it."""

    digest: Any
    as_text: bool  # a JSON column: a pull sends its text

    def differs(self, stored: Any) -> bool:
        sent = json.dumps(stored) if self.as_text and stored is not None else stored
        return stored is None or base_digest(sent) != self.digest


def _differs(stored: Any, sent: Any) -> bool:
    """Whether a stored value differs from a sent one (a base). Date-times are compared
    as instants in UTC, with or without their zone: SQLite gives a zoned column's
    values back without it (in UTC, as they were written), and ``==`` never holds
    between an aware one in the second of a repeated hour (``fold=1``) and one in
    another zone (PEP 495). Two NaNs are the same value."""
    if isinstance(sent, _Digest):
        return sent.differs(stored)
    if isinstance(stored, float) != isinstance(sent, float) and _number(stored) and _number(sent):
        # A column that reads floats and takes decimals (Numeric(asdecimal=False)), or
        # the other way round: the device saw the float, compared so.
        return _differs(float(stored), float(sent))
    if isinstance(stored, float) and isinstance(sent, float) and stored != stored:
        return sent == sent  # NaN is the one float unequal to itself
    if isinstance(stored, dt.datetime) and isinstance(sent, dt.datetime):
        return naive_utc(stored) != naive_utc(sent)
    return bool(stored != sent)


def _number(value: Any) -> bool:
    return isinstance(value, float | decimal.Decimal)


def _other_key(stored: Any, key: Any) -> bool:
    """Whether the row found by ``key`` is stored under another key: text that the
    column's collation compares equal but is not (another case, trailing spaces)."""
    return isinstance(stored, str) and isinstance(key, str) and stored != key


def _unfit(s: Stream, m: Mutation) -> str | None:
    """The local column of ``m`` whose value its column type cannot hold, if one is (the
    database's own message names none): an integer past its range, a decimal past its
    precision, JSON that is not JSON to PostgreSQL."""
    for name, value in m.values.items():
        expr = s.columns.get(name)
        if expr is None or value is None:
            continue
        kind = expr.type
        if isinstance(kind, sa.Integer):
            bound = next((b for narrow, b in _NARROW if isinstance(kind, narrow)), None)
            if isinstance(value, int) and bound is not None and not -bound <= value < bound:
                return name
        elif isinstance(kind, sa.Numeric) and not isinstance(kind, sa.Float):
            if _past_precision(value, kind):
                return name
        elif isinstance(kind, sa.JSON) and _not_json(value):
            return name
    return None


def _past_precision(value: Any, kind: sa.Numeric[Any]) -> bool:
    """Whether a decimal (as the wire carries it) rounds to more digits before the point
    than ``kind`` holds (an infinity to any)."""
    if kind.precision is None:
        return False
    try:
        number = decimal.Decimal(value)
    except (TypeError, ValueError, decimal.InvalidOperation):
        return False
    if number.is_nan():
        return False
    # It must round (half away from zero) to less than 10 ** (precision - scale).
    scale = kind.scale or 0
    with decimal.localcontext(prec=kind.precision + 2):  # exact: precision + 1 digits
        half = decimal.Decimal(5).scaleb(-scale - 1)  # half of the last place
        limit = decimal.Decimal(10) ** (kind.precision - scale) - half
    return number.copy_abs() >= limit


def _not_json(value: Any) -> bool:
    """Whether JSON (as text, or decoded) holds what PostgreSQL's does not take: NaN or
    an infinity, or (jsonb) half of a surrogate pair."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return False
    return any(
        (isinstance(item, float) and not math.isfinite(item))
        or (isinstance(item, str) and _SURROGATE.search(item) is not None)
        for item in json_items(value)
    )


def _first_line(exc: sa.exc.SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return (str(orig) if orig is not None else str(exc)).splitlines()[0]


def _logged(exc: sa.exc.SQLAlchemyError) -> str:
    """``exc`` for the log: the database's message and the statement, not the values
    SQLAlchemy's own text lists (a row's data), nor the message's detail (which may
    show the row)."""
    statement = getattr(exc, "statement", None)
    where = f" [SQL: {statement}]" if statement else ""
    return f"{type(getattr(exc, 'orig', None) or exc).__name__}: {_first_line(exc)}{where}"


#: Of an insert's omitted columns: the values of their scalar defaults (written by the
#: insert), and the columns whose default only the database (or SQLAlchemy, as it
#: executes the insert) computes, read back from the row once it is written.
InsertDefaults = tuple[dict[str, Any], tuple[sa.Column[Any], ...]]


@functools.lru_cache(maxsize=1024)
def _insert_defaults(table: sa.Table, written: frozenset[str]) -> InsertDefaults:
    fill: dict[str, Any] = {}
    computed: list[sa.Column[Any]] = []
    for column in table.columns:
        if column.name in written or column.primary_key or column.name in TRACKING_COLUMNS:
            continue
        default = column.default
        if default is not None and default.is_scalar:
            fill[column.name] = default.arg  # type: ignore[attr-defined]
        elif default is not None or column.server_default is not None:
            computed.append(column)
    return fill, tuple(computed)


def insert_defaults(table: sa.Table, written: Collection[str]) -> InsertDefaults:
    """What an insert of ``written`` columns into ``table`` stores in the others.

    Rules see a new row as it is stored (``MutationContext.row``), the defaults of
    the columns the device left out included: a scalar default is written with the
    row (the rule sees the value it gets), any other (a callable, a SQL expression,
    a server default) is read back from the written row before the rules run.
    """
    return _insert_defaults(table, frozenset(written))


@functools.lru_cache(maxsize=1024)
def _json_columns(table: sa.Table) -> tuple[str, ...]:
    return tuple(c.name for c in table.columns if isinstance(c.type, sa.JSON))


def sql_nulls(table: sa.Table, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` as a statement writes them into ``table``: None in a JSON column as SQL
    NULL, which a device's NULL is (SQLAlchemy writes the JSON value ``null`` for it)."""
    nulls = [n for n in _json_columns(table) if n in values and values[n] is None]
    return {**values, **dict.fromkeys(nulls, sa.null())} if nulls else values


def new_row(
    conn: Connection, s: Stream, key: Any, written: Mapping[str, Any], computed: Collection[Any]
) -> dict[str, Any]:
    """The full row just inserted at ``key``: ``written``, the ``computed`` columns read
    back, NULL in the others."""
    pk = s.key_column
    row = {c.name: None for c in s.base.columns} | dict(written) | {pk.name: key}
    if computed:
        stored = conn.execute(sa.select(*computed).where(pk == key)).mappings().one()
        row |= dict(stored)
    return row


class ConflictFound(Exception):
    """A mutation conflicts; becomes a ``conflict`` result."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Statements:
    current: sa.Select[Any]
    in_scope: sa.Select[Any]  # the row is in the stream's write scope
    scope_count: sa.Select[Any]  # how many rows of ``keys`` are in the stream's write scope
    insert: sa.Insert
    insert_new: sa.Insert
    update: sa.Update
    delete: sa.Delete


class _Savepoint:
    """SAVEPOINT / RELEASE / ROLLBACK TO on a DBAPI connection in a transaction."""

    def __init__(self, dbapi: Any) -> None:
        self.cursor = dbapi.cursor()
        self.cursor.execute("SAVEPOINT syncunit_mutation")

    def commit(self) -> None:
        self.cursor.execute("RELEASE SAVEPOINT syncunit_mutation")
        self.cursor.close()

    def rollback(self) -> None:
        self.cursor.execute("ROLLBACK TO SAVEPOINT syncunit_mutation")
        self.cursor.execute("RELEASE SAVEPOINT syncunit_mutation")
        self.cursor.close()


class MutationWrites:
    """``PushApplier``'s work on one mutation: the applier is ``self``."""

    if TYPE_CHECKING:  # what these methods use of the applier
        store: ServerStore
        schema: SyncSchema
        _cache: dict[str, _Statements]
        _rows: dict[str, sa.Select[Any]]
        _strikes: Strikes

    def _apply_one(
        self,
        conn: Connection,
        principal: Principal,
        client_id: str,
        m: Mutation,
        unit: str,
        writable: frozenset[str],
    ) -> MutationResult:
        stream = self.schema.by_local_table.get(m.table)
        if stream is None:
            reason = f"table {m.table!r} does not accept changes"
            return MutationResult(m.seq, m.id, "rejected", reason, "unknown-table")
        if m.table not in writable:
            reason = f"unit {unit!r} does not push table {m.table!r}; it is read-only here"
            return MutationResult(m.seq, m.id, "rejected", reason, "read-only-table")
        # A savepoint per mutation, on the DBAPI connection: it is the hottest statement
        # pair of a push, and needs none of SQLAlchemy's bookkeeping.
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
            savepoint = _Savepoint(dbapi)
            try:
                self._write(conn, stream, principal, m)
            except (Rejected, ConflictFound, sa.exc.SQLAlchemyError) as exc:
                if isinstance(exc, sa.exc.DBAPIError) and (
                    exc.connection_invalidated or self.store.retryable(exc)
                ):
                    # The transaction is gone (or, a serialization failure on PostgreSQL,
                    # doomed): the whole request fails here, and ``apply`` runs it again.
                    raise
                busy = database_busy(exc) is not None
                struck = None
                if busy and attempt == TRANSIENT_ATTEMPTS:
                    struck = self._strikes.strike(client_id, m)
                    if struck is None:
                        # Most likely not this change's fault: the request fails (503),
                        # nothing of it is kept, and the device sends it again.
                        raise
                savepoint.rollback()
                status: Literal["rejected", "conflict"]
                if isinstance(exc, Rejected):
                    status, code, reason = "rejected", exc.code, exc.reason
                elif isinstance(exc, ConflictFound):
                    status, code, reason = "conflict", "conflict", exc.reason
                elif isinstance(exc, sa.exc.IntegrityError):
                    status, code = "rejected", "constraint"
                    reason = f"the database refused the change: {_first_line(exc)}"
                elif (
                    isinstance(exc, sa.exc.DataError) and (column := _unfit(stream, m)) is not None
                ):  # a value its column cannot hold (else: a rule's query, say)
                    status, code = "rejected", "invalid-value"
                    reason = f"column {column!r}: the database refused a value: {_first_line(exc)}"
                elif struck is not None:
                    log.error("mutation %s %r kept failing: %s", m.table, m.key, _logged(exc))
                    status, code = "rejected", "unavailable"
                    reason = (
                        f"the server's database failed on this change in {struck[0]} requests"
                        f" over {struck[1] / 60:.0f} min ({_first_line(exc)}); it may be the"
                        " change itself (a rule's query past a timeout): retry it later"
                    )
                elif busy:
                    log.warning(
                        "transient failure on %s %r, again: %s", m.table, m.key, _logged(exc)
                    )
                    time.sleep(TRANSIENT_PAUSE * attempt)
                    continue
                else:
                    # A poison mutation (a rule's query fails, a value the database
                    # cannot store): this one is rejected with its reason, the ones
                    # behind it go ahead.
                    log.error("mutation %s %r failed: %s", m.table, m.key, _logged(exc))
                    status, code = "rejected", "server-error"
                    reason = f"the server's database failed on this change: {_first_line(exc)}"
                row = self._server_row(conn, stream, principal, m.key)
                return MutationResult(m.seq, m.id, status, reason, code, row)
            savepoint.commit()
            break
        return MutationResult(seq=m.seq, id=m.id, status="applied")

    def _write(self, conn: Connection, s: Stream, principal: Principal, m: Mutation) -> None:
        base, pk = s.base, s.key_column
        st = self._statements(s)
        if m.op == "insert" and self._insert_new(conn, s, principal, m):
            return
        key = self._coerce_key(m.key, s)
        if key is None:
            raise Rejected("invalid-value", "the row key cannot be empty")
        if m.op not in ("insert", "update", "delete"):
            raise Rejected("invalid-request", f"unknown operation {m.op!r}")
        names = list(m.values) if m.op == "insert" else list(m.changed)
        changes = self._map(s, m, names)
        found = conn.execute(st.current, {KEY: key}).mappings().first()
        current: dict[str, Any] | None = None if found is None else dict(found)
        if current is not None and not self._in_scope(conn, s, principal, key):
            raise Rejected("out-of-scope", "the row is outside your scope")
        if current is not None and _other_key(current[pk.name], key):
            # The column's collation finds another key equal ('ABC' for 'abc'): that row
            # is not the device's, which would otherwise keep both under their own keys.
            # (Checked after the scope: the reason names the stored key.)
            raise Rejected(
                "invalid-value",
                f"key column {s.key!r}: {shorten(m.key)} collides with the stored key"
                f" {shorten(current[pk.name])}, which the column's collation takes as the"
                " same; write the row under the stored key, or another key",
            )
        policy = s.policy
        if m.op == "delete":
            if current is None:
                return  # already gone: deleting is idempotent
            if policy.detects:
                base_vals = self._map(s, m, [n for n in m.base if n != s.key], values=m.base)
                differ = tuple(c for c, v in base_vals.items() if _differs(current[c], v))
                if differ:
                    self._on_conflict(s, m, current, {}, base_vals, differ, key)
            self._check_rules(conn, s, principal, m, key, current)
            conn.execute(st.delete, {KEY: key})
            return
        if current is None and m.op == "update":
            raise ConflictFound("the row was deleted on the server")
        if current is not None:
            base_vals = self._map(s, m, [n for n in m.base if n != s.key], values=m.base)
            if policy.detects:
                merge = getattr(policy, "merge", True)
                watched = list(changes) if merge else list(base_vals)
                differ = tuple(
                    c for c in watched if c in base_vals and _differs(current[c], base_vals[c])
                )
                if m.op == "insert" and not base_vals:
                    differ = tuple(c for c in changes if _differs(current[c], changes[c]))
                if differ:
                    changes = self._on_conflict(s, m, current, changes, base_vals, differ, key)
            row = {**current, **changes}
            if changes:
                conn.execute(st.update, {**sql_nulls(base, changes), KEY: key})
        else:
            fill, computed = insert_defaults(base, changes)
            changes = {**fill, **changes}
            conn.execute(st.insert, {**sql_nulls(base, changes), pk.name: key})
            row = new_row(conn, s, key, changes, computed)
        # The scope comes first: a rule's answer may describe other rows (a clash with
        # another booking), which a principal may only learn about inside its scope.
        if not self._in_scope(conn, s, principal, key):
            raise Rejected("out-of-scope", "the change would move the row outside your scope")
        self._check_rules(conn, s, principal, m, key, row)

    def _map(
        self, s: Stream, m: Mutation, names: list[str], values: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Local column names and values to base-table column names and coerced values.

        ``values`` given means base values: columns that are not writable are skipped.
        """
        source = m.values if values is None else values
        out: dict[str, Any] = {}
        for name in names:
            if values is not None and (name == s.key or s.writable(name) is None):
                continue
            if name == s.key:
                if source.get(name, m.key) != m.key:
                    raise Rejected("read-only-column", "the row key cannot change")
                continue
            if name not in s.columns:
                raise Rejected("unknown-column", f"table {m.table!r} has no column {name!r}")
            column = s.writable(name)
            if column is None:
                raise Rejected(
                    "read-only-column",
                    f"column {name!r} is copied from another table and is read-only;"
                    " change the row it comes from instead",
                )
            if name not in source:
                raise Rejected("invalid-request", f"column {name!r} is changed but has no value")
            if source[name] is None and m.op == "insert" and values is None:
                # A local row has NULL where the app left a column out: a NOT NULL column
                # with a default gets its default (visible to the rules when it is a value).
                default = column.default
                if not column.nullable and default is not None and default.is_scalar:
                    out[column.name] = default.arg  # type: ignore[attr-defined]
                    continue
                if not column.nullable and (default is not None or column.server_default):
                    continue  # the insert leaves it out: the database fills it
            if values is not None and name in m.digested:
                # Only compared: the digest of a value too large to send.
                out[column.name] = _Digest(source[name], logical_type(column.type) == "json")
                continue
            if values is not None and source[name] is None:
                # A base value: what the device saw. A row it created itself holds NULL
                # where the server filled a default; that is a fact, not a value to check.
                out[column.name] = None
                continue
            # A base value is compared, not stored: only a stored one must fit the database.
            nul = values is not None or self.store.text_holds_nul
            out[column.name] = coerce(
                source[name],
                column,
                name,
                nul=nul,
                native=self.store.native_decimals_and_zones,
                base=values is not None,
                beyond_python=self.store.times_beyond_python,
            )
        return out

    def _coerce_key(self, key: Any, s: Stream) -> Any:
        """``coerce_key`` of a pushed key of ``s``, as this store holds it."""
        store = self.store
        return coerce_key(
            key,
            s.key_column,
            s.key,
            native=store.native_decimals_and_zones,
            beyond_python=store.times_beyond_python,
        )

    def _on_conflict(
        self,
        s: Stream,
        m: Mutation,
        current: Mapping[str, Any],
        changes: dict[str, Any],
        base_vals: dict[str, Any],
        differ: tuple[str, ...],
        key: Any,
    ) -> dict[str, Any]:
        conflict = Conflict(
            table=m.table,
            key=key,
            op=m.op,
            server=dict(current),
            client=changes,
            # A base sent as its digest is no value a resolver could merge with.
            base={c: v for c, v in base_vals.items() if not isinstance(v, _Digest)},
            columns=differ,
        )
        try:
            resolution = s.policy.resolve(conflict) if isinstance(s.policy, Resolve) else None
        except sa.exc.SQLAlchemyError:
            raise
        except Exception:  # the app's code: reject this mutation, do not fail the whole push
            log.exception("conflict resolver failed on %s %r", m.table, key)
            raise Rejected(
                "resolver", "the server's conflict resolver failed on this change"
            ) from None
        if isinstance(resolution, Reject):
            raise Rejected("resolver", resolution.reason)
        if resolution is None:
            raise ConflictFound(f"changed on the server since you saw it: {', '.join(differ)}")
        # The resolver answers for the conflicting columns; the client's other changes stand
        # (replacing them would drop them silently while the result says "applied").
        resolved = {k: v for k, v in resolution.items() if k in s.base.c and k != s.key_column.name}
        return {**changes, **resolved}

    def _check_rules(
        self,
        conn: Connection,
        s: Stream,
        principal: Principal,
        m: Mutation,
        key: Any,
        row: Mapping[str, Any],
    ) -> None:
        for rule in s.rules:
            ctx = MutationContext(
                conn=conn,
                table=m.table,
                op=m.op,
                key=key,
                row=row,
                principal_id=principal.id,
                params=principal.params,
            )
            try:
                reason = rule(ctx)
            except sa.exc.SQLAlchemyError:
                raise
            except Exception:  # the app's code: reject this mutation, do not fail the whole push
                log.exception("rule %r failed on %s %r", rule, m.table, key)
                name = getattr(rule, "__name__", "a business rule")
                raise Rejected(
                    "rule", f"the server could not check this change: rule {name!r} failed"
                ) from None
            if reason:
                raise Rejected("rule", reason)

    def _insert_new(self, conn: Connection, s: Stream, principal: Principal, m: Mutation) -> bool:
        """Insert a row whose key is new, in one statement; False if the key exists.

        The common case of a push (a booking made on a device) skips reading the
        current row. The rules run after the row is written, inside the mutation's
        savepoint, so a rejection (or a scope check failing) undoes it.
        """
        pk = s.key_column
        key = self._coerce_key(m.key, s)
        if key is None:
            raise Rejected("invalid-value", "the row key cannot be empty")
        changes = self._map(s, m, list(m.values))
        fill, computed = insert_defaults(s.base, changes)
        if fill:
            changes = {**fill, **changes}
        written = {**sql_nulls(s.base, changes), pk.name: key}
        done = conn.execute(self._statements(s).insert_new, written)
        if done.rowcount == 0:
            return False
        if not self._in_scope(conn, s, principal, key):
            raise Rejected("out-of-scope", "the change would move the row outside your scope")
        row = new_row(conn, s, key, changes, computed)
        self._check_rules(conn, s, principal, m, key, row)
        return True

    def _in_scope(self, conn: Connection, s: Stream, principal: Principal, key: Any) -> bool:
        """Whether the row ``key`` is in the stream's write scope for ``principal``."""
        params = self._scope_params(s, principal)
        return conn.execute(self._statements(s).in_scope, {**params, KEY: key}).first() is not None

    def _scope_params(self, s: Stream, principal: Principal) -> dict[str, Any]:
        """The principal's values of the parameters the stream's write scope binds."""
        return {p: principal.params[p] for p in s.write_parameters}

    def _statements(self, s: Stream) -> _Statements:
        """The stream's statements, built once: SQLAlchemy then reuses their compiled form."""
        st = self._cache.get(s.name)
        if st is None:
            base, pk = s.base, s.key_column
            key: sa.BindParameter[Any] = sa.bindparam(KEY)
            keys: sa.BindParameter[Any] = sa.bindparam("keys", expanding=True)
            assert s.write_where is not None  # only writable streams get here
            from_: Any = base
            for j in s.joins:
                from_ = from_.outerjoin(j.table, j.on)
            # coalesce: an outer join's missing row makes the rule NULL, which is "no"
            scoped = (
                sa.select(sa.literal(1))
                .select_from(from_)
                .where(sa.func.coalesce(s.write_where, sa.false()))
            )
            st = _Statements(
                current=sa.select(base).where(pk == key),
                in_scope=scoped.where(pk == key),
                scope_count=scoped.with_only_columns(sa.func.count()).where(pk.in_(keys)),
                insert=base.insert(),
                insert_new=self.store.insert_new(base),
                update=base.update().where(pk == key),
                delete=base.delete().where(pk == key),
            )
            self._cache[s.name] = st
        return st

    def _server_row(
        self, conn: Connection, s: Stream, principal: Principal, key: Any
    ) -> dict[str, Any] | None:
        """The row as the client should hold it now, or None if it should not hold it.

        It is read through the stream's own filter (a full stream's query) with the
        principal's values: a key outside that scope is None, whoever's row it is.
        A principal without every value the filter binds holds none of its rows.
        """
        if key is None or any(p not in principal.params for p in s.parameters):
            return None
        try:
            k = coerce(
                key,
                s.key_column,
                s.key,
                native=self.store.native_decimals_and_zones,
                beyond_python=self.store.times_beyond_python,
            )
        except Rejected:
            return None
        select = self._rows.get(s.name)
        if select is None:  # built once: SQLAlchemy then reuses its compiled form
            select = self._rows[s.name] = _row_select(s)
        params = {p: principal.params[p] for p in s.parameters}
        # Read in a savepoint: it answers a change already refused, which its failure
        # (a key the column's type cannot take, say) must not turn into a failed request.
        try:
            with conn.begin_nested():
                row = conn.execute(select, {**params, KEY: k}).first()
        except sa.exc.SQLAlchemyError as exc:
            if isinstance(exc, sa.exc.DBAPIError) and (
                exc.connection_invalidated or self.store.retryable(exc)
            ):
                raise  # the request fails, and is run again (see ``_apply_one``)
            log.warning("could not read %s %r back: %s", s.local_table, key, _logged(exc))
            return None
        if row is None:
            return None
        values = list(row)
        for i, conv in wire_converters(s):  # as a pull sends it (JSON as text, say)
            values[i] = conv(values[i])
        return dict(zip(s.columns, values, strict=True))


def _row_select(s: Stream) -> sa.Select[Any]:
    """One row of ``s`` by key, as the stream shows it and only within its scope."""
    if s.mode == "full":
        # Its query is the scope (a filter, a grouping over several tables): the row is
        # one the query gives, never the base table's row of that key.
        assert s.query is not None
        rows = s.query.subquery()
        return sa.select(*(rows.c[name] for name in s.columns)).where(
            rows.c[s.key] == sa.bindparam(KEY)
        )
    columns = [expr.label(name) for name, expr in s.columns.items()]
    return StreamShape(s).rows(columns).where(s.key_column == sa.bindparam(KEY))
