"""Wire messages of the syncunit protocol, and their two encodings.

A sync run is one ``POST /v1/sync/{unit}``: the body is a ``SyncRequest``; the
response is a stream of frames (``Frame``), each encoded on its own so both
sides can work chunk by chunk with bounded memory:

* MessagePack (default, ``application/vnd.syncunit.v1+msgpack``): each frame is a
  4-byte big-endian length followed by the MessagePack bytes;
* JSON (``application/vnd.syncunit.v1+json``, for debugging): one frame per line.

Rows travel columnar: a chunk has ``columns`` (names) and ``data`` (one list of
values per column), or, for a client that asks, one JSON text of the rows
(``Chunk.json_rows``). ``docs/protocol.md`` is the normative description.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import msgspec

from syncunit.errors import ProtocolError

PROTOCOL_VERSION = 1
MSGPACK = "application/vnd.syncunit.v1+msgpack"
JSON = "application/vnd.syncunit.v1+json"
PROBLEM = "application/problem+json"
#: A header of sync and catalog answers (value ``1``): this server holds a push that
#: arrives before the one it follows (sent at once, on another connection) until that
#: one is applied, instead of answering ``sequence-gap``; a client may then send its
#: next batch without waiting for the answer to the one before.
QUEUES_PUSHES = "Syncunit-Queues-Pushes"
#: A header of sync and catalog answers, refusals included: the server's bounds on a
#: push request, ``body=<bytes>, field=<bytes>, mutations=<count>``, and on the
#: subscriptions one sync request may carry, ``subscriptions=<count>`` (``PushLimits``;
#: servers before it said no ``subscriptions``: theirs is 200). A client sizes its
#: push batches under them, surfaces a change that alone cannot pass them as a
#: rejection instead of sending it, and refreshes more subscriptions than one
#: request may carry in several requests of the run.
PUSH_LIMITS = "Syncunit-Push-Limits"
#: Subscriptions a sync request may carry by default (and at any server whose
#: ``PUSH_LIMITS`` does not say it).
MAX_SUBSCRIPTIONS = 200
#: What an integer on the wire may hold (signed 64 bits: both databases' widest).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: JSON has no infinity or NaN (an encoder writes null): in the JSON encoding a
#: non-finite float travels as one of these texts, which the receiver reads back as
#: the float in a ``real`` column (the server from its schema, the client from its
#: catalog), as it does base64 text in a ``blob`` column.
NON_FINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
#: A header of sync and catalog answers: an opaque tag of the principal the request
#: was authenticated as (the same for every credential of that principal, different
#: for another; it does not reveal the principal's id). A device parks a session's
#: changes under it at logout and brings them back when the same principal returns.
PRINCIPAL_TAG = "Syncunit-Principal"

Encoding = Literal["msgpack", "json"]

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "JSON",
    "MAX_SUBSCRIPTIONS",
    "MSGPACK",
    "NON_FINITE",
    "PRINCIPAL_TAG",
    "PROBLEM_CODES",
    "PROTOCOL_VERSION",
    "PUSH_LIMITS",
    "QUEUES_PUSHES",
    "Answered",
    "Catalog",
    "CatalogFrame",
    "Chunk",
    "ColumnInfo",
    "End",
    "Failure",
    "Frame",
    "FrameDecoder",
    "Mutation",
    "MutationResult",
    "ParamInfo",
    "Problem",
    "PushLimits",
    "PushResults",
    "SnapshotOffer",
    "StreamInfo",
    "StreamStart",
    "Subscription",
    "SyncRequest",
    "UnitInfo",
    "base_digest",
    "decode_request",
    "encode_frame",
    "encode_request",
    "local_index_name",
    "local_table_ddl",
]


class PushLimits(msgspec.Struct, frozen=True):
    """The server's bounds on one push request, as its ``PUSH_LIMITS`` header says them.

    ``body``: the request body in bytes (compressed, and once decompressed);
    ``field``: one string or bytes value inside a mutation (key, values, base), in
    bytes (a string's UTF-8); ``mutations``: mutations in one request;
    ``subscriptions``: held subscriptions one sync request may carry to refresh
    besides its unit (a header without it, from an older server: the default).
    """

    body: int = 8 * 1024 * 1024
    field: int = 256 * 1024
    mutations: int = 10_000
    subscriptions: int = MAX_SUBSCRIPTIONS

    def header(self) -> str:
        """The header's value."""
        return (
            f"body={self.body}, field={self.field}, mutations={self.mutations},"
            f" subscriptions={self.subscriptions}"
        )

    @classmethod
    def parse(cls, value: str | None) -> PushLimits | None:
        """The limits in a header's value; None if it is missing or unreadable."""
        if not value:
            return None
        found: dict[str, int] = {}
        for part in value.split(","):
            name, _, number = part.partition("=")
            if number.strip().isdigit() and int(number) > 0:
                found[name.strip()] = int(number)
        if not {"body", "field", "mutations"} <= found.keys():
            return None
        return cls(
            body=found["body"],
            field=found["field"],
            mutations=found["mutations"],
            subscriptions=found.get("subscriptions", MAX_SUBSCRIPTIONS),
        )


# -- catalog -----------------------------------------------------------------


class ColumnInfo(msgspec.Struct, frozen=True):
    """One column of a local table. ``type`` is a logical type (see protocol.md)."""

    name: str
    type: str
    nullable: bool = True
    writable: bool = False


class ParamInfo(msgspec.Struct, frozen=True):
    """A filter parameter the app supplies: ``integer`` (within ``min``/``max``) or ``text``."""

    name: str
    type: Literal["integer", "text"]
    min: int | None = None
    max: int | None = None
    max_length: int = 200


class StreamInfo(msgspec.Struct, frozen=True):
    """A stream: the local table it fills and how; ``params`` the app must supply."""

    name: str
    local_table: str
    key: str
    mode: Literal["delta", "full"]
    columns: list[ColumnInfo]
    indexes: list[list[str]] = []
    definition: str = ""
    params: list[ParamInfo] = []


#: SQLite column type of a local table's column, by logical type (any other: TEXT).
LOCAL_SQL_TYPES = {"integer": "INTEGER", "boolean": "INTEGER", "real": "REAL", "blob": "BLOB"}


def quote_name(name: str) -> str:
    """``name`` as an SQLite identifier."""
    return '"' + name.replace('"', '""') + '"'


def local_index_name(info: StreamInfo, columns: Sequence[str]) -> str:
    """The name of ``info``'s local index on ``columns`` (unquoted), on the device and
    in its snapshot files alike."""
    return f"ix_{info.local_table}_{'_'.join(columns)}"


def local_table_ddl(info: StreamInfo, table: str | None = None) -> list[str]:
    """The statements creating ``info``'s local table (named ``table``), then its indexes.

    The device creates its local tables with them, and the server the table
    ``rows`` of its snapshot files: an empty local table and a file's table then
    have the same columns and indexes, so SQLite copies the file's records and
    index entries as they are stored, without decoding or sorting them. The
    indexes keep the local table's names whatever the table is called, so a
    device can also take the file's pages as they are (``client.adopt``).
    """
    name = table or info.local_table
    cols = ", ".join(
        f"{quote_name(c.name)} {LOCAL_SQL_TYPES.get(c.type, 'TEXT')}"
        + (" PRIMARY KEY" if c.name == info.key else "")
        for c in info.columns
    )
    ddl = [f"CREATE TABLE {quote_name(name)} ({cols})"]
    for ix in info.indexes:
        index = quote_name(local_index_name(info, ix))
        on = ", ".join(map(quote_name, ix))
        ddl.append(f"CREATE INDEX IF NOT EXISTS {index} ON {quote_name(name)} ({on})")
    return ddl


class UnitInfo(msgspec.Struct, frozen=True):
    """A sync unit: its streams, direction (``pull``, ``push`` or ``both``), pushed tables."""

    name: str
    direction: Literal["pull", "push", "both"]
    streams: list[str]
    push: list[str] = []


class Catalog(msgspec.Struct, frozen=True):
    """What ``GET /v1/catalog`` answers: everything a generic client needs."""

    protocol: int
    schema_hash: str
    units: list[UnitInfo]
    streams: list[StreamInfo]

    def unit(self, name: str) -> UnitInfo | None:
        return next((u for u in self.units if u.name == name), None)

    def stream(self, name: str) -> StreamInfo | None:
        return next((s for s in self.streams if s.name == name), None)


# -- request -----------------------------------------------------------------


class Mutation(msgspec.Struct, frozen=True, gc=False):
    """One local change to push. ``seq`` grows by one per client and is never reused.

    ``values`` holds the new values (an insert: the whole row; an update: the
    ``changed`` columns); ``base`` the values the client saw before its change,
    which conflict detection compares with the server's current row. The base of a
    column in ``digested`` is the ``base_digest`` of what the client saw, a value
    too large to send (over the server's field limit) that is only compared.
    """

    seq: int
    id: str
    table: str
    key: Any
    op: Literal["insert", "update", "delete"]
    values: dict[str, Any] = {}
    changed: list[str] = []
    base: dict[str, Any] = {}
    digested: list[str] = []


def base_digest(value: Any) -> Any:
    """What a mutation's ``base`` carries for ``value`` in a column listed in
    ``digested``: the SHA-256 of bytes, as bytes; of text (its UTF-8), as
    ``"sha256:"`` and its hex digits; None for any other value (never digested).

    Typed as the value is, so a server that knows no ``digested`` still takes it
    for its column (a blob as bytes), and finds it unequal to the value stored.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return hashlib.sha256(value).digest()
    if isinstance(value, str):
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()
    return None


class Subscription(msgspec.Struct, frozen=True):
    """Another unit with its parameter values, refreshed in the same request.

    ``id`` is the client's name for it: the frames of its streams carry it.
    """

    id: str
    unit: str
    params: dict[str, Any] = {}
    cursors: dict[str, str] = {}


class SyncRequest(msgspec.Struct, frozen=True):
    """The body of ``POST /v1/sync/{unit}``; ``params`` are the unit's client parameters."""

    protocol: int
    client_id: str
    schema_hash: str = ""
    cursors: dict[str, str] = {}
    mutations: list[Mutation] = []
    chunk_size: int | None = None
    snapshots: bool = False  # the client can apply a ``SnapshotOffer``
    params: dict[str, Any] = {}
    subscriptions: list[Subscription] = []
    #: The lowest seq the client has sent (or numbered to send) and not had answered;
    #: 0: none. A pull then starts with the server's ``Answered`` verdicts on them.
    unanswered_from: int = 0
    #: The client can apply a chunk whose rows come as JSON text (``Chunk.json_rows``).
    json_rows: bool = False
    #: Streams an earlier response of this sync run brought to their end, with no push
    #: since: the server skips them, so a stream that always has something new cannot
    #: hold the later ones back. Each is a stream's name (``stream@subscription`` for a
    #: subscription's).
    done: list[str] = []


# -- response frames ---------------------------------------------------------


class MutationResult(msgspec.Struct, frozen=True, gc=False):
    """The server's verdict on one mutation."""

    seq: int
    id: str
    status: Literal["applied", "conflict", "rejected"]
    reason: str = ""
    code: str = ""
    server_row: dict[str, Any] | None = None


class PushResults(msgspec.Struct, frozen=True, tag="push"):
    """First frame of a pushing unit: one result per mutation sent, in order."""

    results: list[MutationResult]
    last_seq: int


class Answered(msgspec.Struct, frozen=True, tag="answered"):
    """Verdicts, from the server's log, on this client's mutations from
    ``SyncRequest.unanswered_from`` on that the server applied before this pull and
    that this request did not carry (their answer was lost, or is on its way).

    Sent before any rows: a pulled row they wrote is then no longer a local change
    waiting for its answer, and the device keeps it (a later pull would not bring
    it again: its version is behind the cursor). ``last_seq``: the last seq the
    server has applied for this client.
    """

    results: list[MutationResult]
    last_seq: int


class StreamStart(msgspec.Struct, frozen=True, tag="stream"):
    """A stream begins; ``total`` rows are expected (an estimate for progress).

    ``copy`` says the chunks are a first copy (or a re-download) in key order,
    not a delta: a client may defer its secondary indexes until it completes.
    """

    stream: str
    total: int
    reset: bool
    copy: bool = False
    subscription: str = ""


class Chunk(msgspec.Struct, frozen=True, tag="chunk"):
    """A bounded batch of changes, applied in one local transaction with its cursor.

    ``reset`` asks the client to clear the local table first (a full re-download);
    ``complete`` marks the stream's last chunk in this response. The rows are
    ``data`` (one list per column), or, to a client that asked for it, ``json_rows``:
    one JSON array of ``json_count`` rows, each an array in ``columns`` order (a
    SQLite server writes it in the database, for a first copy, without a Python
    object per value). ``row_list()`` and ``row_count()`` read either.
    """

    stream: str
    columns: list[str]
    data: list[list[Any]]
    removed: list[Any]
    cursor: str
    reset: bool = False
    complete: bool = False
    subscription: str = ""
    json_rows: str = ""
    json_count: int = 0

    def row_count(self) -> int:
        """How many rows the chunk carries."""
        if self.json_rows:
            return self.json_count
        return len(self.data[0]) if self.data else 0

    def row_list(self) -> Sequence[Sequence[Any]]:
        """The rows, one sequence of values each, in ``columns`` order.

        Raises ``ProtocolError`` when ``json_rows`` is not a JSON array of
        ``json_count`` arrays of ``len(columns)`` values.
        """
        if not self.json_rows:
            return list(zip(*self.data, strict=True))
        try:
            rows = _rows_decoder(len(self.columns)).decode(self.json_rows)
        except msgspec.DecodeError as exc:  # a row of another width included
            raise ProtocolError(f"malformed rows of a {self.stream!r} chunk: {exc}") from exc
        if len(rows) != self.json_count:
            raise ProtocolError(
                f"a {self.stream!r} chunk said {self.json_count} rows and holds {len(rows)}"
            )
        return rows


class End(msgspec.Struct, frozen=True, tag="end"):
    """The last frame of a response.

    ``complete`` is False when the server ended the response early (it reads
    the database for a bounded time per response): the client sends another
    request with the cursors it now has, in the same sync run.
    """

    server_time: str
    complete: bool = True


class SnapshotOffer(msgspec.Struct, frozen=True, tag="snapshot"):
    """Instead of a stream's first copy: a prebuilt file of its rows to download.

    ``path`` (on this server, ``GET`` with the same token) serves a zstd-compressed
    SQLite file of ``size`` bytes and SHA-256 ``sha256``, whose table ``rows``
    holds the stream's ``rows`` rows; once they are in the local table, ``cursor``
    is the stream's cursor, and the next request takes a delta from it.
    """

    stream: str
    path: str
    size: int
    sha256: str
    rows: int
    cursor: str


class CatalogFrame(msgspec.Struct, frozen=True, tag="catalog"):
    """First frame when the request's ``schema_hash`` was missing or stale.

    The client creates or migrates its local tables from ``catalog`` before it
    applies the frames that follow, so a first sync is one request.
    """

    catalog: Catalog


class Failure(msgspec.Struct, frozen=True, tag="failure"):
    """The server failed after the response started; the client keeps applied chunks."""

    status: int
    code: str
    title: str
    detail: str = ""


Frame = CatalogFrame | PushResults | Answered | StreamStart | Chunk | SnapshotOffer | End | Failure


#: The stable catalog of wire errors: code -> (HTTP status, title). A code never
#: changes meaning and is never reused; both sides import it from here.
PROBLEM_CODES: dict[str, tuple[int, str]] = {
    "unauthenticated": (401, "Authentication required"),
    "forbidden": (403, "Not allowed"),
    "missing-parameter": (403, "The principal lacks a parameter this unit filters on"),
    "unit-forbidden": (403, "This principal may not run this sync unit"),
    "unknown-unit": (404, "No such sync unit"),
    "unknown-stream": (404, "No such stream in this sync unit"),
    "unknown-snapshot": (404, "No such snapshot"),
    "not-found": (404, "No such endpoint"),
    "method-not-allowed": (405, "This endpoint does not take this method"),
    "malformed-request": (400, "The request body could not be read"),
    "unsupported-protocol": (400, "Unsupported protocol version"),
    "invalid-parameter": (400, "A client parameter is missing, unknown or malformed"),
    "upload-timeout": (408, "The request body took too long to arrive"),
    "invalid-range": (400, "The Range header cannot be read"),
    "range-not-satisfiable": (416, "The Range header asks for bytes past the end of the file"),
    "invalid-request": (422, "The request is well-formed but not valid"),
    "sequence-gap": (409, "Mutations are missing before these"),
    "schema-changed": (409, "The server's schema changed; fetch the catalog again"),
    "body-too-large": (413, "The request body is too large"),
    "too-many-mutations": (413, "Too many mutations in one request"),
    "field-too-large": (413, "A field of the request is too large"),
    "unsupported-media-type": (415, "Unsupported content type or encoding"),
    "rate-limited": (429, "Too many requests from this principal; retry after a while"),
    "internal": (500, "The server failed"),
    "busy": (503, "Too many clients are waiting for live changes; try again later"),
    "overloaded": (
        503,
        "The server is at capacity (syncs running or request bodies held); retry after a while",
    ),
    "database-unavailable": (503, "The server's database is unavailable; retry after a while"),
    "database-restored": (503, "The server's database is a restored copy; retry after a while"),
}


class Problem(msgspec.Struct, frozen=True, omit_defaults=True):
    """An ``application/problem+json`` document (RFC 9457) plus a stable ``code``;
    ``unit``, when set, names the unit it is about (``unit-forbidden``: the unit the
    principal may not run, which may be a subscription of the request's unit);
    ``subscription``, when set, is the ``id`` of the request's subscription refused
    (``invalid-parameter``: its parameter values)."""

    type: str
    title: str
    status: int
    code: str
    detail: str = ""
    unit: str = ""
    subscription: str = ""


# -- encoding ----------------------------------------------------------------

_LEN = struct.Struct(">I")
_mp_enc = msgspec.msgpack.Encoder()
_js_enc = msgspec.json.Encoder()
_mp_frame = msgspec.msgpack.Decoder(Frame)
_js_frame = msgspec.json.Decoder(Frame)
_mp_req = msgspec.msgpack.Decoder(SyncRequest)
_js_req = msgspec.json.Decoder(SyncRequest)


@functools.lru_cache(maxsize=64)
def _rows_decoder(width: int) -> msgspec.json.Decoder[list[tuple[Any, ...]]]:
    """Decodes JSON rows of exactly ``width`` values each into tuples (checked, in C)."""
    row = types.GenericAlias(tuple, (Any,) * width)
    return msgspec.json.Decoder(list[row])  # type: ignore[valid-type]


def content_type(encoding: Encoding) -> str:
    return MSGPACK if encoding == "msgpack" else JSON


def encoding_of(media_type: str | None) -> Encoding | None:
    """The encoding a Content-Type or Accept value names, or None."""
    if not media_type:
        return None
    value = media_type.split(";")[0].strip().lower()
    if value in (MSGPACK, "application/msgpack", "application/x-msgpack"):
        return "msgpack"
    if value in (JSON, "application/json"):
        return "json"
    return None


def encode_request(request: SyncRequest, encoding: Encoding = "msgpack") -> bytes:
    if encoding == "msgpack":
        return _mp_enc.encode(request)
    mutations = _reals_as_text(request.mutations)
    if mutations is not request.mutations:
        request = msgspec.structs.replace(request, mutations=mutations)
    return _js_enc.encode(request)


def _text_of(value: Any) -> Any:
    """A non-finite float as its ``NON_FINITE`` text; any other value as it is."""
    if type(value) is float and not math.isfinite(value):
        return "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
    return value


def _finite(values: Iterable[Any], isfinite: Callable[[float], bool] = math.isfinite) -> bool:
    """Whether no value is a non-finite float (every value of a JSON answer's rows
    goes through it)."""
    for v in values:  # noqa: SIM110 (a loop runs faster than all() over a generator)
        if type(v) is float and not isfinite(v):
            return False
    return True


def _list_text(values: list[Any]) -> list[Any]:
    """``values`` with non-finite floats as text (the same list if none is)."""
    return values if _finite(values) else [_text_of(v) for v in values]


def _dict_text(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with non-finite floats as text (the same dict if none is)."""
    return values if _finite(values.values()) else {k: _text_of(v) for k, v in values.items()}


def _reals_as_text(mutations: list[Mutation]) -> list[Mutation]:
    """``mutations`` with the non-finite floats of their values and bases as text (the
    same list if none has one)."""
    out = mutations
    for i, m in enumerate(mutations):
        values, base = _dict_text(m.values), _dict_text(m.base)
        if values is m.values and base is m.base:
            continue
        if out is mutations:
            out = list(mutations)
        out[i] = msgspec.structs.replace(m, values=values, base=base)
    return out


def _results_text(results: list[MutationResult]) -> list[MutationResult]:
    out = results
    for i, r in enumerate(results):
        row = r.server_row
        if row is None or (text := _dict_text(row)) is row:
            continue
        if out is results:
            out = list(results)
        out[i] = msgspec.structs.replace(r, server_row=text)
    return out


def _frame_text(frame: Frame) -> Frame:
    """``frame`` with the non-finite floats of its rows as text, for a JSON answer."""
    if isinstance(frame, Chunk) and frame.data:
        data = [_list_text(column) for column in frame.data]
        if any(new is not old for new, old in zip(data, frame.data, strict=True)):
            return msgspec.structs.replace(frame, data=data)
    elif isinstance(frame, PushResults | Answered):
        results = _results_text(frame.results)
        if results is not frame.results:
            return msgspec.structs.replace(frame, results=results)
    return frame


def decode_request(body: bytes | bytearray, encoding: Encoding) -> SyncRequest:
    """Decode a request body; raise ``ProtocolError`` saying what is wrong."""
    try:
        req = _mp_req.decode(body) if encoding == "msgpack" else _js_req.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed sync request: {exc}") from exc
    except RecursionError:
        raise ProtocolError("malformed sync request: values are nested too deeply") from None
    return req


def close_frames(frames: Iterator[Frame]) -> None:
    """Close ``frames`` now, if it can be closed (a generator: its ``finally`` runs and
    lets go of what it holds, a database snapshot say), not whenever it is collected."""
    close = getattr(frames, "close", None)
    if close is not None:
        close()


def encode_frame(frame: Frame, encoding: Encoding = "msgpack") -> bytes:
    if encoding == "msgpack":
        payload = _mp_enc.encode(frame)
        return _LEN.pack(len(payload)) + payload
    return _js_enc.encode(_frame_text(frame)) + b"\n"


def encode_catalog(catalog: Catalog) -> bytes:
    return _js_enc.encode(catalog)


def decode_catalog(body: bytes) -> Catalog:
    try:
        return msgspec.json.decode(body, type=Catalog)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed catalog: {exc}") from exc


def decode_problem(body: bytes) -> Problem | None:
    try:
        return msgspec.json.decode(body, type=Problem)
    except msgspec.DecodeError:
        return None


class FrameDecoder:
    """Incremental frame reader: feed it bytes as they arrive, get whole frames."""

    def __init__(self, encoding: Encoding = "msgpack", max_frame: int = 256 * 1024 * 1024) -> None:
        self.encoding = encoding
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[Frame]:
        self._buf += data
        buf = self._buf
        pos = 0
        try:
            if self.encoding == "msgpack":
                while len(buf) - pos >= 4:
                    (size,) = _LEN.unpack_from(buf, pos)
                    if size > self.max_frame:
                        raise ProtocolError(f"frame of {size} bytes exceeds {self.max_frame}")
                    if len(buf) - pos - 4 < size:
                        break
                    yield _mp_frame.decode(buf[pos + 4 : pos + 4 + size])
                    pos += 4 + size
            else:
                while (nl := buf.find(b"\n", pos)) != -1:
                    yield _js_frame.decode(buf[pos:nl])
                    pos = nl + 1
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"malformed frame from server: {exc}") from exc
        finally:
            del buf[:pos]

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buf)
