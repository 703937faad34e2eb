"""Bounds on what one request may make the server do, with safe defaults.

A device is not trusted: every size a request controls is bounded before the
server spends memory, time or storage on it. ``Limits`` holds the bounds (each
documented in docs/security.md); the functions here check a request against
them and raise ``ProblemException`` (a 4xx problem response) saying which
bound was crossed and how to stay within it.

The request body is read with a deadline and decompressed as a stream that
stops at the limit, so a small compressed body cannot expand into gigabytes.
The bodies held at once, across requests, are bounded too (``BodyBudget``), and
a large one is decompressed, decoded and checked on a worker thread, two at a
time (``off_the_loop``): the event loop goes on serving everybody else.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from syncunit.protocol import (
    INT64_MAX,
    INT64_MIN,
    MAX_SUBSCRIPTIONS,
    Encoding,
    Mutation,
    PushLimits,
    SyncRequest,
    decode_request,
)
from syncunit.server.problems import ProblemException

try:
    import zstandard

    HAVE_ZSTD = True
except ImportError:  # pragma: no cover
    HAVE_ZSTD = False

__all__ = [
    "BodyBudget",
    "HeldBody",
    "Limits",
    "check_identifiers",
    "check_mutations",
    "check_request",
    "decode_checked",
    "off_the_loop",
    "read_body",
    "shorten",
]

_PIECE = 64 * 1024  # decompressed bytes produced per step
# Large bodies are decompressed, decoded and checked here, two at a time: the memory
# they touch stays in these two threads' allocator arenas, not in every worker's.
_BODY_WORKERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="syncunit-body")
#: A body of at most this many bytes is decoded and checked on the event loop: it
#: holds at most as many values, a millisecond or so of work.
INLINE_BODY_BYTES = 64 * 1024

_T = TypeVar("_T")


@dataclass(frozen=True)
class Limits:
    """What one request may hold. Every field has a safe default; see docs/security.md."""

    #: Request body, compressed and decompressed (bytes).
    max_body_bytes: int = 8 * 1024 * 1024
    #: Mutations in one request (the client pushes in batches below this).
    max_mutations: int = 10_000
    #: One string or bytes value inside a mutation (key, values, base).
    max_field_bytes: int = 256 * 1024
    #: Held subscriptions one request may carry to refresh besides its unit (a device
    #: with more refreshes them over several requests of one run).
    max_subscriptions: int = MAX_SUBSCRIPTIONS
    #: Table, column and stream names, mutation ids, client ids (characters).
    max_name_length: int = 200
    #: Entries in one mutation's ``values``, ``base`` or ``changed``.
    max_columns: int = 500
    #: Nesting of lists and maps inside one value (JSON columns).
    max_depth: int = 16
    #: List items and map entries in all the values of one request together (keys,
    #: ``values`` and ``base``; the columns themselves are not counted).
    max_value_items: int = 1_000_000
    #: Cursors sent in one request, and the length of each.
    max_cursors: int = 1000
    max_cursor_length: int = 4096
    #: Seconds the client may take to upload the body.
    upload_timeout: float = 30.0
    #: Request-body bytes held at once by all requests together, as they arrive and
    #: once decompressed, until decoded; then 503.
    max_buffered_bytes: int = 128 * 1024 * 1024
    #: A response reads the database for at most this many chunks or seconds, then
    #: ends with ``End(complete=False)``; the client continues in another request.
    response_chunks: int = 500
    response_seconds: float = 20.0
    #: A client that takes no data for this long loses its snapshot (its response
    #: ends early, as above); a write blocked for ``send_timeout`` drops the connection.
    stall_seconds: float = 5.0
    send_timeout: float = 30.0
    #: Requests per second per principal (sustained, and at once); then 429.
    requests_per_second: float = 20.0
    request_burst: int = 60
    #: Syncs holding a database connection at once (None: what the pool allows),
    #: and per principal; then 503.
    max_concurrent_syncs: int | None = None
    syncs_per_principal: int = 4

    def __post_init__(self) -> None:
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_buffered_bytes ({self.max_buffered_bytes}) is below max_body_bytes"
                f" ({self.max_body_bytes}): a body the server takes could never be held;"
                " raise max_buffered_bytes or lower max_body_bytes"
            )

    def push_limits(self) -> PushLimits:
        """The bounds on a push a device is told (``protocol.PUSH_LIMITS``)."""
        return PushLimits(
            body=self.max_body_bytes,
            field=self.max_field_bytes,
            mutations=self.max_mutations,
            subscriptions=self.max_subscriptions,
        )


def shorten(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: reasons never echo a whole value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_request(req: SyncRequest, limits: Limits) -> None:
    """Check the request's envelope (client id, cursors, counts, parameters, and the
    identifiers of its mutations) against ``limits``."""
    if not req.client_id or len(req.client_id) > limits.max_name_length:
        raise ProblemException(
            "invalid-request", f"client_id must be 1 to {limits.max_name_length} characters"
        )
    if len(req.cursors) > limits.max_cursors:
        raise ProblemException(
            "field-too-large", f"{len(req.cursors)} cursors; the limit is {limits.max_cursors}"
        )
    for name, token in req.cursors.items():
        if len(name) > limits.max_name_length or len(token) > limits.max_cursor_length:
            raise ProblemException(
                "field-too-large",
                f"cursor names hold at most {limits.max_name_length} characters and cursors"
                f" {limits.max_cursor_length}; send the cursors the server gave",
            )
    if "\x00" in req.client_id:
        raise ProblemException(
            "invalid-request", "client_id cannot hold the NUL character (U+0000); remove it"
        )
    if req.chunk_size is not None and not INT64_MIN <= req.chunk_size <= INT64_MAX:
        raise ProblemException("invalid-request", "chunk_size is not a 64-bit integer")
    if not INT64_MIN <= req.unanswered_from <= INT64_MAX:
        raise ProblemException("invalid-request", "unanswered_from must fit in 64 bits (signed)")
    _check_params(req.params, "params")
    for sub in req.subscriptions:
        _check_params(sub.params, f"subscription {shorten(sub.id, 40)}: params")
    if len(req.mutations) > limits.max_mutations:
        raise ProblemException(
            "too-many-mutations",
            f"{len(req.mutations)} mutations; the limit is {limits.max_mutations}:"
            " send them in several requests",
        )
    check_identifiers(req.mutations)


def _check_params(params: Mapping[str, Any], where: str) -> None:
    """Client parameter values that are integers fit in 64 bits (signed), as every
    integer of a request must; the unit's own check says the rest."""
    for name, value in params.items():
        if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
            raise ProblemException(
                "invalid-request",
                f"{where}[{shorten(name, 40)}]: integers must fit in 64 bits (signed),"
                f" not {shorten(value, 24)}",
            )


