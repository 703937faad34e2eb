"""A pushed value checked against its base column and turned into the column's type.

``coerce`` takes a value as the wire carries it (JSON or MessagePack scalars,
ISO 8601 text for dates and times, decimals as text) and returns what the
column's SQLAlchemy type takes, or raises ``Rejected`` with a reason a person
can read: the mutation is then answered ``rejected``, never applied. A value the
column would keep otherwise than sent is refused, not changed: a fraction of a
second finer than microseconds, a time of day with an offset the database drops.

A JSON request carries bytes as base64 text, and a non-finite real as text
(``protocol.NON_FINITE``): ``bytes_from_json`` turns the values of blob and real
columns back into bytes and floats before the mutations are applied.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from syncunit.protocol import NON_FINITE, Mutation
from syncunit.server.limits import shorten
from syncunit.units import Stream, SyncSchema, logical_type

__all__ = [
    "NotBase64",
    "Rejected",
    "bytes_from_json",
    "coerce",
    "coerce_key",
    "naive_utc",
    "to_datetime",
]


class Rejected(Exception):
    """A mutation is refused; becomes a ``rejected`` result."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


_kinds: dict[Any, str] = {}  # logical type per column type object (held: ids stay unique)

#: Digits of a fraction of a second past the microseconds, which Python's ISO 8601
#: parsers (and msgspec's for durations) drop without a word.
_FINER = re.compile(r"([.,]\d{6})\d+")

#: Where the database has no interval type (SQLite), SQLAlchemy keeps an ``Interval``
#: as the date-time that long after 1970-01-01 (which must fall in years 1 to 9999).
_EPOCH = dt.datetime(1970, 1, 1)


def coerce(
    value: Any,
    column: sa.Column[Any],
    local: str,
    *,
    nul: bool = True,
    native: bool = True,
    base: bool = False,
    beyond_python: bool = False,
) -> Any:
    """Validate a wire value for ``column`` and turn it into the column's Python type.

    ``nul``: whether text may hold the NUL character (the database's text can).
    ``native``: whether the database keeps a time of day's offset in a column with
    time zone, and has an interval type (PostgreSQL); elsewhere a time with an offset
    is refused, and a duration must fit the date-time SQLAlchemy stores it as.
    ``base``: the value is a base (what the device saw, compared, never stored): a
    fraction of a second finer than microseconds is cut, as the database reads a
    stored one, rather than refused.
    ``beyond_python``: whether a date or time column takes the database's text for a
    value Python cannot hold (PostgreSQL's, as the server sends it: ``_beyond_python``).
    """
    if value is None:
        if not column.nullable:
            raise Rejected("invalid-value", f"column {local!r} cannot be empty")
        return None
    kind = _kinds.get(column.type)
    if kind is None:
        kind = _kinds[column.type] = logical_type(column.type)
    if beyond_python and isinstance(value, str) and _beyond_python(value, column, kind):
        return value  # the database reads the text
    try:
        if kind == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if kind == "real":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError
            return float(value)
        if kind == "boolean":
            if value in (0, 1):
                return bool(value)
            raise TypeError
        if kind == "json":
            parsed = json.loads(value) if isinstance(value, str) else value
            if not nul and _binary_json(column.type) and _holds_nul(parsed):
                raise Rejected(
                    "invalid-value",
                    f"column {local!r}: JSON stored as jsonb cannot hold the NUL character"
                    " (U+0000) in a string or a name in this server's database; remove it",
                )
            return parsed
        if kind in ("text", "uuid", "decimal", "datetime", "date", "time", "interval"):
            if kind == "decimal" and isinstance(value, int):
                return decimal.Decimal(value)
            if not isinstance(value, str):
                raise TypeError
            if kind in ("datetime", "time", "interval") and (finer := _FINER.search(value)):
                if not base:
                    raise Rejected(
                        "invalid-value",
                        f"column {local!r}: {shorten(value)} is finer than the microseconds"
                        " the server keeps; round it to at most 6 decimals",
                    )
                value = value[: finer.end(1)] + value[finer.end() :]
            if kind == "datetime":
                try:
                    return to_datetime(value, column)
                except OverflowError:  # an offset took it past Python's years
                    raise Rejected(
                        "invalid-value",
                        f"column {local!r}: {shorten(value)} is outside the years 1 to"
                        " 9999 in UTC, which the server cannot hold",
                    ) from None
            if kind == "date":
                return dt.date.fromisoformat(value)
            if kind == "time":
                return _to_time(value, column, local, native=native)
            if kind == "interval":
                return _to_interval(value, column, local, native=native)
            if kind == "decimal":
                number = decimal.Decimal(value)
                if number.is_snan():  # no database takes it, and comparing it raises
                    raise ValueError(value)
                return number
            if kind == "uuid":
                # In the form the column gives back: text (lower case) with as_uuid=False.
                parsed = uuid.UUID(value)
                return parsed if getattr(column.type, "as_uuid", True) else str(parsed)
            if isinstance(column.type, sa.Enum):
                return _enum_member(value, column.type, local)
            length = getattr(column.type, "length", None)
            if length is not None and len(value) > length:
                raise Rejected(
                    "invalid-value", f"column {local!r} holds at most {length} characters"
                )
            if not nul and "\x00" in value:
                raise Rejected(
                    "invalid-value",
                    f"column {local!r}: text cannot hold the NUL character (U+0000) in this"
                    " server's database; remove it, or keep such data in a binary column",
                )
            return value
        if kind == "blob":
            if isinstance(value, NotBase64):
                raise Rejected(
                    "invalid-value",
                    f"column {local!r} expects bytes, which a JSON request carries as"
                    f" base64 text; {shorten(str(value))} is not base64: {value.error}",
                )
            if not isinstance(value, bytes):
                raise TypeError
            return value
    except (TypeError, ValueError, decimal.InvalidOperation):
        expected = {
            "datetime": "an ISO 8601 date-time string",
            "date": "an ISO 8601 date string",
            "time": "an ISO 8601 time string",
            "interval": "an ISO 8601 duration string (days, hours, minutes, seconds: PT1H30M)",
            "decimal": "a decimal number as a string",
            "uuid": "a UUID string",
        }.get(kind, f"a {kind} value")
        raise Rejected(
            "invalid-value", f"column {local!r} expects {expected}, got {shorten(value)}"
        ) from None
    return value


