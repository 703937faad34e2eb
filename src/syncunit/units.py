"""Declaring what syncs: tracked tables, streams and sync units.

A **stream** is one query: a base table, optional many-to-one joins whose
columns are copied into a flat local table, a row filter whose parameters come
from the principal (``bindparam("hospital_id")``), and the columns to send.
A **sync unit** is a named set of streams plus a direction, run at a moment of
the app ("Splash", "Login", "Online"). A ``SyncSchema`` collects the units.

Tables are SQLAlchemy Core tables, so ORM users pass ``Model.__table__``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import (
    ColumnElement,
)

from syncunit.clauses import absence_tables, bind_names, columns_of, describe
from syncunit.errors import DeclarationError
from syncunit.policies import ConflictPolicy, LastWriteWins, Rule
from syncunit.protocol import (
    INT64_MAX,
    INT64_MIN,
    PROTOCOL_VERSION,
    Catalog,
    ColumnInfo,
    ParamInfo,
    StreamInfo,
    UnitInfo,
    encode_catalog,
)

__all__ = ["Direction", "Join", "Param", "Stream", "SyncSchema", "SyncUnit", "logical_type"]

VERSION = "syncunit_version"
CREATED_AT = "syncunit_created_at"
UPDATED_AT = "syncunit_updated_at"
#: When the row was created (or its key last changed), as the store can tell which
#: tombstones were written before: SQLite's clock then, PostgreSQL's snapshot then
#: (NULL: before tracking kept it).
CREATED_STAMP = "syncunit_created_stamp"
TRACKING_COLUMNS = (VERSION, CREATED_AT, UPDATED_AT, CREATED_STAMP)


def add_tracking_columns(table: sa.Table) -> None:
    """Declare the tracking columns on ``table`` (so ``create_all`` makes them too)."""
    if VERSION not in table.c:
        table.append_column(sa.Column(VERSION, sa.BigInteger, nullable=True))
        table.append_column(sa.Column(CREATED_AT, sa.String(32), nullable=True))
        table.append_column(sa.Column(UPDATED_AT, sa.String(32), nullable=True))
    if CREATED_STAMP not in table.c:
        stamp = sa.BigInteger().with_variant(sa.Text(), "postgresql")
        table.append_column(sa.Column(CREATED_STAMP, stamp, nullable=True))


Direction = Literal["pull", "push", "both"]
Mode = Literal["delta", "full"]


@dataclass(frozen=True)
class Join:
    """A many-to-one join whose columns a stream copies into its local table."""

    table: sa.Table
    on: ColumnElement[bool]


ParamType = Literal["integer", "text"]


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a reason never echoes a whole value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: ``authorize(principal, params)``: False refuses the request with a 403 problem: a pull
#: of the stream (``params``: its client parameters), or a push through any unit that
#: pushes it (``params`` empty).
Authorize = Callable[[Any, Mapping[str, Any]], bool]


@dataclass(frozen=True)
class Param:
    """A filter parameter the app supplies: ``client.sync(unit, params={...})``.

    ``type`` is ``"integer"`` (bounded by ``min`` and ``max``) or ``"text"``
    (at most ``max_length`` characters). The server checks every value before
    it reads a row, and answers a missing or malformed one with a 400 problem.
    """

    type: ParamType = "integer"
    min: int | None = None
    max: int | None = None
    max_length: int = 200

    def __post_init__(self) -> None:
        if self.type not in ("integer", "text"):
            raise DeclarationError(f"parameter type must be 'integer' or 'text', not {self.type!r}")

    def check(self, name: str, value: Any) -> str | None:
        """Why ``value`` is not acceptable for this parameter, or None if it is.

        The reason names the parameter and what it takes; it never repeats a long
        value whole. Integers are signed 64-bit whatever ``min`` and ``max`` say,
        and text never holds NUL (U+0000, which PostgreSQL cannot hold).
        """
        if self.type == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                return f"parameter {name!r} must be an integer, not {_shown(value)}"
            if not INT64_MIN <= value <= INT64_MAX:
                return f"parameter {name!r} must be a signed 64-bit integer, not {_shown(value)}"
            if self.min is not None and value < self.min:
                return f"parameter {name!r} must be at least {self.min}, not {value}"
            if self.max is not None and value > self.max:
                return f"parameter {name!r} must be at most {self.max}, not {value}"
            return None
        if not isinstance(value, str):
            return f"parameter {name!r} must be text, not {_shown(value)}"
        if len(value) > self.max_length:
            return f"parameter {name!r} must be at most {self.max_length} characters"
        if "\x00" in value:
            return f"parameter {name!r} cannot hold the NUL character (U+0000); remove it"
        return None

    def info(self, name: str) -> ParamInfo:
        return ParamInfo(
            name=name, type=self.type, min=self.min, max=self.max, max_length=self.max_length
        )


def logical_type(type_: sa.types.TypeEngine[Any]) -> str:
    """The protocol's logical type for a SQLAlchemy type (see docs/protocol.md)."""
    checks: list[tuple[type[Any], str]] = [
        (sa.Boolean, "boolean"),
        (sa.Integer, "integer"),
        (sa.Float, "real"),
        (sa.Numeric, "decimal"),
        (sa.DateTime, "datetime"),
        (sa.Date, "date"),
        (sa.Time, "time"),
        (sa.Interval, "interval"),
        (sa.Uuid, "uuid"),
        (sa.LargeBinary, "blob"),
        (sa.JSON, "json"),
        (sa.String, "text"),
    ]
    for cls, name in checks:
        if isinstance(type_, cls):
            return name
    if isinstance(type_, sa.types.NullType):
        return "text"
    return "text"


