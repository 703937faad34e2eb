"""Read replicas and PgBouncer: a real streaming standby, a real pooler, on loopback.

The standby is made with ``pg_basebackup`` from a PostgreSQL of this module's own
and replays its WAL; pulls may be served there, pushes (and the pull of a request
that pushed) go to the primary, and a replica behind a device's cursor is
passed over. PgBouncer is Debian's, in transaction pooling.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hospital.server import staff_auth
from hospital.units import schema as hospital_schema

from syncunit.server import SyncServer
from syncunit.server.postgres import PostgresStore, postgres_engine
from syncunit.server.store import ServerStore
from tests.conftest import throwaway_cluster
from tests.filelock import held
from tests.pgserver import PostgresServer, free_port
from tests.support import assert_in_sync, local_keys
from tests.test_postgres import _row, _write, open_writer

pytestmark = pytest.mark.backends("postgres")


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """This module's own cluster: a standby copies the whole of its primary, and the
    session's holds every database the tests before made (a copy of gigabytes)."""
    yield from throwaway_cluster()


@pytest.fixture(scope="module")
def standby(pg: PostgresServer) -> Iterator[PostgresServer]:
    replica = pg.standby()
    yield replica
    replica.stop()


class Counting:
    """Counts the queries an engine runs (a transaction's ``SET LOCAL`` is no query)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.n = 0
        sa.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not statement.startswith("SET LOCAL "):
            self.n += 1


@pytest.fixture
def replicated(
    server: SyncServer, store: ServerStore, pg: PostgresServer, standby: PostgresServer
) -> tuple[SyncServer, Counting, Callable[[], None]]:
    """The hospital server on a store whose pulls the standby serves; ``caught_up()``
    waits for the standby to replay what the primary has."""
    name = str(store.engine.url.database)
    replica = postgres_engine(standby.url(name))
    both = PostgresStore(store.engine, replicas=[replica])
    srv = SyncServer(hospital_schema, both, authenticate=staff_auth(store.engine))

    def caught_up() -> None:
        standby.wait_for_replay(pg.lsn())

    caught_up()
    return srv, Counting(replica), caught_up


SLOT = {
    "doctor_id": 1, "patient_id": 5, "starts_at": "2031-07-07T10:00:00",
    "ends_at": "2031-07-07T10:30:00", "status": "booked", "room": "R1", "notes": "",
}  # fmt: skip


def test_pulls_come_from_the_standby_pushes_go_to_the_primary(
    replicated, serve, make_client, server_db_url
):
    srv, on_replica, caught_up = replicated
    client = make_client(url=serve(srv.app).url)
    client.sync("Login")
    assert on_replica.n > 0  # the first copy was read on the standby
    assert_in_sync(srv, client, "token-h1", "Login")

    _write(server_db_url, _row("backoffice-1"))
    caught_up()
    before = on_replica.n
    client.sync("Login")
    assert "backoffice-1" in local_keys(client, "LocalAppointment")
    assert on_replica.n > before

    key = client.insert("LocalAppointment", dict(SLOT))
    before = on_replica.n
    result = client.sync("Online")  # pushes: the whole request runs on the primary
    assert result.applied == 1
    assert on_replica.n == before
    assert key in local_keys(client, "LocalAppointment")


def test_a_standby_behind_the_devices_cursor_is_passed_over(
    replicated, serve, make_client, server_db_url, standby
):
    """Paused replay: the standby's watermark is older than the device's cursor, so the
    primary answers (no reset, nothing missed); resumed, the standby serves again."""
    srv, on_replica, caught_up = replicated
    client = make_client(url=serve(srv.app).url)
    client.sync("Online")
    with psycopg.connect(standby.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
        try:
            client.insert("LocalAppointment", dict(SLOT))
            assert client.sync("Online").applied == 1  # on the primary: a newer cursor
            _write(server_db_url, _row("while-paused"))
            before = on_replica.n
            result = client.sync("Login")
            assert result.resets == []
            assert "while-paused" in local_keys(client, "LocalAppointment")
            assert on_replica.n == before + 1  # one look at its watermark, then the primary
        finally:
            conn.execute("SELECT pg_wal_replay_resume()")
    caught_up()
    before = on_replica.n
    client.sync("Login")
    assert on_replica.n > before + 1
    assert_in_sync(srv, client, "token-h1", "Login")


def test_the_out_of_order_race_on_the_standby(replicated, serve, make_client, server_db_url):
    srv, on_replica, caught_up = replicated
    client = make_client(url=serve(srv.app).url)
    client.sync("Login")
    with open_writer(server_db_url, _row("writer-a", minute=1)) as a:
        _write(server_db_url, _row("writer-b", minute=2))
        caught_up()
        client.sync("Login")
        assert "writer-a" not in local_keys(client, "LocalAppointment")
        a.commit()
    caught_up()
    before = on_replica.n
    client.sync("Login")
    assert on_replica.n > before
    assert {"writer-a", "writer-b"} <= local_keys(client, "LocalAppointment")
    assert_in_sync(srv, client, "token-h1", "Login")


def test_replicas_from_the_url(store, standby):
    name = str(store.engine.url.database)
    url = f"postgresql://postgres@127.0.0.1:1/{name}?replica=127.0.0.1:{standby.port}"
    s = PostgresStore.from_url(url)
    assert [e.url.port for e in s.replicas] == [standby.port]
    assert s.replicas[0].url.database == name
    assert s.engine.url.port == 1


# -- PgBouncer, transaction pooling ------------------------------------------------------------


def _pgbouncer_bin() -> str | None:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        with held("apt"):  # parallel test workers would race for dpkg's lock
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "pgbouncer"],
                env=env, capture_output=True, timeout=600, check=False,
            )  # fmt: skip
        found = shutil.which("pgbouncer") or (
            "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
        )
    return found


@pytest.fixture(scope="module")
def pgbouncer(pg: PostgresServer) -> Iterator[int]:
    """PgBouncer in transaction pooling in front of the session's PostgreSQL; its port."""
    binary = _pgbouncer_bin()
    if binary is None:
        pytest.skip("PgBouncer is not installed and could not be (apt-get install pgbouncer)")
    port = free_port()
    root = pg.root / f"pgbouncer-{port}"
    root.mkdir()
    (root / "pgbouncer.ini").write_text(
        f"""[databases]
* = host=127.0.0.1 port={pg.port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {root / "users.txt"}
pool_mode = transaction
default_pool_size = 4
max_client_conn = 200
ignore_startup_parameters = extra_float_digits,options
logfile = {root / "pgbouncer.log"}
pidfile = {root / "pgbouncer.pid"}
"""
    )
    (root / "users.txt").write_text('"postgres" ""\n')
    if pg.user is not None:
        for f in (root, root / "pgbouncer.ini", root / "users.txt"):
            shutil.chown(f, pg.user, pg.user)
    proc = subprocess.Popen([binary, str(root / "pgbouncer.ini")], user=pg.user)
    deadline = time.monotonic() + 20
    while True:
        try:
            with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres"):
                break
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log = root / "pgbouncer.log"
                pytest.fail(f"pgbouncer did not start: {log.read_text() if log.exists() else ''}")
            time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(10)