def _enum_member(label: str, type_: sa.Enum, local: str) -> Any:
    """What an ``Enum`` column reads back for the ``label`` it stores: a Python enum's
    member (a pull sends its label: its name, unless ``values_callable`` says otherwise),
    the label itself for an Enum of strings. SQLAlchemy cannot read back a label the
    Enum does not declare (a native enum, PostgreSQL's, cannot store one): rejected."""
    try:
        return type_._object_lookup[label]
    except KeyError:
        labels = ", ".join(map(repr, type_.enums[:10])) + (", ..." if type_.enums[10:] else "")
        raise Rejected(
            "invalid-value", f"column {local!r} expects one of {labels}, got {shorten(label)}"
        ) from None


def to_datetime(value: str, column: sa.Column[Any]) -> dt.datetime:
    """An ISO 8601 date-time for ``column``. One with an offset is the same instant in
    UTC: kept so by a ``DateTime(timezone=True)`` column, without the offset by one
    without time zone (which SQLite would otherwise store with the offset dropped,
    another instant). One without is UTC in a column with time zone. Raises
    ``ValueError`` for anything else (a fraction of a second finer than microseconds
    too), ``OverflowError`` for an instant in UTC outside the years 1 to 9999."""
    if _FINER.search(value):
        raise ValueError(f"finer than microseconds: {value!r}")
    parsed = dt.datetime.fromisoformat(value)
    if not getattr(column.type, "timezone", False):
        return naive_utc(parsed)
    if parsed.utcoffset() is None:  # UTC, as SQLite keeps it (not the session's zone)
        return parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def naive_utc(value: dt.datetime) -> dt.datetime:
    """``value`` in UTC without its zone (one without a zone is taken as it is)."""
    return value if value.tzinfo is None else value.astimezone(dt.UTC).replace(tzinfo=None)


