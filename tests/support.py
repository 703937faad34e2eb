"""Test helpers: a live uvicorn server, a fault-injecting transport, and checks.

Nothing here is specific to one server database: the checks read the server
through SQLAlchemy (``ServerStore.engine``) and the stream definitions, so the
same tests run against every ``ServerStore``.
"""

from __future__ import annotations

import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import uvicorn
from hospital.models import staff

from syncunit.cli import KEEP_ALIVE_S
from syncunit.client import SyncClient
from syncunit.protocol import (
    PROTOCOL_VERSION,
    Chunk,
    Encoding,
    End,
    Frame,
    FrameDecoder,
    StreamStart,
    SyncRequest,
    content_type,
    encode_request,
    encoding_of,
)
from syncunit.server import Principal, SyncServer, TokenAuth
from syncunit.server.changes import StreamReader, to_wire
from syncunit.server.store import ServerStore
from syncunit.units import TRACKING_COLUMNS, Stream, SyncSchema, SyncUnit

# -- waiting ---------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll ``predicate`` until it is truthy; fail after ``timeout`` (a bound, not a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# -- a real HTTP server ------------------------------------------------------------------


class LiveServer:
    """Uvicorn on 127.0.0.1 in a thread, serving ``app`` (which may be swapped later).

    The listening socket is bound and listening before the thread starts, so the
    server is reachable at once: connections wait in the backlog until uvicorn
    accepts them. No polling, no sleeps.
    """

    def __init__(self, app: Any, port: int = 0) -> None:
        """``port`` 0 picks a free one; another restarts a server where clients expect it."""
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it: without it, Nagle and delayed ACKs add ~40 ms a request.
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self._dispatch,
            interface="asgi3",
            lifespan="off",
            ws="none",
            http="h11",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
            timeout_keep_alive=KEEP_ALIVE_S,  # as syncunit serve: the client closes first
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self.thread.start()

    async def _dispatch(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self._sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"


# -- a transport that records frames and cuts streams -------------------------------------


class CutByTest(httpx.ReadError):
    """The connection was cut by a ``TapTransport``."""


def _split_frames(buf: bytearray, encoding: Encoding) -> Iterator[bytes]:
    """Remove and yield the whole encoded frames at the start of ``buf``."""
    while True:
        if encoding == "msgpack":
            if len(buf) < 4:
                return
            end = 4 + int.from_bytes(buf[:4], "big")
            if len(buf) < end:
                return
        else:
            nl = buf.find(b"\n")
            if nl == -1:
                return
            end = nl + 1
        frame = bytes(buf[:end])
        del buf[:end]
        yield frame


class _TapStream(httpx.SyncByteStream):
    def __init__(self, tap: TapTransport, inner: Any, encoding: Encoding, cut: dict[str, Any]):
        self.tap = tap
        self.inner = inner
        self.encoding = encoding
        self.cut = cut
        self.frames: list[Frame] = []
        tap.responses.append(self.frames)

    def _cut(self) -> None:
        self.tap.cuts += 1
        if self.cut.get("error", True):
            raise CutByTest("connection cut by the test")

    def _limit_reached(self) -> bool:
        max_frames = self.cut.get("frames")
        if max_frames is not None:
            return len(self.frames) >= max_frames
        if self.cut.get("chunks") is not None:
            stream, n = self.cut["chunks"]
            return len(chunks(self.frames, stream)) >= n
        return False

    def __iter__(self) -> Iterator[bytes]:
        pending = bytearray()
        decoder = FrameDecoder(self.encoding)
        sent = 0
        max_bytes = self.cut.get("bytes")
        extra = self.cut.get("extra_bytes", 0)
        for data in self.inner:
            if max_bytes is not None:
                room = max_bytes - sent
                part = bytes(data[:room])
                sent += len(part)
                self.frames.extend(decoder.feed(part))
                if part:
                    yield part
                if sent >= max_bytes:
                    self._cut()
                    return
                continue
            pending += data
            for raw in _split_frames(pending, self.encoding):
                if self._limit_reached():
                    if extra:
                        yield raw[:extra]
                    self._cut()
                    return
                for frame in decoder.feed(raw):
                    self.frames.append(frame)
                    if self.tap.on_frame is not None:
                        self.tap.on_frame(frame)
                yield raw
        if pending:  # a trailing partial frame: pass it on, the client will notice
            yield bytes(pending)

    def close(self) -> None:
        self.inner.close()


class TapTransport(httpx.BaseTransport):
    """Real HTTP (``httpx.HTTPTransport``) that records the frames of each sync response.

    ``arm(frames=n)`` cuts the next sync response after ``n`` whole frames (plus
    ``extra_bytes`` of the next one); ``arm(chunks=(stream, n))`` after the
    ``n``-th chunk of ``stream``; ``arm(bytes=n)`` after ``n`` bytes. The
    cut raises ``httpx.ReadError`` (``error=True``) or just ends the body. Sync
    requests go out with ``Accept-Encoding: identity`` so frames can be counted.
    """

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.responses: list[list[Frame]] = []
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.cuts = 0
        self._armed: dict[str, Any] | None = None
        #: Called with each frame as it is handed to the client (in the client's thread).
        self.on_frame: Callable[[Frame], None] | None = None

    def arm(
        self,
        *,
        frames: int | None = None,
        chunks: tuple[str, int] | None = None,
        bytes: int | None = None,
        extra_bytes: int = 0,
        error: bool = True,
    ) -> None:
        assert [frames, chunks, bytes].count(None) == 2, "one limit"
        self._armed = {
            "frames": frames,
            "chunks": chunks,
            "bytes": bytes,
            "extra_bytes": extra_bytes,
            "error": error,
        }

    @property
    def last(self) -> list[Frame]:
        return self.responses[-1]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        is_sync = request.url.path.startswith("/v1/sync/")
        if is_sync:
            request.headers["Accept-Encoding"] = "identity"
        response = self.inner.handle_request(request)
        self.log.append((request.method, request.url.path, response.status_code))
        if not is_sync or response.status_code != 200:
            return response
        encoding = encoding_of(response.headers.get("content-type"))
        assert encoding is not None, response.headers
        cut, self._armed = self._armed or {}, None
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_TapStream(self, response.stream, encoding, cut),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.inner.close()


def chunks(frames: Sequence[Frame], stream: str | None = None) -> list[Chunk]:
    return [f for f in frames if isinstance(f, Chunk) and (stream is None or f.stream == stream)]


def sent_keys(frames: Sequence[Frame], stream: str, key: str = "id") -> list[Any]:
    """The keys of the rows the frames upsert for ``stream``, in order, repeats kept."""
    out: list[Any] = []
    for c in chunks(frames, stream):
        k = c.columns.index(key) if c.columns else -1
        out += [r[k] for r in c.row_list()]
    return out


def removed_keys(frames: Sequence[Frame], stream: str) -> list[Any]:
    return [k for c in chunks(frames, stream) for k in c.removed]


# -- raw requests --------------------------------------------------------------------------


def sync_body(
    *,
    cursors: Mapping[str, str] | None = None,
    chunk_size: int | None = None,
    encoding: Encoding = "msgpack",
    protocol: int = PROTOCOL_VERSION,
    client_id: str = "raw-client",
) -> bytes:
    request = SyncRequest(
        protocol=protocol, client_id=client_id, cursors=dict(cursors or {}), chunk_size=chunk_size
    )
    return encode_request(request, encoding)


def raw_sync(
    url: str,
    unit: str,
    *,
    token: str,
    cursors: Mapping[str, str] | None = None,
    chunk_size: int | None = None,
    encoding: Encoding = "msgpack",
) -> list[Frame]:
    """One sync request without ``SyncClient``; every frame of the response."""
    body = sync_body(cursors=cursors, chunk_size=chunk_size, encoding=encoding)
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": content_type(encoding),
        "Accept": content_type(encoding),
        "Accept-Encoding": "identity",
    }
    decoder = FrameDecoder(encoding)
    frames: list[Frame] = []
    with (
        httpx.Client(base_url=url, timeout=60.0) as http,
        http.stream("POST", f"/v1/sync/{unit}", content=body, headers=headers) as r,
    ):
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"] == content_type(encoding)
        for data in r.iter_bytes():
            frames.extend(decoder.feed(data))
    assert decoder.pending == 0
    assert isinstance(frames[-1], End), frames[-1]
    return frames


