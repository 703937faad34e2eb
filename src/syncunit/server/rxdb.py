"""RxDB's HTTP replication protocol, per sync unit and stream, for JavaScript apps.

RxDB (https://rxdb.info) replicates one collection through three handlers the
app writes; these endpoints are what they call (``docs/javascript.md``):

* ``POST /v1/rxdb/{unit}/{stream}/pull`` ``{"checkpoint": ..., "batchSize": n}``
  answers ``{"documents": [...], "checkpoint": {"cursor": ...}, "reset": bool}``.
  The checkpoint holds the stream cursor, opaque to RxDB. A batch is filled to
  ``batchSize`` across chunk boundaries, since RxDB takes a short batch for
  "caught up". Removals and rows that left the scope come as ``_deleted``
  documents; ``reset`` says this batch starts a re-download, and every local
  document it does not hold must go (a clean re-sync).
* ``POST /v1/rxdb/{unit}/{stream}/push`` ``[{"assumedMasterState", "newDocumentState"}]``
  answers ``{"conflicts": [...], "results": [...]}``: the current server state of
  every document not applied as sent (RxDB's conflict list; ``_deleted`` when the
  client may not hold it), and one result per row, as native devices get them.
* ``GET /v1/rxdb/{unit}/{stream}/pull/stream``: Server-Sent Events for RxDB's
  ``pull.stream$``. Each event's data is ``"RESYNC"`` or ``{"documents",
  "checkpoint"}``; ``RESYNC`` comes first, on every reset, and when more changed
  than one batch holds.
* ``GET /v1/rxdb/{unit}/{stream}/schema``: an RxDB JSON schema for the stream's
  local table, from the catalog.

A unit opened on a selection (client parameters, e.g. one patient's history)
takes its values as the query parameter ``params``, a JSON object, on the pull
and the event stream: ``.../pull?params={"patient_id":7}``, as a native device
passes ``params=`` to ``sync``. A checkpoint holds the values it was read
with: one of other values starts that stream afresh (``reset``).

Everything goes through the native pieces: the same authentication and
validation as ``POST /v1/sync/{unit}``, ``StreamReader`` for pulls,
``PushApplier`` for pushes (scope, conflict policy, rules, exactly-once log)
and the live monitor for the event stream. A device names itself with the
``Syncunit-Client-Id`` header; its pushes of one stream are numbered by the
server in a client id of their own (``rxdb:{device}:{stream}``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import threading
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import msgspec
import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from syncunit.errors import DatabaseRestored
from syncunit.protocol import (
    INT64_MAX,
    INT64_MIN,
    PROTOCOL_VERSION,
    Chunk,
    Mutation,
    MutationResult,
    StreamInfo,
    StreamStart,
    SyncRequest,
)
from syncunit.server.admission import Slot
from syncunit.server.auth import Principal, authorize_unit
from syncunit.server.changes import StreamReader, params_hash
from syncunit.server.cursor import Cursor, encode_cursor, sign_cursor
from syncunit.server.limits import check_mutations, off_the_loop, read_body, shorten
from syncunit.server.live import unit_has_changes
from syncunit.server.problems import (
    ProblemException,
    database_busy,
    database_lost,
    failure_cause,
)
from syncunit.server.store import clients
from syncunit.units import Stream, SyncUnit

if TYPE_CHECKING:
    from syncunit.server.app import SyncServer

__all__ = ["CLIENT_HEADER", "RxDBReplication", "rxdb_schema"]

log = logging.getLogger("syncunit.server")

CLIENT_HEADER = "Syncunit-Client-Id"
DEFAULT_BATCH = 1000
#: Times the rows of one push are numbered and sent to the applier, when pushes of the
#: same device through other server processes keep taking their numbers first.
NUMBERING_ATTEMPTS = 30
_OUTNUMBERED = (
    "not applied: other pushes of this device, through other server processes, kept"
    " taking this change's place in its sequence; push it again"
)
#: Seconds between keep-alive comments on an idle event stream.
HEARTBEAT = 15.0
#: An event stream ends after this many seconds; the client reconnects (and is
#: authenticated again, so a changed principal takes effect).
STREAM_LIFETIME = 300.0

_JSON_TYPES = {
    "integer": "integer",
    "real": "number",
    "boolean": "boolean",
}


def rxdb_schema(info: StreamInfo, *, key_length: int = 100) -> dict[str, Any]:
    """An RxDB collection schema (version 0) for a stream of the catalog.

    The key is a string (RxDB keys are); columns keep their JSON type, and the
    nullable ones admit ``null``, as do all real ones: JSON has no infinity or NaN,
    so a non-finite value arrives as ``null``. Only the key is required, since a
    deleted document carries nothing else.
    """
    properties: dict[str, Any] = {}
    for col in info.columns:
        if col.name == info.key:
            properties[col.name] = {"type": "string", "maxLength": key_length}
            continue
        kind = _JSON_TYPES.get(col.type, "string")
        nullable = col.nullable or col.type == "real"
        properties[col.name] = {"type": [kind, "null"] if nullable else kind}
    return {
        "title": info.local_table,
        "version": 0,
        "primaryKey": info.key,
        "type": "object",
        "properties": properties,
        "required": [info.key],
    }


class _Docs:
    """Converts between stream rows and RxDB documents of one stream."""

    def __init__(self, stream: Stream) -> None:
        info = stream.info()
        self.stream = stream
        self.key = info.key
        self.columns = [c.name for c in info.columns]
        self.booleans = {c.name for c in info.columns if c.type == "boolean"}
        # Binary values travel as base64 text (how msgspec writes bytes in JSON).
        self.blobs = {c.name for c in info.columns if c.type == "blob" and c.name != info.key}
        self.writable = {c.name for c in info.columns if c.writable}
        self.integers = {c.name for c in info.columns if c.type == "integer" and c.name != info.key}
        self.reals = {c.name for c in info.columns if c.type == "real" and c.name != info.key}
        key_info = next(c for c in info.columns if c.name == info.key)
        self.integer_key = key_info.type == "integer"

    def doc_id(self, key: Any) -> str:
        return str(key)

    def server_key(self, doc_id: Any) -> Any:
        """The key as the server's column holds it (PushApplier rejects a bad one)."""
        if self.integer_key and isinstance(doc_id, str):
            try:
                return int(doc_id)
            except ValueError:
                return doc_id
        return doc_id

    def row(self, names: list[str], values: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for name, value in zip(names, values, strict=True):
            if name == self.key:
                doc[name] = self.doc_id(value)
            elif name in self.booleans and value is not None:
                doc[name] = bool(value)
            else:
                doc[name] = value
        doc["_deleted"] = False
        return doc

    def deleted(self, key: Any) -> dict[str, Any]:
        return {self.key: self.doc_id(key), "_deleted": True}

    def mutation(self, seq: int, row: Any) -> Mutation:
        """One RxDB push row as the mutation a native device would send."""
        if not isinstance(row, dict) or not isinstance(row.get("newDocumentState"), dict):
            raise ProblemException(
                "malformed-request",
                "each push row must be {assumedMasterState, newDocumentState} with a document",
            )
        new: dict[str, Any] = row["newDocumentState"]
        old = row.get("assumedMasterState")
        if self.key not in new:
            raise ProblemException("malformed-request", f"a pushed document has no {self.key!r}")
        if old is not None and not isinstance(old, dict):
            raise ProblemException(
                "malformed-request",
                f"the assumedMasterState of document {new[self.key]!r} must be a document"
                " or null (a new document)",
            )
        key = self.server_key(new[self.key])
        known = old is not None and not _flag(old, "assumedMasterState", new[self.key])
        base = {c: old[c] for c in self.writable if c in old} if known and old else {}
        mid = str(uuid.uuid4())
        table = self.stream.local_table
        self._binary(base)
        if _flag(new, "newDocumentState", new[self.key]):
            return Mutation(seq=seq, id=mid, table=table, key=key, op="delete", base=base)
        # Fields the stream does not have are sent on, for the server to refuse by name.
        extra = [f for f in new if f not in self.columns and not f.startswith("_")]
        if not known:
            # Denormalized copies are not data of this row: the server fills them.
            names = [c for c in self.columns if c in self.writable or c == self.key]
            values = {c: new.get(c) for c in [*names, *extra]}
            values[self.key] = key
            self._binary(values)
            return Mutation(seq=seq, id=mid, table=table, key=key, op="insert", values=values)
        assert isinstance(old, dict)
        # A writable field left out means null; a copied one left out is not a change.
        changed = [
            c
            for c in [*self.columns, *extra]
            if c != self.key and (c in new or c in self.writable) and new.get(c) != old.get(c)
        ]
        values = {c: new.get(c) for c in changed}
        self._binary(values)
        return Mutation(
            seq=seq, id=mid, table=table, key=key, op="update",
            values=values, changed=changed, base=base,
        )  # fmt: skip

    def unseen(self, name: str, value: Any) -> bool:
        """Whether ``value`` may be how RxDB holds a server value it cannot hold exactly:
        an integer from 2**53 on (a rounded double in JavaScript), or null for a real column
        (JSON has no infinity or NaN)."""
        if name in self.integers:
            return type(value) is float or (type(value) is int and abs(value) >= 2**53)
        return name in self.reals and value is None

    def beyond_64_bits(self, name: str, value: Any) -> bool:
        """An integer column's value no 64-bit integer is (the wire refuses those)."""
        if name not in self.integers:
            return False
        if type(value) is int:
            return not INT64_MIN <= value <= INT64_MAX
        return type(value) is float and not -(2.0**63) <= value < 2.0**63

    def within_limits(self, m: Mutation) -> Mutation:
        """``m`` without the values ``settle`` answers for, for the request's checks."""
        if not any(self.beyond_64_bits(n, v) for n, v in [*m.base.items(), *m.values.items()]):
            return m
        base = {n: v for n, v in m.base.items() if not self.beyond_64_bits(n, v)}
        values = {n: v for n, v in m.values.items() if not self.beyond_64_bits(n, v)}
        return msgspec.structs.replace(m, base=base, values=values)

    def needs_row(self, m: Mutation) -> bool:
        """Whether ``settle`` must read the server's row to tell what ``m`` means."""
        return any(self.unseen(n, v) for n, v in m.base.items()) or any(
            self.beyond_64_bits(n, v) for n, v in m.values.items()
        )

    def settle(self, m: Mutation, row: dict[str, Any] | None) -> Mutation | MutationResult:
        """``m`` with what RxDB sent read against the server's ``row``, as the device
        could have received it (``_as_received``).

        A base value RxDB could have received for the server's value is that value,
        so it counts as unchanged; another
        past 64 bits is one the row does not hold, as a 64-bit bound. A written
        value past 64 bits is refused (``invalid-value``), unless it is how the
        device received the server's value: then it is no change.
        """
        base = dict(m.base)
        for name, sent in m.base.items():
            if not self.unseen(name, sent):
                continue
            held = None if row is None else row.get(name)
            if row is not None and _as_received(held) == _as_received(sent):
                # The value as read (a NaN too: the apply takes two NaNs as one, and a
                # writer changing it before the apply's own read makes it a conflict).
                base[name] = held
            elif self.beyond_64_bits(name, sent):
                bound = INT64_MAX if sent > 0 else INT64_MIN
                base[name] = bound if held != bound else bound - 1 if sent > 0 else bound + 1
        values, changed = dict(m.values), list(m.changed)
        for name, sent in m.values.items():
            if not self.beyond_64_bits(name, sent):
                continue
            held = None if row is None else row.get(name)
            if row is None or type(held) is not int or _as_received(held) != _as_received(sent):
                return MutationResult(
                    seq=m.seq, id=m.id, status="rejected", code="invalid-value", server_row=row,
                    reason=f"column {name!r}: integers must fit in 64 bits (signed), not"
                    f" {shorten(sent, 24)}; JavaScript holds integers exactly only up to"
                    " 2**53: write larger ones in a text or decimal column",
                )  # fmt: skip
            if m.op == "update":  # what the device received: not a change
                del values[name]
                changed.remove(name)
            else:
                values[name] = held
        return msgspec.structs.replace(m, base=base, values=values, changed=changed)

    def _binary(self, values: dict[str, Any]) -> None:
        """Binary columns' base64 text as bytes, in place. Text that is not base64 stays
        text, which the applier refuses by name (``invalid-value``)."""
        for name in self.blobs & values.keys():
            value = values[name]
            if isinstance(value, str):
                with contextlib.suppress(binascii.Error, ValueError):
                    values[name] = base64.b64decode(value, validate=True)


class _Batch(msgspec.Struct):
    documents: list[dict[str, Any]]
    checkpoint: dict[str, str] | None
    reset: bool = False
    complete: bool = True


class RxDBReplication:
    """The RxDB endpoints of a ``SyncServer`` (its ``routes()`` are mounted by the app)."""

    def __init__(self, server: SyncServer) -> None:
        self.server = server
        self._docs: dict[str, _Docs] = {}
        self._numbering: dict[str, threading.Lock] = {}
        self._numbering_guard = threading.Lock()
        self.stream_lifetime = STREAM_LIFETIME
        self.heartbeat = HEARTBEAT

    def routes(self) -> list[Route]:
        base = "/v1/rxdb/{unit}/{stream}"
        return [
            Route(f"{base}/schema", self.get_schema, methods=["GET"]),
            Route(f"{base}/pull", self.post_pull, methods=["POST"]),
            Route(f"{base}/push", self.post_push, methods=["POST"]),
            Route(f"{base}/pull/stream", self.get_stream, methods=["GET"]),
        ]

    # -- request checks ------------------------------------------------------------

    async def _resolve(self, request: Request) -> tuple[Principal, SyncUnit, Stream]:
        """Authenticate; find the unit and its stream."""
        principal = await self.server._principal(request)
        name = request.path_params["unit"]
        unit = self.server.schema.units.get(name)
        if unit is None:
            known = ", ".join(sorted(self.server.schema.units))
            raise ProblemException(
                "unknown-unit", f"unit {shorten(name, 60)} does not exist; known: {known}"
            )
        stream = next((s for s in unit.streams if s.name == request.path_params["stream"]), None)
        if stream is None:
            known = ", ".join(s.name for s in unit.streams)
            raise ProblemException(
                "unknown-stream",
                f"unit {unit.name!r} has no stream {shorten(request.path_params['stream'], 60)};"
                f" it has: {known}",
            )
        authorize_unit(principal, unit)
        return principal, unit, stream

    def _check(
        self,
        principal: Principal,
        unit: SyncUnit,
        *,
        client_id: str = "rxdb",
        mutations: list[Mutation] | None = None,
        batch: int | None = None,
        params: dict[str, Any] | None = None,
        checked: bool = False,
    ) -> None:
        """Validate as a native sync of the unit would be (``checked``: the mutations
        passed ``check_mutations`` already)."""
        if mutations is not None and not unit.pushes:
            raise ProblemException(
                "invalid-request", f"unit {unit.name!r} does not push; use a unit that does"
            )
        if mutations is None and not unit.pulls:
            raise ProblemException(
                "invalid-request", f"unit {unit.name!r} does not pull; use its push endpoint"
            )
        # The unit's check (``_check_unit``) says which parameter is missing, unknown
        # or malformed: here they come as ``?params=``.
        req = SyncRequest(
            protocol=PROTOCOL_VERSION,
            client_id=client_id,
            mutations=mutations or [],
            params=params or {},
            chunk_size=batch,
        )
        self.server._validate(req, unit, principal, checked)

    @staticmethod
    def _client_id(request: Request, stream: Stream) -> str:
        device = request.headers.get(CLIENT_HEADER, "").strip()
        if not device or len(device) > 120:
            raise ProblemException(
                "invalid-request",
                f"send a '{CLIENT_HEADER}' header naming this device (1 to 120 characters,"
                " the same on every push)",
            )
        return f"rxdb:{device}:{stream.name}"

    @staticmethod
    def _params(request: Request) -> dict[str, Any]:
        """The unit's client parameters: the ``params`` query parameter, a JSON object."""
        text = request.query_params.get("params")
        if text is None:
            return {}
        try:
            params = msgspec.json.decode(text)
        except msgspec.DecodeError as exc:
            raise ProblemException(
                "malformed-request", f"params is not JSON: {exc}; send ?params={{...}}"
            ) from exc
        except RecursionError:
            raise ProblemException(
                "malformed-request", "params nests too deeply; send ?params={...} of plain values"
            ) from None
        if not isinstance(params, dict):
            raise ProblemException(
                "malformed-request", 'params must be a JSON object, e.g. ?params={"patient_id":7}'
            )
        return params

    def docs(self, stream: Stream) -> _Docs:
        d = self._docs.get(stream.name)
        if d is None:
            d = self._docs[stream.name] = _Docs(stream)
        return d

    async def _json(self, request: Request) -> tuple[Any, int]:
        """The JSON body, and its size in bytes."""
        held = self.server.bodies.hold()
        try:
            body = await read_body(request.stream(), request.headers, self.server.limits, held)
            return await off_the_loop(len(body), partial(_decode_json, body)), len(body)
        finally:
            held.release()

    def _mutations(self, stream: Stream, rows: list[Any]) -> list[Mutation]:
        """RxDB's push rows as mutations, checked against the limits (a worker runs this
        for many rows)."""
        limits = self.server.limits
        if len(rows) > limits.max_mutations:
            raise ProblemException(
                "too-many-mutations",
                f"{len(rows)} rows; the limit is {limits.max_mutations}: push fewer at once",
            )
        docs = self.docs(stream)
        mutations = [docs.mutation(i + 1, r) for i, r in enumerate(rows)]
        # Integers past 64 bits that JavaScript made of a server value are read against
        # the row (``_Docs.settle``), row by row: never a refusal of the whole push.
        check_mutations([docs.within_limits(m) for m in mutations], limits)
        return mutations

    # -- handlers ------------------------------------------------------------------

    async def get_schema(self, request: Request) -> Response:
        _, _, stream = await self._resolve(request)
        return _json_response(rxdb_schema(stream.info()))

    async def post_pull(self, request: Request) -> Response:
        principal, unit, stream = await self._resolve(request)
        body, _ = await self._json(request)
        if not isinstance(body, dict):
            raise ProblemException("malformed-request", 'send {"checkpoint": ..., "batchSize": n}')
        batch = body.get("batchSize", DEFAULT_BATCH)
        if isinstance(batch, bool) or not isinstance(batch, int):
            raise ProblemException("invalid-request", "batchSize must be an integer")
        params = self._params(request)
        self._check(principal, unit, batch=batch, params=params)
        key = await self.server._key()
        token = _cursor_of(body.get("checkpoint"))
        if token is not None:
            token = self.server._verified(token, key)
        slot = self.server._slot(principal)
        try:
            result = await anyio.to_thread.run_sync(
                self.pull, stream, principal, token, batch, params
            )
        finally:
            slot.release()
        self.server._maybe_prune()
        return _json_response(
            {
                "documents": result.documents,
                "checkpoint": _signed(result.checkpoint, key),
                "reset": result.reset,
            }
        )

    async def post_push(self, request: Request) -> Response:
        principal, unit, stream = await self._resolve(request)
        client_id = self._client_id(request, stream)
        rows, size = await self._json(request)
        if not isinstance(rows, list):
            raise ProblemException(
                "malformed-request", "send the array of push rows RxDB gives the push handler"
            )
        mutations = await off_the_loop(size, partial(self._mutations, stream, rows))
        params = self._params(request)  # a unit with client parameters does not push
        self._check(
            principal, unit, client_id=client_id, mutations=mutations, params=params, checked=True
        )
        slot = self.server._slot(principal)
        try:
            results = await anyio.to_thread.run_sync(
                self.push, unit, stream, principal, client_id, mutations
            )
        finally:
            slot.release()
        return _json_response(results)

    async def get_stream(self, request: Request) -> Response:
        try:
            batch = int(request.query_params.get("batchSize", DEFAULT_BATCH))
        except ValueError:
            raise ProblemException("invalid-request", "batchSize must be an integer") from None
        principal, unit, stream = await self._resolve(request)
        params = self._params(request)
        self._check(principal, unit, batch=batch, params=params)
        waiting = self.server.live_slot(principal)
        try:
            # Read before the answer starts: a database that cannot answer (restored,
            # gone) is the sync's problem response, not a 200 cut short.
            seen = await anyio.to_thread.run_sync(self.server.store.current_version)
            cursor = await anyio.to_thread.run_sync(self._cursor_now, stream, principal, params)
        except BaseException:
            waiting.release()
            raise
        events = self._events(request, unit, stream, principal, batch, params, seen, cursor)
        return _HeldStream(
            events,
            waiting,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # -- the work ------------------------------------------------------------------

    def pull(
        self,
        stream: Stream,
        principal: Principal,
        token: str | None,
        batch: int,
        params: dict[str, Any] | None = None,
    ) -> _Batch:
        """Documents since ``token``: whole chunks until ``batch`` documents or the end
        (of the selection ``params`` names, for a unit opened on one).

        A key changed twice in one batch (a first copy and its catch-up) is sent
        once, as it is last; the count is of distinct documents, so a batch
        short of ``batch`` really means "caught up".
        A full stream (small by definition) is sent whole, whatever ``batch``.
        """
        store = self.server.store
        docs = self.docs(stream)
        reader = StreamReader(store, stream, principal.scope(stream, params), chunk_size=batch)
        out: dict[str, dict[str, Any]] = {}
        cursor, reset, complete = token, False, False
        with store.snapshot() as (conn, watermark):
            epoch, horizon = store.epoch_and_horizon(conn)
            frames = reader.frames(conn, watermark, epoch, horizon, token)
            try:
                for frame in frames:
                    if isinstance(frame, StreamStart):
                        reset = reset or frame.reset
                        continue
                    if not isinstance(frame, Chunk):  # pragma: no cover - readers yield these
                        continue
                    reset = reset or frame.reset
                    for key in frame.removed:
                        doc = docs.deleted(key)
                        out.pop(doc[docs.key], None)
                        out[doc[docs.key]] = doc
                    for values in zip(*frame.data, strict=True):
                        doc = docs.row(frame.columns, values)
                        out.pop(doc[docs.key], None)
                        out[doc[docs.key]] = doc
                    cursor = frame.cursor
                    if frame.complete:
                        complete = True
                        break
                    # A full stream goes whole: a cursor before its last chunk is a copy's.
                    if len(out) >= batch and stream.mode != "full":
                        break
            finally:
                frames.close()
        checkpoint = None if cursor is None else {"cursor": cursor}
        return _Batch(list(out.values()), checkpoint, reset, complete)

    def push(
        self,
        unit: SyncUnit,
        stream: Stream,
        principal: Principal,
        client_id: str,
        mutations: list[Mutation],
    ) -> dict[str, Any]:
        """Apply the rows through ``PushApplier``; RxDB's conflicts plus every result.

        RxDB rows carry no sequence numbers: they follow the device's last applied
        one. Pushes of one device through this process are numbered one at a time;
        one through another server process may take the same numbers first. The
        applier then applies none of the rows it numbered twice (``sequence-reused``,
        against the other push's log), and those rows go again with the numbers after
        it, until every row has its own result (or ``NUMBERING_ATTEMPTS`` ran out).
        A row holding a value JavaScript may have received inexactly is first read
        against the server's row (``_Docs.settle``).
        """
        if not mutations:
            return {"conflicts": [], "results": []}
        pushed: list[tuple[Mutation, MutationResult] | None] = [None] * len(mutations)
        docs = self.docs(stream)
        mutations = list(mutations)
        reading = [i for i, m in enumerate(mutations) if docs.needs_row(m)]
        if reading:  # one connection for every row to read
            with self.server.store.engine.connect() as conn:
                for i in reading:
                    m = mutations[i]
                    row = self._server_row(conn, stream, principal, m.key)
                    settled = docs.settle(m, row)
                    if isinstance(settled, MutationResult):
                        pushed[i] = (m, settled)
                    else:
                        mutations[i] = settled
        waiting = [i for i, p in enumerate(pushed) if p is None]
        for _ in range(NUMBERING_ATTEMPTS):
            if not waiting:
                break
            with self._lock_for(client_id):
                with self.server.store.engine.connect() as conn:
                    last = conn.execute(
                        sa.select(clients.c.last_seq).where(clients.c.client_id == client_id)
                    ).scalar()
                first = max(int(last or 0), 0) + 1  # -1 after renew_epoch: from 1 again
                numbered = [
                    msgspec.structs.replace(mutations[i], seq=first + n)
                    for n, i in enumerate(waiting)
                ]
                req = SyncRequest(
                    protocol=PROTOCOL_VERSION, client_id=client_id, mutations=numbered
                )
                results = self.server.pusher.apply(principal, req, unit).results
            taken: list[int] = []
            for i, m, r in zip(waiting, numbered, results, strict=True):
                if r.code == "sequence-reused":  # not applied: its number was another push's
                    taken.append(i)
                    r = msgspec.structs.replace(r, reason=_OUTNUMBERED)
                pushed[i] = (m, r)
            if not taken:
                break
            waiting = taken
        conflicts: list[dict[str, Any]] = []
        answers: list[dict[str, Any]] = []
        for m, r in (p for p in pushed if p is not None):
            answers.append(_result(docs, m, r))
            if r.status == "applied":
                continue
            # A refusal made without reading the row (a read-only table, a number another
            # push took, ...) says nothing of it: the device learns the row as this stream
            # gives it to the principal (a full stream's through its query), and a deletion
            # of a row it may not hold.
            row = r.server_row
            if row is None:
                with self.server.store.engine.connect() as conn:
                    row = self._server_row(conn, stream, principal, m.key)
            if row is None:
                conflicts.append(docs.deleted(m.key))
            else:
                conflicts.append(docs.row(list(row), list(row.values())))
        return {"conflicts": conflicts, "results": answers}

    def _server_row(
        self, conn: sa.Connection, stream: Stream, principal: Principal, key: Any
    ) -> dict[str, Any] | None:
        """The row as the device should hold it (the applier's own lookup)."""
        return self.server.pusher._server_row(conn, stream, principal, key)

    def _lock_for(self, client_id: str) -> threading.Lock:
        with self._numbering_guard:
            lock = self._numbering.get(client_id)
            if lock is None:
                lock = self._numbering[client_id] = threading.Lock()
            return lock

    def _cursor_now(
        self, stream: Stream, principal: Principal, params: dict[str, Any]
    ) -> str | None:
        """A cursor holding everything of ``stream`` up to now, without reading its rows."""
        if stream.mode == "full":  # small by definition: its content hash is the cursor
            batch = self.pull(stream, principal, None, self.server.max_chunk_size, params)
            return None if batch.checkpoint is None else batch.checkpoint["cursor"]
        store = self.server.store
        with store.snapshot() as (conn, watermark):
            epoch, _ = store.epoch_and_horizon(conn)
        phash = params_hash(stream, principal.scope(stream, params))
        cur = Cursor(epoch, stream.definition_hash, phash, "done", since=watermark, high=watermark)
        return encode_cursor(cur)

    async def _events(
        self,
        request: Request,
        unit: SyncUnit,
        stream: Stream,
        principal: Principal,
        batch: int,
        params: dict[str, Any],
        seen: int,
        cursor: str | None,
    ) -> AsyncIterator[bytes]:
        """The event stream: ``RESYNC`` first, then the changes in scope as they come.

        The stream keeps its own cursor (``cursor``, at version ``seen`` to begin with),
        taken before each ``RESYNC`` is sent: the pull the client makes on it reads at
        least that far, so a later event (whose checkpoint replaces the client's) leaves
        no gap behind it. A read that fails ends the stream (the client reconnects, and
        is told why: ``_ended``).
        """
        monitor = self.server.monitor
        key = await self.server._key()
        alone = SyncUnit(f"rxdb:{stream.name}", [stream])
        loop = asyncio.get_running_loop()
        ends = loop.time() + self.stream_lifetime
        yield b"retry: 1000\n\n" + _event("RESYNC")
        beat = loop.time()
        while (left := ends - loop.time()) > 0 and not await request.is_disconnected():
            version = await monitor.wait_beyond(seen, min(1.0, left))
            if version <= seen:
                if loop.time() - beat >= self.heartbeat:
                    beat = loop.time()
                    yield b": keep-alive\n\n"
                continue
            # The reads take a sync slot, as a long-poll's check does; with none free,
            # this change is looked at on a later wake.
            slot = self.server.sync_slots.try_acquire(principal.id)
            if not isinstance(slot, Slot):
                await asyncio.sleep(min(1.0, left))
                continue
            seen = version
            try:
                event = await self._event_for(
                    request, unit, stream, principal, alone, cursor, batch, params
                )
            except Exception as exc:  # the answer is under way: it can only end
                self._ended(exc)
                return
            finally:
                slot.release()
            if event is None:
                return
            cursor, data = event
            if data is not None:
                if isinstance(data, dict):
                    data = {**data, "checkpoint": _signed(data["checkpoint"], key)}
                yield _event(data)

    def _ended(self, exc: Exception) -> None:
        """An event stream's read failed: logged and counted as the problem a request
        would have been answered with (which the reconnecting client gets)."""
        refused = self.server.metrics.refused
        if isinstance(exc, DatabaseRestored):
            log.error("event stream ended: %s", exc)
            refused.labels("database-restored").inc()
        elif database_lost(exc) or database_busy(exc) is not None:
            log.error("event stream ended: the database failed: %s", failure_cause(exc))
            refused.labels("database-unavailable").inc()
        else:
            log.exception("event stream failed", exc_info=exc)
            refused.labels("internal").inc()

    async def _event_for(
        self,
        request: Request,
        unit: SyncUnit,
        stream: Stream,
        principal: Principal,
        alone: SyncUnit,
        cursor: str | None,
        batch: int,
        params: dict[str, Any],
    ) -> tuple[str | None, Any] | None:
        """What to send on a change: (the stream's new cursor, the event or None); None
        ends the stream."""
        changed = await anyio.to_thread.run_sync(
            unit_has_changes, self.server.store, alone, principal, params,
            {stream.name: cursor or ""},
        )  # fmt: skip
        if not changed:
            return cursor, None
        # Rows go out only to whom the request still authenticates as: a revoked
        # token or changed parameters end the stream (the client reconnects).
        # A refusal ends it, counted and logged as the request's refusal would be.
        now = await anyio.to_thread.run_sync(self.server.authenticate, request)
        if now is None:
            self.server._note_refusal(
                request,
                "unauthenticated",
                "the token expired or was revoked while the event stream was open",
                after="; the event stream ended",
            )
            return None
        if now != principal:  # not a refusal: the client reconnects as who it is now
            log.info("event stream ended: the credential's principal changed")
            return None
        # ... and whom the streams' ``authorize`` hooks still let read them, as a pull's
        # check would (a hook may look up permissions that changed).
        try:
            await anyio.to_thread.run_sync(self.server._check_unit, unit, principal, params)
        except ProblemException as exc:
            self.server._note_refusal(
                request, exc.code, exc.detail, after="; the event stream ended"
            )
            return None
        found = await anyio.to_thread.run_sync(self.pull, stream, principal, cursor, batch, params)
        if found.reset or not found.complete or found.checkpoint is None:
            fresh = await anyio.to_thread.run_sync(self._cursor_now, stream, principal, params)
            return fresh, "RESYNC"
        if not found.documents:
            return found.checkpoint["cursor"], None
        return found.checkpoint["cursor"], {
            "documents": found.documents,
            "checkpoint": found.checkpoint,
        }


class _HeldStream(StreamingResponse):
    """An event stream holding a share of the server's long waits until it ends, however
    it ends (a client gone, a failure, its lifetime)."""

    def __init__(self, content: AsyncIterator[bytes], slot: Slot, **options: Any) -> None:
        super().__init__(content, **options)
        self._slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slot.release()


def _decode_json(body: bytes | bytearray) -> Any:
    try:
        return msgspec.json.decode(body) if body else None
    except msgspec.DecodeError as exc:
        raise ProblemException("malformed-request", f"the body is not JSON: {exc}") from exc
    except RecursionError:
        raise ProblemException(
            "malformed-request", "the body's values are nested too deeply"
        ) from None


def _flag(doc: dict[str, Any], part: str, doc_id: Any) -> bool:
    """A document's ``_deleted``: a JSON boolean, false when absent. Anything else
    refuses the request: a string such as ``"false"`` is no answer to "deleted?"."""
    value = doc.get("_deleted", False)
    if not isinstance(value, bool):
        raise ProblemException(
            "malformed-request",
            f"_deleted of the {part} of document {doc_id!r} is {value!r}: send true or"
            " false (a JSON boolean), or leave it out for false",
        )
    return value


def _cursor_of(checkpoint: Any) -> str | None:
    if checkpoint is None:
        return None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("cursor"), str | None):
        cursor: str | None = checkpoint.get("cursor")
        return cursor
    raise ProblemException(
        "malformed-request", 'the checkpoint is null or {"cursor": "..."} from an earlier pull'
    )


def _signed(checkpoint: dict[str, str] | None, key: bytes) -> dict[str, str] | None:
    """The checkpoint a client gets: its cursor signed, as every cursor given out is."""
    if checkpoint is None:
        return None
    return {"cursor": sign_cursor(checkpoint["cursor"], key)}


def _result(docs: _Docs, m: Mutation, r: MutationResult) -> dict[str, Any]:
    out: dict[str, Any] = {docs.key: docs.doc_id(m.key), "op": m.op, "status": r.status}
    if r.status != "applied":
        out["code"] = r.code
        out["reason"] = r.reason
    return out


def _as_received(value: Any) -> Any:
    """A value as JSON brings it to JavaScript: an integer as its nearest double, a
    non-finite real as null."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    try:
        number = float(value)
    except OverflowError:  # past any double: JSON.parse gives Infinity, never equal
        return ("overflow", value)
    return number if math.isfinite(number) else None


def _event(data: Any) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


def _json_response(data: Any) -> Response:
    return Response(
        msgspec.json.encode(data),
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
