"""Helpers for the write-path tests (push, outbox, conflicts, crashes); no tests here.

* ``FaultTransport``: real HTTP that can lose the response of a sync request
  after the server handled it, or send a request twice; it records every sync
  request that went out, decoded;
* ``NotesApp``: a small test-only schema (one ``note`` table, scoped by owner)
  served by a real ``SyncServer`` on its own database, with the conflict
  policy and rules a test asks for; an ``audit`` table counts how many times
  the server really applied a change (a rule writes one row per application;
  with ``batches=True`` it has a set-based form too, so runs of new rows are
  written as batches when every other rule has one);
* raw requests: ``post_sync`` sends a ``SyncRequest`` with bare httpx.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from syncunit.client import SyncClient
from syncunit.policies import BatchContext, ConflictPolicy, MutationContext, Rule, set_check
from syncunit.protocol import (
    PROTOCOL_VERSION,
    Encoding,
    Frame,
    FrameDecoder,
    Mutation,
    PushResults,
    SyncRequest,
    content_type,
    decode_request,
    encode_request,
    encoding_of,
)
from syncunit.server import Principal, SyncServer, TokenAuth
from syncunit.units import Stream, SyncSchema, SyncUnit
from tests.support import LiveServer

# -- a transport that loses and duplicates ------------------------------------------------


def decode_sync_request(request: httpx.Request) -> SyncRequest:
    body = request.content
    if request.headers.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    encoding = encoding_of(request.headers.get("content-type"))
    assert encoding is not None
    return decode_request(body, encoding)


class ResponseLost(httpx.ReadError):
    """The server handled the request; its response never reached the client."""


class FaultTransport(httpx.BaseTransport):
    """Real HTTP (``httpx.HTTPTransport``) with faults injected on sync requests.

    ``lose_next()``: the next sync request reaches the server, which handles it
    completely (the whole response is read), then the client gets a read error.
    ``duplicate_next()``: the next sync request is sent twice; the client gets the
    second answer. ``hang_up_next(handled=...)``: the connection closes without a
    response, before the request reaches the server or after it handled it. ``sent``
    holds every sync request that reached the server.
    """

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.sent: list[SyncRequest] = []
        self._faults: list[str] = []

    def lose_next(self) -> None:
        self._faults.append("lose")

    def duplicate_next(self) -> None:
        self._faults.append("duplicate")

    def hang_up_next(self, *, handled: bool) -> None:
        """The server closes the connection without a response, as a kept-alive
        connection it times out does; ``handled``: after handling the request."""
        self._faults.append("hang up after" if handled else "hang up before")

    def _forward(self, request: httpx.Request) -> httpx.Response:
        copy = httpx.Request(
            request.method, request.url, headers=request.headers, content=request.content
        )
        self.sent.append(decode_sync_request(copy))
        return self.inner.handle_request(copy)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.startswith("/v1/sync/"):
            return self.inner.handle_request(request)
        request.read()
        fault = self._faults.pop(0) if self._faults else None
        if fault is None:
            return self._forward(request)
        if fault == "hang up before":
            raise httpx.RemoteProtocolError("Server disconnected (test)", request=request)
        first = self._forward(request)
        try:
            first.read()
        finally:
            first.close()
        if fault == "duplicate":
            return self._forward(request)
        if fault == "hang up after":
            raise httpx.RemoteProtocolError("Server disconnected (test)", request=request)
        raise ResponseLost("the response was lost on the way back (test)", request=request)

    @property
    def mutations_per_request(self) -> list[int]:
        return [len(r.mutations) for r in self.sent]

    def close(self) -> None:
        self.inner.close()


# -- raw requests ------------------------------------------------------------------------


def post_sync(
    url: str,
    unit: str,
    *,
    token: str,
    client_id: str,
    mutations: Sequence[Mutation] = (),
    cursors: dict[str, str] | None = None,
    schema_hash: str | None = None,
    unanswered_from: int = 0,
    encoding: Encoding = "msgpack",
) -> httpx.Response:
    """One ``POST /v1/sync/{unit}`` with bare httpx (the response fully read), in
    ``encoding`` both ways.

    Without ``schema_hash`` it sends the server's (read from ``GET /v1/catalog``),
    as a client that holds the catalog does.
    """
    auth = {"Authorization": f"Bearer {token}"}
    if schema_hash is None:
        schema_hash = httpx.get(f"{url}/v1/catalog", headers=auth, timeout=30).json()["schema_hash"]
    body = encode_request(
        SyncRequest(
            protocol=PROTOCOL_VERSION,
            client_id=client_id,
            schema_hash=schema_hash,
            cursors=cursors or {},
            mutations=list(mutations),
            unanswered_from=unanswered_from,
        ),
        encoding,
    )
    headers = {
        **auth,
        "Content-Type": content_type(encoding),
        "Accept": content_type(encoding),
        "Accept-Encoding": "identity",
    }
    return httpx.post(f"{url}/v1/sync/{unit}", content=body, headers=headers, timeout=30)


def frames_of(response: httpx.Response, encoding: Encoding = "msgpack") -> list[Frame]:
    assert response.status_code == 200, response.text
    decoder = FrameDecoder(encoding)
    frames = list(decoder.feed(response.content))
    assert decoder.pending == 0
    return frames


def push_results(response: httpx.Response, encoding: Encoding = "msgpack") -> PushResults:
    first = frames_of(response, encoding)[0]
    assert isinstance(first, PushResults), first
    return first


# -- a small schema of our own -------------------------------------------------------------

TOKENS = {
    "t1": Principal("user-1", {"owner": "u1"}),
    "t2": Principal("user-2", {"owner": "u2"}),
    "t1-renewed": Principal("user-1", {"owner": "u1"}),  # another credential of user-1
}
NOTE_COLUMNS = ("id", "owner", "title", "body", "tag", "n", "data")


class NotesApp:
    """A ``note`` table synced by one stream (rows of the principal's owner), served live.

    Units: ``Sync`` (both), ``Pull`` (pull), ``Push`` (push). Every insert or
    update the server applies adds a row to ``audit`` (from a rule, inside the
    mutation's savepoint), so ``applications(key)`` counts real applications.
    """

    def __init__(
        self,
        tmp_path: Path,
        serve: Callable[[Any], LiveServer],
        *,
        policy: ConflictPolicy | None = None,
        rules: Sequence[Rule] = (),
        name: str = "notes",
        database: str | None = None,
        batches: bool = False,
        **server_options: Any,
    ) -> None:
        self.tmp_path = tmp_path
        self.meta = sa.MetaData()
        self.note = sa.Table(
            "note",
            self.meta,
            sa.Column("id", sa.String(36), primary_key=True),
            sa.Column("owner", sa.String(20), nullable=False),
            sa.Column("title", sa.String(80), nullable=False, default=""),
            sa.Column("body", sa.Text, nullable=False, default=""),
            sa.Column("tag", sa.String(20), nullable=True),
            sa.Column("n", sa.Integer, nullable=False, default=0),
            sa.Column("data", sa.LargeBinary, nullable=True),
        )
        self.audit = sa.Table(
            "audit",
            self.meta,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("note_id", sa.String(36), nullable=False),
            sa.Column("op", sa.String(10), nullable=False),
        )
        audit = self.audit

        def count_applications(ctx: MutationContext) -> str | None:
            ctx.conn.execute(audit.insert().values(note_id=ctx.key, op=ctx.op))
            return None

        #: Batches of new rows the server wrote with the counting rule's set form.
        self.batches = 0

        def count_batch(batch: BatchContext) -> bool:
            self.batches += 1
            rows = [{"note_id": key, "op": "insert"} for key in batch.keys]
            batch.conn.execute(audit.insert(), rows)
            return True

        if batches:  # runs of new rows go as batches (the rules' set forms decide)
            count_applications = set_check(count_batch)(count_applications)

        self.stream = Stream(
            "notes",
            self.note,
            {c: self.note.c[c] for c in NOTE_COLUMNS},
            where=self.note.c.owner == sa.bindparam("owner"),
            local_table="LocalNote",
            policy=policy,
            rules=[*rules, count_applications],
        )
        self.schema = SyncSchema(
            [
                SyncUnit("Sync", [self.stream], direction="both"),
                SyncUnit("Pull", [self.stream]),
                SyncUnit("Push", [self.stream], direction="push"),
            ]
        )
        self.database = database or f"sqlite:///{tmp_path / (name + '-server.sqlite')}"
        self.server = SyncServer(
            self.schema,
            self.database,
            authenticate=TokenAuth(TOKENS),
            install=False,
            **server_options,
        )
        self.meta.create_all(self.server.store.engine)
        self.server.store.install(self.schema)
        self.live = serve(self.server.app)
        self.url = self.live.url
        self._clients: list[SyncClient] = []

    # -- clients -----------------------------------------------------------------------

    def client(self, token: str = "t1", *, name: str = "device", **options: Any) -> SyncClient:
        """A client on ``{name}.sqlite``; the same name reopens the same device."""
        c = SyncClient(self.url, self.tmp_path / f"{name}.sqlite", token=token, **options)
        self._clients.append(c)
        return c

    def close(self) -> None:
        for c in self._clients:
            c.close()
        self.server.store.engine.dispose()

    # -- the server's side -------------------------------------------------------------

    def add(self, key: str, owner: str = "u1", **values: Any) -> None:
        """A row written on the server with plain SQL (tracked all the same)."""
        row = {"id": key, "owner": owner, "title": "", "body": "", "tag": None, "n": 0}
        row.update(values)
        with self.server.store.engine.begin() as conn:
            conn.execute(self.note.insert().values(row))

    def backoffice(self, sql: str, params: Any = ()) -> None:
        """Plain SQL on the server database, without syncunit (as another app would)."""
        from tests.conftest import PlainSQL

        PlainSQL(self.database)(sql, params)

    def row(self, key: str) -> dict[str, Any] | None:
        with self.server.store.engine.connect() as conn:
            r = conn.execute(sa.select(self.note).where(self.note.c.id == key)).mappings().first()
        return None if r is None else {c: r[c] for c in NOTE_COLUMNS}

    def rows(self, owner: str = "u1") -> list[tuple[Any, ...]]:
        """The stream's rows for ``owner``, as a client holds them, by key."""
        cols = [self.note.c[c] for c in NOTE_COLUMNS]
        with self.server.store.engine.connect() as conn:
            q = sa.select(*cols).where(self.note.c.owner == owner).order_by(self.note.c.id)
            return [tuple(r) for r in conn.execute(q)]

    def version(self, key: str) -> int:
        with self.server.store.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(self.note.c.syncunit_version).where(self.note.c.id == key)
                ).scalar_one()
            )

    def applications(self, key: str | None = None) -> int:
        """How many times the server applied an insert or update (of ``key``)."""
        q = sa.select(sa.func.count()).select_from(self.audit)
        if key is not None:
            q = q.where(self.audit.c.note_id == key)
        with self.server.store.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def last_seq(self, client_id: str) -> int | None:
        with self.server.store.engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT last_seq FROM syncunit_clients WHERE client_id = :c"),
                {"c": client_id},
            ).scalar()

    def logged(self, client_id: str) -> list[tuple[int, str]]:
        """(seq, mutation id) of the result log of ``client_id``."""
        with self.server.store.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT seq, mutation_id FROM syncunit_mutations WHERE client_id = :c"
                    " ORDER BY seq"
                ),
                {"c": client_id},
            )
            return [(int(r[0]), str(r[1])) for r in rows]


