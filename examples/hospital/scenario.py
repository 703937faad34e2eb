"""The hospital demo, end to end: server, data, a device, a backoffice, verification.

``syncunit demo`` runs this: a fresh SQLite server database with generated data,
the sync server in a child process on 127.0.0.1, a device that syncs Splash
then Login (with a progress bar), backoffice edits made with plain SQL, a delta
sync, two patients opened on the device (PatientDetails with parameters), and a
check that every local table equals the server-side query for the device's user
and the subscriptions it holds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from syncunit import SyncClient, SyncResult
from syncunit.client.scheduler import RetryPolicy
from syncunit.server.verify import compare, scope_rows

from .backoffice import run_backoffice
from .generate import generate
from .server import build
from .units import schema

#: Where this package's top package is found: ``examples/`` of a checkout (imported as
#: ``hospital``), or the installed package (``syncunit.examples.hospital``).
PACKAGE_ROOT = Path(__file__).resolve().parents[len((__package__ or "hospital").split("."))]
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
        sys.executable, "-m", "syncunit", "serve", f"{__package__}.server:build",
        "--app-dir", str(PACKAGE_ROOT), "--database", database_url,
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


def summarize(result: SyncResult, device: str = "device") -> dict[str, Any]:
    return {
        "device": device,
        "unit": result.unit,
        "rows_in": result.total_in,
        "rows_removed": result.total_removed,
        "rows_out": result.rows_out,
        "bytes_in": result.bytes_in,
        "bytes_out": result.bytes_out,
        "seconds": round(result.seconds, 4),
        "requests": result.requests,
    }


class Connectivity(httpx.BaseTransport):
    """Real HTTP, with a switch that makes the device offline (connection refused)."""

    def __init__(self) -> None:
        self.online = True
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.online:
            raise httpx.ConnectError("the device is offline", request=request)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


def verify(server_db: Path, client: SyncClient, units: list[str]) -> list[str]:
    """Compare every local table of ``units``, and of the subscriptions the device
    holds, with the server; return the differences.

    A local table filled by several streams (Login's appointments and each open
    patient's history) must equal the union of what each of them selects.
    """
    server = build(f"sqlite:///{server_db}")
    problems: list[str] = []
    params = {"hospital_id": HOSPITAL_ID}
    runs = [(stream, params) for unit in units for stream in schema.units[unit].streams]
    for unit, values in client.subscriptions():
        runs += [(stream, {**params, **values}) for stream in schema.units[unit].streams]
    by_table: dict[str, dict[Any, tuple[Any, ...]]] = {}
    first: dict[str, Any] = {}
    done: set[tuple[str, str]] = set()
    for stream, values in runs:
        if (stream.name, json.dumps(values, sort_keys=True)) in done:
            continue
        done.add((stream.name, json.dumps(values, sort_keys=True)))
        first.setdefault(stream.local_table, stream)
        k = list(stream.columns).index(stream.key)
        rows = by_table.setdefault(stream.local_table, {})
        rows.update({r[k]: r for r in scope_rows(server.store, stream, values)})
    pending = {(p.table, p.key) for p in client.outbox.pending()}
    for table, rows in by_table.items():
        stream = first[table]
        local = client.store.rows(table, list(stream.columns))
        ignore = {k for t, k in pending if t == table}
        diff = compare(stream, list(rows.values()), local, ignore=ignore)
        if not diff.equal:
            problems.append(f"{table}: {diff}")
    server.store.engine.dispose()
    return problems


def server_has(server_db: Path, keys: list[str]) -> set[str]:
    conn = sqlite3.connect(server_db)
    try:
        marks = ",".join("?" * len(keys))
        return {
            r[0] for r in conn.execute(f"SELECT id FROM appointment WHERE id IN ({marks})", keys)
        }
    finally:
        conn.close()


def slot(doctor_id: int, day: int, hour: int, patient_id: int = 1) -> dict[str, Any]:
    start = dt.datetime(2027, 3, 1, hour) + dt.timedelta(days=day)
    return {
        "doctor_id": doctor_id,
        "patient_id": patient_id,
        "starts_at": start.isoformat(),
        "ends_at": (start + dt.timedelta(minutes=30)).isoformat(),
        "status": "booked",
        "room": "R7",
        "notes": "booked offline",
    }


class Demo:
    """The scenario's state: the server database, two devices, what happened."""

    def __init__(self, work: Path, url: str, console: Console) -> None:
        self.work = work
        self.url = url
        self.console = console
        self.server_db = work / "server.sqlite"
        self.syncs: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.conflicts: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.net = Connectivity()
        self.device = self._client("device", work / "device.sqlite", self.net)
        self.other = self._client("other", work / "other-device.sqlite", None)

    def _client(self, name: str, path: Path, transport: httpx.BaseTransport | None) -> SyncClient:
        def started(unit: str) -> None:
            if unit != "Login" or name == "other":
                self.console.print(f"  [dim]{name}: start {unit}[/]")

        def completed(result: SyncResult) -> None:
            self.syncs.append(summarize(result, name))
            self.rejected += [_brief(r) for r in result.rejected]
            self.conflicts += [_brief(c) for c in result.conflicts]
            self.console.print(
                f"  [dim]{name}: {result.unit} done: {result.total_in} in,"
                f" {result.total_removed} removed, {result.rows_out} out,"
                f" {result.applied} applied[/]"
            )
            for item in result.rejected + result.conflicts:
                self.console.print(f"  [yellow]{item['status']}[/] {item['key']}: {item['reason']}")

        def failed(unit: str, exc: Exception) -> None:
            self.console.print(f"  [dim]{name}: {unit} failed: {exc.__class__.__name__}[/]")

        return SyncClient(
            self.url, path, token=TOKEN, transport=transport, on_start=started,
            on_complete=completed, on_error=failed, sync_on_reconnect="Online",
            retry=RetryPolicy(base_delay=0.2, max_delay=2.0),
        )  # fmt: skip

    def wait_until(self, what: str, done: Callable[[], bool], timeout: float = 30.0) -> float:
        """Wait (bounded) for background work; return the seconds it took."""
        started = time.perf_counter()
        while not done():
            if time.perf_counter() - started > timeout:
                self.problems.append(f"timed out waiting for {what}")
                break
            time.sleep(0.02)
        return time.perf_counter() - started

    def idle(self, client: SyncClient) -> bool:
        status = client.status
        return status.state == "idle" and not status.queued

    def pull_path(self) -> None:
        self.device.sync("Splash")
        with Progress(
            TextColumn("Login"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, transient=True,
        ) as bar:  # fmt: skip
            task = bar.add_task("Login", total=None)
            self.device.on_progress = lambda _u, done, total: bar.update(
                task, completed=done, total=total
            )
            self.device.sync("Login")
            self.device.on_progress = None
        edits = run_backoffice(str(self.server_db), HOSPITAL_ID)
        self.console.print(
            f"backoffice: rescheduled {len(edits.rescheduled)}, cancelled {len(edits.cancelled)},"
            f" moved {len(edits.reassigned)} to another hospital, renamed doctor"
            f" {edits.renamed_doctor} ({edits.renamed_rows} appointments)"
        )
        self.device.sync("Login")
        self.device.sync("Splash")
        self.problems += verify(self.server_db, self.device, ["Splash", "Login"])
        gone = edits.cancelled + edits.reassigned
        marks = ",".join("?" * len(gone))
        left = self.device.store.query(
            f"SELECT count(*) FROM LocalAppointment WHERE id IN ({marks})", gone
        )[0][0]
        if left:
            self.problems.append(f"{left} cancelled or moved appointments are still local")

    def open_patients(self) -> None:
        """The user opens two patients: each is a subscription, synced on its own."""
        dev = self.device
        first, second = [
            r[0]
            for r in dev.store.query(
                "SELECT patient_id FROM LocalAppointment GROUP BY patient_id"
                " ORDER BY count(*) DESC, patient_id LIMIT 2"
            )
        ]
        self.patient = first
        for patient_id in (first, second):
            self.console.print(f"device: opens patient {patient_id} (PatientDetails)")
            dev.sync("PatientDetails", params={"patient_id": patient_id})
        [(edited,)] = dev.store.query(
            "SELECT id FROM LocalAppointment WHERE patient_id = ? ORDER BY id LIMIT 1", (first,)
        )
        conn = sqlite3.connect(self.server_db)
        with conn:
            conn.execute("UPDATE patient SET phone = '+351 910 000 000' WHERE id = ?", (first,))
            conn.execute(
                "UPDATE appointment SET notes = 'allergic to penicillin' WHERE id = ?", (edited,)
            )
        conn.close()
        self.console.print(f"backoffice: edits patient {first}'s phone and a note")
        again = dev.sync("PatientDetails", params={"patient_id": first})
        # A delta: the patient's appointments carry its name, so its row's change
        # sends them again, and nothing else; the one-row card is replaced whole.
        mine = dev.store.query(
            "SELECT count(*) FROM LocalAppointment WHERE patient_id = ?", (first,)
        )[0][0]
        if "patient_history" in again.resets or again.rows_in["LocalAppointment"] > mine:
            self.problems.append(f"reopening patient {first} was not a delta: {again}")
        got = dev.store.query("SELECT notes FROM LocalAppointment WHERE id = ?", (edited,))
        phone = dev.store.query("SELECT phone FROM LocalPatient WHERE id = ?", (first,))
        if got != [("allergic to penicillin",)] or phone != [("+351 910 000 000",)]:
            self.problems.append("the backoffice's edits did not reach the open patient")
        held = dev.store.query(
            "SELECT count(*) FROM LocalAppointment WHERE patient_id = ?", (second,)
        )[0][0]
        removed = dev.unsubscribe("PatientDetails", {"patient_id": second})
        self.console.print(
            f"device: closes patient {second}: {removed} row removed, its {held}"
            " appointments stay (Login holds them)"
        )
        if dev.store.query("SELECT 1 FROM LocalPatient WHERE id = ?", (second,)):
            self.problems.append(f"patient {second}'s card is still local after closing")
        kept = dev.store.query(
            "SELECT count(*) FROM LocalAppointment WHERE patient_id = ?", (second,)
        )[0][0]
        if kept != held:
            self.problems.append(f"closing patient {second} dropped rows Login holds")
        self.problems += verify(self.server_db, dev, ["Splash", "Login"])

    def write_path(self) -> None:
        dev, other = self.device, self.other
        other.sync("Login")
        other.watch("Login")
        doctor_id = dev.store.query("SELECT id FROM LocalDoctor WHERE hospital_id = 1 LIMIT 1")[0][
            0
        ]

        self.console.print("device: books an appointment; SendAppointments is triggered")
        first = dev.insert("LocalAppointment", slot(doctor_id, 0, 8))
        dev.trigger("SendAppointments")
        seconds = self.wait_until(
            "the other device to see the booking",
            lambda: bool(
                other.store.query("SELECT 1 FROM LocalAppointment WHERE id = ?", (first,))
            ),
        )
        self.console.print(f"other device: got the booking through live changes in {seconds:.2f} s")

        self.net.online = False
        dev.set_online(False)
        self.console.print("device: [bold]offline[/]; books 3 appointments, edits a note")
        booked = [dev.insert("LocalAppointment", slot(doctor_id, day, 9)) for day in range(3)]
        edited = dev.store.query("SELECT id FROM LocalAppointment ORDER BY id LIMIT 1")[0][0]
        dev.update("LocalAppointment", edited, {"notes": "patient called: running late"})
        dev.trigger("SendAppointments")
        status = dev.status
        self.console.print(
            f"  status: {status.state}, queued {status.queued},"
            f" {status.pending_mutations} changes in the outbox"
        )
        self.console.print("other device books the same slot; the backoffice edits the note")
        taken = other.insert("LocalAppointment", slot(doctor_id, 1, 9, patient_id=2))
        other.sync("SendAppointments")
        conn = sqlite3.connect(self.server_db)
        with conn:
            conn.execute("UPDATE appointment SET notes = 'moved to room 9' WHERE id = ?", (edited,))
        conn.close()

        self.console.print("device: [bold]online[/] again: Online runs, pending requests dropped")
        self.net.online = True
        dev.set_online(True)
        self.wait_until("the Online sync", lambda: self.idle(dev))
        for change in dev.outbox.rejected():
            if change.code == "rule":
                new = slot(doctor_id, 1, 15)
                self.console.print(f"  resolve: retry {change.key} at {new['starts_at']}")
                dev.outbox.retry(
                    change.id, {"starts_at": new["starts_at"], "ends_at": new["ends_at"]}
                )
            else:
                self.console.print(f"  resolve: keep the server's row for {change.key}")
                dev.outbox.discard(change.id)
        dev.trigger("SendAppointments")
        self.wait_until("the resolved changes", lambda: self.idle(dev) and not dev.outbox.count())
        dev.sync("Online")
        self.wait_until("the other device to catch up", lambda: self.idle(other))
        other.sync("Login")

        on_server = server_has(self.server_db, [first, *booked, taken])
        listed = {r["key"] for r in self.rejected}
        for key in [first, *booked]:
            if key not in on_server and key not in listed:
                self.problems.append(
                    f"booking {key} is neither on the server nor listed as rejected"
                )
        if taken not in on_server:
            self.problems.append("the other device's booking is missing on the server")
        if not listed:
            self.problems.append("the double booking was not rejected")
        if dev.outbox.count() or dev.outbox.rejected():
            self.problems.append("changes are still waiting after resolution")
        self.problems += verify(self.server_db, dev, ["Splash", "Login"])
        self.problems += verify(self.server_db, other, ["Login"])

    def close(self) -> None:
        self.device.close()
        self.other.close()


def _brief(item: dict[str, Any]) -> dict[str, Any]:
    return {k: item[k] for k in ("table", "key", "reason", "code", "op")}


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
    for p in work.glob("*.sqlite*"):
        p.unlink()
    server_db = work / "server.sqlite"
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
            demo = Demo(work, url, console)
            try:
                demo.pull_path()
                demo.open_patients()
                demo.write_path()
            finally:
                demo.close()
        verified = not demo.problems
        _print_table(console, demo.syncs)
        for p in demo.problems:
            console.print(f"[red]MISMATCH[/] {p}")
        console.print(
            "[green]verified[/]: every local table equals the server-side query for this user"
            " and the patients open on the device, and every booking is on the server or"
            " listed as rejected with its reason"
            if verified
            else "[red]verification failed[/]"
        )
        if report is not None:
            report.write_text(
                json.dumps(
                    {
                        "verified": verified,
                        "syncs": demo.syncs,
                        "rejected": demo.rejected,
                        "conflicts": demo.conflicts,
                        "problems": demo.problems,
                    },
                    indent=2,
                )
            )
        return 0 if verified else 1
    finally:
        if own_dir and not os.environ.get("SYNCUNIT_KEEP_DEMO"):
            shutil.rmtree(work, ignore_errors=True)


def _print_table(console: Console, syncs: list[dict[str, Any]]) -> None:
    table = Table(title="syncs")
    for col in ("device", "unit", "in", "removed", "out", "bytes in", "bytes out", "ms", "req"):
        table.add_column(col, justify="left" if col in ("device", "unit") else "right")
    for s in syncs:
        table.add_row(
            s["device"], s["unit"], f"{s['rows_in']:,}", f"{s['rows_removed']:,}",
            f"{s['rows_out']:,}", f"{s['bytes_in']:,}", f"{s['bytes_out']:,}",
            f"{s['seconds'] * 1000:.0f}", str(s["requests"]),
        )  # fmt: skip
    console.print(table)
