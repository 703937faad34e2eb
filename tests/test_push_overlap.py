"""A push-only unit sends the next batch while the answer to this one is read.

DESIGN section 5 (exactly once, in order). A server that queues pushes (its
answers say ``Syncunit-Queues-Pushes: 1``) holds a batch that arrives before the
one it follows until that one is applied, so the client sends each batch as soon
as it is numbered; to any other server, the next batch goes only once the
server has committed this one (its answer's headers came). Either way it is
applied after it, and a failure anywhere leaves every batch in flight to the
next run, which sends them in order, each applied once.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from syncunit.client import run
from syncunit.errors import NetworkError
from syncunit.protocol import QUEUES_PUSHES
from tests.test_push_support import (
    FaultTransport,
    ResponseLost,
    assert_each_applied_once,
    decode_sync_request,
    write_notes_offline,
)

# How long a held answer or push waits for the next batch to leave: a client that
# overlaps them sends it within milliseconds; one that does not never does, and the
# test then fails on the order of the events.
NEXT_BATCH_WAIT = 10.0


class _SlowBody(httpx.SyncByteStream):
    """A response body that starts once ``hold()`` returns (``cut``: then fails) and
    says when it was read whole (``note("read")``) and when it was closed
    (``note("closed")``)."""

    def __init__(
        self, inner: Any, note: Callable[[str], None], cut: bool, hold: Callable[[], None]
    ) -> None:
        self.inner = inner
        self.note = note
        self.cut = cut
        self.hold = hold

    def __iter__(self) -> Iterator[bytes]:
        self.hold()
        if self.cut:
            raise httpx.ReadError("the connection broke (test)")
        yield from self.inner
        self.note("read")

    def close(self) -> None:
        self.note("closed")
        self.inner.close()


class SlowAnswers(FaultTransport):
    """Answers to pushes arrive slowly; ``events`` has ("sent", first seq) when a push
    leaves, ("committed", first seq) when its answer's headers came (the server had
    committed it), ("read", first seq) when its answer was read whole and ("closed",
    first seq) when it was closed. ``lose``: the answer to the push starting at that
    seq is lost (it was applied); ``cut``: that answer's body breaks; ``late``: the
    push starting at that seq reaches the server only once a later push has left
    (and 0.3 s more, for the later one to get there first);
    ``plain``: the answers do not say that the server queues pushes (as from a server
    that does not).

    With ``total`` (the last seq the run pushes), the answer to each push but the last
    starts only once the next push has left (at most ``NEXT_BATCH_WAIT``), so an
    overlap the client makes is seen whatever the machine's load; without it, each
    answer starts 0.3 s late."""

    def __init__(
        self,
        lose: int | None = None,
        cut: int | None = None,
        late: int | None = None,
        plain: bool = False,
        total: int | None = None,
    ) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []
        self.lose = lose
        self.cut = cut
        self.late = late
        self.plain = plain
        self.total = total
        self._changed = threading.Condition()

    def _note(self, event: str, first: int) -> None:
        with self._changed:
            self.events.append((event, first))
            self._changed.notify_all()

    def _wait_for_push_after(self, first: int) -> None:
        """Until a push starting after ``first`` has left (or ``NEXT_BATCH_WAIT``)."""
        with self._changed:
            self._changed.wait_for(
                lambda: any(e == "sent" and s > first for e, s in self.events),
                timeout=NEXT_BATCH_WAIT,
            )

    def _hold_answer(self, first: int, last: int) -> Callable[[], None]:
        if self.total is None or last >= self.total:
            return lambda: time.sleep(0.3)
        return lambda: self._wait_for_push_after(first)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.startswith("/v1/sync/"):
            return self.inner.handle_request(request)
        request.read()
        pushed = decode_sync_request(request).mutations
        if pushed:
            self._note("sent", pushed[0].seq)
            if pushed[0].seq == self.late:
                self._wait_for_push_after(pushed[0].seq)
                time.sleep(0.3)  # and a moment more: the later push reaches the server first
        response = self._forward(request)
        if self.plain:
            del response.headers[QUEUES_PUSHES]
        if not pushed:
            return response
        first = pushed[0].seq
        self._note("committed", first)  # the headers came: the server holds it
        if first == self.lose:
            self.lose = None
            try:
                response.read()
            finally:
                response.close()
            raise ResponseLost("the response was lost on the way back (test)", request=request)
        cut, self.cut = first == self.cut, None if first == self.cut else self.cut
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_SlowBody(
                response.stream,
                lambda e: self._note(e, first),
                cut,
                self._hold_answer(first, pushed[-1].seq),
            ),
        )


def _device(notes_app: Any, rows: int, **transport: Any) -> tuple[Any, Any, SlowAnswers]:
    app = notes_app()
    slow = SlowAnswers(**transport)
    device = app.client(transport=slow, push_batch=50)
    device.sync("Sync")
    write_notes_offline(device, rows)
    return app, device, slow


@pytest.fixture
def short_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "FIRST_PUSH_BATCH", 20)


def _applied_in_order(app: Any, n: int) -> bool:
    """Whether the server applied notes n-0000.. in key order (one request after the
    other: PostgreSQL stamps the rows of a transaction alike)."""
    versions = [app.version(f"n-{i:04d}") for i in range(n)]
    return versions == sorted(versions)


def _assert_overtook(
    app: Any, device: Any, slow: SlowAnswers, result: Any, batches: tuple[int, int], **sizes: int
) -> None:
    """The batch from ``batches[0]`` left before the server had the one from
    ``batches[1]``; every one of ``n`` changes applied once, in order, in ``requests``."""
    overtaking, late = batches
    assert slow.events.index(("sent", overtaking)) < slow.events.index(("committed", late))
    assert (result.requests, result.applied) == (sizes["requests"], sizes["n"])
    assert_each_applied_once(app, device, sizes["n"])
    assert _applied_in_order(app, sizes["n"])


@pytest.mark.usefixtures("short_first")
def test_each_batch_goes_before_the_answer_to_the_one_before_is_read(notes_app):
    app, device, slow = _device(notes_app, 170, total=170)

    result = device.sync("Push")

    assert slow.mutations_per_request[1:] == [20, 50, 50, 50]
    firsts = [1, 21, 71, 121]
    for before, after in itertools.pairwise(firsts):
        assert slow.events.index(("sent", after)) < slow.events.index(("read", before))
    assert [m.seq for r in slow.sent for m in r.mutations] == list(range(1, 171))
    assert (result.requests, result.applied) == (4, 170)
    assert_each_applied_once(app, device, 170)
    assert _applied_in_order(app, 170)


@pytest.mark.usefixtures("short_first")
def test_a_batch_goes_before_the_server_has_the_one_before_and_is_applied_after_it(notes_app):
    """The batch from seq 21 reaches the server late: the one from 71, sent once the
    answer to the first is read, gets there first, is held until 21..70 are applied,
    then applied."""
    app, device, slow = _device(notes_app, 170, late=21)

    result = device.sync("Push")

    _assert_overtook(app, device, slow, result, (71, 21), n=170, requests=4)


@pytest.mark.usefixtures("short_first")
def test_after_renew_epoch_a_batch_that_overtook_the_first_is_applied_after_it(notes_app):
    """renew-epoch (a restored database) forgot the device's sequence; its first batch
    then reaches the server late, after the second. The device's requests say where
    its unanswered changes start, so the second still waits for the first: nothing is
    answered "applied" without being applied, and all go in order."""
    app, device, slow = _device(notes_app, 170, late=1)
    app.server.store.renew_epoch()

    result = device.sync("Push")

    _assert_overtook(app, device, slow, result, (21, 1), n=170, requests=4)


@pytest.mark.usefixtures("short_first")
def test_a_device_that_only_fetched_the_catalog_sends_its_second_batch_at_once(notes_app):
    """The catalog says the server queues pushes: the first run's second batch goes
    while the first is still on its way (it reaches the server 0.8 s late)."""
    app = notes_app()
    slow = SlowAnswers(late=1)
    device = app.client(transport=slow, push_batch=50)
    device.catalog(refresh=True)
    write_notes_offline(device, 70)

    result = device.sync("Push")

    _assert_overtook(app, device, slow, result, (21, 1), n=70, requests=2)


@pytest.mark.usefixtures("short_first")
def test_to_a_server_that_does_not_queue_pushes_each_batch_goes_once_it_has_the_one_before(
    notes_app,
):
    app, device, slow = _device(notes_app, 170, plain=True, total=170)

    result = device.sync("Push")

    firsts = [1, 21, 71, 121]
    for before, after in itertools.pairwise(firsts):
        sent = slow.events.index(("sent", after))
        assert slow.events.index(("committed", before)) < sent  # after the server has it
        assert sent < slow.events.index(("read", before))  # before its answer is read
    assert (result.requests, result.applied) == (4, 170)
    assert_each_applied_once(app, device, 170)


@pytest.mark.usefixtures("short_first")
def test_without_the_pipeline_each_answer_is_read_before_the_next_batch_goes(notes_app):
    app, device, slow = _device(notes_app, 170)
    device.pipeline = False

    assert device.sync("Push").applied == 170

    firsts = [r.mutations[0].seq for r in slow.sent if r.mutations]
    assert firsts == [1, 51, 101, 151]  # no short first batch either
    steps = ("sent", "committed", "read", "closed")
    assert slow.events == [(step, f) for f in firsts for step in steps]
    assert app.applications() == 170


@pytest.mark.usefixtures("short_first")
def test_a_lost_answer_leaves_its_batch_and_the_next_to_the_next_run_each_applied_once(
    notes_app,
):
    app, device, _ = _device(notes_app, 170, lose=71)

    with pytest.raises(NetworkError):
        device.sync("Push")
    # 71-120 were applied but not answered; 121-170 were numbered, and maybe sent.
    assert device.store.query("SELECT min(seq) FROM syncunit_outbox") == [(71,)]

    result = device.sync("Push")

    assert result.applied == 100
    assert_each_applied_once(app, device, 170)


@pytest.mark.usefixtures("short_first")
def test_an_answer_cut_while_the_next_batch_is_out_ends_the_run_with_that_request_done(
    notes_app,
):
    app, device, slow = _device(notes_app, 170, cut=71, total=170)

    with pytest.raises(NetworkError):
        device.sync("Push")
    # The batch sent meanwhile was waited for and its answer closed, unread.
    assert ("committed", 121) in slow.events
    assert ("closed", 121) in slow.events
    assert ("read", 121) not in slow.events

    device.sync("Push")

    assert_each_applied_once(app, device, 170)


@pytest.mark.usefixtures("short_first")
def test_changes_left_in_flight_by_an_earlier_run_go_before_those_numbered_now(notes_app):
    """A run that stopped left 120 changes numbered (in flight) and 60 more came since:
    the batch numbered during the first request follows the in-flight ones, so it
    must not go before them (the server would refuse the gap)."""
    app, device, slow = _device(notes_app, 120)
    streams = [s for s in device.store.catalog().streams if s.local_table == "LocalNote"]
    assert len(device.outbox.number(streams, 120)) == 120  # numbered, never sent
    write_notes_offline(device, 60, prefix="m")

    result = device.sync("Push")

    sent = [m.seq for r in slow.sent for m in r.mutations]
    assert sent == list(range(1, 181))
    assert result.applied == 180
    assert_each_applied_once(app, device, 180)
