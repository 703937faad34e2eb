"""Deltas pay for the client's changes, not everyone's: 50,000 foreign writes.

``python -m bench.foreign`` builds a hospital database with 100 hospitals,
serves it (``bench.serverproc``), gives hospital 1's device its first copy,
then times one 10-row delta of hospital 1 twice, from the same cursor:

* **quiet**: only the 10 changes in scope happened since the cursor;
* **busy**: the same 10, plus ``--foreign`` writes (default 50,000) in the
  other 99 hospitals: note updates, bookings, cancellations (deletes) and
  appointments moved between doctors of one hospital.

The two states are two copies of one database, each served by its own server
process; the same request goes to each in turn, ``--runs`` rounds, so both see
the same machine load. On PostgreSQL (``run_foreign_pg``, part of the bench's
PostgreSQL rows) a copy is another database with its own epoch, where the
device's cursors would reset: the quiet rounds run first, then the foreign
writes go into the same database, then the busy rounds (``--postgres``: that run
alone, on a throwaway cluster; ``--doctors 300000`` gives each hospital 3,000
doctors, a scope of many pinned keys). Reported: the median
and minimum ms of a request over real HTTP (the request, the server's reading
and encoding, the response read whole) and the server's CPU ms per request.
The target is busy/quiet <= 1.5. Prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.env import TOKEN, UNIT, ensure_paths
from bench.serverproc import ServerProcess

HOSPITALS = 100


class _Postgres:
    """A psycopg connection that takes this module's SQLite-style statements."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url.replace("+psycopg", ""), autocommit=True)

    @staticmethod
    def _sql(sql: str) -> Any:
        return "BEGIN" if sql == "BEGIN IMMEDIATE" else sql.replace("?", "%s")

    def execute(self, sql: str, params: Any = ()) -> Any:
        return self.conn.execute(self._sql(sql), params or None)

    def executemany(self, sql: str, seq: Any) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(self._sql(sql), seq)

    def close(self) -> None:
        self.conn.close()


def _connect(db: Path | str) -> Any:
    """A SQLite file, or a PostgreSQL URL (``bench.pgserver``)."""
    if isinstance(db, str):
        return _Postgres(db)
    return sqlite3.connect(db, isolation_level=None, timeout=30)


def build(db: Path | str, appointments: int, doctors: int) -> None:
    ensure_paths()
    from hospital.generate import generate
    from hospital.server import build as build_server

    server = build_server(db if isinstance(db, str) else f"sqlite:///{db}")
    generate(server.store.engine, appointments=appointments, hospitals=HOSPITALS, doctors=doctors)
    server.store.engine.dispose()


def _ids(conn: Any, sql: str, *params: Any) -> list[Any]:
    return [r[0] for r in conn.execute(sql, params)]


def change_mine(db: Path | str, count: int, rng: random.Random) -> list[str]:
    """Update ``count`` appointments of hospital 1 (the measured device's scope)."""
    conn = _connect(db)
    try:
        mine = _ids(
            conn,
            "SELECT a.id FROM appointment a JOIN doctor d ON d.id = a.doctor_id"
            " WHERE d.hospital_id = 1 ORDER BY a.id",
        )
        picked = rng.sample(mine, count)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE appointment SET notes = ? WHERE id = ?",
            [(f"changed {rng.random()}", k) for k in picked],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return picked


