"""The sync server as a mountable ASGI (Starlette) application.

* ``GET  /v1/catalog``      units, streams and local table schemas, with a schema hash
* ``POST /v1/sync/{unit}``  one unit run: push (if the unit pushes), then pull, streamed
* ``POST /v1/live/{unit}``  a long-poll answering when the unit has changes in scope
* ``/v1/rxdb/{unit}/{stream}/...``  RxDB's replication protocol (``server/rxdb.py``)

Every request is authenticated, admitted (rate per principal, concurrent
syncs), bounded (``Limits``) and checked before it touches the database; a
refused request gets a problem response saying why, and one log line. Each
request has an id (``X-Request-ID``) that its log lines carry with the client
id and the unit (``logs``); ``GET /metrics`` serves Prometheus metrics
(``metrics``). The
response body is produced by ``streaming.FramePump`` within a time budget.
Cursors are signed with a key kept in the database, so a forged one is
treated as no cursor at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from functools import partial
from typing import Any

import anyio.to_thread
import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from syncunit.errors import DatabaseRestored, DatabaseTooNew, ProtocolError
from syncunit.protocol import (
    PRINCIPAL_TAG,
    PROTOCOL_VERSION,
    PUSH_LIMITS,
    QUEUES_PUSHES,
    Encoding,
    SyncRequest,
    content_type,
    encode_catalog,
    encoding_of,
)
from syncunit.server.admission import RateLimiter, Slot, SyncSlots, default_sync_slots
from syncunit.server.answer import SyncAnswer, sign_frames
from syncunit.server.auth import (
    Authenticator,
    Principal,
    authorize_stream,
    authorize_unit,
    bound_parameters,
    unusable,
)
from syncunit.server.backends import open_store
from syncunit.server.cursor import verify_cursor
from syncunit.server.inspector import FrameObserver, Inspector, SyncLog
from syncunit.server.limits import (
    BodyBudget,
    Limits,
    check_mutations,
    check_request,
    decode_checked,
    off_the_loop,
    read_body,
    shorten,
)
from syncunit.server.live import VersionMonitor, unit_has_changes
from syncunit.server.logs import (
    SCOPE_KEY,
    RequestContext,
    RequestIds,
    current_request,
    install_filter,
)
from syncunit.server.metrics import ServerMetrics, SyncTally
from syncunit.server.problems import (
    DATABASE_BUSY,
    DATABASE_LOST,
    ProblemException,
    database_busy,
    database_lost,
    failure_cause,
    problem_response,
)
from syncunit.server.push import PushApplier
from syncunit.server.rxdb import RxDBReplication
from syncunit.server.snapshots import Snapshots, check_range
from syncunit.server.store import ServerStore
from syncunit.server.streaming import FramePump, FrameResponse, compressor_for
from syncunit.server.values import bytes_from_json
from syncunit.units import SyncSchema, SyncUnit

log = logging.getLogger("syncunit.server")
#: How often a long-poll with nothing to answer looks whether its client is still there.
LIVE_LOOK = 2.0


def _take(slots: SyncSlots, principal: Principal, code: str, holds: str, *, retry: int) -> Slot:
    """One of ``slots`` for ``principal``, or a 503 ``code`` saying whose share is full
    (``holds``: what it already does, ``{}`` the count) and when to retry."""
    slot = slots.try_acquire(principal.id)
    if isinstance(slot, Slot):
        return slot
    who = "this principal" if slot == "principal" else "the server"
    limit = slots.per_principal if slot == "principal" else slots.total
    raise ProblemException(
        code, f"{who} already {holds.format(limit)}; retry in {retry} s",
        headers={"Retry-After": str(retry)},
    )  # fmt: skip


__all__ = ["SyncServer", "create_app"]

#: A cursor that is not the server's own becomes this: the stream starts afresh.
FORGED = "forged"


class SyncServer(SyncAnswer):
    """The server's state and request handling; ``.app`` is the ASGI app."""

    def __init__(
        self,
        schema: SyncSchema,
        database: str | Engine | ServerStore,
        *,
        authenticate: Authenticator,
        chunk_size: int = 2000,
        max_chunk_size: int = 20_000,
        limits: Limits | None = None,
        max_body_bytes: int | None = None,
        max_mutations: int | None = None,
        max_live_waiters: int = 1000,
        live_waiters_per_principal: int | None = None,
        max_live_wait: float = 60.0,
        tombstone_retention: dt.timedelta | None = dt.timedelta(days=30),
        prune_every: float = 3600.0,
        cursor_secret: bytes | None = None,
        accept_unsigned_cursors: bool = False,
        install: bool = True,
        metrics_token: str | None = None,
        log_principals: bool = False,
        snapshot_dir: str | os.PathLike[str] | None = None,
        snapshot_min_rows: int = 100_000,
    ) -> None:
        self.schema = schema
        #: The principal parameters the streams bind (name -> taken as a list).
        self.bound_parameters = bound_parameters(schema)
        self.store = database if isinstance(database, ServerStore) else open_store(database)
        self.authenticate = authenticate
        self.chunk_size = chunk_size
        self.max_chunk_size = max_chunk_size
        limits = limits or Limits()
        if max_body_bytes is not None:
            limits = replace(limits, max_body_bytes=max_body_bytes)
        if max_mutations is not None:
            limits = replace(limits, max_mutations=max_mutations)
        self.limits = limits
        #: The bounds a device sizes its pushes under, told in every sync, catalog
        #: and problem answer (``protocol.PUSH_LIMITS``).
        self._push_limits = limits.push_limits().header()
        self.rate = RateLimiter(limits.requests_per_second, limits.request_burst)
        #: Request-body bytes held at once, by every request together.
        self.bodies = BodyBudget(limits.max_buffered_bytes)
        self.sync_slots = SyncSlots(
            limits.max_concurrent_syncs or default_sync_slots(self.store.engine),
            limits.syncs_per_principal,
        )
        self.catalog = schema.catalog()
        self._catalog_body = encode_catalog(self.catalog)
        self.pusher = PushApplier(self.store, schema, limits)
        #: Prebuilt first copies of large scopes, kept in ``snapshot_dir`` (None: row by row).
        self.snapshots = (
            None
            if snapshot_dir is None
            else Snapshots(self.store, snapshot_dir, min_rows=snapshot_min_rows)
        )
        self.monitor = VersionMonitor(self.store)
        self.tombstone_retention = tombstone_retention
        self.prune_every = prune_every
        self._pruned_at = -float("inf")
        self._pruning = threading.Lock()
        self.max_live_waiters = max_live_waiters
        #: Long-polls waiting at once, in total and per principal (default: a tenth of
        #: the total): one principal's devices, or a stolen token, cannot take them all.
        self.live_waits = SyncSlots(
            max_live_waiters,
            live_waiters_per_principal or max(1, max_live_waiters // 10),
        )
        self.max_live_wait = max_live_wait
        self._cursor_key = cursor_secret
        self.accept_unsigned_cursors = accept_unsigned_cursors
        #: Taken once by the first sync of a server that did not install: it looks for
        #: missing scope indexes (``install`` creates them, a migration may not have).
        self._scope_check = None if install else threading.Lock()
        if install:
            self.store.install(schema)
            if self._cursor_key is None:
                self._cursor_key = self._load_cursor_key()
        #: Recent syncs, for the inspector page; ``observers`` see every response's frames.
        self.sync_log = SyncLog()
        self.observers: list[FrameObserver] = [self.sync_log.observe]
        self.inspector = Inspector(self.store, self.sync_log, self._principal)
        self.rxdb = RxDBReplication(self)
        #: Prometheus metrics on a registry of this server's own (``metrics.registry``).
        self.metrics = ServerMetrics(
            self.store, self.monitor, self.sync_slots, self._principal, metrics_token
        )
        #: Whether log lines name the principal (personal data: off by default).
        self.log_principals = log_principals
        install_filter()
        self.app = Starlette(
            middleware=[Middleware(RequestIds)],
            routes=[
                Route("/v1/catalog", self.get_catalog, methods=["GET"]),
                Route("/v1/sync/{unit}", self.post_sync, methods=["POST"]),
                Route("/v1/live/{unit}", self.post_live, methods=["POST"]),
                Route("/v1/snapshots/{stream}/{name}", self.get_snapshot, methods=["GET", "HEAD"]),
                *self.inspector.routes(),
                *self.rxdb.routes(),
                *self.metrics.routes(),
            ],
            # ProtocolError has its own handler: one for Exception also re-raises (a
            # traceback in the server's log for every malformed request).
            exception_handlers={
                ProblemException: self._on_problem,
                ProtocolError: self._on_malformed,
                HTTPException: self._on_no_route,
                sa.exc.DBAPIError: self._on_database_error,
                sa.exc.TimeoutError: self._on_database_error,
                DatabaseRestored: self._on_restored,
                ClientDisconnect: _on_disconnect,
                Exception: self._on_error,
            },
        )

    # -- handlers --------------------------------------------------------------------

    async def _principal(self, request: Request) -> Principal:
        """Authenticate, then count the request against the principal's rate."""
        principal = await anyio.to_thread.run_sync(self.authenticate, request)
        if principal is None:
            raise ProblemException(
                "unauthenticated", "send a valid 'Authorization: Bearer <token>'"
            )
        why = unusable(principal, self.bound_parameters)
        if why is not None:
            # The server records which principal each device pushes as, and filters rows
            # with its parameters: a value the database cannot hold would fail late.
            log.warning("authenticate returned a principal whose %s; refused", why)
            raise ProblemException(
                "forbidden",
                f"this credential's principal cannot be used: its {why}. Its id must be"
                " non-empty text, no parameter may hold the NUL character (U+0000), and"
                " a parameter the streams filter on must be text, a number or a signed"
                " 64-bit integer; ask for a credential with other claims",
            )
        ctx = current_request()
        if ctx is not None:
            ctx.principal, ctx.show_principal = principal.id, self.log_principals
        wait = self.rate.check(principal.id)
        if wait is not None:
            retry = max(1, math.ceil(wait))
            raise ProblemException(
                "rate-limited",
                f"more than {self.limits.requests_per_second:g} requests a second;"
                f" retry in {retry} s",
                headers={"Retry-After": str(retry)},
            )
        return principal

    async def get_catalog(self, request: Request) -> Response:
        principal = await self._principal(request)
        tag = self._principal_tag(principal, await self._key())
        return Response(
            self._catalog_body,
            media_type="application/json",
            headers={QUEUES_PUSHES: "1", PUSH_LIMITS: self._push_limits, PRINCIPAL_TAG: tag},
        )

    async def get_snapshot(self, request: Request) -> Response:
        """A snapshot file offered to this principal (``Range`` requests resume it).

        Authorized as a sync of its stream: a unit that pulls it and that the
        principal may run, the stream's principal parameters, its ``authorize``
        hook (with no client parameters: a stream offered as a file reads none);
        then the file must hold that stream for the principal's parameters.
        """
        principal = await self._principal(request)
        stream = self.schema.streams.get(request.path_params["stream"])
        snap = None
        # A stream with client parameters is never offered as a file (see Snapshots).
        if stream is not None and self.snapshots is not None and not stream.client_params:
            pulling = [u for u in self.schema.units.values() if u.pulls and stream in u.streams]
            if pulling:
                if principal.units is not None and not any(
                    u.name in principal.units for u in pulling
                ):
                    authorize_unit(principal, pulling[0])  # the problem a sync of it gets
                authorize_stream(principal, stream, {})
                snap = self.snapshots.find(request.path_params["name"], stream, principal.params)
        stat = None
        if snap is not None:
            with contextlib.suppress(FileNotFoundError):
                stat = snap.path.stat()
        if snap is None or stat is None:
            raise ProblemException(
                "unknown-snapshot", "no such snapshot for you: sync again to get a fresh offer"
            )
        response = FileResponse(snap.path, media_type="application/zstd", stat_result=stat)
        # A Range FileResponse would refuse in plain text is a problem, as every refusal;
        # one it ignores (If-Range of another version: the whole file) stays so.
        wanted, if_range = request.headers.get("range"), request.headers.get("if-range")
        if wanted is not None and (
            if_range is None
            or (
                not if_range.startswith("W/")
                and if_range in (response.headers["etag"], response.headers["last-modified"])
            )
        ):
            check_range(wanted, stat.st_size)
        return response

    @property
    def max_subscriptions(self) -> int:
        """Held subscriptions one request may carry to refresh besides its unit
        (``Limits.max_subscriptions``); devices learn it from ``protocol.PUSH_LIMITS``."""
        return self.limits.max_subscriptions

    @max_subscriptions.setter
    def max_subscriptions(self, count: int) -> None:
        self.limits = replace(self.limits, max_subscriptions=count)
        self._push_limits = self.limits.push_limits().header()

    async def _sync_request(self, request: Request) -> tuple[Principal, SyncUnit, SyncRequest]:
        """Authenticate, find the unit, read and validate the body."""
        principal = await self._principal(request)
        name = request.path_params["unit"]
        unit = self.schema.units.get(name)
        if unit is None:
            known = ", ".join(sorted(self.schema.units))
            raise ProblemException(
                "unknown-unit", f"unit {shorten(name, 60)} does not exist; known: {known}"
            )
        ctx = current_request() or RequestContext("-")
        ctx.unit = unit.name
        authorize_unit(principal, unit)
        encoding = encoding_of(request.headers.get("content-type"))
        if encoding is None:
            raise ProblemException(
                "unsupported-media-type",
                f"Content-Type must be {content_type('msgpack')} or {content_type('json')}",
            )
        held = self.bodies.hold()
        try:
            # Counted as they arrive (compressed, if the client compressed them).
            body = await read_body(
                _counted(request.stream(), ctx), request.headers, self.limits, held
            )
            if not body:
                raise ProblemException("malformed-request", "the request body is empty")
            size = len(body)
            req = await off_the_loop(size, partial(self._decoded, body, encoding))
            del body  # the request holds it all now
        finally:
            held.release()
        # printable and short: a device's id must not forge or flood log lines
        ctx.client_id = "".join(c if c.isprintable() else "?" for c in req.client_id[:64])
        self._validate(req, unit, principal, checked=True)
        if encoding == "json" and req.mutations:
            # Bytes travel as base64 text in JSON (measured so by the limits, above).
            mutations = await off_the_loop(
                size, partial(bytes_from_json, req.mutations, self.schema)
            )
            req = msgspec.structs.replace(req, mutations=mutations)
        if req.cursors or req.subscriptions:
            key = await self._key()
            req = msgspec.structs.replace(
                req,
                cursors={n: self._verified(t, key) for n, t in req.cursors.items()},
                subscriptions=[
                    msgspec.structs.replace(
                        sub, cursors={n: self._verified(t, key) for n, t in sub.cursors.items()}
                    )
                    for sub in req.subscriptions
                ],
            )
        return principal, unit, req

    def _decoded(self, body: bytes | bytearray, encoding: Encoding) -> SyncRequest:
        """The request in ``body``, its mutations checked against the limits (a worker
        runs this for a large body)."""
        req, checked = decode_checked(body, encoding, self.limits)
        if not checked and req.protocol == PROTOCOL_VERSION:  # else _validate says so
            check_mutations(req.mutations, self.limits)
        return req

    def _verified(self, token: str, key: bytes) -> str:
        """The cursor inside a signed token, or ``FORGED`` (the stream starts afresh).

        ``accept_unsigned_cursors`` lets cursors of servers before signing (0.1)
        through while devices upgrade; it also lets forged ones through.
        """
        cursor = verify_cursor(token, key)
        if cursor is not None:
            return cursor
        if self.accept_unsigned_cursors and token.count(".") == 1:
            return token
        return FORGED

    async def _key(self) -> bytes:
        """The key cursors are signed with: given, or kept in the database (made once)."""
        if self._cursor_key is None:
            self._cursor_key = await anyio.to_thread.run_sync(self._load_cursor_key)
        return self._cursor_key

    @staticmethod
    def _principal_tag(principal: Principal, key: bytes) -> str:
        """``protocol.PRINCIPAL_TAG``: the principal's id under the server's key."""
        mac = hmac.new(key, b"principal\x00" + principal.id.encode(), hashlib.sha256)
        return mac.hexdigest()[:32]

    def _load_cursor_key(self) -> bytes:
        return bytes.fromhex(self.store.fact_made_once("cursor-key", lambda: secrets.token_hex(32)))

    def _slot(self, principal: Principal) -> Slot:
        """A sync slot, or 503 at once (never a wait on the database pool)."""
        return _take(self.sync_slots, principal, "overloaded", "runs {} syncs", retry=1)

    async def post_sync(self, request: Request) -> Response:
        principal, unit, req = await self._sync_request(request)
        key = await self._key()
        encoding = encoding_of(request.headers.get("content-type")) or "msgpack"
        slot = self._slot(principal)
        ctx = current_request() or RequestContext("-")
        try:
            pushed = None
            if req.mutations:
                t0 = time.monotonic()
                # _validate ran check_mutations with the same limits: not twice.
                pushed = await anyio.to_thread.run_sync(
                    partial(self.pusher.apply, checked=True), principal, req, unit
                )
                self.metrics.push_seconds.labels(unit.name).observe(time.monotonic() - t0)
            self._maybe_prune()
            accept = encoding_of(request.headers.get("accept")) or encoding
            compressor = compressor_for(request.headers.get("accept-encoding", ""))
            headers = {
                "Cache-Control": "no-store",
                QUEUES_PUSHES: "1",
                PUSH_LIMITS: self._push_limits,
                PRINCIPAL_TAG: self._principal_tag(principal, key),
            }
            if compressor.name:
                headers["Content-Encoding"] = compressor.name
            frames = self._frames(unit, principal, req, pushed)
            for observe in self.observers:
                frames = observe(unit, principal, req, frames)
            tally = SyncTally()
            frames = tally.watch(frames)

            def ended(pump: FramePump) -> None:
                self._sync_ended(ctx, unit, req, tally, pump)

            pump = FramePump(
                sign_frames(frames, key), accept, compressor, self.limits, slot, on_end=ended
            ).start()
        except BaseException:
            slot.release()
            raise
        headers["X-Request-ID"] = ctx.request_id
        return FrameResponse(
            pump,
            send_timeout=self.limits.send_timeout,
            media_type=content_type(accept),
            headers=headers,
        )

    async def post_live(self, request: Request) -> Response:
        """Long-poll: answer as soon as ``unit`` has changes in scope, or when the wait ends."""
        principal, unit, req = await self._sync_request(request)
        try:
            wait = float(request.query_params.get("wait", "25"))
        except ValueError:
            wait = math.nan
        if not math.isfinite(wait):
            raise ProblemException("invalid-request", "wait must be a number of seconds")
        wait = min(max(wait, 0.0), self.max_live_wait)
        waiting = self.live_slot(principal)
        try:
            return await self._wait_live(request, unit, principal, req, wait)
        finally:
            waiting.release()

    def live_slot(self, principal: Principal) -> Slot:
        """A slot for a long wait on changes (a long-poll, an RxDB event stream), or 503
        ``busy``: each principal has its share, and the server its total."""
        return _take(self.live_waits, principal, "busy", "has {} long waits on changes", retry=5)

    async def _wait_live(
        self, request: Request, unit: SyncUnit, principal: Principal, req: SyncRequest, wait: float
    ) -> Response:
        """Answer when ``unit`` has changes in scope for ``req``, or after ``wait`` seconds;
        end early if the client has gone (its share of long waits goes back)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        seen = await anyio.to_thread.run_sync(self.store.current_version)
        look = True  # the scope is checked at first, and again only once a version moved
        while True:
            changed, checked = False, not look
            if look:
                slot = self.sync_slots.try_acquire(principal.id)
                if isinstance(slot, Slot):  # no slot free: check again on the next wake
                    checked = True
                    try:
                        changed = await anyio.to_thread.run_sync(
                            self._has_changes, unit, principal, req
                        )
                    finally:
                        slot.release()
            remaining = deadline - loop.time()
            if changed or remaining <= 0:
                # The wait may have outlived the credential it began with: answer only
                # whom the request still authenticates as (401 once its token expired);
                # a changed principal is told to sync, which sees its scope as it is now.
                now = await anyio.to_thread.run_sync(self.authenticate, request)
                if now is None:
                    raise ProblemException(
                        "unauthenticated",
                        "the token expired or was revoked during the wait; send a valid"
                        " 'Authorization: Bearer <token>'",
                    )
                changed = changed or now != principal
                body = msgspec.json.encode({"unit": unit.name, "changed": changed})
                return Response(body, media_type="application/json")
            wake = min(remaining, LIVE_LOOK if checked else 1.0)
            newest = await self.monitor.wait_beyond(seen, wake)
            if await request.is_disconnected():
                return Response(status_code=204)  # nobody reads it
            look = newest > seen or not checked
            seen = max(seen, newest)

    def _has_changes(self, unit: SyncUnit, principal: Principal, req: SyncRequest) -> bool:
        """Whether the unit, or one of the request's subscriptions, has changes in scope."""
        runs = [(unit, req.params, req.cursors)]
        runs += [(self.schema.units[s.unit], s.params, s.cursors) for s in req.subscriptions]
        return any(unit_has_changes(self.store, u, principal, p, c) for u, p, c in runs)

    def _validate(
        self, req: SyncRequest, unit: SyncUnit, principal: Principal, checked: bool = False
    ) -> None:
        """Check ``req`` against the server; ``checked``: its mutations passed
        ``check_mutations`` while decoding."""
        if req.protocol != PROTOCOL_VERSION:
            raise ProblemException(
                "unsupported-protocol",
                f"client speaks protocol {req.protocol}; this server speaks {PROTOCOL_VERSION}",
            )
        check_request(req, self.limits)
        if not checked:
            check_mutations(req.mutations, self.limits)
        if req.mutations and req.schema_hash and req.schema_hash != self.catalog.schema_hash:
            # Mutations were made under another schema: the client migrates first.
            raise ProblemException(
                "schema-changed",
                f"the client has schema {req.schema_hash}, the server {self.catalog.schema_hash}",
            )
        if req.chunk_size is not None and not 1 <= req.chunk_size <= self.max_chunk_size:
            raise ProblemException(
                "invalid-request", f"chunk_size must be between 1 and {self.max_chunk_size}"
            )
        if req.mutations and not unit.pushes:
            raise ProblemException(
                "invalid-request", f"unit {unit.name!r} does not push; send no mutations"
            )
        self._check_unit(unit, principal, req.params)
        if len(req.subscriptions) > self.max_subscriptions:
            raise ProblemException(
                "invalid-request", f"at most {self.max_subscriptions} subscriptions per request"
            )
        ids = set()
        for sub in req.subscriptions:
            if not sub.id or sub.id in ids:
                raise ProblemException(
                    "invalid-request", f"subscription id {shorten(sub.id, 60)} is empty or repeated"
                )
            ids.add(sub.id)
            other = self.schema.units.get(sub.unit)
            if other is None or not other.pulls:
                # A unit renamed or removed since the device opened it: named, so the
                # device closes that subscription and syncs on without it.
                raise ProblemException(
                    "invalid-request",
                    f"subscription {shorten(sub.id, 60)}: no pulling unit {shorten(sub.unit, 60)}",
                    unit=sub.unit,
                    subscription=sub.id,
                )
            # Authorized as a sync of it would be: the whole request is refused, naming
            # the subscription's unit (the device drops that subscription, not this unit).
            authorize_unit(principal, other, subscription=sub.id)
            try:
                self._check_unit(other, principal, sub.params)
            except ProblemException as exc:
                # Its values refused, or a stream's ``authorize`` hook (or the principal's
                # parameters) refusing them: named, so the device closes that subscription
                # and syncs on without it.
                raise ProblemException(
                    exc.code,
                    f"subscription {shorten(sub.id, 60)}: {exc.detail}",
                    unit=sub.unit,
                    subscription=sub.id,
                ) from exc

    def _check_unit(self, unit: SyncUnit, principal: Principal, params: Mapping[str, Any]) -> None:
        """The unit's client parameters are all given and valid; the principal has its own."""
        declared = unit.client_params
        unknown = sorted(set(params) - set(declared))
        if unknown:
            known = ", ".join(sorted(declared)) or "none"
            raise ProblemException(
                "invalid-parameter",
                f"unit {unit.name!r} has no parameter"
                f" {', '.join(shorten(n, 60) for n in unknown[:5])}"
                f"{' and more' if len(unknown) > 5 else ''} (it takes: {known})",
                unit=unit.name,
            )
        for name, param in declared.items():
            if name not in params:
                raise ProblemException(
                    "invalid-parameter",
                    f"unit {unit.name!r} needs parameter {name!r} ({param.type});"
                    f" pass params={{{name!r}: ...}}",
                    unit=unit.name,
                )
            reason = param.check(name, params[name])
            if reason is not None:
                raise ProblemException(
                    "invalid-parameter", f"unit {unit.name!r}: {reason}", unit=unit.name
                )
        for stream in unit.streams if unit.pulls else ():
            # Each stream's hook sees the client parameters it declares, as it reads them.
            authorize_stream(principal, stream, {n: params[n] for n in stream.client_params})

    def _sync_ended(
        self, ctx: RequestContext, unit: SyncUnit, req: SyncRequest, tally: SyncTally,
        pump: FramePump,
    ) -> None:  # fmt: skip
        """Count a sync that ended, and log it in one line."""
        seconds = time.monotonic() - ctx.started
        mutations = len(req.mutations)
        self.metrics.record_sync(
            unit.name, pump.outcome, tally, ctx.bytes_in, pump.bytes_out, mutations, seconds
        )
        results = tally.results
        log.info(
            "sync %s: %s in %.3f s; %d rows sent, %d removed; %d mutations received"
            " (%d applied, %d conflicts, %d rejected); %d bytes in, %d out",
            unit.name, pump.outcome, seconds, tally.upserted, tally.removed, mutations,
            results.get("applied", 0), results.get("conflict", 0), results.get("rejected", 0),
            ctx.bytes_in, pump.bytes_out,
            extra={
                "outcome": pump.outcome, "seconds": round(seconds, 4),
                "rows_sent": tally.upserted, "rows_removed": tally.removed,
                "mutations": mutations, "push_results": dict(results),
                "bytes_in": ctx.bytes_in, "bytes_out": pump.bytes_out,
            },
        )  # fmt: skip

    # -- refusals and failures ---------------------------------------------------------

    async def _on_problem(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProblemException)
        self._note_refusal(request, exc.code, exc.detail)
        # A push refused as too large (413) says the bounds: the device sizes under them.
        return problem_response(
            exc.code,
            exc.detail,
            {PUSH_LIMITS: self._push_limits, **exc.headers},
            unit=exc.unit,
            subscription=exc.subscription,
        )

    def _note_refusal(self, request: Request, code: str, detail: str, *, after: str = "") -> None:
        """Count a refusal (``code``) and log it once, without the principal's id unless
        principals are logged; ``after`` says what followed (a stream that ended)."""
        ctx = current_request() or RequestContext("-")
        path, said = request.url.path, ctx.scrub(shorten(detail, 200))
        self.metrics.refused.labels(code).inc()
        log.info("refused %s %s: %s: %s%s", request.method, path, code, said, after)

    async def _on_no_route(self, request: Request, exc: Exception) -> Response:
        """The router's own refusals (no such path, or not with this method) as problems,
        like every other refusal: a client with a wrong base URL is told so."""
        assert isinstance(exc, HTTPException)
        path = request.url.path
        if exc.status_code == 404:
            code = "not-found"
            detail = (
                f"no endpoint at {path}; the sync endpoint is /v1/sync/{{unit}} under the"
                " server's URL (check the prefix it is mounted at)"
            )
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            code, detail = "method-not-allowed", f"{request.method} {path}: use {allowed}"
        else:  # not raised by the router: as Starlette answers it
            return Response(exc.detail, status_code=exc.status_code, headers=exc.headers)
        return await self._on_problem(request, ProblemException(code, detail, headers=exc.headers))

    async def _on_database_error(self, request: Request, exc: Exception) -> Response:
        """A connection the database ended (a restart, a failover) is not a bug: one
        line in the log and a 503 the device retries; any other database error is."""
        lost = database_lost(exc)
        busy = None if lost else database_busy(exc)
        if not lost and busy is None:
            return await self._on_error(request, exc)
        path = request.url.path
        self.metrics.refused.labels("database-unavailable").inc()
        why = (
            "its database connection ended or could not be made"
            if lost
            else "the database could not take it"
        )
        log.error("%s %s failed: %s: %s", request.method, path, why, failure_cause(exc))
        detail = DATABASE_LOST if lost else DATABASE_BUSY.format(why=busy)
        return problem_response("database-unavailable", detail, {"Retry-After": "1"})

    async def _on_restored(self, request: Request, exc: Exception) -> Response:
        """A database restored under a running server: nothing is served from it until
        the operator renews its epoch; devices retry (a 503) and lose nothing."""
        self.metrics.refused.labels("database-restored").inc()
        log.error("%s %s refused: %s", request.method, request.url.path, exc)
        return problem_response("database-restored", str(exc), {"Retry-After": "30"})

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        """A failure of the server's own: a traceback in the log, counted as ``internal``."""
        # It runs after the request's context is gone: its fields come from the scope.
        ctx = request.scope.get(SCOPE_KEY)
        extra = ctx.fields() if isinstance(ctx, RequestContext) else {}
        self.metrics.refused.labels("internal").inc()
        log.exception("sync request failed", exc_info=exc, extra=extra)
        return problem_response("internal", "see the server log")

    async def _on_malformed(self, request: Request, exc: Exception) -> Response:
        detail = str(exc)
        path = request.url.path
        self.metrics.refused.labels("malformed-request").inc()
        log.info("refused %s %s: malformed-request: %s", request.method, path, shorten(detail, 200))
        return problem_response("malformed-request", detail[:1000])

    # -- housekeeping ------------------------------------------------------------------

    def retrack(self, table: str) -> int:
        """Declare that ``table`` changed outside tracking (see ``ServerStore.retrack``):
        every stream reading it copies afresh at its next sync. Returns the version
        recorded; a table this server's schema does not track is a ``ValueError``."""
        names = sorted(t.name for t in self.schema.tracked_tables())
        if table not in names:
            raise ValueError(
                f"table {table!r} is not tracked by this server: name one of {', '.join(names)}"
            )
        return self.store.retrack(table)

    def prune_now(self) -> int | None:
        """Drop tombstones older than ``tombstone_retention``; return the new horizon.

        Clients whose cursor is older re-download the affected streams. Runs by
        itself on a background thread at most every ``prune_every`` seconds.
        """
        if self.tombstone_retention is None:
            return None
        cutoff = dt.datetime.now(dt.UTC) - self.tombstone_retention
        return self.store.prune_tombstones_before(cutoff)

    def _check_scope_indexes(self) -> None:
        """Warn, on a background thread, about the scope indexes missing from the database
        of a server that did not install them (once per server, at its first sync); an
        error if a newer syncunit migrated that database."""
        if self._scope_check is None or not self._scope_check.acquire(blocking=False):
            return  # installed at start, or checked already: the lock is never released

        def check() -> None:
            try:
                with self.store.engine.connect() as conn, conn.begin():
                    self.store.check_not_newer(conn)
            except DatabaseTooNew as exc:
                log.error(
                    "%s. This server (install=False) serves it without being able to judge"
                    " that version's tracking: Upgrade syncunit here to the version that"
                    " migrated it",
                    exc,
                )
            except Exception:
                log.exception("checking the database's syncunit migration failed")
            try:
                missing = self.store.missing_scope_indexes(self.schema)
            except Exception:
                log.exception("looking for missing scope indexes failed")
                return
            if missing:
                log.warning(
                    "%d scope index(es) missing: a delta looks for a client's changes among"
                    " every change of the table since its cursor. Create them (run what"
                    " 'syncunit ddl' prints, or start a server with install=True): %s",
                    len(missing),
                    "; ".join(missing),
                )

        threading.Thread(target=check, name="syncunit-scope-indexes", daemon=True).start()

    def _maybe_prune(self) -> None:
        self._check_scope_indexes()
        now = time.monotonic()
        if self.tombstone_retention is None or now - self._pruned_at < self.prune_every:
            return
        if not self._pruning.acquire(blocking=False):
            return
        self._pruned_at = now

        def prune() -> None:
            try:
                self.prune_now()
            except DatabaseTooNew:
                pass  # a newer syncunit's database: told once, at the first sync
            except Exception:
                log.exception("pruning tombstones failed; it is tried again later")
            finally:
                self._pruning.release()

        threading.Thread(target=prune, name="syncunit-prune", daemon=True).start()


def create_app(
    schema: SyncSchema,
    database: str | Engine | ServerStore,
    *,
    authenticate: Authenticator,
    **options: Any,
) -> Starlette:
    """The ASGI app serving ``schema`` from ``database``; mount it anywhere."""
    return SyncServer(schema, database, authenticate=authenticate, **options).app


async def _on_disconnect(request: Request, exc: Exception) -> Response:
    """A client that went away before its request ended (an app closing, a lost
    network) is not a server failure: one line, and the request ends here. Nothing
    of a request body that never fully arrived was applied; the client sends it again."""
    log.info("%s %s: the client disconnected before the request ended",
             request.method, request.url.path)  # fmt: skip
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


async def _counted(stream: AsyncIterator[bytes], ctx: RequestContext) -> AsyncIterator[bytes]:
    """``stream``, adding the bytes of each part to ``ctx.bytes_in`` as it arrives."""
    async for part in stream:
        ctx.bytes_in += len(part)
        yield part