def _to_time(value: str, column: sa.Column[Any], local: str, *, native: bool) -> dt.time:
    """An ISO 8601 time of day for ``column``. A ``Time(timezone=True)`` column on
    PostgreSQL (``native``) keeps an offset: one without is taken as UTC, as a zoned
    date-time is, not in the session's time zone. Elsewhere the database would drop
    the offset (another time), so a time with one is refused."""
    parsed = dt.time.fromisoformat(value)
    if native and getattr(column.type, "timezone", False):
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)
    if parsed.tzinfo is not None:
        raise Rejected(
            "invalid-value",
            f"column {local!r} keeps no offset in a time of day (the database would drop"
            f" it): send a plain time (HH:MM:SS), not {shorten(value)}",
        )
    return parsed


def _to_interval(value: str, column: sa.Column[Any], local: str, *, native: bool) -> dt.timedelta:
    """An ISO 8601 duration (days, hours, minutes, seconds) for ``column``."""
    parsed = msgspec.convert(value, dt.timedelta)
    if not (native and getattr(column.type, "native", True)):
        try:
            _EPOCH + parsed
        except OverflowError:
            raise Rejected(
                "invalid-value",
                f"column {local!r}: {shorten(value)} is longer than this server's database"
                " keeps (it stores a duration as a date-time from 1970-01-01, within the"
                " years 1 to 9999)",
            ) from None
    return parsed


def coerce_key(
    value: Any,
    column: sa.Column[Any],
    local: str,
    *,
    native: bool = True,
    beyond_python: bool = False,
) -> Any:
    """``coerce`` for a row's key, which must also be in the form the row comes back in:
    a key the database stores in another form (an upper-case UUID, a date-time with a
    space, ``1.5`` in a column of two decimals, ``1E+2``, ``-0``) would come back as
    another row beside the device's own, which keeps its form.

    ``native``: whether the database gives decimals and zoned date-times back as
    stored (PostgreSQL); SQLite's come back with SQLAlchemy's ten places when the
    column says no scale, and without their zone. ``beyond_python``: as ``coerce``
    takes it (such a key is taken in the one form the database writes)."""
    key = coerce(value, column, local, native=native, beyond_python=beyond_python)
    kind = _kinds[column.type]
    if kind not in ("uuid", "datetime", "date", "time", "interval", "decimal") or key is None:
        return key
    if isinstance(key, dt.timedelta):
        canonical = msgspec.to_builtins(key)
    elif isinstance(key, dt.datetime) and not native:
        canonical = key.replace(tzinfo=None).isoformat()
    elif isinstance(key, dt.date | dt.time):
        canonical = key.isoformat()
    elif isinstance(key, decimal.Decimal):
        scale = getattr(column.type, "scale", None)
        if scale is None and not native:
            scale = getattr(column.type, "_effective_decimal_return_scale", None)
        if scale is not None:
            key = key.quantize(decimal.Decimal(1).scaleb(-scale))
        canonical = format(key.copy_abs() if key.is_zero() else key, "f")
    else:
        canonical = str(key)
    if canonical != value:
        raise Rejected(
            "invalid-value",
            f"key column {local!r}: {shorten(value)} is stored as {shorten(canonical)}, and"
            " would come back as another row; write the key as the server stores it",
        )
    return key


#: PostgreSQL's text (DateStyle ISO, time zone UTC: ``postgres.configure_engine``) for
#: a date or date-time before year 1 (``BC``) or after 9999, and for a time (with time
#: zone or not) of ``24:00:00``, by logical type and whether the column has a zone.
#: Only the form the database writes: a value a device sends back unchanged compares
#: equal to the stored one, and a key comes back as it went.
_DAY = r"(?P<year>\d{4,})-\d\d-\d\d"
_CLOCK = r" \d\d:\d\d:\d\d(\.\d{0,5}[1-9])?"
_BEYOND = {
    ("date", False): re.compile(_DAY + "(?P<bc> BC)?"),
    ("datetime", False): re.compile(_DAY + _CLOCK + "(?P<bc> BC)?"),
    ("datetime", True): re.compile(_DAY + _CLOCK + r"\+00(?P<bc> BC)?"),
    ("time", False): re.compile("24:00:00"),
    ("time", True): re.compile(r"24:00:00[+-]\d\d(:\d\d){0,2}"),
}