def foreign_writes(db: Path | str, count: int, rng: random.Random) -> dict[str, int]:
    """``count`` writes in hospitals 2..100, each its own row version, in batches."""
    conn = _connect(db)
    kinds = {"update": 0, "insert": 0, "delete": 0, "move": 0}
    try:
        doctors: dict[int, list[int]] = {}
        for d, h in conn.execute("SELECT id, hospital_id FROM doctor WHERE hospital_id != 1"):
            doctors.setdefault(h, []).append(d)
        theirs = _ids(
            conn,
            "SELECT a.id FROM appointment a JOIN doctor d ON d.id = a.doctor_id"
            " WHERE d.hospital_id != 1",
        )
        doctor_of = dict(
            conn.execute(
                "SELECT a.id, d.hospital_id FROM appointment a JOIN doctor d"
                " ON d.id = a.doctor_id WHERE d.hospital_id != 1"
            ).fetchall()
        )
        done = 0
        while done < count:
            conn.execute("BEGIN IMMEDIATE")
            for _ in range(min(1000, count - done)):
                roll = rng.random()
                key = theirs[rng.randrange(len(theirs))]
                if roll < 0.8:
                    conn.execute("UPDATE appointment SET notes = ? WHERE id = ?", (str(roll), key))
                    kinds["update"] += 1
                elif roll < 0.9:
                    h = rng.choice(list(doctors))
                    new = str(uuid.uuid4())
                    conn.execute(
                        "INSERT INTO appointment (id, doctor_id, patient_id, starts_at, ends_at,"
                        " status, room, notes) VALUES (?, ?, 1, '2030-01-01 09:00:00.000000',"
                        " '2030-01-01 09:15:00.000000', 'booked', 'R1', '')",
                        (new, rng.choice(doctors[h])),
                    )
                    theirs.append(new)
                    doctor_of[new] = h
                    kinds["insert"] += 1
                elif roll < 0.95:
                    conn.execute("DELETE FROM appointment WHERE id = ?", (key,))
                    kinds["delete"] += 1
                else:
                    h = doctor_of.get(key, 2)
                    conn.execute(
                        "UPDATE appointment SET doctor_id = ? WHERE id = ?",
                        (rng.choice(doctors[h]), key),
                    )
                    kinds["move"] += 1
                done += 1
            conn.execute("COMMIT")
    finally:
        conn.close()
    return kinds


def _request(cursors: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    from syncunit.protocol import PROTOCOL_VERSION, SyncRequest, content_type, encode_request

    body = encode_request(
        SyncRequest(protocol=PROTOCOL_VERSION, client_id="bench-foreign", cursors=cursors),
        "msgpack",
    )
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": content_type("msgpack"),
        "Accept": content_type("msgpack"),
    }
    return body, headers


def _rows(content: bytes) -> int:
    from syncunit.protocol import Chunk, FrameDecoder

    frames = FrameDecoder("msgpack").feed(content)
    return sum(f.row_count() + len(f.removed) for f in frames if isinstance(f, Chunk))


def timed_deltas(
    servers: dict[str, ServerProcess], cursors: dict[str, str], runs: int
) -> dict[str, Any]:
    """The same sync request sent to each server in turn, ``runs`` rounds (after one to
    warm up): both see the same machine load. Median and minimum ms, server CPU ms."""
    body, headers = _request(cursors)
    times: dict[str, list[float]] = {name: [] for name in servers}
    cpu: dict[str, float] = dict.fromkeys(servers, 0.0)
    rows: dict[str, int] = {}
    clients = {name: httpx.Client(base_url=s.url, timeout=60) for name, s in servers.items()}
    try:
        for i in range(runs + 1):
            for name, http in clients.items():
                cpu0 = servers[name].cpu()
                started = time.perf_counter()
                r = http.post(f"/v1/sync/{UNIT}", content=body, headers=headers)
                elapsed = (time.perf_counter() - started) * 1000
                r.raise_for_status()
                if i:
                    times[name].append(elapsed)
                    cpu[name] += servers[name].cpu() - cpu0
                rows[name] = _rows(r.content)
    finally:
        for http in clients.values():
            http.close()
    return {
        name: {
            "ms": round(statistics.median(t), 2),
            "min_ms": round(min(t), 2),
            "server_cpu_ms": round(cpu[name] * 1000 / runs, 2),
            "rows": rows[name],
        }
        for name, t in times.items()
    }


