"""One client sync in a fresh process, so its peak memory is its own.

Run as ``python -m bench.clientproc --url URL --db PATH``: prints one JSON line
with the ``SyncResult``, when the first rows were applied, the process's RSS
before the sync and its peak RSS, its CPU time (and that of ``sync()`` alone),
and how long the first copy's index build took. ``run_client`` does that from
the bench and parses the answer.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.env import ROOT, TOKEN, UNIT, subprocess_env


def _status_mb(field: str) -> float:
    """A memory figure of this process from ``/proc/self/status``, in MiB.

    ``VmHWM`` (peak RSS) is used rather than ``getrusage().ru_maxrss``: the
    latter keeps the high-water mark of the parent that spawned this process
    across ``exec``, so it reports the bench's memory, not the client's.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _last_stream_timing(events: list[tuple[float, int, int]], started: float) -> dict[str, Any]:
    """When the last stream (the big one in Login) was announced and its first rows applied.

    The server announces a stream (``StreamStart``, the progress total grows)
    after counting its rows, then sends chunks; the gap shows the server's
    time to first row.
    """
    announced = max(
        (i for i in range(1, len(events)) if events[i][2] > events[i - 1][2]), default=0
    )
    if not events:
        return {"stream_start_s": None, "first_rows_s": None}
    t_start, done_then, _ = events[announced]
    first = next((t for t, done, _ in events[announced:] if done > done_then), None)
    return {
        "stream_start_s": round(t_start - started, 4),
        "first_rows_s": None if first is None else round(first - started, 4),
    }


def run_client(
    url: str, db: Path, *, unit: str = UNIT, chunk_size: int | None = None, timeout: float = 900
) -> dict[str, Any]:
    """Sync ``unit`` into ``db`` in a subprocess; return its measurements."""
    cmd = [sys.executable, "-m", "bench.clientproc", "--url", url, "--db", str(db), "--unit", unit]
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    return run_json(cmd, timeout=timeout)


def run_json(cmd: Sequence[str], *, timeout: float) -> dict[str, Any]:
    """Run a bench client command from the checkout; its last output line, as JSON."""
    proc = subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"client failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One client sync, measured.")
    parser.add_argument("--url", required=True)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--unit", default=UNIT)
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("--token", default=TOKEN)
    args = parser.parse_args(argv)
    from syncunit.client import SyncClient
    from syncunit.client.store import LocalStore

    events: list[tuple[float, int, int]] = []
    index_build = [0.0]  # the suspended indexes built once the copy ends
    restore = LocalStore.restore_indexes

    def timed_restore(store: LocalStore, info: Any) -> None:
        t0 = time.perf_counter()
        try:
            restore(store, info)
        finally:
            index_build[0] += time.perf_counter() - t0

    LocalStore.restore_indexes = timed_restore  # type: ignore[method-assign]

    def progress(_unit: str, done: int, total: int) -> None:
        events.append((time.perf_counter(), done, total))

    base_rss = _status_mb("VmRSS")
    cpu0 = _cpu()
    started = time.perf_counter()
    with SyncClient(
        args.url,
        args.db,
        token=args.token,
        chunk_size=args.chunk_size,
        timeout=600,
        on_progress=progress,
    ) as client:
        sync_cpu0 = _cpu()
        result = client.sync(args.unit)
        sync_cpu = _cpu() - sync_cpu0
    wall = time.perf_counter() - started
    print(
        json.dumps(
            {
                "result": result.to_dict(),
                "wall_seconds": round(wall, 4),
                **_last_stream_timing(events, started),
                "cpu_seconds": round(_cpu() - cpu0, 3),
                "sync_cpu_seconds": round(sync_cpu, 3),
                "index_build_s": round(index_build[0], 4),
                "base_rss_mb": round(base_rss, 1),
                "peak_rss_mb": round(_status_mb("VmHWM"), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
