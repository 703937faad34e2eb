"""Random histories: server writes of every kind, interleaved with syncs cut anywhere.

Whatever happens in between, a device that finally syncs without a cut holds
exactly what its streams select on the server now (DESIGN invariants 1, 4, 5
and 7), and a row deleted on the server is not on it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncunit.errors import NetworkError
from tests.support import local_keys

SLOTS = st.integers(0, 10**6)  # picks an existing row by index, modulo the count
DOCTOR = st.integers(0, 9)  # the example data has 10 doctors in 2 hospitals

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), DOCTOR, SLOTS),
        st.tuples(st.just("notes"), SLOTS, SLOTS),
        st.tuples(st.just("reassign"), SLOTS, DOCTOR),
        st.tuples(st.just("delete"), SLOTS, SLOTS),
        st.tuples(st.just("rename"), DOCTOR, SLOTS),
        st.tuples(st.just("move_doctor"), DOCTOR, SLOTS),
        st.tuples(st.just("sync"), st.integers(0, 8), SLOTS),  # cut after n frames; 0: none
    ),
    max_size=14,
)


def _apply(plain_sql: Any, op: tuple[Any, ...], deleted: set[str]) -> None:
    kind, a, b = op
    keys = [r[0] for r in plain_sql("SELECT id FROM appointment ORDER BY id")]
    doctors = [r[0] for r in plain_sql("SELECT id FROM doctor ORDER BY id")]
    key = keys[a % len(keys)] if keys else None
    if kind == "insert":
        start = dt.datetime(2032, 1, 1) + dt.timedelta(minutes=15 * (b % 5000))
        plain_sql(
            "INSERT INTO appointment (id, doctor_id, patient_id, starts_at, ends_at, status,"
            " room, notes) VALUES (?, ?, 3, ?, ?, 'booked', 'R1', '')",
            (str(uuid.uuid4()), doctors[a % len(doctors)], start.isoformat(" "),
             (start + dt.timedelta(minutes=15)).isoformat(" ")),
        )  # fmt: skip
    elif kind == "notes" and key:
        plain_sql("UPDATE appointment SET notes = ? WHERE id = ?", (f"n{b}", key))
    elif kind == "reassign" and key:
        plain_sql(
            "UPDATE appointment SET doctor_id = ? WHERE id = ?", (doctors[b % len(doctors)], key)
        )
    elif kind == "delete" and key:
        plain_sql("DELETE FROM appointment WHERE id = ?", (key,))
        deleted.add(key)
    elif kind == "rename":
        plain_sql(
            "UPDATE doctor SET name = ? WHERE id = ?", (f"Dr. {b}", doctors[a % len(doctors)])
        )
    elif kind == "move_doctor":
        plain_sql(
            "UPDATE doctor SET hospital_id = 3 - hospital_id WHERE id = ?",
            (doctors[a % len(doctors)],),
        )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=OPERATIONS)
def test_any_history_ends_in_sync(server, make_client, tap, plain_sql, in_sync, operations):
    device = make_client(name=f"d{uuid.uuid4().hex[:8]}", transport=tap, chunk_size=7)
    deleted: set[str] = set()
    for op in operations:
        if op[0] != "sync":
            _apply(plain_sql, op, deleted)
            continue
        if op[1]:
            tap.arm(frames=op[1], error=bool(op[2] % 2))
        with contextlib.suppress(NetworkError, httpx.HTTPError):
            device.sync("Login")  # if cut: the applied chunks stay, the next sync resumes
        tap._armed = None
    device.sync("Login")
    in_sync(device)
    assert not deleted & local_keys(device, "LocalAppointment")
