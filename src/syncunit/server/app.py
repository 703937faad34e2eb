"""The sync server as a mountable ASGI (Starlette) application.

* ``GET  /v1/catalog``      units, streams and local table schemas, with a schema hash
* ``POST /v1/sync/{unit}``  one unit run: push (if the unit pushes), then pull, streamed

The response body is a stream of frames produced on a worker thread that
reads the database and encodes chunk by chunk into a bounded queue, so server
memory does not grow with the result and reading overlaps with sending.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio.to_thread
import msgspec
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from syncunit.errors import ProtocolError
from syncunit.protocol import (
    PROTOCOL_VERSION,
    End,
    Failure,
    Frame,
    PushResults,
    SyncRequest,
    content_type,
    decode_request,
    encode_catalog,
    encode_frame,
    encoding_of,
)
from syncunit.server.auth import Authenticator, Principal
from syncunit.server.backends import open_store
from syncunit.server.changes import StreamReader
from syncunit.server.inspector import FrameObserver, Inspector, SyncLog
from syncunit.server.live import VersionMonitor, unit_has_changes
from syncunit.server.problems import ProblemException, problem, problem_response
from syncunit.server.push import PushApplier
from syncunit.server.store import ServerStore
from syncunit.units import SyncSchema, SyncUnit

try:  # optional: zstd is preferred when both sides have it
    import zstandard

    HAVE_ZSTD = True
except ImportError:  # pragma: no cover
    HAVE_ZSTD = False

log = logging.getLogger("syncunit.server")

__all__ = ["SyncServer", "create_app"]

_DONE = object()
AHEAD = 4


class SyncServer:
    """The server's state and request handling; ``.app`` is the ASGI app."""

    def __init__(
        self,
        schema: SyncSchema,
        database: str | Engine | ServerStore,
        *,
        authenticate: Authenticator,
        chunk_size: int = 2000,
        max_chunk_size: int = 20_000,
        max_body_bytes: int = 32 * 1024 * 1024,
        max_mutations: int = 10_000,
        max_live_waiters: int = 1000,
        max_live_wait: float = 60.0,
        tombstone_retention: dt.timedelta | None = dt.timedelta(days=30),
        prune_every: float = 3600.0,
        install: bool = True,
    ) -> None:
        self.schema = schema
        self.store = database if isinstance(database, ServerStore) else open_store(database)
        self.authenticate = authenticate
        self.chunk_size = chunk_size
        self.max_chunk_size = max_chunk_size
        self.max_body_bytes = max_body_bytes
        self.max_mutations = max_mutations
        self.catalog = schema.catalog()
        self._catalog_body = encode_catalog(self.catalog)
        self.pusher = PushApplier(self.store, schema)
        self.monitor = VersionMonitor(self.store)
        self.tombstone_retention = tombstone_retention
        self.prune_every = prune_every
        self._pruned_at = -float("inf")
        self._pruning = threading.Lock()
        self.max_live_waiters = max_live_waiters
        self.max_live_wait = max_live_wait
        if install:
            self.store.install(schema)
        #: Recent syncs, for the inspector page; ``observers`` see every response's frames.
        self.sync_log = SyncLog()
        self.observers: list[FrameObserver] = [self.sync_log.observe]
        self.inspector = Inspector(self.store, self.sync_log, self._principal)
        self.app = Starlette(
            routes=[
                Route("/v1/catalog", self.get_catalog, methods=["GET"]),
                Route("/v1/sync/{unit}", self.post_sync, methods=["POST"]),
                Route("/v1/live/{unit}", self.post_live, methods=["POST"]),
                *self.inspector.routes(),
            ],
            exception_handlers={ProblemException: _on_problem, Exception: _on_error},
        )

    # -- handlers --------------------------------------------------------------------

    async def _principal(self, request: Request) -> Principal:
        principal = await anyio.to_thread.run_sync(self.authenticate, request)
        if principal is None:
            raise ProblemException(
                "unauthenticated", "send a valid 'Authorization: Bearer <token>'"
            )
        return principal

    async def get_catalog(self, request: Request) -> Response:
        await self._principal(request)
        return Response(self._catalog_body, media_type="application/json")

    async def _sync_request(self, request: Request) -> tuple[Principal, SyncUnit, SyncRequest]:
        """Authenticate, find the unit, read and validate the body."""
        principal = await self._principal(request)
        name = request.path_params["unit"]
        unit = self.schema.units.get(name)
        if unit is None:
            known = ", ".join(sorted(self.schema.units))
            raise ProblemException("unknown-unit", f"unit {name!r} does not exist; known: {known}")
        encoding = encoding_of(request.headers.get("content-type"))
        if encoding is None:
            raise ProblemException(
                "unsupported-media-type",
                f"Content-Type must be {content_type('msgpack')} or {content_type('json')}",
            )
        body = await self._read_body(request)
        req = decode_request(body, encoding) if body else None
        if req is None:
            raise ProblemException("malformed-request", "the request body is empty")
        self._validate(req, unit, principal)
        return principal, unit, req

    async def post_sync(self, request: Request) -> Response:
        principal, unit, req = await self._sync_request(request)
        self._maybe_prune()
        encoding = encoding_of(request.headers.get("content-type")) or "msgpack"
        pushed = None
        if req.mutations:
            pushed = await anyio.to_thread.run_sync(self.pusher.apply, principal, req)
        accept = encoding_of(request.headers.get("accept")) or encoding
        compressor = _compressor(request.headers.get("accept-encoding", ""))
        headers = {"Cache-Control": "no-store"}
        if compressor.name:
            headers["Content-Encoding"] = compressor.name
        frames = self._frames(unit, principal, req, pushed)
        for observe in self.observers:
            frames = observe(unit, principal, req, frames)
        return StreamingResponse(
            _pump(frames, accept, compressor),
            media_type=content_type(accept),
            headers=headers,
        )

    async def post_live(self, request: Request) -> Response:
        """Long-poll: answer as soon as ``unit`` has changes in scope, or when the wait ends."""
        principal, unit, req = await self._sync_request(request)
        try:
            wait = float(request.query_params.get("wait", "25"))
        except ValueError:
            raise ProblemException("invalid-request", "wait must be a number of seconds") from None
        wait = min(max(wait, 0.0), self.max_live_wait)
        if self.monitor.waiters >= self.max_live_waiters:
            raise ProblemException("busy", f"{self.monitor.waiters} clients are waiting")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        seen = await anyio.to_thread.run_sync(self.store.current_version)
        while True:
            changed = await anyio.to_thread.run_sync(
                unit_has_changes, self.store, unit, principal.params, req.cursors
            )
            remaining = deadline - loop.time()
            if changed or remaining <= 0:
                body = msgspec.json.encode({"unit": unit.name, "changed": changed})
                return Response(body, media_type="application/json")
            seen = max(seen, await self.monitor.wait_beyond(seen, remaining))

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ProblemException("body-too-large", f"the limit is {self.max_body_bytes} bytes")
        chunks = bytearray()
        async for part in request.stream():
            chunks += part
            if len(chunks) > self.max_body_bytes:
                raise ProblemException(
                    "body-too-large", f"the limit is {self.max_body_bytes} bytes"
                )
        coding = request.headers.get("content-encoding", "identity").strip().lower()
        try:
            if coding in ("", "identity"):
                return bytes(chunks)
            if coding == "gzip":
                d = zlib.decompressobj(31)
                out = d.decompress(chunks, self.max_body_bytes + 1)
            elif coding == "zstd" and HAVE_ZSTD:
                dz = zstandard.ZstdDecompressor().decompressobj()
                out = dz.decompress(bytes(chunks))
            else:
                raise ProblemException("unsupported-media-type", f"Content-Encoding {coding!r}")
        except (zlib.error, ValueError) as exc:
            raise ProblemException("malformed-request", f"cannot decompress body: {exc}") from exc
        except Exception as exc:
            if HAVE_ZSTD and isinstance(exc, zstandard.ZstdError):
                raise ProblemException("malformed-request", f"bad zstd body: {exc}") from exc
            raise
        if len(out) > self.max_body_bytes:
            raise ProblemException("body-too-large", f"the limit is {self.max_body_bytes} bytes")
        return bytes(out)

    def _validate(self, req: SyncRequest, unit: SyncUnit, principal: Principal) -> None:
        if req.protocol != PROTOCOL_VERSION:
            raise ProblemException(
                "unsupported-protocol",
                f"client speaks protocol {req.protocol}; this server speaks {PROTOCOL_VERSION}",
            )
        if not req.client_id or len(req.client_id) > 200:
            raise ProblemException("invalid-request", "client_id must be 1 to 200 characters")
        if req.schema_hash and req.schema_hash != self.catalog.schema_hash:
            raise ProblemException(
                "schema-changed",
                f"the client has schema {req.schema_hash}, the server {self.catalog.schema_hash}",
            )
        if req.chunk_size is not None and not 1 <= req.chunk_size <= self.max_chunk_size:
            raise ProblemException(
                "invalid-request", f"chunk_size must be between 1 and {self.max_chunk_size}"
            )
        if len(req.mutations) > self.max_mutations:
            raise ProblemException("too-many-mutations", f"the limit is {self.max_mutations}")
        if req.mutations and not unit.pushes:
            raise ProblemException(
                "invalid-request", f"unit {unit.name!r} does not push; send no mutations"
            )
        for stream in unit.streams if unit.pulls else ():
            missing = [p for p in stream.parameters if p not in principal.params]
            if missing:
                raise ProblemException(
                    "missing-parameter",
                    f"stream {stream.name!r} filters on {', '.join(missing)}, which"
                    f" principal {principal.id!r} does not have",
                )

    # -- housekeeping ------------------------------------------------------------------

    def prune_now(self) -> int | None:
        """Drop tombstones older than ``tombstone_retention``; return the new horizon.

        Clients whose cursor is older re-download the affected streams. Runs by
        itself on a background thread at most every ``prune_every`` seconds.
        """
        if self.tombstone_retention is None:
            return None
        cutoff = dt.datetime.now(dt.UTC) - self.tombstone_retention
        return self.store.prune_tombstones_before(cutoff)

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if self.tombstone_retention is None or now - self._pruned_at < self.prune_every:
            return
        if not self._pruning.acquire(blocking=False):
            return
        self._pruned_at = now

        def prune() -> None:
            try:
                self.prune_now()
            except Exception:
                log.exception("pruning tombstones failed; it is tried again later")
            finally:
                self._pruning.release()

        threading.Thread(target=prune, name="syncunit-prune", daemon=True).start()

    # -- the response ------------------------------------------------------------------

    def _frames(
        self, unit: SyncUnit, principal: Principal, req: SyncRequest, pushed: PushResults | None
    ) -> Iterator[Frame]:
        if pushed is not None:
            yield pushed
        if unit.pulls:
            chunk = req.chunk_size or self.chunk_size
            with self.store.snapshot() as (conn, watermark):
                epoch, horizon = self.store.epoch_and_horizon(conn)
                for stream in unit.streams:
                    reader = StreamReader(self.store, stream, principal.params, chunk_size=chunk)
                    yield from reader.frames(
                        conn, watermark, epoch, horizon, req.cursors.get(stream.name)
                    )
        yield End(server_time=dt.datetime.now(dt.UTC).isoformat())


