"""The full stream (Splash's summary): replaced whole, and only when it changed.

DESIGN section 2 (delta / full stream): a small aggregate is replaced whole
each time, in one local transaction; an unchanged summary costs no rows. A copy
that a response ended early, or a cut, left part-way is resumed (invariant 7)
and never taken for the whole summary (invariant 1).
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from hospital.generate import generate
from hospital.models import appointment, doctor

from syncunit.errors import NetworkError
from syncunit.protocol import End, Frame
from syncunit.server import SyncServer
from syncunit.server.limits import Limits
from tests.conftest import SIZE
from tests.support import (
    LiveServer,
    TapTransport,
    appointments_of,
    assert_in_sync,
    chunks,
    doctors_of,
    sent_keys,
)


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


# -- a summary split across responses (the server's per-response chunk budget) ---------------


def _two_chunks_a_response(
    make_server: Any, serve: Any, store: Any
) -> tuple[SyncServer, LiveServer]:
    """The hospital server, ending each response after two chunks."""
    server = make_server(limits=Limits(response_chunks=2))
    generate(store.engine, **SIZE)
    return server, serve(server.app)


def _on_first_early_end(tap: TapTransport, act: Any) -> None:
    """Call ``act()`` once, when the first response the server ended early has arrived."""
    done: list[bool] = []

    def on_frame(frame: Frame) -> None:
        if isinstance(frame, End) and not frame.complete and not done:
            done.append(True)
            act()

    tap.on_frame = on_frame


def test_a_summary_split_across_responses_is_resumed_and_arrives_whole(
    make_server, serve, store, make_client, tap
):
    server, live = _two_chunks_a_response(make_server, serve, store)
    device = make_client(url=live.url, chunk_size=1, transport=tap)

    result = device.sync("Splash")

    # Five doctors, two rows a response: the copy went on where each response ended.
    assert result.requests == 3
    assert result.rows_in == {"LocalSummary": 5}
    assert [len(chunks(r, "summary")) for r in tap.responses] == [2, 2, 1]
    assert [c.reset for c in chunks(tap.responses[1], "summary")] == [False, False]
    keys = [k for r in tap.responses for k in sent_keys(r, "summary", "doctor_id")]
    assert sorted(keys) == sorted(doctors_of(store, 1))  # each once
    assert len(_summary(device)) == 5
    assert_in_sync(server, device, "token-h1", "Splash")

    again = device.sync("Splash")
    assert again.rows_in == {"LocalSummary": 0}
    assert len(_summary(device)) == 5


def test_a_cut_in_a_resumed_summary_leaves_it_unswapped_and_the_next_sync_finishes_it(
    make_server, serve, store, make_client, tap
):
    server, live = _two_chunks_a_response(make_server, serve, store)
    device = make_client(url=live.url, chunk_size=1, transport=tap)
    # The second response is cut after its first row of the summary.
    _on_first_early_end(tap, lambda: tap.arm(chunks=("summary", 1)))

    with pytest.raises(NetworkError):
        device.sync("Splash")

    assert tap.cuts == 1
    assert _summary(device) == {}  # three rows came, beside the table: none shown
    result = device.sync("Splash")
    assert result.rows_in == {"LocalSummary": 2}  # the two rows left, from where it stopped
    assert len(_summary(device)) == 5
    assert_in_sync(server, device, "token-h1", "Splash")


def test_a_summary_that_changes_between_responses_is_sent_again_whole(
    make_server, serve, store, make_client, tap
):
    server, live = _two_chunks_a_response(make_server, serve, store)
    device = make_client(url=live.url, chunk_size=1, transport=tap)
    cancelled = appointments_of(store, 1)[0]

    def cancel() -> None:
        with store.write() as conn:
            conn.execute(
                appointment.update().where(appointment.c.id == cancelled).values(status="cancelled")
            )

    _on_first_early_end(tap, cancel)

    result = device.sync("Splash")

    # The rows sent first have another hash now: the copy starts again, from its first row.
    assert chunks(tap.responses[1], "summary")[0].reset
    assert result.rows_in == {"LocalSummary": 7}
    assert len(_summary(device)) == 5
    assert_in_sync(server, device, "token-h1", "Splash")
