"""Why keys made on devices are time-ordered: SQLite inserts by key order.

``python -m bench.keys`` writes the 100k-row scope of the hospital example into
an empty local table (the client's columns and indexes, WAL, synchronous=NORMAL)
four ways: time-ordered keys (UUIDv7, as ``syncunit.uuid7`` and the generator
make them) or random UUIDv4 keys, in one transaction or in chunks of 2,000 rows
(one transaction per chunk, as a sync applies them). Prints rows/s.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from bench.bounds import server_encode, stored_rows
from bench.datasets import cached_server_db


def write(db: Path, columns: list[str], rows: list[tuple[Any, ...]], chunk: int) -> float:
    """Rows/s writing ``rows`` into a fresh table at ``db`` in transactions of ``chunk``."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    types = {"doctor_id": "INTEGER", "patient_id": "INTEGER"}
    ddl = ", ".join(
        f'"{c}" {types.get(c, "TEXT")}{" PRIMARY KEY" if c == "id" else ""}' for c in columns
    )
    conn.execute(f"CREATE TABLE t ({ddl})")
    conn.execute("CREATE INDEX t_starts ON t (starts_at)")
    conn.execute("CREATE INDEX t_doctor ON t (doctor_id, starts_at)")
    sql = f"INSERT INTO t ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    started = time.perf_counter()
    for i in range(0, len(rows), chunk):
        conn.execute("BEGIN")
        conn.executemany(sql, rows[i : i + chunk])
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    seconds = time.perf_counter() - started
    conn.close()
    return len(rows) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    args = parser.parse_args(argv)
    server_db, _ = cached_server_db(args.rows)
    columns, ordered = stored_rows(server_encode(server_db, args.chunk))
    k = columns.index("id")
    shuffled = [(*r[:k], str(uuid.uuid4()), *r[k + 1 :]) for r in ordered]
    db = args.workdir / "syncunit-bench-keys.sqlite"
    ways = (("one transaction", len(ordered)), (f"chunks of {args.chunk}", args.chunk))
    for label, chunk in ways:
        for keys, rows in (("time-ordered keys", ordered), ("random UUIDv4 keys", shuffled)):
            print(f"{keys:20s} {label:18s} {write(db, columns, rows, chunk):>10,.0f} rows/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