def check_identifiers(mutations: list[Mutation]) -> None:
    """No mutation id, table name or text key holds NUL (U+0000).

    They are stored as text, which PostgreSQL cannot hold NUL in; they are
    refused on every database, so a device is told the same wherever it syncs.
    """
    for i, m in enumerate(mutations):
        key = m.key
        if (
            "\x00" in m.id
            or "\x00" in m.table
            or (type(key) is str and "\x00" in key)
            or (type(key) is list and any(type(k) is str and "\x00" in k for k in key))
        ):
            raise ProblemException(
                "invalid-request",
                f"mutation {i} (seq {shorten(m.seq, 24)}): its id, table and key cannot hold"
                " the NUL character (U+0000); remove it",
            )


def check_mutations(mutations: list[Mutation], limits: Limits) -> None:
    """Check every mutation's shape against ``limits``; raise saying which one is wrong."""
    if len(mutations) > limits.max_mutations:
        raise ProblemException(
            "too-many-mutations",
            f"{len(mutations)} mutations; the limit is {limits.max_mutations}",
        )
    max_name, max_columns = limits.max_name_length, limits.max_columns
    # A string of at most this many characters fits whatever it holds (4 bytes a character).
    short = limits.max_field_bytes // 4
    room = _Room(limits.max_value_items)
    for i, m in enumerate(mutations):
        # The common case first, in one pass with no message built: names short enough,
        # values that are short strings, 64-bit integers, floats, booleans or None.
        if (
            INT64_MIN <= m.seq <= INT64_MAX
            and len(m.id) <= max_name
            and len(m.table) <= max_name
            and len(m.values) <= max_columns
            and len(m.base) <= max_columns
            and len(m.changed) <= max_columns
            and _short_names(m.changed, max_name)
            and len(m.digested) <= max_columns
            and _short_names(m.digested, max_name)
            and _plain(m.key, short)
            and _short_names(m.values, max_name)
            and _all_plain(m.values.values(), short)
            and _short_names(m.base, max_name)
            and _all_plain(m.base.values(), short)
        ):
            continue
        _check_mutation(i, m, limits, room)