def local_notes(client: SyncClient) -> list[tuple[Any, ...]]:
    return sorted(client.store.rows("LocalNote", list(NOTE_COLUMNS)))


def local_note(client: SyncClient, key: str) -> dict[str, Any] | None:
    rows = client.store.query(
        f"SELECT {', '.join(NOTE_COLUMNS)} FROM LocalNote WHERE id = ?", (key,)
    )
    return dict(zip(NOTE_COLUMNS, rows[0], strict=True)) if rows else None


def outbox_rows(client: SyncClient) -> list[tuple[Any, ...]]:
    """(table, key, op, changed columns, seq) of every outbox entry, oldest first."""
    return [(p.table, p.key, p.op, sorted(p.changed), p.seq) for p in client.outbox.pending()]


def iter_keys(prefix: str, n: int) -> Iterator[str]:
    for i in range(n):
        yield f"{prefix}-{i:04d}"


def write_notes_offline(device: SyncClient, n: int, prefix: str = "n") -> None:
    """``n`` new notes of u1 written on the device in one transaction (keys n-0000...)."""
    with device.store.atomic() as conn:
        conn.executemany(
            "INSERT INTO \"LocalNote\" (id, owner, title, body, n) VALUES (?, 'u1', ?, '', 0)",
            [(k, k) for k in iter_keys(prefix, n)],
        )


def assert_each_applied_once(app: Any, device: SyncClient, n: int) -> None:
    """Every one of ``n`` pushed changes logged in order, applied once, and the device
    left with an empty outbox and the server's rows."""
    assert [seq for seq, _ in app.logged(device.client_id)] == list(range(1, n + 1))
    assert app.applications() == n
    assert device.outbox.count() == 0
    assert local_notes(device) == app.rows("u1")