def test_sync_and_push_through_pgbouncer_in_transaction_pooling(
    server, store, pgbouncer, serve, make_client, tmp_path
):
    name = str(store.engine.url.database)
    url = f"postgresql://postgres@127.0.0.1:{pgbouncer}/{name}?prepare_threshold=none"
    pooled = PostgresStore.from_url(url)
    srv = SyncServer(hospital_schema, pooled, authenticate=staff_auth(pooled.engine))
    live = serve(srv.app)
    devices = [make_client(url=live.url, name=f"d{i}") for i in range(3)]
    for round_ in range(8):  # statements repeat many times: no prepared statement may leak
        for i, d in enumerate(devices):
            d.insert(
                "LocalAppointment",
                {**SLOT, "starts_at": f"2031-08-0{1 + i}T{10 + round_}:00:00",
                 "ends_at": f"2031-08-0{1 + i}T{10 + round_}:30:00"},
            )  # fmt: skip
            assert d.sync("Online").applied == 1
    for d in devices:
        d.sync("Login")
        assert_in_sync(srv, d, "token-h1", "Login")
    with pooled.engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM appointment WHERE room = 'R1'"
                                 " AND starts_at >= '2031-08-01'")).scalar_one()  # fmt: skip
    assert n == 24
    pooled.engine.dispose()
