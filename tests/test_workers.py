"""Several server processes over one PostgreSQL: ``syncunit serve`` for real.

Two ``syncunit serve`` commands run as separate processes on two ports (one of
them with ``--workers 2``); a device whose push reached the first process and
whose answer was lost retries through the second, and the push applies once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hospital.generate import generate

from syncunit.client import SyncClient
from syncunit.server import ServerStore
from tests.conftest import SIZE
from tests.test_push_support import FaultTransport

pytestmark = pytest.mark.backends("postgres")

SLOT = {
    "doctor_id": 1, "patient_id": 5, "starts_at": "2031-06-06T10:00:00",
    "ends_at": "2031-06-06T10:30:00", "status": "booked", "room": "R1", "notes": "",
}  # fmt: skip


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


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