#: The types of logical type ``text``: text itself, an expression of unknown type (a
#: function, a literal column), the app's own ``TypeDecorator`` (its values are its
#: own), and intervals. Any other type ``logical_type`` does not name is refused.
_TEXT_TYPES = (
    sa.String,
    sa.types.NullType,
    sa.types.TypeDecorator,
    sa.Interval,
    postgresql.INTERVAL,
)


def _carried(type_: sa.types.TypeEngine[Any]) -> bool:
    """Whether a sync can carry a column of ``type_`` to devices and back: not one a
    driver reads as objects no encoding carries and no local column stores (an
    array, an address, a range, a text search vector)."""
    return logical_type(type_) != "text" or isinstance(type_, _TEXT_TYPES)


class Stream:
    """One query of a sync unit, filling one local table.

    ``columns`` maps local column names to columns of the base or joined tables
    (a list of columns keeps their names). The base table's primary key is the
    local key. Columns of joined tables are read-only on the client.

    ``write`` says which rows a principal may push changes to (the row must
    match it before and after each change). By default it is the row filter
    ``where``; a stream with no row filter is read-only unless ``write`` is an
    explicit clause (``sa.true()`` lets every principal write every row).
    ``write=False`` makes any stream read-only.
    """

    def __init__(
        self,
        name: str,
        base: sa.Table,
        columns: Mapping[str, ColumnElement[Any]] | Sequence[sa.Column[Any]],
        *,
        joins: Sequence[Join] = (),
        where: ColumnElement[bool] | None = None,
        local_table: str | None = None,
        indexes: Sequence[Sequence[str]] = (),
        policy: ConflictPolicy | None = None,
        rules: Sequence[Rule] = (),
        write: ColumnElement[bool] | bool | None = None,
        client_params: Mapping[str, Param] | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        self.name = name
        self.mode: Mode = "delta"
        self.base = base
        self.joins = tuple(joins)
        self.where = where
        self.local_table = local_table or name
        self.indexes = [list(ix) for ix in indexes]
        self.policy: ConflictPolicy = policy or LastWriteWins()
        self.rules = list(rules)
        self.query: sa.Select[Any] | None = None
        if isinstance(columns, Mapping):
            self.columns: dict[str, ColumnElement[Any]] = dict(columns)
        else:
            self.columns = {str(c.name): c for c in columns}
        for read, role in ((base, "base table"), *((j.table, "joined table") for j in joins)):
            if not isinstance(read, sa.Table):
                shown = getattr(read, "name", None) or type(read).__name__
                raise DeclarationError(
                    f"stream {name!r}: its {role} {shown!r} is not a Table but a"
                    f" {type(read).__name__}: tracking follows changes per table, so a"
                    " stream reads tables themselves, not aliases, subqueries or views"
                )
        tables = [base, *(j.table for j in joins)]
        if len(set(tables)) != len(tables):
            twice = next(x for i, x in enumerate(tables) if x in tables[:i])
            raise DeclarationError(
                f"stream {name!r} reads table {twice.name!r} twice (as its base or in two"
                " joins): tracking maps each change of a table to one join. Keep one join,"
                " or copy the second table's columns the stream needs into a table of their own"
            )
        pk = list(base.primary_key.columns)
        if len(pk) != 1:
            raise DeclarationError(
                f"stream {name!r}: base table {base.name!r} needs a single-column primary key"
                f" (it has {', '.join(c.name for c in pk) or 'none'}): it becomes the device's"
                " local key. Give the table one (a UUID column, say) and keep the other key as"
                " a UNIQUE constraint; joined tables may have composite keys"
            )
        for j in joins:
            if not list(j.table.primary_key.columns):
                raise DeclarationError(
                    f"stream {name!r}: joined table {j.table.name!r} has no primary key;"
                    " declare one (tracking identifies its rows by it)"
                )
        for table in (base, *(j.table for j in joins)):
            for kc in table.primary_key.columns:
                if logical_type(kc.type) == "blob":
                    raise DeclarationError(
                        f"stream {name!r}: table {table.name!r} has a binary key column"
                        f" ({kc.name!r}); tracking records keys as JSON text, which holds"
                        " no bytes. Key the table by an integer, text or UUID column and"
                        " keep the binary value in a UNIQUE column"
                    )
        self.key_column: sa.Column[Any] = pk[0]
        key_names = [n for n, c in self.columns.items() if c is self.key_column]
        if not key_names:
            self.columns = {self.key_column.name: self.key_column, **self.columns}
            key_names = [self.key_column.name]
        self.key = key_names[0]
        allowed = {base, *(j.table for j in self.joins)}
        for local, col in self.columns.items():
            if (other := _unjoined(col, allowed)) is not None:
                raise DeclarationError(
                    f"stream {name!r}: column {local!r} reads table {other!r},"
                    " which is neither the base table nor joined; add a Join for it"
                )
        for j in self.joins:
            if (other := _unjoined(j.on, allowed)) is not None:
                raise DeclarationError(
                    f"stream {name!r}: the join of {j.table.name!r} reads table {other!r},"
                    f" which is neither the base table nor joined: join {other!r} too, or"
                    " leave it out of the join's condition"
                )
        for e in visitors.iterate(where) if where is not None else ():
            if isinstance(e, sa.Select) and base in (*e.columns_clause_froms, *e._from_obj):
                raise DeclarationError(
                    f"stream {name!r}: its filter reads other rows of {base.name!r} through a"
                    " subquery, so a change to one row would move others in or out of scope"
                    " without devices hearing of it. Decide scope from each row's own"
                    " columns and joined rows (a column the app maintains, or a joined table)"
                )
        if (other := _unjoined(where, allowed)) is not None:
            raise DeclarationError(
                f"stream {name!r}: its filter reads table {other!r} (a subquery?), which is"
                " neither the base table nor joined: a change to it would move rows in or"
                f" out of scope without devices hearing of it. Join {other!r} (Join(...))"
                " and filter on its columns"
            )
        for t in absence_tables(where, {j.table for j in self.joins}):
            raise DeclarationError(
                f"stream {name!r}: its filter can hold when the joined {t!r} row is missing"
                f" (IS NULL, coalesce, CASE on {t!r}), so inserting that row would move a row"
                " out of scope unseen. Require the row too (AND"
                f" {t}.<key> IS NOT NULL), or test the base table's own column"
                " (its foreign key IS NULL)"
            )
        self.parameters = bind_names(where, *(j.on for j in self.joins))
        self.write_where: ColumnElement[bool] | None = None
        if write is True and where is None:
            raise DeclarationError(
                f"stream {name!r} has no row filter, so write=True would let every principal"
                " change every row: pass write=<clause> naming the rows a principal may change"
                " (sa.true() if that is really meant)"
            )
        if write is None or write is True:
            self.write_where = where
        elif write is not False:
            if (other := _unjoined(write, allowed)) is not None:
                raise DeclarationError(
                    f"stream {name!r}: the write rule reads table {other!r},"
                    " which is neither the base table nor joined"
                )
            self.write_where = write
        #: Whether clients may push changes to this stream's rows at all.
        self.is_writable = self.write_where is not None
        self.write_parameters = bind_names(self.write_where, *(j.on for j in self.joins))
        self.client_params: dict[str, Param] = dict(client_params or {})
        self.authorize = authorize
        self._validate_names()
        self._validate_types()
        self._validate_client_params()

    @classmethod
    def full(
        cls,
        name: str,
        query: sa.Select[Any],
        *,
        key: str,
        local_table: str | None = None,
        indexes: Sequence[Sequence[str]] = (),
        client_params: Mapping[str, Param] | None = None,
        authorize: Authorize | None = None,
    ) -> Stream:
        """A small stream (an aggregate, a summary) replaced whole at each sync.

        ``query`` is any SELECT (it may use principal parameters as bind
        parameters, and ``client_params``); ``key`` names the selected column
        that identifies a row.
        """
        self = cls.__new__(cls)
        self.name = name
        self.mode = "full"
        self.query = query
        self.local_table = local_table or name
        self.indexes = [list(ix) for ix in indexes]
        self.policy = LastWriteWins()
        self.rules = []
        self.joins = ()
        self.where = None
        self.write_where = None
        self.is_writable = False
        self.write_parameters = []
        self.columns = {str(c.key): c for c in query.selected_columns}
        if key not in self.columns:
            raise DeclarationError(f"stream {name!r}: key {key!r} is not a selected column")
        self.key = key
        froms = query.get_final_froms()
        base = next((f for f in froms if isinstance(f, sa.Table)), None)
        self.base = base if base is not None else sa.table(name)  # type: ignore[assignment]
        self.key_column = self.columns[key]  # type: ignore[assignment]
        self.parameters = bind_names(query)
        self.client_params = dict(client_params or {})
        self.authorize = authorize
        self._validate_names()
        self._validate_types()
        self._validate_client_params()
        return self

    def _validate_types(self) -> None:
        for local, expr in self.columns.items():
            if _carried(expr.type):
                continue
            column = isinstance(expr, sa.Column) and expr.table is not None
            shown = f"{expr.table.name}.c.{expr.name}" if column else "..."
            raise DeclarationError(
                f"stream {self.name!r}: column {local!r} is of type {expr.type!r}, whose"
                " values no sync can carry to devices and back (every sync of its units"
                " would fail). Send it as a supported type, read-only on devices"
                f" ({local!r}: sa.cast({shown}, sa.Text) in the stream's columns, say),"
                " or keep it in a column of a supported type (integer, real, decimal,"
                " boolean, text, date and time, UUID, JSON or bytes)"
            )

    def _validate_names(self) -> None:
        for n in [self.local_table, *self.columns]:
            if not n.replace("_", "").isalnum() or n.startswith("syncunit_"):
                raise DeclarationError(
                    f"stream {self.name!r}: {n!r} is not a usable local name"
                    " (letters, digits and _; the prefix syncunit_ is reserved)"
                )
        for ix in self.indexes:
            for c in ix:
                if c not in self.columns:
                    raise DeclarationError(f"stream {self.name!r}: index column {c!r} unknown")

    def _validate_client_params(self) -> None:
        for pname, param in self.client_params.items():
            if not isinstance(param, Param):
                raise DeclarationError(f"stream {self.name!r}: parameter {pname!r} needs a Param")
            if pname not in self.parameters:
                raise DeclarationError(
                    f"stream {self.name!r}: client parameter {pname!r} is not used by the"
                    f" filter; use sa.bindparam({pname!r}) in where= or a join"
                )
        if self.client_params and not self.principal_parameters:
            raise DeclarationError(
                f"stream {self.name!r}: a stream with client parameters must also filter on"
                " a principal parameter (a client parameter only narrows the principal's scope)"
            )

    @property
    def principal_parameters(self) -> list[str]:
        """The filter parameters the principal supplies (the others the app does)."""
        return [p for p in self.parameters if p not in self.client_params]

    # -- derived facts -------------------------------------------------------

    @property
    def tables(self) -> list[sa.Table]:
        """The base table and the joined tables, in join order."""
        return [self.base, *(j.table for j in self.joins)]

    def writable(self, local: str) -> sa.Column[Any] | None:
        """The base-table column a local column maps back to, or None if read-only."""
        if self.mode != "delta" or not self.is_writable:
            return None
        col = self.columns.get(local)
        if isinstance(col, sa.Column) and col.table is self.base:
            return col
        return None

    def scope_columns(self) -> dict[str, set[str]]:
        """Per table, the columns whose change can move a row into or out of scope."""
        out: dict[str, set[str]] = {}
        for clause in [self.where, *(j.on for j in self.joins)]:
            for c in columns_of(clause):
                if isinstance(c.table, sa.Table):
                    out.setdefault(c.table.name, set()).add(c.name)
        return out

    def info(self) -> StreamInfo:
        cols = []
        for local, col in self.columns.items():
            nullable = True
            if isinstance(col, sa.Column) and col.table is self.base and self.mode == "delta":
                nullable = bool(col.nullable) and col is not self.key_column
            cols.append(
                ColumnInfo(
                    name=local,
                    type=logical_type(col.type),
                    nullable=nullable and local != self.key,
                    writable=self.writable(local) is not None and local != self.key,
                )
            )
        return StreamInfo(
            name=self.name,
            local_table=self.local_table,
            key=self.key,
            mode=self.mode,
            columns=cols,
            indexes=self.indexes,
            definition=self.definition_hash,
            params=[p.info(n) for n, p in self.client_params.items()],
        )

    @property
    def definition_hash(self) -> str:
        """Changes whenever what the stream sends changes: the client then re-downloads."""
        cached: str | None = getattr(self, "_definition_hash", None)
        if cached is None:
            desc: dict[str, Any] = {
                "mode": self.mode,
                "local": self.local_table,
                "key": self.key,
                "columns": [
                    [n, describe(c), logical_type(c.type)] for n, c in self.columns.items()
                ],
            }
            if self.mode == "full":
                desc["query"] = describe(self.query)
            else:
                desc["base"] = self.base.name
                desc["joins"] = [[j.table.name, describe(j.on)] for j in self.joins]
                desc["where"] = describe(self.where)
            if self.client_params:
                desc["params"] = {n: repr(p) for n, p in sorted(self.client_params.items())}
            raw = json.dumps(desc, sort_keys=True).encode()
            cached = hashlib.sha256(raw).hexdigest()[:16]
            self._definition_hash = cached
        return cached

    def __repr__(self) -> str:
        return f"Stream({self.name!r}, mode={self.mode!r}, local_table={self.local_table!r})"


@dataclass
class SyncUnit:
    """A named set of streams and a direction: one moment of the app."""

    name: str
    streams: Sequence[Stream] = ()
    direction: Direction = "pull"
    push_tables: Sequence[str] = field(default_factory=list)

    @property
    def pulls(self) -> bool:
        return self.direction in ("pull", "both")

    @property
    def pushes(self) -> bool:
        return self.direction in ("push", "both")

    @property
    def client_params(self) -> dict[str, Param]:
        """The parameters the app supplies to run this unit (its streams' together)."""
        out: dict[str, Param] = {}
        for s in self.streams:
            out.update(s.client_params)
        return out


def _unjoined(clause: Any, allowed: set[Any]) -> str | None:
    """The name of a table ``clause`` reads that is not in ``allowed`` (the stream's base
    table and joined tables), or None."""
    return next((c.table.name for c in columns_of(clause) if c.table not in allowed), None)


def _check_shared(a: Stream, b: Stream) -> None:
    """Two streams may fill one local table if they send the same rows' same columns
    and at most one has no client parameters (the device records which holds a row)."""
    same = (
        a.mode == b.mode == "delta"
        and a.base is b.base
        and a.key == b.key
        and [(n, describe(c)) for n, c in a.columns.items()]
        == [(n, describe(c)) for n, c in b.columns.items()]
    )
    if not same:
        raise DeclarationError(
            f"streams {a.name!r} and {b.name!r} both fill {a.local_table!r} but differ;"
            " streams sharing a local table need the same base table, key and columns"
        )
    if not a.client_params and not b.client_params:
        raise DeclarationError(
            f"streams {a.name!r} and {b.name!r} both fill {a.local_table!r}; only one"
            " stream without client parameters may fill a local table"
        )


class SyncSchema:
    """All units a server offers; computes the catalog and what to track."""

    def __init__(self, units: Iterable[SyncUnit]) -> None:
        self.units: dict[str, SyncUnit] = {}
        self.streams: dict[str, Stream] = {}
        by_table: dict[str, Stream] = {}
        for unit in units:
            if unit.name in self.units:
                raise DeclarationError(f"two units are named {unit.name!r}")
            if unit.direction not in ("pull", "push", "both"):
                raise DeclarationError(f"unit {unit.name!r}: unknown direction {unit.direction!r}")
            self.units[unit.name] = unit
            for s in unit.streams:
                known = self.streams.get(s.name)
                if known is not None and known is not s:
                    raise DeclarationError(f"two different streams are named {s.name!r}")
                other = by_table.get(s.local_table)
                if other is not None and other is not s:
                    _check_shared(other, s)
                self.streams[s.name] = s
                if other is None or (other.client_params and not s.client_params):
                    by_table[s.local_table] = s  # the plain stream speaks for a shared table
            if unit.client_params and unit.pushes:
                raise DeclarationError(
                    f"unit {unit.name!r} has client parameters, so it can only pull"
                )
            for pname, param in unit.client_params.items():
                for s in unit.streams:
                    if s.client_params.get(pname, param) != param:
                        raise DeclarationError(
                            f"unit {unit.name!r}: streams declare parameter {pname!r} differently"
                        )
        for unit in self.units.values():
            for t in unit.push_tables:
                if t not in by_table:
                    raise DeclarationError(f"unit {unit.name!r} pushes unknown table {t!r}")
                if not by_table[t].is_writable:
                    raise DeclarationError(
                        f"unit {unit.name!r} pushes {t!r}, whose stream {by_table[t].name!r}"
                        " is read-only: give it a row filter or an explicit write= rule"
                    )
            for t in self.unit_push_tables(unit) if unit.pushes else []:
                if by_table[t].client_params:
                    raise DeclarationError(
                        f"unit {unit.name!r} pushes {t!r}, which only streams with client"
                        " parameters fill; a pushed table needs a stream without them"
                    )
        self.by_local_table = by_table
        for table in self.tracked_tables():
            add_tracking_columns(table)

    def tracked_tables(self) -> list[sa.Table]:
        """Every table whose changes delta streams need, each once."""
        seen: dict[str, sa.Table] = {}
        for s in self.streams.values():
            if s.mode == "delta":
                for t in s.tables:
                    seen.setdefault(t.name, t)
        return list(seen.values())

    def scope_columns(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for s in self.streams.values():
            if s.mode == "delta":
                for table, cols in s.scope_columns().items():
                    out.setdefault(table, set()).update(cols)
        return out

    def unit_push_tables(self, unit: SyncUnit) -> list[str]:
        """Local tables whose mutations a pushing unit sends (default: its writable streams')."""
        if unit.push_tables:
            return list(unit.push_tables)
        return [s.local_table for s in unit.streams if s.mode == "delta" and s.is_writable]

    def catalog(self) -> Catalog:
        streams = [s.info() for s in self.streams.values()]
        units = [
            UnitInfo(
                name=u.name,
                direction=u.direction,
                streams=[s.name for s in u.streams],
                push=self.unit_push_tables(u) if u.pushes else [],
            )
            for u in self.units.values()
        ]
        # Every field of the catalog (indexes, nullability and writability included):
        # a device holding another hash takes the whole catalog again, so whatever
        # changes in it reaches every device.
        unhashed = Catalog(protocol=PROTOCOL_VERSION, schema_hash="", units=units, streams=streams)
        schema_hash = hashlib.sha256(encode_catalog(unhashed)).hexdigest()[:16]
        return msgspec.structs.replace(unhashed, schema_hash=schema_hash)