def decode_checked(
    body: bytes | bytearray, encoding: Encoding, limits: Limits
) -> tuple[SyncRequest, bool]:
    """The request in ``body``, and whether its mutations already pass ``check_mutations``.

    The common body (names short enough; keys and values short strings, 64-bit
    integers, floats, booleans, None, or a key of a list of those) is decoded into
    structs whose fields carry those bounds, so msgspec checks them while it
    decodes, in C. Any other body is decoded as ``decode_request`` does (False:
    the caller runs ``check_mutations``, which says what is wrong). Either way the
    request holds the same values; its structs are subclasses of ``SyncRequest`` and
    ``Mutation``.
    """
    decoder = _checked_decoder(
        encoding,
        limits.max_name_length,
        limits.max_columns,
        limits.max_field_bytes // 4,
        limits.max_depth >= 1,
    )
    try:
        req: SyncRequest = decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return decode_request(body, encoding), False
    # Values here are scalars; keys may be lists of them, which count as items.
    items = sum(len(m.key) for m in req.mutations if type(m.key) is list)
    return req, items <= limits.max_value_items


@functools.lru_cache(maxsize=16)
def _checked_decoder(
    encoding: Encoding, max_name: int, max_columns: int, short: int, list_keys: bool
) -> msgspec.msgpack.Decoder[Any] | msgspec.json.Decoder[Any]:
    """A decoder of requests whose mutations fit these bounds (see ``decode_checked``)."""
    name = Annotated[str, msgspec.Meta(max_length=max_name)]
    plain = (
        None
        | bool
        | Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
        | float
        | Annotated[str, msgspec.Meta(max_length=short)]
    )
    # A composite key has a column of the table per item: no more than ``max_columns``.
    key = (
        plain | Annotated[list[plain], msgspec.Meta(max_length=max_columns)] if list_keys else plain
    )
    columns = Annotated[dict[name, plain], msgspec.Meta(max_length=max_columns)]
    mutation = msgspec.defstruct(
        "CheckedMutation",
        [
            ("seq", Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]),
            ("id", name),
            ("table", name),
            ("key", key),
            ("op", Literal["insert", "update", "delete"]),
            ("values", columns, {}),
            ("changed", Annotated[list[name], msgspec.Meta(max_length=max_columns)], []),
            ("base", columns, {}),
            ("digested", Annotated[list[name], msgspec.Meta(max_length=max_columns)], []),
        ],
        bases=(Mutation,),
        frozen=True,
        gc=False,
        module=__name__,
    )
    request = msgspec.defstruct(
        "CheckedRequest",
        [("mutations", list[mutation], [])],  # type: ignore[valid-type]
        bases=(SyncRequest,),
        frozen=True,
        module=__name__,
    )
    if encoding == "msgpack":
        return msgspec.msgpack.Decoder(request)
    return msgspec.json.Decoder(request)


def _short_names(names: Iterable[str], max_name: int) -> bool:
    """Every name at most ``max_name`` characters (measured in C, no loop here)."""
    return max(map(len, names), default=0) <= max_name


def _all_plain(values: Iterable[Any], short: int) -> bool:
    """``_plain`` of every value, in one loop with no call per value."""
    for v in values:
        t = type(v)
        if t is str:
            if len(v) > short:
                return False
        elif t is int:
            if not INT64_MIN <= v <= INT64_MAX:
                return False
        elif not (v is None or t is float or t is bool):
            return False
    return True


def _plain(v: Any, short: int) -> bool:
    """A value that passes every limit for sure (False: look closer)."""
    t = type(v)
    if t is str:
        return len(v) <= short
    if t is int:
        return bool(INT64_MIN <= v <= INT64_MAX)
    return v is None or t is float or t is bool


class _Room:
    """List items and map entries the values of one request may still hold."""

    __slots__ = ("items",)

    def __init__(self, items: int) -> None:
        self.items = items


def _check_mutation(i: int, m: Mutation, limits: Limits, room: _Room) -> None:
    where = f"mutation {i} (seq {shorten(m.seq, 24)})"
    if not INT64_MIN <= m.seq <= INT64_MAX:
        raise ProblemException("invalid-request", f"{where}: seq is not a 64-bit integer")
    for label, name in (("id", m.id), ("table", m.table)):
        if len(name) > limits.max_name_length:
            raise ProblemException(
                "field-too-large",
                f"{where}: {label} holds at most {limits.max_name_length} characters",
            )
    for label, columns in (
        ("values", m.values),
        ("base", m.base),
        ("changed", m.changed),
        ("digested", m.digested),
    ):
        if len(columns) > limits.max_columns:
            raise ProblemException(
                "field-too-large",
                f"{where}: {label} holds at most {limits.max_columns} columns",
            )
        for name in columns:
            if len(name) > limits.max_name_length:
                raise ProblemException(
                    "field-too-large",
                    f"{where}: column names hold at most {limits.max_name_length} characters",
                )
    _check_value(m.key, limits, f"{where}: key", room)
    for label, values in (("values", m.values), ("base", m.base)):
        for name, value in values.items():
            _check_value(value, limits, f"{where}: {label}[{shorten(name, 40)}]", room)


