"""Several server processes over one PostgreSQL: ``syncunit serve`` for real.

Two ``syncunit serve`` commands run as separate processes on two ports (one of
them with ``--workers 2``); a device whose push reached the first process and
whose answer was lost retries through the second, and the push applies once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hospital.generate import generate

from syncunit.client import SyncClient
from syncunit.server import ServerStore
from tests.conftest import SIZE
from tests.pgserver import free_port
from tests.test_push_support import FaultTransport

pytestmark = pytest.mark.backends("postgres")

ROOT = Path(__file__).resolve().parents[1]
SLOT = {
    "doctor_id": 1, "patient_id": 5, "starts_at": "2031-06-06T10:00:00",
    "ends_at": "2031-06-06T10:30:00", "status": "booked", "room": "R1", "notes": "",
}  # fmt: skip


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., tuple[str, subprocess.Popen[bytes]]]]:
    """``serve_process(database_url, workers=1)``: ``syncunit serve`` in its own process."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(database: str, workers: int = 1) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        log = (tmp_path / f"serve-{port}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "syncunit", "serve", "hospital.server:build",
             "--database", database, "--app-dir", str(ROOT / "examples"),
             "--port", str(port), "--workers", str(workers), "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "examples")},
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


def _count(store: ServerStore, sql: str, **params: Any) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text(sql), params).scalar_one())


def test_a_push_retried_on_another_server_process_applies_once(
    store: ServerStore, server_db_url: str, serve_process: Any, tmp_path: Path
) -> None:
    generate(store.engine, **SIZE)
    one, _ = serve_process(server_db_url)
    two, workers = serve_process(server_db_url, workers=2)
    assert len(_children(workers.pid)) >= 2  # uvicorn's worker processes (and its helper)

    fault = FaultTransport()
    device = SyncClient(one, tmp_path / "dev.sqlite", token="token-h1", transport=fault)
    device.sync("Online")
    key = device.insert("LocalAppointment", dict(SLOT))
    fault.lose_next()
    with pytest.raises(Exception):  # noqa: B017, PT011 - the lost response
        device.sync("Online")
    device.close()
    assert _count(store, "SELECT count(*) FROM appointment WHERE id = :k", k=key) == 1

    again = SyncClient(two, tmp_path / "dev.sqlite", token="token-h1")
    try:
        result = again.sync("Online")
        assert result.applied == 1  # answered from the first process's log
        assert again.outbox.count() == 0
        for _ in range(4):  # any worker answers any request
            assert again.sync("Online").total_in == 0
    finally:
        again.close()
    assert _count(store, "SELECT count(*) FROM appointment WHERE id = :k", k=key) == 1
    assert _count(store, "SELECT count(*) FROM syncunit_mutations") == 1