def create_app(
    schema: SyncSchema,
    database: str | Engine | ServerStore,
    *,
    authenticate: Authenticator,
    **options: Any,
) -> Starlette:
    """The ASGI app serving ``schema`` from ``database``; mount it anywhere."""
    return SyncServer(schema, database, authenticate=authenticate, **options).app


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemException)
    return problem_response(exc.code, exc.detail)


async def _on_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ProtocolError):
        return problem_response("malformed-request", str(exc))
    log.exception("sync request failed", exc_info=exc)
    return problem_response("internal", "see the server log")


# -- streaming -----------------------------------------------------------------------


class _Compressor:
    def __init__(self, name: str) -> None:
        self.name = name
        if name == "zstd":
            self._z: Any = zstandard.ZstdCompressor(level=1).compressobj()
        elif name == "gzip":
            self._z = zlib.compressobj(6, zlib.DEFLATED, 31)

    def feed(self, data: bytes) -> bytes:
        return self._z.compress(data) if self.name else data

    def flush(self, final: bool = False) -> bytes:
        if not self.name:
            return b""
        if self.name == "zstd":
            mode = (
                zstandard.COMPRESSOBJ_FLUSH_FINISH if final else zstandard.COMPRESSOBJ_FLUSH_BLOCK
            )
            return bytes(self._z.flush(mode))
        return bytes(self._z.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH))