def final_cursors(frames: Sequence[Frame]) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in chunks(frames):
        out[c.stream] = c.cursor
    return out


def stream_starts(frames: Sequence[Frame]) -> list[StreamStart]:
    return [f for f in frames if isinstance(f, StreamStart)]


# -- what the client should hold -------------------------------------------------------------


def principal_params(store: ServerStore, token: str) -> dict[str, Any]:
    """The hospital example's principal parameters for a staff token."""
    with store.engine.connect() as conn:
        hid = conn.execute(
            sa.select(staff.c.hospital_id).where(staff.c.token == token)
        ).scalar_one()
    return {"hospital_id": hid}


def _stream(server: SyncServer, stream: Stream | str) -> Stream:
    return server.schema.streams[stream] if isinstance(stream, str) else stream


def expected_rows(
    server: SyncServer, stream: Stream | str, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """What ``stream`` selects on the server right now for ``params``, as stored locally."""
    s = _stream(server, stream)
    if s.mode == "full":
        assert s.query is not None
        query = s.query
    else:
        query = StreamReader(server.store, s, params, chunk_size=1).rows_select()
    with server.store.engine.connect() as conn:
        rows = conn.execute(query, {k: params[k] for k in s.parameters}).all()
    k = list(s.columns).index(s.key)
    return sorted((tuple(to_wire(v) for v in r) for r in rows), key=lambda r: r[k])


def local_rows(
    client: SyncClient, server: SyncServer, stream: Stream | str
) -> list[tuple[Any, ...]]:
    """The client's local table of ``stream``, in the stream's column order, sorted by key."""
    s = _stream(server, stream)
    k = list(s.columns).index(s.key)
    return sorted(client.store.rows(s.local_table, list(s.columns)), key=lambda r: r[k])


def local_keys(client: SyncClient, table: str, key: str = "id") -> set[Any]:
    return {r[0] for r in client.store.rows(table, [key])}


def assert_in_sync(server: SyncServer, client: SyncClient, token: str, unit: str) -> None:
    """DESIGN invariant 1: each local table equals its stream's query for this principal."""
    params = principal_params(server.store, token)
    for s in server.schema.units[unit].streams:
        want = expected_rows(server, s, params)
        got = local_rows(client, server, s)
        assert len(got) == len(want), f"{s.local_table}: {len(got)} rows, server has {len(want)}"
        assert got == want, f"{s.local_table} differs from the server's query"


def db_state(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (to check that a request changed nothing)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn, warnings.catch_warnings():
        # Indexes on tombstones' old values are expressions, which reflection skips.
        warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based")
        meta = sa.MetaData()
        meta.reflect(conn)  # all tables at once: a few catalog queries, not a few per table
        for name in sorted(meta.tables):
            table = meta.tables[name]
            out[name] = sorted((tuple(r) for r in conn.execute(sa.select(table))), key=repr)
    return out


# -- reading the hospital example on the server ------------------------------------------------


def patients_of(store: ServerStore, hospital_id: int) -> list[int]:
    """Patients with appointments at ``hospital_id``, most appointments first."""
    from hospital.models import appointment, doctor

    q = (
        sa.select(appointment.c.patient_id)
        .join(doctor, doctor.c.id == appointment.c.doctor_id)
        .where(doctor.c.hospital_id == hospital_id)
        .group_by(appointment.c.patient_id)
        .order_by(sa.func.count().desc(), appointment.c.patient_id)
    )
    with store.engine.connect() as conn:
        return list(conn.execute(q).scalars())


def appointments_of(
    store: ServerStore, hospital_id: int, doctor_id: int | None = None
) -> list[str]:
    """Keys of the appointments whose doctor works at ``hospital_id``, in key order."""
    from hospital.models import appointment, doctor

    q = (
        sa.select(appointment.c.id)
        .join(doctor, doctor.c.id == appointment.c.doctor_id)
        .where(doctor.c.hospital_id == hospital_id)
        .order_by(appointment.c.id)
    )
    if doctor_id is not None:
        q = q.where(appointment.c.doctor_id == doctor_id)
    with store.engine.connect() as conn:
        return list(conn.execute(q).scalars())


def doctors_of(store: ServerStore, hospital_id: int) -> list[int]:
    from hospital.models import doctor

    q = sa.select(doctor.c.id).where(doctor.c.hospital_id == hospital_id).order_by(doctor.c.id)
    with store.engine.connect() as conn:
        return list(conn.execute(q).scalars())


def trigger_names(engine: sa.Engine) -> list[str]:
    """Every trigger in the server database, sorted (duplicates kept)."""
    sql = {
        "sqlite": "SELECT name FROM sqlite_master WHERE type = 'trigger'",
        "postgresql": "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal",
    }[engine.dialect.name]
    with engine.connect() as conn:
        return sorted(conn.exec_driver_sql(sql).scalars())


def owner_push_server(
    database: str | Path,
    table: sa.Table,
    local_table: str,
    user: Principal,
    rules: Sequence[Any] = (),
) -> SyncServer:
    """A push-only unit ``Push`` over ``table`` (its own columns), each row scoped by its
    ``owner`` column to the ``owner`` parameter of ``user`` (token ``t1``), on a new
    database (a URL, or the path of a SQLite file) with the table created and tracked."""
    url = f"sqlite:///{database}" if isinstance(database, Path) else database
    stream = Stream(
        f"{table.name}s",
        table,
        {str(c.name): c for c in table.columns if c.name not in TRACKING_COLUMNS},
        where=table.c.owner == sa.bindparam("owner"),
        local_table=local_table,
        rules=list(rules),
    )
    schema = SyncSchema([SyncUnit("Push", [stream], direction="push")])
    server = SyncServer(schema, url, authenticate=TokenAuth({"t1": user}), install=False)
    table.metadata.create_all(server.store.engine)
    server.store.install(schema)
    return server


def owned_table_server(
    database: str,
    table: sa.Table,
    local_table: str,
    unit: str,
    *,
    policy: Any = None,
    tokens: Mapping[str, Principal] | None = None,
    push_unit: str | None = None,
) -> SyncServer:
    """A server of one ``table`` (its rows filtered by an ``owner`` column), every column
    synced to ``local_table`` by a stream named after the table (``doc``: ``docs``) that
    ``unit`` pulls and pushes (and ``push_unit``, if given, only pushes); token ``t`` is
    owner ``ana``'s unless ``tokens`` says."""
    stream = Stream(
        f"{table.name}s",
        table,
        {str(c.name): c for c in table.columns},
        where=table.c.owner == sa.bindparam("owner"),
        local_table=local_table,
        policy=policy,
    )
    units = [SyncUnit(unit, [stream], direction="both")]
    if push_unit is not None:
        units.append(SyncUnit(push_unit, [stream], direction="push"))
    schema = SyncSchema(units)
    principals = tokens or {"t": Principal("ana", {"owner": "ana"})}
    server = SyncServer(schema, database, authenticate=TokenAuth(principals), install=False)
    assert table.metadata is not None
    table.metadata.create_all(server.store.engine)
    server.store.install(schema)
    return server
