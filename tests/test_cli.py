"""The maintenance commands and ``syncunit serve``'s guard against half-sent requests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hospital.generate import generate
from hospital.models import metadata

from syncunit.cli import main
from syncunit.server import ServerStore, SyncServer
from syncunit.server.migrations import LATEST
from syncunit.server.store import meta_table
from tests.conftest import EXAMPLES, SIZE, SOURCE, PlainSQL
from tests.pgserver import free_port
from tests.support import trigger_names

SCHEMA = ["hospital.units:schema", "--app-dir", str(EXAMPLES)]  # a SyncSchema TARGET
REQUEST = b"GET /v1/catalog HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _facts(store: ServerStore) -> dict[str, str]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(meta_table.c.key, meta_table.c.value))
        return {str(k): str(v) for k, v in rows}


# -- prune --keep ------------------------------------------------------------------------


def test_prune_refuses_a_negative_keep_and_changes_nothing(
    server: SyncServer, store: ServerStore, server_db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _facts(store)
    with pytest.raises(SystemExit) as refused:
        main(["prune", *SCHEMA, "--database", server_db_url, "--keep", "-1000"])
    assert refused.value.code == 2
    assert "argument --keep: -1000 is negative" in capsys.readouterr().err
    with pytest.raises(ValueError, match="keep_versions must be 0 or more, not -1"):
        store.prune_tombstones(-1)
    assert _facts(store) == before  # the horizon has not moved

    assert main(["prune", *SCHEMA, "--database", server_db_url, "--keep", "0"]) == 0
    horizon = int(_facts(store)["horizon"])
    assert horizon <= store.current_version()  # never past the current version


# -- --chunk-size ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["sync", "serve", "demo"])
@pytest.mark.parametrize(
    ("raw", "told"),
    [("0", "0 rows: a chunk holds at least 1 row"), ("-5", "-5 rows"), ("many", "not a whole")],
)
def test_a_chunk_size_under_one_row_is_a_one_line_error(
    command: str, raw: str, told: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = {
        "sync": ["sync", "http://127.0.0.1:9", "Login", "--db", str(tmp_path / "d.sqlite")],
        "serve": ["serve", *SCHEMA, "--database", f"sqlite:///{tmp_path / 's.sqlite'}"],
        "demo": ["demo", "--workdir", str(tmp_path)],
    }[command]
    with pytest.raises(SystemExit) as refused:
        main([*args, "--chunk-size", raw])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --chunk-size: {told}" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing made


# -- retrack -------------------------------------------------------------------------------


def test_retrack_moves_the_horizon_of_the_tables_named_only(
    server: SyncServer, store: ServerStore, server_db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _facts(store)
    assert "tracking:truncated:appointment" not in before

    code = main(["retrack", *SCHEMA, "--database", server_db_url, "appointment", "patient"])

    assert code == 0
    out = capsys.readouterr().out
    assert "appointment: changed outside tracking at version" in out
    assert "every stream reading it copies afresh" in out
    after = _facts(store)
    moved = {k for k in after if before.get(k) != after[k]}
    assert moved == {"tracking:truncated:appointment", "tracking:truncated:patient"}
    assert int(after["tracking:truncated:appointment"]) > 0


def test_retrack_of_a_table_not_tracked_is_an_error_and_changes_nothing(
    server: SyncServer, store: ServerStore, server_db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _facts(store)
    code = main(["retrack", *SCHEMA, "--database", server_db_url, "appointment", "apointment"])
    err = capsys.readouterr().err
    assert code == 1
    assert "not tracked by hospital.units:schema: apointment; name among" in err
    assert "appointment" in err.split("name among")[1]
    assert "Traceback" not in err
    assert _facts(store) == before  # not even the table named correctly


def _tamper(backend: str, plain_sql: PlainSQL) -> None:
    """Turn off a trigger of the doctor table, as a writer that disabled tracking would."""
    if backend == "sqlite":
        name = plain_sql(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'doctor'"
        )[0][0]
        plain_sql(f"DROP TRIGGER {name}")
    else:
        plain_sql("ALTER TABLE doctor DISABLE TRIGGER USER")


def test_retrack_of_a_mistyped_table_reinstalls_nothing(
    backend: str,
    server: SyncServer,
    store: ServerStore,
    server_db_url: str,
    plain_sql: PlainSQL,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _tamper(backend, plain_sql)
    before, triggers = _facts(store), trigger_names(store.engine)
    pending = store.tracking_ddl(server.schema)
    assert pending  # the tampered tracking, which a correct retrack re-installs

    code = main(["retrack", *SCHEMA, "--database", server_db_url, "doctr"])

    assert code == 1
    assert "not tracked by hospital.units:schema: doctr" in capsys.readouterr().err
    assert _facts(store) == before
    assert trigger_names(store.engine) == triggers
    assert store.tracking_ddl(server.schema) == pending  # still to re-install


# -- a database a newer syncunit migrated -----------------------------------------------------


def _newer(store: ServerStore, plain_sql: PlainSQL) -> dict[str, str]:
    plain_sql(f"UPDATE syncunit_meta SET value = '{LATEST + 1}' WHERE key = 'schema-version'")
    return _facts(store)


@pytest.mark.parametrize(
    "command", [["lag"], ["prune", "--keep", "0"], ["renew-epoch"], ["retrack", "appointment"]]
)
def test_the_maintenance_commands_refuse_a_database_a_newer_version_migrated(
    command: list[str],
    server: SyncServer,
    store: ServerStore,
    server_db_url: str,
    plain_sql: PlainSQL,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = _newer(store, plain_sql)

    code = main([command[0], *SCHEMA, "--database", server_db_url, *command[1:]])

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"error: the database is at syncunit migration {LATEST + 1}")
    assert err.count("\n") == 1  # one line, no traceback
    assert _facts(store) == before  # the epoch, the horizon, tracking: as they were


def test_serve_with_workers_stops_on_a_database_a_newer_version_migrated(
    server: SyncServer, store: ServerStore, server_db_url: str, plain_sql: PlainSQL
) -> None:
    """Before starting any worker: one failing at its start is started again, for ever."""
    before = _newer(store, plain_sql)

    done = subprocess.run(
        [sys.executable, "-m", "syncunit", "serve", "hospital.server:build",
         "--database", server_db_url, "--app-dir", str(EXAMPLES),
         "--port", str(free_port()), "--workers", "2"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE), str(EXAMPLES)])},
    )  # fmt: skip

    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: the database is at syncunit migration {LATEST + 1}")
    assert _facts(store) == before


# -- a SyncSchema TARGET, a missing or bare database ---------------------------------------


def test_the_maintenance_commands_take_a_sync_schema(
    server: SyncServer, server_db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """They sign no one in: a SyncSchema needs no --tokens (which only serve takes)."""
    database = ["--database", server_db_url]
    assert main(["ddl", *SCHEMA, *database]) == 0
    assert main(["lag", *SCHEMA, *database]) == 0
    assert main(["prune", *SCHEMA, *database, "--keep", "1"]) == 0
    assert main(["renew-epoch", *SCHEMA, *database]) == 0
    out, err = capsys.readouterr()
    assert "CREATE" in out
    assert "tombstones at or below version" in out
    assert "new epoch" in out
    assert err == ""


@pytest.mark.parametrize(
    "command",
    [["ddl"], ["lag"], ["prune", "--keep", "1"], ["renew-epoch"], ["retrack", "appointment"]],
)
def test_a_mistyped_sqlite_path_is_an_error_and_no_new_file(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "tyop.sqlite"
    code = main([command[0], *SCHEMA, "--database", f"sqlite:///{typo}", *command[1:]])
    err = capsys.readouterr().err
    assert code == 1
    assert f"error: no database at {typo}" in err
    assert "Traceback" not in err
    assert not typo.exists()


@pytest.mark.parametrize(
    "command", [["lag"], ["prune", "--keep", "1"], ["renew-epoch"], ["retrack", "appointment"]]
)
def test_a_database_without_tracking_is_an_error_and_stays_as_it_was(
    command: list[str], store: ServerStore, server_db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The application's tables but no syncunit tracking (e.g. the wrong database)."""
    tables = set(sa.inspect(store.engine).get_table_names())
    code = main([command[0], *SCHEMA, "--database", server_db_url, *command[1:]])
    err = capsys.readouterr().err
    assert code == 1
    assert "has no syncunit tracking installed" in err
    assert "Traceback" not in err
    assert set(sa.inspect(store.engine).get_table_names()) == tables


