"""What lets the suite run in parallel processes (``pytest -n``): the machine-wide lock
around package installs, and each worker's own share of the ports."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import pgserver
from tests.filelock import held

_TRY_LOCK = """
import fcntl, sys
with open(sys.argv[1], "a") as f:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("busy")
    else:
        print("free")
"""


def _other_process_finds(name: str) -> str:
    path = Path(tempfile.gettempdir()) / f"syncunit-tests-{name}.lock"
    done = subprocess.run(
        [sys.executable, "-c", _TRY_LOCK, str(path)], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_another_process_waits_while_the_lock_is_held() -> None:
    name = "test-parallel-workers"
    with held(name):
        assert _other_process_finds(name) == "busy"
    assert _other_process_finds(name) == "free"


def test_two_workers_never_pick_the_same_port(monkeypatch: pytest.MonkeyPatch) -> None:
    picked: dict[str, set[int]] = {}
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
        monkeypatch.setattr(pgserver, "_HANDED_OUT", set())  # each worker's own session
        picked[worker] = {pgserver.free_port() for _ in range(400)}
    assert len(picked["gw0"]) == len(picked["gw1"]) == 400
    assert not picked["gw0"] & picked["gw1"]
