"""The hospital sync server in its own process (uvicorn on 127.0.0.1).

Run as ``python -m bench.serverproc --db PATH --port N`` (a SQLite file) or
``--db postgresql+psycopg://...`` (any database URL the store takes);
``ServerProcess`` starts it, waits until it answers, measures its CPU time and
stops it.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

from bench.env import ROOT, TOKEN, UNIT, ensure_paths, subprocess_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def database_url(db: Path | str) -> str:
    """The store URL of a bench server database: a SQLite file's path, or a URL."""
    return db if isinstance(db, str) else f"sqlite:///{db}"


class ServerProcess:
    """A server subprocess on a free port; a context manager.

    ``db`` is a SQLite file or a database URL (``postgresql+psycopg://...``);
    ``url`` serves that database instead of the SQLite file ``db``.
    """

    def __init__(
        self,
        db: Path | str,
        *,
        log: Path | None = None,
        snapshots: Path | None = None,
        url: str | None = None,
    ) -> None:
        self.db = db
        self.database_url = url  # another database than the SQLite file ``db`` (PostgreSQL)
        self.snapshots = snapshots  # serve prebuilt first copies for the bench's user
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if log is None:
            log = (
                db.with_suffix(".server.log")
                if isinstance(db, Path)
                else Path(tempfile.gettempdir()) / f"syncunit-bench-server-{self.port}.log"
            )
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self, timeout: float = 120.0) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            "bench.serverproc",
            "--db",
            database_url(self.db),
            "--port",
            str(self.port),
            *(["--snapshots", str(self.snapshots)] if self.snapshots else []),
            *(["--url", self.database_url] if self.database_url else []),
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {TOKEN}"}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited early:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/catalog", headers=headers, timeout=2).is_success:
                    self.pid = self.proc.pid
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not answer within {timeout:.0f}s")

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def peak_rss_mb(self) -> float | None:
        """The server's peak RSS so far (``VmHWM``), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(2)  # SIGINT: uvicorn shuts down cleanly
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the hospital example for the bench.")
    parser.add_argument("--db", required=True, help="a SQLite file or a database URL")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--snapshots", type=Path, help="build and serve snapshot files here")
    parser.add_argument("--url", help="serve this database instead of --db (PostgreSQL)")
    args = parser.parse_args(argv)
    ensure_paths()
    from hospital.server import build

    from syncunit.cli import run_app

    url = args.url or (args.db if "://" in args.db else database_url(Path(args.db)))
    if args.snapshots is None:
        server = build(url)
    else:
        # Built before serving, for the bench's user: a server that has been up a
        # while has them already (the first large copy builds them in the background).
        server = build(url, snapshot_dir=args.snapshots, snapshot_min_rows=1)
        assert server.snapshots is not None
        params = {"hospital_id": 1}  # TOKEN's staff member works at hospital 1
        for stream in server.schema.units[UNIT].streams:
            if stream.mode == "delta":
                server.snapshots.build(stream, params)
    # As ``syncunit serve`` runs it.
    run_app(server.app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