def _copy(src: Path, dst: Path) -> None:
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def run_foreign(
    *,
    appointments: int = 100_000,
    doctors: int = 1_000,
    foreign: int = 50_000,
    changes: int = 10,
    runs: int = 15,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """The quiet and busy deltas of hospital 1; the report as a dict (``error`` if wrong)."""
    ensure_paths()
    from syncunit.client import SyncClient

    rng = random.Random(8)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        quiet_db, busy_db = Path(tmp) / "quiet.sqlite", Path(tmp) / "busy.sqlite"
        started = time.perf_counter()
        build(quiet_db, appointments, doctors)
        report: dict[str, Any] = {
            "hospitals": HOSPITALS,
            "appointments": appointments,
            "build_s": round(time.perf_counter() - started, 1),
        }
        with (
            ServerProcess(quiet_db) as server,
            SyncClient(server.url, Path(tmp) / "device.sqlite", token=TOKEN) as device,
        ):
            device.sync(UNIT)
            names = [s for u in device.catalog().units if u.name == UNIT for s in u.streams]
            cursors = device.store.cursors(names)
        change_mine(quiet_db, changes, rng)
        _copy(quiet_db, busy_db)  # the same database (epoch, versions) from here on
        started = time.perf_counter()
        report["foreign_writes"] = foreign_writes(busy_db, foreign, rng)
        report["foreign_write_s"] = round(time.perf_counter() - started, 1)
        with ServerProcess(quiet_db) as quiet, ServerProcess(busy_db) as busy:
            result = timed_deltas({"quiet": quiet, "busy": busy}, cursors, runs)
        report.update(result)
        report["ratio"] = round(result["busy"]["ms"] / result["quiet"]["ms"], 2)
        report["cpu_ratio"] = round(
            result["busy"]["server_cpu_ms"] / max(result["quiet"]["server_cpu_ms"], 0.01), 2
        )
        rows_q, rows_b = result["quiet"]["rows"], result["busy"]["rows"]
    if rows_q != changes or rows_b != changes:
        report["error"] = f"the deltas brought {rows_q} and {rows_b} rows, not {changes}"
    return report


def run_foreign_pg(
    pg: Any,
    *,
    appointments: int = 100_000,
    doctors: int = 1_000,
    foreign: int = 50_000,
    changes: int = 10,
    runs: int = 15,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """The same figure with the server on PostgreSQL (``pg``: a ``PostgresDatasets``):
    quiet rounds, then the foreign writes into the same database, then busy rounds."""
    ensure_paths()
    from syncunit.client import SyncClient

    rng = random.Random(8)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        pg.sql('CREATE DATABASE "scope_churn"')
        url = pg.url("scope_churn")
        started = time.perf_counter()
        build(url, appointments, doctors)
        pg.sql("VACUUM ANALYZE", "scope_churn")
        report: dict[str, Any] = {
            "hospitals": HOSPITALS,
            "appointments": appointments,
            "build_s": round(time.perf_counter() - started, 1),
            "order": "quiet rounds, then the foreign writes, then busy rounds (one database)",
        }
        with ServerProcess(url, log=Path(tmp) / "server.log") as server:
            with SyncClient(server.url, Path(tmp) / "device.sqlite", token=TOKEN) as device:
                device.sync(UNIT)
                names = [s for u in device.catalog().units if u.name == UNIT for s in u.streams]
                cursors = device.store.cursors(names)
            change_mine(url, changes, rng)
            result = timed_deltas({"quiet": server}, cursors, runs)
            started = time.perf_counter()
            report["foreign_writes"] = foreign_writes(url, foreign, rng)
            report["foreign_write_s"] = round(time.perf_counter() - started, 1)
            result.update(timed_deltas({"busy": server}, cursors, runs))
            # Right after a burst of writes the planner's statistics are stale until
            # autovacuum analyzes the tables (its naptime is a minute): both figures.
            pg.sql("ANALYZE", "scope_churn")
            result.update(timed_deltas({"busy_analyzed": server}, cursors, runs))
        pg.drop(url)
    report.update(result)
    report["ratio_analyzed"] = round(result["busy_analyzed"]["ms"] / result["quiet"]["ms"], 2)
    report["ratio"] = round(result["busy"]["ms"] / result["quiet"]["ms"], 2)
    report["cpu_ratio"] = round(
        result["busy"]["server_cpu_ms"] / max(result["quiet"]["server_cpu_ms"], 0.01), 2
    )
    rows_q, rows_b = result["quiet"]["rows"], result["busy"]["rows"]
    if rows_q != changes or rows_b != changes or result["busy_analyzed"]["rows"] != changes:
        report["error"] = f"the deltas brought {rows_q} and {rows_b} rows, not {changes}"
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appointments", type=int, default=100_000)
    parser.add_argument("--doctors", type=int, default=1_000)
    parser.add_argument("--foreign", type=int, default=50_000)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--postgres", action="store_true", help="the server on a throwaway PostgreSQL"
    )
    args = parser.parse_args(argv)
    sizes = {
        "appointments": args.appointments,
        "doctors": args.doctors,
        "foreign": args.foreign,
        "changes": args.changes,
        "runs": args.runs,
        "workdir": args.workdir,
    }
    if args.postgres:
        from bench.pgserver import PostgresDatasets

        with PostgresDatasets(args.workdir) as pg:
            report = run_foreign_pg(pg, **sizes)
    else:
        report = run_foreign(**sizes)
    print(json.dumps(report, indent=2))
    if "error" in report:
        print(f"error: {report['error']}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
