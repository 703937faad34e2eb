"""Deltas pay for the client's changes, not everyone's: 50,000 foreign writes.

``python -m bench.foreign`` builds a hospital database with 100 hospitals,
serves it (``bench.serverproc``), gives hospital 1's device its first copy,
then times one 10-row delta of hospital 1 twice, from the same cursor:

* **quiet**: only the 10 changes in scope happened since the cursor;
* **busy**: the same 10, plus ``--foreign`` writes (default 50,000) in the
  other 99 hospitals: note updates, bookings, cancellations (deletes) and
  appointments moved between doctors of one hospital.

Each is the median of ``--runs`` requests over real HTTP (the request, the
server's reading and encoding, the response read whole). The target is
busy/quiet <= 1.5. Prints a JSON report.
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


def build(db: Path, appointments: int, doctors: int) -> None:
    ensure_paths()
    from hospital.generate import generate
    from hospital.server import build as build_server

    server = build_server(f"sqlite:///{db}")
    generate(server.store.engine, appointments=appointments, hospitals=HOSPITALS, doctors=doctors)
    server.store.engine.dispose()


def _ids(conn: sqlite3.Connection, sql: str, *params: Any) -> list[Any]:
    return [r[0] for r in conn.execute(sql, params)]


def change_mine(db: Path, count: int, rng: random.Random) -> list[str]:
    """Update ``count`` appointments of hospital 1 (the measured device's scope)."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        mine = _ids(
            conn,
            "SELECT a.id FROM appointment a JOIN doctor d ON d.id = a.doctor_id"
            " WHERE d.hospital_id = 1",
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


def foreign_writes(db: Path, count: int, rng: random.Random) -> dict[str, int]:
    """``count`` writes in hospitals 2..100, each its own row version, in batches."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
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


def timed_delta(url: str, cursors: dict[str, str], runs: int) -> tuple[float, int, list[float]]:
    """Median ms of ``runs`` identical sync requests from ``cursors``; rows received."""
    from syncunit.protocol import (
        PROTOCOL_VERSION,
        Chunk,
        FrameDecoder,
        SyncRequest,
        content_type,
        encode_request,
    )

    body = encode_request(
        SyncRequest(protocol=PROTOCOL_VERSION, client_id="bench-foreign", cursors=cursors),
        "msgpack",
    )
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": content_type("msgpack"),
        "Accept": content_type("msgpack"),
    }
    times: list[float] = []
    rows = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(runs + 1):  # the first one warms the server's caches
            started = time.perf_counter()
            r = http.post(f"/v1/sync/{UNIT}", content=body, headers=headers)
            elapsed = time.perf_counter() - started
            r.raise_for_status()
            frames = FrameDecoder("msgpack").feed(r.content)
            rows = sum(
                len(f.data[0]) if f.data else 0 for f in frames if isinstance(f, Chunk)
            ) + sum(len(f.removed) for f in frames if isinstance(f, Chunk))
            times.append(elapsed * 1000)
    return statistics.median(times[1:]), rows, [round(t, 1) for t in times[1:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appointments", type=int, default=100_000)
    parser.add_argument("--doctors", type=int, default=1_000)
    parser.add_argument("--foreign", type=int, default=50_000)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    ensure_paths()
    from syncunit.client import SyncClient

    rng = random.Random(8)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        db = Path(tmp) / "server.sqlite"
        started = time.perf_counter()
        build(db, args.appointments, args.doctors)
        report: dict[str, Any] = {
            "hospitals": HOSPITALS,
            "appointments": args.appointments,
            "build_s": round(time.perf_counter() - started, 1),
        }
        with ServerProcess(db) as server:
            with SyncClient(server.url, Path(tmp) / "device.sqlite", token=TOKEN) as device:
                device.sync(UNIT)
                catalog = device.catalog()
                names = [s for u in catalog.units if u.name == UNIT for s in u.streams]
                cursors = device.store.cursors(names)
            change_mine(db, args.changes, rng)
            quiet, rows_q, runs_q = timed_delta(server.url, cursors, args.runs)
            started = time.perf_counter()
            report["foreign_writes"] = foreign_writes(db, args.foreign, rng)
            report["foreign_write_s"] = round(time.perf_counter() - started, 1)
            busy, rows_b, runs_b = timed_delta(server.url, cursors, args.runs)
        report.update(
            quiet_ms=round(quiet, 2),
            busy_ms=round(busy, 2),
            ratio=round(busy / quiet, 2),
            rows=[rows_q, rows_b],
            quiet_runs_ms=runs_q,
            busy_runs_ms=runs_b,
        )
    print(json.dumps(report, indent=2))
    if rows_q != args.changes or rows_b != args.changes:
        print(f"error: the deltas brought {rows_q} and {rows_b} rows, not {args.changes}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
