"""Fixtures: a server database per backend, a live sync server, clients, plain SQL.

Every test that touches the server database goes through ``server_db_url`` /
``store`` (or ``new_database``), parametrized over ``BACKENDS``: SQLite files
in the test's directory, and databases of a throwaway PostgreSQL cluster the
session starts itself (``tests/pgserver.py``), one new database per test.
``--backends sqlite`` (or ``SYNCUNIT_TEST_BACKENDS``) narrows the run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from hospital.generate import generate
from hospital.models import metadata
from hospital.server import staff_auth
from hospital.units import schema as hospital_schema

import syncunit.server.push as push_module
from syncunit.client import SyncClient
from syncunit.server import SyncServer, open_store
from syncunit.server.batch import write_batch
from syncunit.server.store import ServerStore
from syncunit.units import SyncSchema
from tests.pgserver import PostgresServer, PostgresUnavailable, free_port
from tests.support import LiveServer, TapTransport, assert_in_sync

BACKENDS = ["sqlite", "postgres"]

#: Small but real: 2 hospitals, 5 doctors each, 400 appointments (200 per hospital).
SIZE = {"appointments": 400, "hospitals": 2, "doctors": 10, "patients": 60}
#: Chunk size the test clients ask for, so a download takes many chunks.
CHUNK = 16


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backends",
        default=os.environ.get("SYNCUNIT_TEST_BACKENDS", ",".join(BACKENDS)),
        help="server databases to test against, comma separated (default: %(default)s)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run only on these server databases (e.g. 'postgres')"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--backends").split(",")
        marker = metafunc.definition.get_closest_marker("backends")
        only = set(marker.args) if marker else set(BACKENDS)
        names = [b for b in BACKENDS if b in chosen and b in only]
        metafunc.parametrize("backend", names, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def throwaway_cluster() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of its own for a fixture: started, yielded, removed."""
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster for the whole session, started on first use."""
    yield from throwaway_cluster()


#: Every engine that connected during the session (weakly held), to be disposed.
_ENGINES: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


@sa.event.listens_for(sa.Engine, "engine_connect")
def _track_engine(conn: sa.Connection) -> None:
    _ENGINES.add(conn.engine)


def dispose_engines() -> None:
    """Close the pooled connections of every engine (a psycopg connection garbage
    collected open warns, and warnings are errors)."""
    for engine in list(_ENGINES):
        engine.dispose()


#: httpx's own default (5 s) is shorter than a first request can take on a loaded
#: CI machine (the server's first connection to PostgreSQL, a cold page cache).
#: Tests that are about timeouts pass their own.
PATIENT_TIMEOUT = 60.0


@pytest.fixture(autouse=True, scope="session")
def _patient_http() -> Iterator[None]:
    """``httpx.get``/``post``/... in tests wait ``PATIENT_TIMEOUT`` unless told otherwise."""

    def patient(call: Callable[..., Any]) -> Callable[..., Any]:
        def with_timeout(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", PATIENT_TIMEOUT)
            return call(*args, **kwargs)

        return with_timeout

    with pytest.MonkeyPatch.context() as mp:
        for name in ("request", "stream", "get", "post", "put", "patch", "delete", "head"):
            mp.setattr(httpx, name, patient(getattr(httpx, name)))
        yield


@pytest.fixture(autouse=True)
def _dispose_engines_after_the_test() -> Iterator[None]:
    yield
    dispose_engines()


@pytest.fixture(scope="session")
def _dropping() -> list[tuple[list[threading.Thread] | None, str]]:
    """PostgreSQL databases of finished tests, each with the server-stopping threads
    (``_stopping``) it waits for before it is dropped (None: not yet noted)."""
    return []


@pytest.fixture
def new_database(
    request: pytest.FixtureRequest,
    backend: str,
    tmp_path: Path,
    _stopping: list[threading.Thread],
    _dropping: list[tuple[list[threading.Thread] | None, str]],
) -> Iterator[Callable[[str], str]]:
    """``new_database(name)``: the URL of a new, empty server database on the backend.

    A PostgreSQL database is dropped soon after its test, once the servers that
    test started have stopped (they stop on threads of their own, ``_stopping``:
    dropped under a server still ending a response, the database would fail it):
    the session's cluster keeps only a few tests' databases.
    """
    made: list[str] = []

    def make(name: str = "server") -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path / (name + '.sqlite')}"
        pg: PostgresServer = request.getfixturevalue("pg")
        made.append(pg.create_database(name))
        return pg.url(made[-1])

    yield make
    if not made:
        return
    dispose_engines()
    pg = request.getfixturevalue("pg")
    # Every server of an earlier test has been told to stop by now: note the threads.
    alive = [r for r in _stopping if r.is_alive()]
    waiting = [(alive if reapers is None else reapers, name) for reapers, name in _dropping]
    _dropping[:] = [(None, name) for name in made]
    for reapers, name in waiting:
        if any(r.is_alive() for r in reapers):
            _dropping.append((reapers, name))
        else:
            pg.drop_database(name)


@pytest.fixture
def server_db_url(new_database: Callable[[str], str]) -> str:
    return new_database("server")


@pytest.fixture
def store(server_db_url: str) -> Iterator[ServerStore]:
    """The server database with the hospital tables created (and no rows yet)."""
    s = open_store(server_db_url)
    metadata.create_all(s.engine)
    yield s
    s.engine.dispose()


# -- plain SQL, without syncunit ------------------------------------------------------------


Run = Callable[..., list[tuple[Any, ...]]]


class PlainSQL:
    """Runs SQL on the server database with the bare DB-API driver, as a backoffice would.

    Parameters are ``?`` (positional) or ``:name`` (named), as sqlite3 takes them;
    on PostgreSQL they are translated for psycopg.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.backend = "sqlite" if url.startswith("sqlite") else "postgres"

    @contextmanager
    def transaction(self) -> Iterator[Run]:
        if self.backend == "sqlite":
            with self._sqlite() as run:
                yield run
        else:
            with self._postgres() as run:
                yield run

    @contextmanager
    def _sqlite(self) -> Iterator[Run]:
        conn = sqlite3.connect(self.url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("BEGIN IMMEDIATE")

            def run(sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
                return list(conn.execute(sql, params))

            try:
                yield run
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @contextmanager
    def _postgres(self) -> Iterator[Run]:
        with psycopg.connect(pg_dsn(self.url)) as conn:

            def run(sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
                cur = conn.execute(to_psycopg(sql), params or None)  # type: ignore[call-overload]
                return list(cur.fetchall()) if cur.description else []

            with conn.transaction():
                yield run

    def __call__(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        with self.transaction() as run:
            return run(sql, params)

    def many(self, sql: str, seq: Sequence[Any]) -> None:
        with self.transaction() as run:
            for params in seq:
                run(sql, params)

    def script(self, statements: Sequence[str]) -> None:
        with self.transaction() as run:
            for stmt in statements:
                run(stmt)


def to_psycopg(sql: str) -> str:
    """sqlite3's ``?`` and ``:name`` parameters as psycopg's ``%s`` and ``%(name)s``."""
    sql = sql.replace("%", "%%").replace("?", "%s")
    return re.sub(r"(?<![:\w]):([A-Za-z_]\w*)", r"%(\1)s", sql)


def pg_dsn(url: str) -> str:
    """A libpq connection string for a SQLAlchemy PostgreSQL URL."""
    u = sa.make_url(url)
    return f"host={u.host} port={u.port} user={u.username} dbname={u.database}"


@pytest.fixture
def plain_sql(server_db_url: str) -> PlainSQL:
    return PlainSQL(server_db_url)


class DbBackup:
    """Copies the server database aside and puts a copy back (a restore from backup)."""

    def __init__(self, url: str, tmp: Path, pg: PostgresServer | None = None) -> None:
        self.url = url
        self.tmp = tmp
        self.pg = pg
        self.n = 0

    def save(self) -> str:
        self.n += 1
        if self.pg is not None:  # pg_dump, as an operator would
            dest = str(self.tmp / f"backup{self.n}.dump")
            _pg_tool(self.pg, "pg_dump", "-Fc", "-f", dest, pg_dsn(self.url))
            return dest
        path = self.url.removeprefix("sqlite:///")
        dest = str(self.tmp / f"backup{self.n}.sqlite")
        src, dst = sqlite3.connect(path), sqlite3.connect(dest)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        return dest

    def restore(self, saved: str, store: ServerStore) -> None:
        store.engine.dispose()
        if self.pg is not None:  # a new database of the same name, then pg_restore
            name = str(sa.make_url(self.url).database)
            self.pg.drop_database(name)
            self.pg.admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
            _pg_tool(self.pg, "pg_restore", "-d", pg_dsn(self.url), saved)
            return
        copy = str(self.tmp / "restoring.sqlite")
        shutil.copyfile(saved, copy)
        src, dst = sqlite3.connect(copy), sqlite3.connect(self.url.removeprefix("sqlite:///"))
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()


def _pg_tool(pg: PostgresServer, tool: str, *args: str) -> None:
    subprocess.run([str(pg.bindir / tool), *args], check=True, capture_output=True, timeout=120)


@pytest.fixture
def db_backup(
    request: pytest.FixtureRequest, backend: str, server_db_url: str, tmp_path: Path
) -> DbBackup:
    pg = request.getfixturevalue("pg") if backend == "postgres" else None
    return DbBackup(server_db_url, tmp_path, pg)


# -- the sync server --------------------------------------------------------------------------


@pytest.fixture
def make_server(store: ServerStore) -> Callable[..., SyncServer]:
    """A ``SyncServer`` on the test database (installs tracking unless install=False)."""

    def make(schema: SyncSchema = hospital_schema, **options: Any) -> SyncServer:
        return SyncServer(schema, store, authenticate=staff_auth(store.engine), **options)

    return make


@pytest.fixture
def server(
    request: pytest.FixtureRequest, make_server: Callable[..., SyncServer], store: ServerStore
) -> SyncServer:
    """The hospital server with ``SIZE`` rows.

    By default tracking is installed first and every generated row gets its own
    version; parametrize indirectly with ``"data-first"`` to generate the rows
    before tracking exists, so installing stamps each table's rows with one version.
    """
    order = getattr(request, "param", "tracking-first")
    if order == "data-first":
        generate(store.engine, **SIZE)
        return make_server()
    srv = make_server()
    generate(store.engine, **SIZE)
    return srv


@pytest.fixture(scope="session")
def _stopping() -> Iterator[list[threading.Thread]]:
    """Servers told to stop, each joined on a thread of its own; the session waits for
    those threads at its end.

    Joining uvicorn costs a tick of its main loop (0.1 s), most of a small test's
    time, so tests do not wait for it: the port closes within a tick, and a thread
    a test left behind meets a refused connection, never another test's server.
    A joined server is let go, with its app and its database engine: kept to the
    end of the session, hundreds of them (three million objects) made each full
    garbage collection stop every thread for more than a second.
    """
    reapers: list[threading.Thread] = []
    yield reapers
    for reaper in reapers:
        reaper.join(timeout=35)
    assert not any(r.is_alive() for r in reapers), "a uvicorn server did not stop"
    dispose_engines()


@pytest.fixture
def serve(_stopping: list[threading.Thread]) -> Iterator[Callable[[Any], LiveServer]]:
    """Serve an ASGI app over real HTTP on 127.0.0.1; ``live.app`` may be swapped later."""
    started: list[LiveServer] = []

    def start(app: Any) -> LiveServer:
        live = LiveServer(app)
        started.append(live)
        return live

    yield start
    _stopping[:] = [r for r in _stopping if r.is_alive()]
    for live in started:
        live.server.should_exit = True
        reaper = threading.Thread(target=live.stop, name="stop-uvicorn", daemon=True)
        reaper.start()
        _stopping.append(reaper)


@pytest.fixture
def live(server: SyncServer, serve: Callable[[Any], LiveServer]) -> LiveServer:
    return serve(server.app)


#: The example apps (``hospital``, ``notes``), importable by a ``syncunit serve`` process.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: This checkout's package, imported by those processes before any installed one.
SOURCE = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., tuple[str, subprocess.Popen[bytes]]]]:
    """``serve_process(database_url, workers=1, *options)``: ``syncunit serve`` in its own
    process; its URL and process."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        database: str, workers: int = 1, *options: str
    ) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        log = (tmp_path / f"serve-{port}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "syncunit", "serve", "hospital.server:build",
             "--database", database, "--app-dir", str(EXAMPLES),
             "--port", str(port), "--workers", str(workers), "--log-level", "warning", *options],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE), str(EXAMPLES)])},
        )  # fmt: skip
        log.close()  # the child holds its own copy
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/v1/catalog", timeout=2).status_code == 401:
                    return url, proc
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (tmp_path / f"serve-{port}.log").read_text()
                raise AssertionError(f"syncunit serve did not start:\n{text}")
            time.sleep(0.1)

    yield start
    for proc in procs:  # each in its own process group: the server and its workers
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture
def make_client(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> Iterator[Callable[..., SyncClient]]:
    """``make_client(token, name=..., **SyncClient options)``; the same name reopens a device.

    Clients talk to the ``live`` hospital server (started on first use) unless
    given another ``url``. (``backend`` is requested so that ``live``, which
    depends on it, can be requested lazily.)
    """
    clients: list[SyncClient] = []

    def make(
        token: str | None = "token-h1",
        *,
        name: str = "device",
        url: str | None = None,
        chunk_size: int | None = CHUNK,
        **options: Any,
    ) -> SyncClient:
        c = SyncClient(
            url or request.getfixturevalue("live").url,
            tmp_path / f"{name}.sqlite",
            token=token,
            chunk_size=chunk_size,
            **options,
        )
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def client(make_client: Callable[..., SyncClient]) -> SyncClient:
    return make_client()


@pytest.fixture
def tap() -> TapTransport:
    return TapTransport()


@pytest.fixture
def tapped(make_client: Callable[..., SyncClient], tap: TapTransport) -> SyncClient:
    """A client whose sync responses ``tap`` records (and can cut)."""
    return make_client(transport=tap)


@pytest.fixture
def in_sync(server: SyncServer) -> Callable[[SyncClient, str], None]:
    """``in_sync(client, unit, token="token-h1")``: assert DESIGN invariant 1."""

    def check(client: SyncClient, unit: str = "Login", token: str = "token-h1") -> None:
        assert_in_sync(server, client, token, unit)

    return check


# -- the write path: a small test-only schema (for tests/test_push*, test_conflicts*, ...) ----


@pytest.fixture
def notes_app(
    tmp_path: Path, serve: Callable[[Any], LiveServer], new_database: Callable[[str], str]
) -> Iterator[Callable[..., Any]]:
    """``notes_app(policy=..., rules=...)``: a live server of the small notes schema of
    ``tests/test_push_support.py`` on a new database; its clients are closed at teardown."""
    from tests.test_push_support import NotesApp

    apps: list[NotesApp] = []

    def make(**options: Any) -> NotesApp:
        url = new_database(f"notes{len(apps)}")
        app = NotesApp(tmp_path, serve, database=url, **options)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


# -- sync moments: a fake clock and a faulty network (test_scheduler, test_moments, test_live) --

import json  # noqa: E402


class FakeClock:
    """An injected clock (``SyncClient(clock=...)``): time moves only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


class _CountedStream(httpx.SyncByteStream):
    """A response body that counts as in flight until it is closed."""

    def __init__(self, inner: Any, done: Callable[[], None]) -> None:
        self.inner = inner
        self.done = done
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.inner

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            if not self.closed:
                self.closed = True
                self.done()


class FaultyNetwork(httpx.BaseTransport):
    """Real HTTP with faults a test controls, for ``SyncClient(transport=...)``.

    Only sync requests (``POST /v1/sync/{unit}``) are held, faulted and counted; the
    catalog and live requests pass (except ``offline``, which cuts everything).

    * ``hold()`` / ``release()``: sync requests block (on a ``threading.Event``) until released.
    * ``fail(kind, unit=None)``: ``"offline"`` raises ``httpx.ConnectError``; an int answers
      that status with a problem document; ``"lost"`` lets the server handle the request and
      then loses the response (``httpx.ReadError``). ``heal()`` removes every fault.
    * ``units``: the unit of every sync request, in order; ``max_in_flight``: the most sync
      requests that were in flight (sent, body not yet closed) at the same time.
    """

    PROBLEMS = {401: "unauthenticated", 403: "forbidden", 422: "invalid-request", 503: "busy"}

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.cond = threading.Condition()
        self.gate = threading.Event()
        self.gate.set()
        self.faults: dict[str | None, Any] = {}
        self.retry_after: int | None = None  # the Retry-After of injected problems
        self.units: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def fail(
        self, kind: str | int, unit: str | None = None, retry_after: int | None = None
    ) -> None:
        """Fail requests of ``unit`` (all: None) with ``kind`` ("offline", "lost", or an
        HTTP status answered as a problem, with ``Retry-After`` if given)."""
        self.faults[unit] = kind
        self.retry_after = retry_after

    def heal(self) -> None:
        self.faults.clear()

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """Wait until ``n`` sync requests have been sent (held ones count)."""
        with self.cond:
            return self.cond.wait_for(lambda: len(self.units) >= n, timeout)

    def _done(self) -> None:
        with self.cond:
            self.in_flight -= 1
            self.cond.notify_all()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if not path.startswith("/v1/sync/"):
            if self.faults.get(None) == "offline":
                raise httpx.ConnectError("offline (FaultyNetwork)", request=request)
            return self.inner.handle_request(request)
        unit = path.removeprefix("/v1/sync/")
        with self.cond:
            self.units.append(unit)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.cond.notify_all()
        try:
            assert self.gate.wait(60), "FaultyNetwork: a held request was never released"
            fault = self.faults.get(unit, self.faults.get(None))
            if fault == "offline":
                raise httpx.ConnectError("offline (FaultyNetwork)", request=request)
            if isinstance(fault, int):
                code = self.PROBLEMS[fault]
                body = json.dumps(
                    {"type": f"urn:syncunit:problem:{code}", "title": code, "status": fault,
                     "code": code, "detail": "injected by FaultyNetwork"}
                )  # fmt: skip
                self._done()
                headers = {"Content-Type": "application/problem+json"}
                if self.retry_after is not None:
                    headers["Retry-After"] = str(self.retry_after)
                return httpx.Response(fault, headers=headers, content=body)
            response = self.inner.handle_request(request)
            if fault == "lost":
                response.read()  # the server has done its work...
                response.close()
                raise httpx.ReadError("response lost (FaultyNetwork)", request=request)
        except BaseException:
            self._done()
            raise
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_CountedStream(response.stream, self._done),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.gate.set()
        self.inner.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def net(make_client: Callable[..., SyncClient]) -> Iterator[FaultyNetwork]:
    """Set up after ``make_client``, so it is released before the clients close."""
    n = FaultyNetwork()
    yield n
    n.release()  # never leave a worker blocked at teardown


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """A spy on the batched push: each ``write_batch`` answer (True: written)."""
    answers: list[bool] = []

    def spy(*args: Any) -> bool:
        ok = write_batch(*args)
        answers.append(ok)
        return ok

    monkeypatch.setattr(push_module, "write_batch", spy)
    return answers