_DONE = object()


def _check_value(value: Any, limits: Limits, where: str, room: _Room) -> None:
    """Sizes, 64-bit integers, nesting and items (``room``, shared by the request's
    values) of one wire value, and no MessagePack extension in it.

    Without recursion, and with no list of what is left to see: one iterator per
    list or map open around the current item, ``max_depth`` at most.
    """
    open_: list[Iterator[Any]] = []
    v = value
    while True:
        if isinstance(v, bool) or v is None or isinstance(v, float):
            pass
        elif isinstance(v, int):
            if not INT64_MIN <= v <= INT64_MAX:
                raise ProblemException(
                    "invalid-request", f"{where}: integers must fit in 64 bits (signed)"
                )
        elif isinstance(v, str | bytes | bytearray | memoryview):
            size = len(v.encode()) if isinstance(v, str) else len(v)
            if size > limits.max_field_bytes:
                raise ProblemException(
                    "field-too-large",
                    f"{where}: a value holds at most {limits.max_field_bytes} bytes",
                )
        elif isinstance(v, list | tuple | dict):
            if len(open_) >= limits.max_depth:
                raise ProblemException(
                    "invalid-request", f"{where}: values nest at most {limits.max_depth} deep"
                )
            room.items -= len(v)
            if room.items < 0:
                raise ProblemException(
                    "field-too-large",
                    f"{where}: the values of one request hold at most {limits.max_value_items}"
                    " list items and map entries in all; send fewer changes in a request,"
                    " or smaller lists and maps",
                )
            # A map's keys are seen as its values are (one after the other).
            open_.append(
                itertools.chain.from_iterable(v.items()) if isinstance(v, dict) else iter(v)
            )
        elif isinstance(v, msgspec.msgpack.Ext):
            raise ProblemException(
                "invalid-request",
                f"{where}: a MessagePack extension value (type {v.code}) is not a value;"
                " send a string, number, boolean, nil, binary, list or map",
            )
        while open_:
            v = next(open_[-1], _DONE)
            if v is not _DONE:
                break
            open_.pop()
        else:
            return


# -- the body -------------------------------------------------------------------------


class BodyBudget:
    """The request-body bytes all requests hold at once (``Limits.max_buffered_bytes``)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self._lock = threading.Lock()

    def hold(self) -> HeldBody:
        """A share for one request's body, empty at first; ``release`` it when done."""
        return HeldBody(self)


