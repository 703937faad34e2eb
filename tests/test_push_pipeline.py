"""A push of several batches numbers the next batch while the server applies one.

DESIGN section 5 (exactly once, in order): a batch numbered ahead is in flight
like a batch sent and unanswered; it goes after the one before it, never
before, and a run that fails first leaves both to the next run, which sends
them in order and in bounded requests, each applied once.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from syncunit.errors import NetworkError
from tests.test_push_support import (
    FaultTransport,
    ResponseLost,
    decode_sync_request,
    local_notes,
    write_notes_offline,
)


class WatchingTransport(FaultTransport):
    """Before each push reaches the server, waits (bounded) for the device to number
    the next batch, and records how many changes are in flight then; ``lose_from``:
    the answer to the request starting at that seq is lost (the server applied it)."""

    def __init__(self, device_file: Path, lose_from: int | None = None) -> None:
        super().__init__()
        self.device_file = device_file
        self.lose_from = lose_from
        self.in_flight: list[int] = []

    def _counts(self) -> tuple[int, int]:
        with sqlite3.connect(self.device_file) as conn:
            row = conn.execute(
                "SELECT count(seq), count(*) - count(seq) FROM syncunit_outbox"
            ).fetchone()
        return int(row[0]), int(row[1])

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.startswith("/v1/sync/"):
            return self.inner.handle_request(request)
        request.read()
        sending = len(self._decode(request).mutations)
        if sending:
            deadline = time.monotonic() + 2.0
            in_flight, unsent = self._counts()
            while unsent and in_flight <= sending and time.monotonic() < deadline:
                time.sleep(0.01)
                in_flight, unsent = self._counts()
            self.in_flight.append(in_flight)
        response = self._forward(request)
        first = self.sent[-1].mutations[0].seq if self.sent[-1].mutations else None
        if first is not None and first == self.lose_from:
            self.lose_from = None
            try:
                response.read()
            finally:
                response.close()
            raise ResponseLost("the response was lost on the way back (test)", request=request)
        return response

    @staticmethod
    def _decode(request: httpx.Request) -> Any:
        return decode_sync_request(request)


def _device(notes_app: Any, rows: int, **transport: Any) -> tuple[Any, Any, WatchingTransport]:
    app = notes_app()
    path = app.tmp_path / "device.sqlite"
    watch = WatchingTransport(path, **transport)
    device = app.client(transport=watch, push_batch=50)
    device.sync("Sync")
    write_notes_offline(device, rows)
    return app, device, watch


def test_the_next_batch_is_numbered_while_the_server_applies_this_one(notes_app):
    app, device, watch = _device(notes_app, 120)

    result = device.sync("Sync")

    # In flight when each push left: its own batch and the next one, numbered meanwhile.
    assert watch.in_flight == [100, 70, 20]
    assert watch.mutations_per_request[1:] == [50, 50, 20]
    assert [m.seq for r in watch.sent for m in r.mutations] == list(range(1, 121))
    assert (result.requests, result.applied) == (3, 120)
    assert app.applications() == 120
    assert device.outbox.count() == 0
    assert local_notes(device) == app.rows("u1")


def test_without_the_pipeline_batches_are_numbered_one_after_the_other(notes_app):
    app, device, watch = _device(notes_app, 120)
    device.pipeline = False

    assert device.sync("Sync").applied == 120

    assert watch.in_flight == [50, 50, 20]
    assert app.applications() == 120


def test_a_failed_push_leaves_the_batch_numbered_ahead_to_the_next_run_in_order(notes_app):
    app, device, watch = _device(notes_app, 120, lose_from=51)

    with pytest.raises(NetworkError):
        device.sync("Sync")
    # 51-100 were applied but not answered; 101-120 were numbered ahead and never sent.
    assert [m.seq for r in watch.sent for m in r.mutations] == list(range(1, 101))
    in_flight = device.store.query("SELECT min(seq), max(seq) FROM syncunit_outbox")
    assert in_flight == [(51, 120)]

    result = device.sync("Sync")

    # In order, at most push_batch per request: 51-100 answered from the log, then the rest.
    assert watch.mutations_per_request[1:] == [50, 50, 50, 20]
    sent = [m.seq for r in watch.sent[3:] for m in r.mutations]
    assert sent == list(range(51, 121))
    assert result.applied == 70
    assert [seq for seq, _ in app.logged(device.client_id)] == list(range(1, 121))
    assert app.applications() == 120  # each applied once
    assert device.outbox.count() == 0
    assert local_notes(device) == app.rows("u1")


class OvertakingTransport(FaultTransport):
    """The first push batch is held on the way until the second one has its answer:
    the second overtakes it (a slow route, or another server process applying it)."""

    def __init__(self) -> None:
        super().__init__()
        self.second_answered = threading.Event()
        self.statuses: list[tuple[int, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.startswith("/v1/sync/"):
            return self.inner.handle_request(request)
        request.read()
        mutations = decode_sync_request(request).mutations
        first = mutations[0].seq if mutations else None
        if first == 1 and not self.second_answered.is_set():
            self.second_answered.wait(10)
        response = self._forward(request)
        if first is not None:
            self.statuses.append((first, response.status_code))
        if first is not None and first > 1:
            response.read()
            self.second_answered.set()
        return response


def test_a_batch_that_overtook_the_one_before_it_is_sent_again_after_it(notes_app, monkeypatch):
    """The server holds a batch whose predecessor has not come for PREDECESSOR_WAIT_S,
    then refuses it 409 ``sequence-gap`` (not retryable: a gap the device made would
    never close). A batch sent before the answer to the one ahead of it may be refused
    so when that one is slow on the way or applied by another server process: once
    that answer comes, the device sends it again, and the run ends with all applied."""
    from syncunit.server import push as push_module

    monkeypatch.setattr(push_module, "PREDECESSOR_WAIT_S", 0.2)
    app = notes_app()
    overtaking = OvertakingTransport()
    device = app.client(transport=overtaking, push_batch=50)
    device.sync("Sync")
    write_notes_offline(device, 120)

    result = device.sync("Push")

    assert (51, 409) in overtaking.statuses  # it overtook, and was refused for the gap
    assert result.applied == 120
    assert [seq for seq, _ in app.logged(device.client_id)] == list(range(1, 121))
    assert app.applications() == 120  # each applied once
    assert device.outbox.count() == 0


def test_prepare_sends_the_oldest_in_flight_first_and_at_most_the_limit(notes_app):
    _, device, _ = _device(notes_app, 5)
    catalog = device.store.catalog()
    streams = [s for s in catalog.streams if s.local_table == "LocalNote"]

    ahead = device.outbox.number(streams, 2)
    assert [m.seq for m in ahead] == [1, 2]
    assert [m.seq for m in device.outbox.prepare(streams, 1)] == [1]
    assert [m.seq for m in device.outbox.prepare(streams, 3)] == [1, 2, 3]
    assert [m.seq for m in device.outbox.prepare(streams, 10)] == [1, 2, 3, 4, 5]
    assert device.outbox.number(streams, 10) == []


def test_the_first_batch_is_short_so_the_server_starts_while_the_next_is_numbered(
    notes_app, monkeypatch
):
    from syncunit.client import run

    monkeypatch.setattr(run, "FIRST_PUSH_BATCH", 20)
    app, device, watch = _device(notes_app, 120)

    result = device.sync("Sync")

    assert watch.mutations_per_request[1:] == [20, 50, 50]
    assert watch.in_flight == [70, 100, 50]  # the full batch numbered behind the short one
    assert [m.seq for r in watch.sent for m in r.mutations] == list(range(1, 121))
    assert (result.requests, result.applied) == (3, 120)
    assert app.applications() == 120
    assert local_notes(device) == app.rows("u1")


def test_the_verdicts_are_recorded_without_an_fsync_and_the_numbering_with_one(notes_app):
    """A power cut may lose the recorded verdicts (the server's log gives them again:
    see the failed-push test above), never a numbering: it is on disk before it goes."""
    _, device, _ = _device(notes_app, 120)
    seen: list[str] = []
    device.store.conn.set_trace_callback(seen.append)

    assert device.sync("Sync").applied == 120

    device.store.conn.set_trace_callback(None)

    def level_at(i: int) -> str:
        pragmas = [s for s in seen[:i] if s.startswith("PRAGMA synchronous")]
        return pragmas[-1] if pragmas else "as opened (FULL)"

    removals = [i for i, s in enumerate(seen) if s.startswith("DELETE FROM syncunit_outbox")]
    numberings = [i for i, s in enumerate(seen) if s.startswith("UPDATE syncunit_outbox SET seq")]
    assert len(removals) == len(numberings) == 120
    assert {level_at(i) for i in removals} == {"PRAGMA synchronous=NORMAL"}
    assert "PRAGMA synchronous=NORMAL" not in {level_at(i) for i in numberings}
