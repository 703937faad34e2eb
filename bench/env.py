"""Where the benchmark finds the project, the example and its caches."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RESULTS = ROOT / "bench" / "results"
TOKEN = "token-h1"  # the staff member of hospital 1, whose scope is every generated row
UNIT = "Login"
STREAM_TABLE = "LocalAppointment"


def ensure_paths() -> None:
    """Put the repository root and ``examples/`` on ``sys.path`` (idempotent)."""
    for p in (str(EXAMPLES), str(ROOT)):
        if p not in sys.path:
            sys.path.insert(0, p)


def subprocess_env() -> dict[str, str]:
    """The environment for bench subprocesses: same paths, unbuffered output."""
    parts = [str(ROOT), str(EXAMPLES), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in parts if p),
        "PYTHONUNBUFFERED": "1",
    }


def cache_dir() -> Path:
    """Cache of generated server databases (``SYNCUNIT_BENCH_CACHE`` overrides)."""
    default = Path.home() / ".cache" / "syncunit-bench"
    path = Path(os.environ.get("SYNCUNIT_BENCH_CACHE", default)) / "servers"
    path.mkdir(parents=True, exist_ok=True)
    return path
