"""A push's batches: the next one numbered, and for a push-only unit sent, while the
server applies this one.

``NumberAhead`` numbers the next batch in a thread while a request is on its way
(every pushing unit, unless ``SyncClient.pipeline`` is False).

``push_overlapped`` goes further for a unit that only pushes: batch *k+1* goes
on a second connection while the answer to *k* is read and recorded, so
neither side waits for the other between batches. To a server that queues
pushes (its answers say ``protocol.QUEUES_PUSHES``), *k+1* goes as soon as it
is numbered: the server holds it until *k* is applied. To any other server it
goes once the headers of *k*'s answer have come (the server applies and
commits a push before its response starts, so it then holds *k*). Either way
only if its numbers follow *k*'s: changes an earlier run left in flight go
first, after the answer.

Only for units that push and pull nothing: a pull would send cursors that the
answer being read has not moved yet. Exactly once holds as for any batch in
flight: if anything fails, the run stops, and the next run sends every batch
in flight in order, the server answering those it applied from its log.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from syncunit.errors import RequestRejected
from syncunit.protocol import Catalog, Mutation, StreamInfo, UnitInfo

if TYPE_CHECKING:
    from syncunit.client.client import SyncResult
    from syncunit.client.outbox import Budget, Outbox
    from syncunit.client.run import UnitRun

__all__ = ["NumberAhead", "overlaps", "push_overlapped"]

log = logging.getLogger("syncunit.outbox")


class NumberAhead:
    """The next batch numbered and frozen in a thread while a request is on its way.

    Used as ``with ahead: response = send(...)``: the thread starts on entry and is
    waited for on exit, before the response is read (the store is then the caller's
    alone again). The numbering is an ordinary ``Outbox.number`` transaction: once it
    commits the batch is in flight, sent after the one before it, by the next round
    or, if this request fails, by the next run. If it fails it rolls back and
    ``mutations`` stays empty: the next round numbers the batch itself.
    """

    def __init__(
        self,
        outbox: Outbox,
        streams: Sequence[StreamInfo],
        limit: int,
        budget: Budget | None = None,
    ) -> None:
        self.outbox = outbox
        self.mutations: list[Mutation] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(list(streams), limit, budget), name="syncunit-number-ahead"
        )

    def _run(self, streams: list[StreamInfo], limit: int, budget: Budget | None) -> None:
        try:
            self.mutations = self.outbox.number(streams, limit, budget)
        except BaseException as exc:  # kept, logged; the next round numbers in the open
            self.error = exc

    def __enter__(self) -> NumberAhead:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._thread.join()
        if self.error is not None:
            log.warning("numbering the next batch ahead failed: %s", self.error)

    def next_batch(self) -> list[Mutation]:
        """The batch to send next: the one numbered ahead, if nothing numbered before it
        is still waiting for its answer (else [] : the caller prepares afresh)."""
        if not self.mutations:
            return []
        return self.mutations if self.outbox.in_flight_from() == self.mutations[0].seq else []


def overlaps(run: UnitRun, unit: UnitInfo | None, sending: int, batch: int) -> bool:
    """Whether a run of ``unit`` pushing ``sending`` changes sends its batches overlapped."""
    return unit is not None and unit.direction == "push" and run.client.pipeline and sending > batch


class _Posting:
    """A request sent on a thread of its own; ``response`` waits for its headers."""

    def __init__(self, post: Callable[[], httpx.Response], carried: list[str]) -> None:
        self._post = post
        #: The ids of the held subscriptions the request carries.
        self.carried = carried
        self._response: httpx.Response | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="syncunit-push", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._response = self._post()
        except BaseException as exc:  # raised again by ``response``, in the run's thread
            self._error = exc

    def response(self) -> httpx.Response:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._response is not None
        return self._response

    def discard(self) -> None:
        """Wait for the request, and drop its answer unread (the next run asks again)."""
        self._thread.join()
        if self._response is not None:
            self._response.close()


def push_overlapped(
    run: UnitRun,
    unit_name: str,
    unit: UnitInfo,
    catalog: Catalog,
    result: SyncResult,
    params: Mapping[str, Any] | None,
    streams: Sequence[StreamInfo],
    sizes: tuple[int, int, int, int],
) -> bool:
    """Send up to ``rounds`` batches (the first of ``first`` changes, then of ``batch``),
    each request on its way while the answer before it is recorded.

    ``sizes`` is ``(first, batch, rounds, sending)``, ``sending`` the changes waiting
    (for progress). Returns whether the server completed the last response (False:
    the caller continues the run; also after a batch refused as too large, which
    the run then sends in smaller ones: ``UnitRun.too_large``, or a request refused
    for carrying too many subscriptions: ``UnitRun.too_many_subscriptions``).
    """
    first, batch, rounds, sending = sizes
    outbox = run.client.outbox

    def send(mutations: list[Mutation]) -> _Posting:
        run.client._feed.sending(unit_name, len(mutations), sending)
        run.client._status_changed()
        request, _ = run._build(unit_name, unit, catalog, mutations, params, False)
        carried = [s.id for s in request.subscriptions]
        return _Posting(lambda: run._post(unit_name, request, result), carried)

    mutations = outbox.prepare(streams, run.cap(first), run.budget())
    if not mutations:
        return True
    posting = send(mutations)
    complete = True
    #: Whether ``posting`` left before the answer to the batch before it came.
    sent_early = False
    for round_ in range(rounds):
        ahead = (
            None
            if round_ + 1 == rounds
            else NumberAhead(outbox, streams, run.cap(batch), run.budget())
        )
        # A server that queues pushes holds a batch that comes before its predecessor
        # is applied: the next one goes as soon as it is numbered. Any other: once this
        # answer's headers came (the server has committed this batch).
        early = ahead is not None and run.client._queues_pushes
        following = None
        try:
            with ahead if ahead is not None else contextlib.nullcontext():
                response = None if early else posting.response()
            nxt = _following(ahead, mutations)
            following = send(nxt) if nxt else None
            try:
                if response is None:
                    response = posting.response()
                complete, _ = run._finish(response, catalog, result, carried=posting.carried)
            except RequestRejected as exc:
                if exc.code != "sequence-gap" or not sent_early:
                    raise
                # It overtook the batch before it (delayed on the way, or applied by
                # another server process) and the server stopped waiting for that one,
                # which is applied now that its answer came: send it again, after it.
                if following is not None:
                    following.discard()
                    following = None
                log.info("a push batch came before the one ahead of it; sending it again")
                posting = send(mutations)
                response = posting.response()
                complete, _ = run._finish(response, catalog, result, carried=posting.carried)
        except BaseException as exc:
            if following is not None:
                following.discard()
            if isinstance(exc, RequestRejected) and (
                run.too_large(exc, mutations, streams)
                or run.too_many_subscriptions(exc, len(posting.carried))
            ):
                return False
            raise
        sent_early = early and following is not None
        if following is None:
            # Nothing numbered to follow at once: what is in flight, in order, then new.
            nxt = [] if ahead is None else outbox.prepare(streams, run.cap(batch), run.budget())
            if not nxt:
                break
            following = send(nxt)
        mutations, posting = nxt, following
    return complete


def _following(ahead: NumberAhead | None, sent: list[Mutation]) -> list[Mutation]:
    """The batch numbered ahead if its numbers follow ``sent`` (else []: changes an
    earlier run left in flight go first, after the answer)."""
    nxt = [] if ahead is None else ahead.mutations
    return nxt if nxt and nxt[0].seq == sent[-1].seq + 1 else []