class HeldBody:
    """One request's share of a ``BodyBudget``: grows as its body arrives and inflates."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.size = 0
        self.released = False

    def grow(self, size: int) -> None:
        """Hold ``size`` more bytes, or raise 503 ``overloaded`` (thread-safe).

        After ``release`` it holds nothing and raises: a body worker still inflating
        the body of a request that was cancelled meanwhile stops there."""
        budget = self.budget
        with budget._lock:
            if self.released:
                raise ProblemException("overloaded", "the request ended while its body was read")
            if self.size + size > budget.total:
                # Never fits, however idle the server: a 503 would be retried for ever.
                raise ProblemException(
                    "body-too-large",
                    f"the body, as sent and decompressed, needs more than the {budget.total}"
                    " bytes the server holds for all request bodies at once"
                    " (max_buffered_bytes); send less in one request",
                )
            if budget.held + size > budget.total:
                raise ProblemException(
                    "overloaded",
                    f"the server holds {budget.held} bytes of request bodies and takes at"
                    f" most {budget.total} at once; this request needs {self.size + size};"
                    " retry in 1 s",
                    headers={"Retry-After": "1"},
                )
            budget.held += size
            self.size += size

    def release(self) -> None:
        """Give back everything held (the body is decoded or refused, or the request
        ended); what would still grow it is refused."""
        with self.budget._lock:
            self.budget.held -= self.size
            self.size = 0
            self.released = True


async def off_the_loop(size: int, work: Callable[[], _T]) -> _T:
    """``work()`` on a body of ``size`` bytes: here if it is small, else on a body worker
    (two at once), so a large body never holds up the event loop."""
    if size <= INLINE_BODY_BYTES:
        return work()
    return await asyncio.get_running_loop().run_in_executor(_BODY_WORKERS, work)


async def read_body(
    stream: AsyncIterator[bytes],
    headers: Mapping[str, str],
    limits: Limits,
    held: HeldBody | None = None,
) -> bytes | bytearray:
    """The request body, decompressed, within ``limits`` (size and upload time).

    ``held``: the share of the server's ``BodyBudget`` the body's bytes are counted
    in as they arrive and inflate (a declared ``Content-Length`` at once): past it,
    503 and nothing more is read.
    """
    limit = limits.max_body_bytes
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProblemException("body-too-large", f"the limit is {limit} bytes")
    coding = headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity", "gzip") and not (coding == "zstd" and HAVE_ZSTD):
        raise ProblemException(
            "unsupported-media-type", f"Content-Encoding {shorten(coding, 40)}: use gzip or zstd"
        )
    if held is not None and declared is not None and declared.isdigit():
        held.grow(int(declared))
    received = bytearray()
    try:
        async with asyncio.timeout(limits.upload_timeout):
            async for part in stream:
                received += part
                if len(received) > limit:
                    raise ProblemException("body-too-large", f"the limit is {limit} bytes")
                if held is not None and len(received) > held.size:
                    held.grow(len(received) - held.size)
    except TimeoutError:
        raise ProblemException(
            "upload-timeout", f"the body took longer than {limits.upload_timeout:g} s to arrive"
        ) from None
    if coding in ("", "identity"):
        return received
    # Off the event loop whatever its size: a small body may inflate to ``limit`` bytes.
    return await asyncio.get_running_loop().run_in_executor(
        _BODY_WORKERS, inflate, received, coding, limit, held
    )


def inflate(
    data: bytes | bytearray, coding: str, limit: int, held: HeldBody | None = None
) -> bytearray:
    """Decompress ``data`` piece by piece, stopping as soon as the output passes ``limit``
    (or ``held`` cannot grow by the next piece)."""
    out = bytearray()
    try:
        for piece in _pieces(data, coding):
            out += piece
            if len(out) > limit:
                raise ProblemException(
                    "body-too-large", f"the body decompresses to more than {limit} bytes"
                )
            if held is not None:
                held.grow(len(piece))
    except (zlib.error, ValueError, EOFError) as exc:
        raise ProblemException(
            "malformed-request", f"cannot decompress the {coding} body: {exc}"
        ) from exc
    except Exception as exc:
        if HAVE_ZSTD and isinstance(exc, zstandard.ZstdError):
            raise ProblemException("malformed-request", f"bad zstd body: {exc}") from exc
        raise
    return out


def _pieces(data: bytes | bytearray, coding: str) -> Iterator[bytes]:
    if coding == "gzip":
        yield from _gunzip(data)
        return
    # zstd: a bounded window (8 MiB) and output read in pieces, never all at once.
    dctx = zstandard.ZstdDecompressor(max_window_size=8 * 1024 * 1024)
    reader = dctx.stream_reader(data, read_across_frames=True)
    while piece := reader.read(_PIECE):
        yield piece


def _gunzip(data: bytes | bytearray) -> Iterator[bytes]:
    """Every gzip member of ``data`` (RFC 1952: one after another), as Python's ``gzip``
    reads them; anything after the last one that is not a member is refused.

    The input is fed a piece at a time from a view of ``data`` (never copied whole).
    """
    view = memoryview(data)
    at = members = 0
    while at < len(view) or not members:
        if members and bytes(view[at : at + 2]) != b"\x1f\x8b":
            raise ValueError(
                f"{len(view) - at} bytes after the gzip data are not gzip;"
                " send the compressed body alone"
            )
        d = zlib.decompressobj(31)
        while not d.eof:
            if at >= len(view):
                raise ValueError("the gzip stream is truncated")
            fed = view[at : at + _PIECE]
            at += len(fed)
            piece = d.decompress(fed, _PIECE)
            yield piece
            # Input left (at most one piece), or output held back once a piece was full.
            # (Once at the end, ``unconsumed_tail`` may still hold what is ``unused_data``.)
            while not d.eof and (d.unconsumed_tail or len(piece) == _PIECE):
                piece = d.decompress(d.unconsumed_tail, _PIECE)
                yield piece
        at -= len(d.unused_data)  # the next member starts there
        members += 1