def test_ddl_on_a_database_without_the_tables_is_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sqlite = tmp_path / "other.sqlite"
    sa.create_engine(f"sqlite:///{sqlite}").connect().close()  # exists, no tables
    assert main(["ddl", *SCHEMA, "--database", f"sqlite:///{sqlite}"]) == 1
    assert "error: table 'doctor' does not exist" in capsys.readouterr().err


def test_serve_offers_its_log_levels(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["serve", *SCHEMA, "--database", "sqlite://", "--log-level", "verbose"])
    assert refused.value.code == 2
    assert "invalid choice: 'verbose'" in capsys.readouterr().err


# -- serve --header-timeout ---------------------------------------------------------------


@contextmanager
def _connected(url: str) -> Iterator[socket.socket]:
    conn = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30)
    try:
        yield conn
    finally:
        conn.close()


def _closed_by_server(conn: socket.socket) -> bool:
    """Wait (up to the socket's timeout) for the server to close ``conn``."""
    try:
        while conn.recv(65536):  # the rest of an earlier answer, if any
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _answered(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        assert more, "the server closed the connection instead of answering"
        data += more
    return data


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_closes_connections_whose_request_headers_never_end(
    serve_process: Any, tmp_path: Path, workers: int
) -> None:
    url, _ = serve_process(
        f"sqlite:///{tmp_path / 'server.sqlite'}", workers, "--header-timeout", "2"
    )
    with (
        _connected(url) as silent,
        _connected(url) as half_sent,
        _connected(url) as kept,
        _connected(url) as pipelined,
        _connected(url) as honest,
    ):
        half_sent.sendall(b"POST /v1/sync/Login HTTP/1.1\r\nHost: x\r\n")  # never finished
        kept.sendall(REQUEST)
        assert _answered(kept).startswith(b"HTTP/1.1 401")
        kept.sendall(b"GET /v1/catalog HTTP/1.1\r\n")  # a kept-alive connection, then half
        pipelined.sendall(REQUEST + b"GET /v1/catalog HTTP/1.1\r\n")  # a whole one, and half
        honest.sendall(REQUEST)  # served meanwhile
        assert _answered(honest).startswith(b"HTTP/1.1 401")
        # Past the header timeout (well short of keep-alive's 75 s): all four closed.
        assert _closed_by_server(silent)
        assert _closed_by_server(half_sent)
        assert _closed_by_server(kept)
        assert _closed_by_server(pipelined)


def test_a_slow_but_complete_request_is_served(serve_process: Any, tmp_path: Path) -> None:
    """The deadline is on the headers: headers sent in pieces inside it are served, and
    so is a request whose body comes after it."""
    database = f"sqlite:///{tmp_path / 'server.sqlite'}"
    engine = sa.create_engine(database)
    metadata.create_all(engine)
    generate(engine, **SIZE)  # staff tokens
    engine.dispose()
    url, _ = serve_process(database, 1, "--header-timeout", "3")
    with _connected(url) as slow:
        for piece in (b"GET /v1/cata", b"log HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"\r\n"):
            slow.sendall(piece)
            time.sleep(0.5)
        assert _answered(slow).startswith(b"HTTP/1.1 401")
    body = b'{"not": "a sync request"}'
    with _connected(url) as uploading:
        uploading.sendall(
            b"POST /v1/sync/Login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer token-h1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        time.sleep(4)  # past the header timeout: the server waits for the body
        uploading.sendall(body)
        assert _answered(uploading).startswith(b"HTTP/1.1 4")  # read, then refused
