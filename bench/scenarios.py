"""The measured scenarios, each returning a JSON-ready dict.

A server (``ServerProcess``) serves a private copy of a cached database; the
initial syncs run in fresh client processes (``run_client``) so each one's
peak memory is its own; deltas, the anti-pattern and the push run a client in
this process against the same server.
"""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import bounds
from bench.clientproc import run_client
from bench.env import STREAM_TABLE, TOKEN, UNIT
from bench.serverproc import ServerProcess

Log = Callable[[str], None]
PUSH_UNIT = "SendAppointments"
KINTO_COLUMNS = {"specialty": "specialty_name", "hospital": "hospital_name"}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def rate(n: int, seconds: float) -> float | None:
    return round(n / seconds, 1) if seconds > 0 else None


# -- initial sync ---------------------------------------------------------------------


def initial_sync(server: ServerProcess, db: Path, chunk_size: int | None) -> dict[str, Any]:
    """One initial sync from an empty device, in a fresh process."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    cpu0 = server.cpu()
    out = run_client(server.url, db, chunk_size=chunk_size)
    server_cpu = server.cpu() - cpu0
    res = out["result"]
    rows = sum(res["rows_in"].values())
    seconds = res["seconds"]
    return {
        "rows": rows,
        "appointments": res["rows_in"].get(STREAM_TABLE, 0),
        "seconds": seconds,
        "rows_per_s": rate(rows, seconds),
        "bytes": res["bytes_in"],
        "bytes_per_row": round(res["bytes_in"] / rows, 2) if rows else None,
        "chunk_size": chunk_size,
        "client_peak_rss_mb": out["peak_rss_mb"],
        "client_base_rss_mb": out["base_rss_mb"],
        "stream_start_s": out["stream_start_s"],
        "first_rows_s": out["first_rows_s"],
        "client_cpu_s": out["cpu_seconds"],
        "server_cpu_s": round(server_cpu, 3),
    }


def initial_runs(
    server: ServerProcess,
    workdir: Path,
    n: int,
    chunk_size: int | None,
    repeats: int,
    log: Log,
    limit: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """``repeats`` initial syncs of ``n`` rows; the median run, plus every run's time.

    With ``limit`` (the SQLite write limit's seconds on the same rows), each sync is
    followed at once by a limit run: ``limit_pairs`` holds both times and their
    ratio per round, and ``limit_pair_ratio_median`` the median ratio (the limit's
    seconds over the sync's: the sync's share of the limit, as ``initial_vs_limit``).
    """
    runs = []
    pairs = []
    for i in range(repeats):
        run = initial_sync(server, workdir / f"device-{n}.sqlite", chunk_size)
        note = ""
        if limit is not None:
            lim = limit()
            pairs.append(
                {
                    "sync_s": run["seconds"],
                    "limit_s": round(lim, 4),
                    "ratio": round(lim / run["seconds"], 3),
                }
            )
            note = f", limit right after {lim:.3f}s: ratio {pairs[-1]['ratio']}"
        log(
            f"  initial {n:,} #{i + 1}: {run['rows_per_s']:,.0f} rows/s, "
            f"{run['client_peak_rss_mb']} MB peak{note}"
        )
        runs.append(run)
    best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    out = {**best, "runs_seconds": [r["seconds"] for r in runs]}
    if pairs:
        out["limit_pairs"] = pairs
        out["limit_pair_ratio_median"] = round(median([p["ratio"] for p in pairs]), 3)
    return out


def limit_probe(server_db: Path, workdir: Path, chunk_size: int) -> Callable[[], float]:
    """The SQLite write limit on ``server_db``'s headline rows, as a function to time
    again and again (its rows recorded once, now, from the database as it is)."""
    columns, rows = bounds.stored_rows(bounds.server_encode(server_db, chunk_size))

    def run() -> float:
        db = workdir / "pair-limit.sqlite"
        try:
            seconds: float = bounds.sqlite_limit(columns, rows, db)["seconds"]
        finally:
            bounds._fresh(db)
        return seconds

    return run


def chunk_sweep(
    server: ServerProcess, workdir: Path, sizes: Sequence[int], repeats: int, log: Log
) -> dict[str, Any]:
    """Initial sync at each chunk size: the curve, and the fastest size."""
    curve = []
    for size in sizes:
        runs = [initial_sync(server, workdir / "sweep.sqlite", size) for _ in range(repeats)]
        seconds = median([r["seconds"] for r in runs])
        row = {
            "chunk_size": size,
            "seconds": round(seconds, 4),
            "rows_per_s": rate(runs[0]["rows"], seconds),
            "bytes": runs[0]["bytes"],
            "client_peak_rss_mb": max(r["client_peak_rss_mb"] for r in runs),
        }
        log(f"  chunk {size}: {row['rows_per_s']:,.0f} rows/s, {row['client_peak_rss_mb']} MB")
        curve.append(row)
    best = max(curve, key=lambda r: r["rows_per_s"] or 0)
    return {"rows": runs[0]["rows"], "curve": curve, "best_chunk_size": best["chunk_size"]}


# -- delta ------------------------------------------------------------------------------


def change_appointments(
    server_db: Path | str, count: int, rng: random.Random, tag: str
) -> list[str]:
    """Update ``count`` in-scope appointments with plain SQL, as a backoffice would.

    ``server_db`` is a SQLite file or a PostgreSQL URL (``bench.pgserver``).
    """
    if isinstance(server_db, str):
        return _change_appointments_pg(server_db, count, rng, tag)
    conn = sqlite3.connect(server_db, isolation_level=None, timeout=30)
    try:
        high = conn.execute("SELECT max(rowid) FROM appointment").fetchone()[0]
        ids: list[str] = []
        while len(ids) < count:
            picks = rng.sample(range(1, high + 1), min(high, 2 * (count - len(ids))))
            marks = ",".join("?" * len(picks))
            found = conn.execute(f"SELECT id FROM appointment WHERE rowid IN ({marks})", picks)
            ids = list(dict.fromkeys([*ids, *(r[0] for r in found)]))[:count]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE appointment SET notes = ?, room = ? WHERE id = ?",
            [(f"changed {tag} {i}", f"R{rng.randint(1, 40)}", a) for i, a in enumerate(ids)],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return ids


def _change_appointments_pg(url: str, count: int, rng: random.Random, tag: str) -> list[str]:
    import psycopg

    with psycopg.connect(url.replace("+psycopg", ""), autocommit=False) as conn:
        conn.execute("SELECT setseed(%s)", (rng.random() * 2 - 1,))
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM appointment ORDER BY random() LIMIT %s", (count,)
            ).fetchall()
        ]
        conn.commit()
        with conn.cursor() as cur:
            cur.executemany(
                "UPDATE appointment SET notes = %s, room = %s WHERE id = %s",
                [(f"changed {tag} {i}", f"R{rng.randint(1, 40)}", a) for i, a in enumerate(ids)],
            )
        conn.commit()
    return ids


def delta_runs(
    server: ServerProcess,
    server_db: Path | str,
    device_db: Path,
    changes: int,
    runs: int,
    chunk_size: int | None,
    seed: int = 1,
) -> dict[str, Any]:
    """``runs`` deltas of ``changes`` rows each, after an initial sync into ``device_db``."""
    return delta_rounds([(server, server_db, device_db)], changes, runs, chunk_size, seed)[0]


def delta_rounds(
    targets: Sequence[tuple[ServerProcess, Path | str, Path]],
    changes: int,
    runs: int,
    chunk_size: int | None,
    seed: int = 1,
) -> list[dict[str, Any]]:
    """``runs`` rounds of one delta per (server, its database, device), in turn.

    With several targets (tables of different sizes) each round measures them back
    to back, so a drift of the machine's speed over minutes touches every size
    alike: ``pair_ratios`` are the second target's delta over the first's, round
    by round.
    """
    from syncunit.client import SyncClient

    rng = random.Random(seed)
    clients = [
        SyncClient(server.url, device, token=TOKEN, chunk_size=chunk_size)
        for server, _, device in targets
    ]
    try:
        idle = [c.sync(UNIT) for c in clients]  # nothing changed: the cost of asking
        times: list[list[float]] = [[] for _ in targets]
        sizes: list[list[int]] = [[] for _ in targets]
        cpu: list[list[float]] = [[] for _ in targets]
        for i in range(runs):
            for k, (server, server_db, _) in enumerate(targets):
                client = clients[k]
                change_appointments(server_db, changes, rng, f"{seed}.{i}")
                cpu0 = server.cpu()
                res = client.sync(UNIT)
                cpu[k].append(server.cpu() - cpu0)
                got = res.rows_in.get(STREAM_TABLE, 0)
                if got != changes:
                    raise RuntimeError(f"delta brought {got} appointments, expected {changes}")
                times[k].append(res.seconds)
                sizes[k].append(res.bytes_in)
    finally:
        for c in clients:
            c.close()
    out = []
    for k in range(len(targets)):
        seconds = median(times[k])
        out.append(
            {
                "changes": changes,
                "seconds": round(seconds, 5),
                "ms": round(seconds * 1000, 2),
                "bytes": int(median(sizes[k])),
                "runs_ms": [round(t * 1000, 2) for t in times[k]],
                "server_cpu_ms": round(median(cpu[k]) * 1000, 1),
                # The clock ticks of /proc are 10 ms: the mean over the runs resolves finer.
                "server_cpu_ms_mean": round(sum(cpu[k]) / len(cpu[k]) * 1000, 2),
                "no_change_ms": round(idle[k].seconds * 1000, 2),
                "no_change_bytes": idle[k].bytes_in,
            }
        )
    if len(targets) == 2:
        ratios = [b / a for a, b in zip(times[0], times[1], strict=True)]
        out[1]["pair_ratios"] = [round(r, 3) for r in ratios]
        out[1]["pair_ratio_median"] = round(median(ratios), 3)
    return out


# -- the anti-pattern -------------------------------------------------------------------


def delete_all_create_all(
    server: ServerProcess, device_db: Path, chunk_size: int | None
) -> dict[str, Any]:
    """Drop what the device has of the scope and download all of it again.

    The appointments cursor is made unreadable, so the server resets the
    stream: the client empties the local table in the first chunk's
    transaction (the engine's own write: nothing reaches the outbox) and
    receives every row again, as a delete-all/create-all sync would.
    """
    from syncunit.client import SyncClient

    with SyncClient(server.url, device_db, token=TOKEN, chunk_size=chunk_size) as client:
        with client.store.atomic() as conn:
            conn.execute(
                "UPDATE syncunit_cursors SET cursor = 'forgotten' WHERE local_table = ?",
                (STREAM_TABLE,),
            )
        res = client.sync(UNIT)
    if not res.resets:
        raise RuntimeError("the server did not reset the stream")
    return {
        "rows": res.total_in,
        "removed": res.total_removed,
        "seconds": round(res.seconds, 4),
        "bytes": res.bytes_in,
    }


# -- push -------------------------------------------------------------------------------


def push(
    server: ServerProcess, device_db: Path, mutations: int, *, taken: bool = False
) -> dict[str, Any]:
    """Insert ``mutations`` rows locally with plain SQL, then push them in one unit run.

    ``taken``: the rows book the slots the first push of this device booked, so the
    double-booking rule refuses them all (a device back from long offline work).

    Returns ``mutations_per_s`` None with a note when the server has no push
    unit or the client no outbox.
    """
    from syncunit.client import SyncClient
    from syncunit.errors import SyncUnitError, UnknownUnitError

    out: dict[str, Any] = {"mutations": mutations, "unit": PUSH_UNIT, "mutations_per_s": None}
    try:
        with SyncClient(server.url, device_db, token=TOKEN) as client:
            catalog = client.catalog(refresh=True)
            if catalog.unit(PUSH_UNIT) is None:
                out["note"] = f"the server has no {PUSH_UNIT!r} unit yet"
                return out
            conn = client.store.conn
            outboxes = [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%outbox%'"
                )
            ]
            if not outboxes:
                out["note"] = "the client has no outbox table yet"
                return out
            t0 = time.perf_counter()
            _insert_local_appointments(client.store, mutations, taken=taken)
            out["local_insert_s"] = round(time.perf_counter() - t0, 4)
            pending = conn.execute(f'SELECT count(*) FROM "{outboxes[0]}"').fetchone()[0]
            server_cpu, client_cpu = server.cpu(), time.process_time()
            res = client.sync(PUSH_UNIT)
            # CPU seconds of both sides: a figure other processes on the machine skew less.
            server_cpu = server.cpu() - server_cpu
            client_cpu = time.process_time() - client_cpu
            out["server_cpu_s"] = round(server_cpu, 3)
            out["client_cpu_s"] = round(client_cpu, 3)
            out["mutations_per_cpu_s"] = rate(mutations, server_cpu + client_cpu)
            out.update(
                {
                    "outbox_rows_before": pending,
                    "seconds": round(res.seconds, 4),
                    "mutations_per_s": rate(mutations, res.seconds),
                    "applied": res.applied,
                    "conflicts": len(res.conflicts),
                    "rejected": len(res.rejected),
                    "bytes_out": res.bytes_out,
                    "bytes_in": res.bytes_in,
                    "requests": res.requests,
                }
            )
            if res.applied != mutations and not taken:
                out["note"] = f"{res.applied} of {mutations} mutations were applied"
    except UnknownUnitError as exc:
        out["note"] = f"unknown unit: {exc}"
    except SyncUnitError as exc:
        out["note"] = f"push failed: {type(exc).__name__}: {exc}"
    return out


def push_runs(
    server: ServerProcess, device_db: Path, mutations: int, repeats: int
) -> dict[str, Any]:
    """``push`` ``repeats`` times in a row on the same server and device (each adds
    ``mutations`` rows to both); the median run by rate, plus every run's rate.

    A push takes half a second: one run is at the mercy of the machine's moment.
    """
    runs = [push(server, device_db, mutations) for _ in range(repeats)]
    rated = [r for r in runs if r.get("mutations_per_s") is not None]
    if len(rated) != len(runs):
        return next(r for r in runs if r.get("mutations_per_s") is None)
    best = sorted(rated, key=lambda r: r["mutations_per_s"])[len(rated) // 2]
    return {**best, "runs_mutations_per_s": [r["mutations_per_s"] for r in runs]}


def _insert_local_appointments(store: Any, count: int, *, taken: bool = False) -> None:
    """New appointments in free future slots, written as an app would: plain SQL.

    The slots start after every appointment the device holds, so a push after
    another one books free slots too; ``taken`` books the first push's slots again.
    """
    from syncunit.ids import uuid7

    conn = store.conn
    doctors = [r[0] for r in conn.execute('SELECT id FROM "LocalDoctor" ORDER BY id')]
    patients = [
        r[0] for r in conn.execute(f'SELECT DISTINCT patient_id FROM "{STREAM_TABLE}" LIMIT 1000')
    ] or [1]
    first = dt.datetime(2031, 1, 6, 8, 0)
    (latest,) = conn.execute(f'SELECT max(ends_at) FROM "{STREAM_TABLE}"').fetchone()
    if latest is not None and not taken:
        first = max(first, dt.datetime.fromisoformat(latest).replace(tzinfo=None, microsecond=0))
    rows = []
    for i in range(count):
        start = first + dt.timedelta(minutes=15 * (i // len(doctors)))
        end = start + dt.timedelta(minutes=15)
        rows.append(
            (
                uuid7(),
                doctors[i % len(doctors)],
                patients[i % len(patients)],
                start.isoformat(),
                end.isoformat(),
                "booked",
                f"R{i % 40 + 1}",
                "booked on the device",
            )
        )
    with store.atomic() as c:
        c.executemany(
            f'INSERT INTO "{STREAM_TABLE}" (id, doctor_id, patient_id, starts_at, ends_at,'
            " status, room, notes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


# -- bounds -----------------------------------------------------------------------------


def limits(
    server_db: Path, workdir: Path, chunk_size: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Server read+encode alone, client decode+apply alone, and the SQLite write limit.

    Also returns the rows as dicts in the peer's shape (for Kinto).
    """
    rec = bounds.server_encode(server_db, chunk_size)
    apply = bounds.client_apply(rec, workdir / "apply.sqlite")
    columns, rows = bounds.stored_rows(rec)
    limit = bounds.sqlite_limit(columns, rows, workdir / "limit.sqlite")
    upsert = bounds.sqlite_limit(columns, rows, workdir / "limit.sqlite", upsert_sql=True)
    (workdir / "apply.sqlite").unlink(missing_ok=True)
    (workdir / "limit.sqlite").unlink(missing_ok=True)
    keys = [KINTO_COLUMNS.get(c, c) for c in columns]
    records = [{**dict(zip(keys, r, strict=True)), "hospital_id": 1} for r in rows]
    return {
        "chunk_size": chunk_size,
        "server_encode": rec.summary(),
        "client_apply": apply,
        "sqlite_insert": limit,
        "sqlite_upsert": upsert,
    }, records


# -- the peer ---------------------------------------------------------------------------


def peer_changes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The 100 records both peers see changed for their delta (the same ones)."""
    rng = random.Random(3)
    return [
        {**rec, "status": "rescheduled", "notes": f"moved {i}", "room": "R001"}
        for i, rec in enumerate(rng.sample(records, min(100, len(records))))
    ]


def pouchdb(records: list[dict[str, Any]], workdir: Path, log: Log) -> dict[str, Any]:
    """PouchDB replicating from express-pouchdb, or the reason it could not run."""
    try:
        from bench.pouchdb_peer import run_pouchdb_peer

        return run_pouchdb_peer(records, peer_changes(records), workdir=workdir / "pouchdb")
    except Exception as exc:  # the peer is optional: never fail the bench for it
        log(f"  PouchDB could not run: {exc}")
        return {
            "available": False,
            "records": len(records),
            "reason": f"{type(exc).__name__}: {str(exc)[-1500:]}",
        }


def kinto(records: list[dict[str, Any]], workdir: Path, quick: bool, log: Log) -> dict[str, Any]:
    """Kinto 26 on PostgreSQL with the same rows, or the reason it could not run."""
    changes = peer_changes(records)
    try:
        from bench.kinto_peer import run_kinto_peer

        t0 = time.perf_counter()
        out = run_kinto_peer(
            records, changes, workdir=workdir / "kinto", page_sizes=(1000, 5000, 10000), quick=quick
        )
        out["wall_seconds"] = round(time.perf_counter() - t0, 1)
        out["available"] = True
        return out
    except Exception as exc:  # the peer is optional: never fail the bench for it
        log(f"  Kinto could not run: {exc}")
        return {
            "available": False,
            "records": len(records),
            "reason": f"{type(exc).__name__}: {str(exc)[-1500:]}",
        }
