"""A backoffice that edits the server database with plain SQL, not through syncunit.

Its changes are tracked all the same (by triggers), and reach devices as deltas:
rescheduled and renamed rows change, cancelled (deleted) and reassigned rows
leave the devices that had them.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass


@dataclass
class BackofficeReport:
    rescheduled: list[str]
    cancelled: list[str]
    reassigned: list[str]
    renamed_doctor: int
    renamed_rows: int


def run_backoffice(db_path: str, hospital_id: int, *, count: int = 20) -> BackofficeReport:
    """Reschedule, cancel and reassign ``count`` appointments each; rename one doctor."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        scope = [
            r[0]
            for r in conn.execute(
                "SELECT a.id FROM appointment a JOIN doctor d ON d.id = a.doctor_id"
                " WHERE d.hospital_id = ? ORDER BY a.id LIMIT ?",
                (hospital_id, count * 3),
            )
        ]
        resched, cancel, move = scope[:count], scope[count : 2 * count], scope[2 * count :]
        later = (dt.datetime(2026, 1, 5) + dt.timedelta(days=400)).isoformat(sep=" ")
        conn.executemany(
            "UPDATE appointment SET starts_at = ?, notes = 'rescheduled by backoffice'"
            " WHERE id = ?",
            [(later, a) for a in resched],
        )
        conn.executemany("DELETE FROM appointment WHERE id = ?", [(a,) for a in cancel])
        other = conn.execute(
            "SELECT id FROM doctor WHERE hospital_id != ? ORDER BY id LIMIT 1", (hospital_id,)
        ).fetchone()[0]
        conn.executemany(
            "UPDATE appointment SET doctor_id = ? WHERE id = ?", [(other, a) for a in move]
        )
        doctor_id, name = conn.execute(
            "SELECT id, name FROM doctor WHERE hospital_id = ? ORDER BY id LIMIT 1",
            (hospital_id,),
        ).fetchone()
        conn.execute("UPDATE doctor SET name = ? WHERE id = ?", (name + " (renamed)", doctor_id))
        rows = conn.execute(
            "SELECT count(*) FROM appointment WHERE doctor_id = ?", (doctor_id,)
        ).fetchone()[0]
        conn.execute("COMMIT")
    finally:
        conn.close()
    return BackofficeReport(resched, cancel, move, doctor_id, rows)
