"""The hospital demo, end to end: server, data, a device, a backoffice, verification.

``syncunit demo`` runs this: a fresh SQLite server database with generated data,
the sync server in a child process on 127.0.0.1, a device that syncs Splash
then Login (with a progress bar), backoffice edits made with plain SQL, a delta
sync, and a check that every local table equals the server-side query for the
device's user.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hospital.backoffice import run_backoffice
from hospital.generate import generate
from hospital.server import build
from hospital.units import schema
from syncunit import SyncClient, SyncResult
from syncunit.server.verify import compare, scope_rows

EXAMPLES_DIR = Path(__file__).resolve().parent.parent
HOSPITAL_ID = 1
TOKEN = f"token-h{HOSPITAL_ID}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server_process(database_url: str, *, chunk_size: int | None = None) -> Iterator[str]:
    """Run ``syncunit serve`` for the hospital schema in a child process; yield its URL."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "syncunit", "serve", "hospital.server:build",
        "--app-dir", str(EXAMPLES_DIR), "--database", database_url,
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the sync server exited with code {proc.returncode}")
            try:
                httpx.get(f"{url}/v1/catalog", timeout=1.0)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the sync server did not start within 30 s") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summarize(result: SyncResult) -> dict[str, Any]:
    return {
        "unit": result.unit,
        "rows_in": result.total_in,
        "rows_removed": result.total_removed,
        "rows_out": result.rows_out,
        "bytes_in": result.bytes_in,
        "bytes_out": result.bytes_out,
        "seconds": round(result.seconds, 4),
        "requests": result.requests,
    }


def verify(server_db: Path, client: SyncClient, units: list[str]) -> list[str]:
    """Compare every local table of ``units`` with the server; return the differences."""
    server = build(f"sqlite:///{server_db}")
    problems: list[str] = []
    params = {"hospital_id": HOSPITAL_ID}
    seen: set[str] = set()
    for unit in units:
        for stream in schema.units[unit].streams:
            if stream.name in seen:
                continue
            seen.add(stream.name)
            local = client.store.rows(stream.local_table, list(stream.columns))
            diff = compare(stream, scope_rows(server.store, stream, params), local)
            if not diff.equal:
                problems.append(str(diff))
    server.store.engine.dispose()
    return problems


def run_demo(
    *,
    appointments: int = 100_000,
    report: Path | None = None,
    workdir: Path | None = None,
    chunk_size: int | None = None,
    console: Console | None = None,
) -> int:
    """Run the demo; return the process exit code (0 when verified)."""
    console = console or Console()
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="syncunit-demo-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    server_db, device_db = work / "server.sqlite", work / "device.sqlite"
    for p in work.glob("*.sqlite*"):
        p.unlink()
    syncs: list[dict[str, Any]] = []
    try:
        console.print(f"[bold]syncunit demo[/] in {work}")
        started = time.perf_counter()
        server = build(f"sqlite:///{server_db}")
        counts = generate(server.store.engine, appointments=appointments)
        server.store.engine.dispose()
        console.print(
            f"server database: {counts['appointments']:,} appointments, {counts['doctors']}"
            f" doctors, {counts['hospitals']} hospitals ({time.perf_counter() - started:.1f} s)"
        )
        with server_process(f"sqlite:///{server_db}", chunk_size=chunk_size) as url:
            console.print(f"server: {url}; device: staff of hospital {HOSPITAL_ID}")
            with SyncClient(url, device_db, token=TOKEN) as client:
                syncs.append(summarize(client.sync("Splash")))
                with Progress(
                    TextColumn("Login"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True,
                ) as bar:  # fmt: skip
                    task = bar.add_task("Login", total=None)

                    def progress(unit: str, done: int, total: int) -> None:
                        bar.update(task, completed=done, total=total)

                    client.on_progress = progress
                    syncs.append(summarize(client.sync("Login")))
                    client.on_progress = None
                edits = run_backoffice(str(server_db), HOSPITAL_ID)
                console.print(
                    f"backoffice: rescheduled {len(edits.rescheduled)}, cancelled"
                    f" {len(edits.cancelled)}, moved {len(edits.reassigned)} to another"
                    f" hospital, renamed doctor {edits.renamed_doctor}"
                    f" ({edits.renamed_rows} appointments)"
                )
                syncs.append(summarize(client.sync("Login")))
                syncs.append(summarize(client.sync("Splash")))
                problems = verify(server_db, client, ["Splash", "Login"])
                gone = edits.cancelled + edits.reassigned
                present = client.store.conn.execute(
                    "SELECT count(*) FROM LocalAppointment WHERE id IN"
                    f" ({','.join('?' * len(gone))})",
                    gone,
                ).fetchone()[0]
                if present:
                    problems.append(f"{present} cancelled or moved appointments are still local")
        verified = not problems
        _print_table(console, syncs)
        for p in problems:
            console.print(f"[red]MISMATCH[/] {p}")
        console.print(
            "[green]verified[/]: every local table equals the server-side query for this user"
            if verified
            else "[red]verification failed[/]"
        )
        if report is not None:
            report.write_text(json.dumps({"verified": verified, "syncs": syncs}, indent=2))
        return 0 if verified else 1
    finally:
        if own_dir and not os.environ.get("SYNCUNIT_KEEP_DEMO"):
            shutil.rmtree(work, ignore_errors=True)


def _print_table(console: Console, syncs: list[dict[str, Any]]) -> None:
    table = Table(title="syncs")
    for col in (
        "unit",
        "rows in",
        "removed",
        "rows out",
        "bytes in",
        "bytes out",
        "ms",
        "requests",
    ):
        table.add_column(col, justify="left" if col == "unit" else "right")
    for s in syncs:
        table.add_row(
            s["unit"], f"{s['rows_in']:,}", f"{s['rows_removed']:,}", f"{s['rows_out']:,}",
            f"{s['bytes_in']:,}", f"{s['bytes_out']:,}", f"{s['seconds'] * 1000:.0f}",
            str(s["requests"]),
        )  # fmt: skip
    console.print(table)