def _beyond_python(value: str, column: sa.Column[Any], kind: str) -> bool:
    """Whether ``value`` is PostgreSQL's text for a value of ``column`` (of logical type
    ``kind``) that Python cannot hold, as ``PostgresStore`` reads it: ``infinity`` and
    ``-infinity`` (dates, date-times), a year BC or past 9999, ``24:00:00``."""
    if kind in ("date", "datetime") and value in ("infinity", "-infinity"):
        return True
    zoned = kind != "date" and bool(getattr(column.type, "timezone", False))
    pattern = _BEYOND.get((kind, zoned))
    found = None if pattern is None else pattern.fullmatch(value)
    if found is None or kind == "time":
        return found is not None
    year = found["year"]  # four digits, or more with no leading zero, as written
    return (len(year) == 4 or year[0] != "0") and (found["bc"] is not None or len(year) > 4)


class NotBase64(str):
    """A JSON request's value for a blob column that is not base64 text (``error``
    says why): ``coerce`` rejects it, naming the column."""

    error: str


def _not_base64(text: str, error: str) -> NotBase64:
    value = NotBase64(text)
    value.error = error
    return value


def _text_columns(stream: Stream) -> dict[str, Callable[[str], Any]]:
    """The local names of ``stream``'s columns whose values a JSON request may carry as
    text (``blob``, ``real``), each with what reads that text back."""
    out: dict[str, Callable[[str], Any]] = {}
    for name, column in stream.columns.items():
        kind = logical_type(column.type)
        if kind == "blob":
            out[name] = _from_base64
        elif kind == "real":
            out[name] = _real_from_text
    return out


def _decoded(
    values: Mapping[str, Any], columns: Mapping[str, Callable[[str], Any]]
) -> dict[str, Any] | None:
    """``values`` with the text of ``columns`` read back; None if none is text."""
    out: dict[str, Any] | None = None
    for name in columns.keys() & values.keys():
        value = values[name]
        if isinstance(value, str):
            if out is None:
                out = dict(values)
            out[name] = columns[name](value)
    return out


def _real_from_text(text: str) -> Any:
    """A non-finite real's text as its float; other text as it is (``coerce`` refuses
    it, naming the column)."""
    return NON_FINITE.get(text, text)


def _from_base64(text: str) -> bytes | NotBase64:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        return _not_base64(text, str(exc))


def bytes_from_json(mutations: list[Mutation], schema: SyncSchema) -> list[Mutation]:
    """A JSON request's ``mutations`` with the base64 text of blob columns (in
    ``values`` and ``base``; no key is binary: the declaration refuses it) as bytes,
    and the text of non-finite reals (``protocol.NON_FINITE``) as floats, as
    MessagePack carries them.

    Only tables with a blob or real column are looked at. Text that is not base64
    becomes a ``NotBase64``, which ``coerce`` rejects (``invalid-value``) naming the
    column; other text in a real column stays text, which it rejects too.
    """
    text_of: dict[str, dict[str, Callable[[str], Any]]] = {}  # per table
    out = mutations
    for i, m in enumerate(mutations):
        columns = text_of.get(m.table)
        if columns is None:
            stream = schema.by_local_table.get(m.table)
            columns = text_of[m.table] = {} if stream is None else _text_columns(stream)
        if not columns:
            continue
        values = _decoded(m.values, columns)
        base = _decoded(m.base, columns)
        if values is None and base is None:
            continue
        if out is mutations:
            out = list(mutations)
        out[i] = msgspec.structs.replace(
            m,
            values=m.values if values is None else values,
            base=m.base if base is None else base,
        )
    return out


def _binary_json(type_: sa.types.TypeEngine[Any]) -> bool:
    """Whether PostgreSQL stores this JSON column as ``jsonb``, which cannot hold NUL
    (``json`` keeps the text as sent, escapes included)."""
    variants: dict[str, Any] = getattr(type_, "_variant_mapping", {})
    return isinstance(variants.get("postgresql", type_), JSONB)


def json_items(value: Any) -> Iterator[Any]:
    """Every item of a decoded JSON value: itself, and each name, value and list item
    within it, however deep (walked without recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _holds_nul(value: Any) -> bool:
    """Whether a decoded JSON value has the NUL character in a string or a name."""
    return any(isinstance(item, str) and "\x00" in item for item in json_items(value))