def _compressor(accept_encoding: str) -> _Compressor:
    offered = {p.split(";")[0].strip().lower() for p in accept_encoding.split(",")}
    if "zstd" in offered and HAVE_ZSTD:
        return _Compressor("zstd")
    if "gzip" in offered:
        return _Compressor("gzip")
    return _Compressor("")


async def _pump(frames: Iterator[Frame], encoding: Any, comp: _Compressor) -> AsyncIterator[bytes]:
    """Run ``frames`` on a worker thread; hand its encoded bytes to the event loop.

    At most ``AHEAD`` pieces wait in between, so memory stays bounded while the
    database read and the network send overlap.
    """
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[Any] = asyncio.Queue()
    slots = threading.Semaphore(AHEAD)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            if slots.acquire(timeout=0.2):
                try:
                    loop.call_soon_threadsafe(q.put_nowait, item)
                except RuntimeError:  # the event loop is gone
                    return False
                return True
        return False

    def produce() -> None:
        try:
            for frame in frames:
                data = comp.feed(encode_frame(frame, encoding)) + comp.flush()
                if data and not put(data):
                    return
        except ProblemException as exc:
            p = problem(exc.code, exc.detail)
            fail = Failure(status=p.status, code=p.code, title=p.title, detail=p.detail)
            put(comp.feed(encode_frame(fail, encoding)) + comp.flush())
        except Exception as exc:
            log.exception("sync stream failed", exc_info=exc)
            fail = Failure(
                status=500, code="internal", title="The server failed", detail="see the server log"
            )
            put(comp.feed(encode_frame(fail, encoding)) + comp.flush())
        finally:
            if not stop.is_set():
                tail = comp.flush(final=True)
                if tail:
                    put(tail)
            put(_DONE)
            close = getattr(frames, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name="syncunit-frames", daemon=True)
    worker.start()
    try:
        while True:
            item = await q.get()
            slots.release()
            if item is _DONE:
                break
            yield item
    finally:
        stop.set()
        await anyio.to_thread.run_sync(worker.join, 5.0)
