"""The full stream (Splash's summary): replaced whole, and only when it changed.

DESIGN section 2 (delta / full stream): a small aggregate is replaced whole
each time, in one local transaction; an unchanged summary costs no rows.
"""

from __future__ import annotations

import sqlalchemy as sa
from hospital.models import appointment, doctor

from tests.support import appointments_of, chunks, doctors_of


def _summary(client):
    return {r[0]: r[1:] for r in client.store.rows("LocalSummary", ["doctor_id", "booked"])}


def _cursor(client):
    return client.store.cursors(["summary"])["summary"]


def test_first_splash_fills_the_summary_in_one_chunk(tapped, tap, in_sync):
    result = tapped.sync("Splash")

    summary = chunks(tap.last, "summary")
    assert len(summary) == 1
    assert summary[0].reset
    assert summary[0].complete
    assert result.rows_in == {"LocalSummary": 5}
    assert sum(b for (b,) in _summary(tapped).values()) == 200
    in_sync(tapped, "Splash")


def test_unchanged_summary_transfers_no_rows_and_keeps_its_cursor(tapped, tap, store, in_sync):
    tapped.sync("Splash")
    cursor = _cursor(tapped)
    # A write the summary does not show (another hospital's notes) changes nothing either.
    with store.write() as conn:
        conn.execute(
            appointment.update()
            .where(appointment.c.id.in_(appointments_of(store, 2)[:10]))
            .values(notes="elsewhere")
        )

    result = tapped.sync("Splash")

    assert result.rows_in == {"LocalSummary": 0}
    assert result.rows_removed == {"LocalSummary": 0}
    assert result.resets == []
    assert all(not c.row_count() and not c.reset for c in chunks(tap.last, "summary"))
    assert _cursor(tapped) == cursor
    in_sync(tapped, "Splash")


def test_cancelled_appointment_changes_the_summary(tapped, tap, store, in_sync):
    tapped.sync("Splash")
    before = _summary(tapped)
    cancelled = appointments_of(store, 1)[0]
    with store.write() as conn:
        conn.execute(
            appointment.update().where(appointment.c.id == cancelled).values(status="cancelled")
        )
        doc = conn.execute(
            sa.select(appointment.c.doctor_id).where(appointment.c.id == cancelled)
        ).scalar_one()

    result = tapped.sync("Splash")

    after = _summary(tapped)
    assert after[doc] == (before[doc][0] - 1,)
    assert {k: v for k, v in after.items() if k != doc} == {
        k: v for k, v in before.items() if k != doc
    }
    assert result.rows_in == {"LocalSummary": 5}  # replaced whole
    assert chunks(tap.last, "summary")[0].reset
    in_sync(tapped, "Splash")


def test_summary_rows_that_disappear_are_removed(tapped, store, in_sync):
    tapped.sync("Splash")
    leaving = doctors_of(store, 1)[0]
    with store.write() as conn:
        conn.execute(doctor.update().where(doctor.c.id == leaving).values(hospital_id=2))

    tapped.sync("Splash")

    assert leaving not in _summary(tapped)
    assert len(_summary(tapped)) == 4
    in_sync(tapped, "Splash")


def test_each_principal_gets_its_own_summary(make_client, in_sync):
    h1 = make_client("token-h1", name="h1")
    h2 = make_client("token-h2", name="h2")
    h1.sync("Splash")
    h2.sync("Splash")
    assert not set(_summary(h1)) & set(_summary(h2))
    in_sync(h1, "Splash", token="token-h1")
    in_sync(h2, "Splash", token="token-h2")
