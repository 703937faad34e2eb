"""One unit run: its requests, and their response frames applied as they arrive.

A run sends the unit's request (with a batch of pushed changes, if any), reads
the response's frames on the way in (catalog, chunks, push results, snapshot
offers), applies them to the local store, and continues while the server ends
a response early. ``SyncClient.sync`` records what it did.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from syncunit.client import bootstrap, holds, pushing
from syncunit.client.blobtext import chunk_bytes
from syncunit.client.outbox import Budget
from syncunit.client.prefetch import FramePrefetch
from syncunit.client.pushing import NumberAhead
from syncunit.client.scheduler import subscription_id
from syncunit.client.store import quote
from syncunit.errors import (
    NetworkError,
    ProblemError,
    ProtocolError,
    RequestRejected,
    SyncCancelled,
    problem_error,
)
from syncunit.protocol import (
    QUEUES_PUSHES,
    Answered,
    Catalog,
    CatalogFrame,
    Chunk,
    End,
    Failure,
    Mutation,
    PushLimits,
    PushResults,
    SnapshotOffer,
    StreamInfo,
    StreamStart,
    Subscription,
    SyncRequest,
    UnitInfo,
    content_type,
    encode_request,
)

if TYPE_CHECKING:
    from syncunit.client.client import SyncClient, SyncResult

__all__ = ["UnitRun", "forbidden_unit", "forget_unit", "held", "refused_own_params"]

COMPRESS_ABOVE = 16 * 1024
#: gzip level of request bodies. A push of 2,000 inserts (640 KB of msgpack) takes
#: 2.4 ms at level 1 against 4.7 ms at level 5, for 7% more bytes (100 KB against 93 KB).
COMPRESS_LEVEL = 1
#: Responses in a row that the server ended early without a chunk before a run gives up.
MAX_IDLE_CONTINUATIONS = 3
#: With more than one batch to push, the first is at most this long: the server starts
#: on it sooner, and the next, full batch is numbered while it works.
FIRST_PUSH_BATCH = 500
log = logging.getLogger("syncunit.client")
#: The refusals of a push too large for the server (413), which it sends less after.
TOO_LARGE = ("field-too-large", "body-too-large", "too-many-mutations")


def too_large(exc: ProblemError, first: int, last: int) -> tuple[int | None, int] | None:
    """How a push of the changes numbered ``first`` to ``last`` goes on after the
    server refused it as too large, or None if ``exc`` stands (not such a refusal).

    (the seq of the change no request can carry, to withdraw, and None otherwise;
    how many changes the next request carries). The change the server names
    (``field-too-large`` says its seq), or the one change of a batch of one, can
    pass in no request; the changes before a named one go on their own; a batch
    too large in bytes goes again with at most half as many changes (its next
    request is also sized under the bounds the answer said).
    """
    if exc.status != 413 or exc.code not in TOO_LARGE:
        return None
    seq: int | None = None
    if exc.code == "field-too-large":  # its detail names the change
        named = re.search(r"\(seq (\d+)\)", exc.detail)
        seq = int(named.group(1)) if named else None
        if seq is None and first == last:
            return None  # not a change's value (the request's own fields)
    elif exc.code == "body-too-large" and first == last:
        seq = first
    if seq == first:
        return first, 0
    if seq is not None and first < seq <= last:
        return None, seq - first  # those before it, then it alone
    return None, max(1, (last - first + 1) // 2)


def too_large_reason(exc: ProblemError, then: str) -> str:
    """Why a change no request can carry was withdrawn; ``then``: what the user does."""
    return (
        f"the server refuses any request holding it ({exc.detail or exc.title}): keep"
        " large content out of synced columns (a file, object storage) or split it,"
        f" then {then} with smaller values"
    )


class UnitRun:
    """One run of a unit for ``client``: one request, or more (push batches, continuations,
    the delta after snapshot offers)."""

    def __init__(self, client: SyncClient, protocol: int, defer_indexes_above: int) -> None:
        self.client = client
        self.protocol = protocol  # the version spoken (the client module's, read per run)
        #: A first copy of at least this many rows builds its local indexes at its end.
        self.defer_indexes_above = defer_indexes_above
        self._offers: list[SnapshotOffer] = []
        #: At most this many changes a request, after the server refused a larger batch
        #: as too large (None: ``push_batch``).
        self._cap: int | None = None
        #: Held subscriptions a request of this run refreshed (its response completed):
        #: the next requests carry the others, at most ``subscription_bound()`` each.
        self._refreshed: set[str] = set()
        #: At most this many subscriptions a request, after the server refused more
        #: (None: the bound it said, ``protocol.PUSH_LIMITS``).
        self._sub_cap: int | None = None
        #: Streams (``stream@subscription`` for a subscription's) a response of this run
        #: brought to their end since its last push: the next requests ask the server to
        #: skip them (``SyncRequest.done``).
        self._done: set[str] = set()
        #: A response of this run brought a new catalog: the next requests follow it.
        self._new_catalog = False

    def subscription_bound(self) -> int:
        """How many held subscriptions one request carries: the server's bound (its last
        word, or the default for a server that said none), or fewer after a refusal."""
        bound = (self.client.push_limits or PushLimits()).subscriptions
        return bound if self._sub_cap is None else max(1, min(bound, self._sub_cap))

    def too_many_subscriptions(self, exc: RequestRejected, carried: int) -> bool:
        """The server refused a request carrying ``carried`` subscriptions as carrying
        too many (its bound was lowered since the device learnt it): carry fewer.
        True if the run can go on (False: ``exc`` stands)."""
        if (
            exc.status != 422
            or exc.code != "invalid-request"
            or "subscriptions per request" not in exc.detail
            or carried <= 1
        ):
            return False
        said = (self.client.push_limits or PushLimits()).subscriptions
        named = re.search(r"at most (\d+) subscriptions", exc.detail)
        if said < carried:  # the refusal's header says the new bound
            self._sub_cap = said
        elif named and 0 < int(named.group(1)) < carried:
            self._sub_cap = int(named.group(1))
        else:
            self._sub_cap = carried // 2
        log.info(
            "a request carrying %d subscriptions was refused (%s): carrying %d",
            carried,
            exc.detail,
            self.subscription_bound(),
        )
        return True

    def refreshed(self, carried: Sequence[str], complete: bool) -> None:
        """A response to a request carrying the subscriptions ``carried`` was read:
        complete, they are refreshed for this run."""
        if complete:
            self._refreshed.update(carried)

    def subscriptions_left(self, unit_name: str, catalog: Catalog | None) -> bool:
        """Whether a held subscription ``unit_name`` refreshes is not refreshed yet in
        this run (more than one request may carry: the next carries it)."""
        return bool(held(self.client, unit_name, catalog, skip=self._refreshed, limit=1))

    def budget(self) -> Budget:
        """What one push request may carry, by the server's last word on its bounds."""
        return Budget(self.client.push_limits, json=self.client.encoding == "json")

    def cap(self, count: int) -> int:
        """``count`` changes, or fewer after a batch was refused as too large."""
        return count if self._cap is None else max(1, min(count, self._cap))

    def too_large(
        self, exc: RequestRejected, sent: list[Mutation], streams: Sequence[StreamInfo]
    ) -> bool:
        """The server refused the push ``sent`` as too large (413): send less (``too_large``),
        the change no request can carry withdrawn and surfaced (``Outbox.withdraw``).
        True if the run can go on (False: ``exc`` stands)."""
        if not sent:
            return False
        verdict = too_large(exc, sent[0].seq, sent[-1].seq)
        if verdict is None:
            return False
        withdrawn, cap = verdict
        if withdrawn is not None:
            self._cap = None  # it was the one: the changes after it go in full batches
            reason = too_large_reason(exc, "retry the change")
            return self.client.outbox.withdraw(withdrawn, exc.code, reason, streams)
        self._cap = cap
        log.info("a push of %d changes was refused (%s): sending fewer", len(sent), exc.code)
        return True

    def run(
        self,
        unit_name: str,
        catalog: Catalog | None,
        result: SyncResult,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """Run ``unit_name``: push its changes, pull its streams; record it in ``result``."""
        try:
            self._run(unit_name, catalog, result, params)
        finally:  # changes too large to send, made rejections on the way
            result.rejected += [c.to_dict() for c in self.client.outbox.take_refused()]

    def _run(
        self,
        unit_name: str,
        catalog: Catalog | None,
        result: SyncResult,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        unit = None if catalog is None else catalog.unit(unit_name)
        push_streams = [] if unit is None or catalog is None else [
            s for s in catalog.streams if s.local_table in unit.push
        ]  # fmt: skip
        tables = [s.local_table for s in push_streams]
        rounds = 1
        sending = self.client.outbox.count(tables) if push_streams else 0
        batch = self.client.push_batch
        first = batch
        if push_streams:
            rounds += sending // batch
            if self.client.pipeline and sending > batch > FIRST_PUSH_BATCH:
                first = FIRST_PUSH_BATCH
                rounds += 1
        if (
            catalog is not None
            and unit is not None
            and pushing.overlaps(self, unit, sending, batch)
        ):
            done = pushing.push_overlapped(
                self,
                unit_name,
                unit,
                catalog,
                result,
                params,
                push_streams,
                (first, batch, rounds, sending),
            )
            sending = self.client.outbox.count(tables)
            if done and not sending:
                return
            # What is left (a batch the numbering thread could not number, or changes
            # the app made meanwhile): one batch after the other, in flight first.
            rounds, first = 1 + sending // batch, batch
        left: list[Path] = []
        ahead: NumberAhead | None = None
        round_ = -1
        while round_ + 1 < rounds:
            round_ += 1
            # The batch numbered while the server applied the last one, or a fresh one.
            mutations = ahead.next_batch() if ahead is not None else []
            wanted = first if round_ == 0 else batch
            if not mutations and push_streams:
                mutations = self.client.outbox.prepare(
                    push_streams, self.cap(wanted), self.budget()
                )
            if 0 < len(mutations) < wanted and self.client.outbox.count(tables) > len(mutations):
                rounds += 1  # cut short (by its bytes, or the cap): one more round for the rest
            ahead = None
            if mutations:
                self.client._feed.sending(unit_name, len(mutations), sending)
                self.client._status_changed()
                if self.client.pipeline and round_ + 1 < rounds:
                    ahead = NumberAhead(
                        self.client.outbox, push_streams, self.cap(batch), self.budget()
                    )
            try:
                complete, chunks = self._request(
                    unit_name, unit, catalog, mutations, result, params, ahead=ahead
                )
            except RequestRejected as exc:
                if not self.too_large(exc, mutations, push_streams):
                    raise
                round_ -= 1  # the same round again, with fewer changes
                ahead = None
                continue
            if catalog is None or self._new_catalog:
                # The response brought the catalog (a first sync, or the server's changed):
                # continue with its streams' cursors.
                catalog, unit = self._latest(unit_name)
            if self._offers:
                # Large first copies came as files: apply them, then a delta from there.
                offers, self._offers = self._offers, []
                left = bootstrap.apply_offers(self.client, offers, result)
                catalog = self.client.store.catalog()
                unit = None if catalog is None else catalog.unit(unit_name)
                complete, chunks = self._request(
                    unit_name, unit, catalog, [], result, params, snapshots=not left
                )
                if self._offers:
                    raise ProtocolError("the server offered a snapshot again after one failed")
            idle = 0
            recopied = False
            while True:
                # The server ends a response after a bounded time: continue from the
                # cursors just stored. Responses that bring nothing, again and again,
                # mean something is wrong: give up (the next run resumes). Held
                # subscriptions beyond what one request may carry go in the next
                # requests. Streams marked to copy afresh on the way (a change the
                # device refused, or a catalog change made unsendable: ``recopy.py``)
                # copy in this run.
                if complete and not self.subscriptions_left(unit_name, catalog):
                    if recopied or not self._recopy_due(unit_name, unit, params):
                        break
                    recopied = True
                    self._recopy_again(catalog)
                idle = 0 if chunks or complete else idle + 1
                if idle >= MAX_IDLE_CONTINUATIONS:
                    raise NetworkError(
                        f"the server ended {idle} responses of {unit_name!r} early without"
                        " sending anything; applied chunks are kept"
                    )
                complete, chunks = self._request(
                    unit_name, unit, catalog, [], result, params, snapshots=False
                )
                if self._new_catalog:
                    catalog, unit = self._latest(unit_name)
            for part in left:  # copied row by row instead: a cut download is not resumed
                part.unlink(missing_ok=True)
            bootstrap.sweep_copied(self.client.store)  # and those an earlier run left
            if not push_streams or not self.client.outbox.count(tables):
                break

    def _latest(self, unit_name: str) -> tuple[Catalog | None, UnitInfo | None]:
        """The catalog stored, and ``unit_name``'s description in it."""
        self._new_catalog = False
        catalog = self.client.store.catalog()
        return catalog, None if catalog is None else catalog.unit(unit_name)

    def _recopy_due(
        self, unit_name: str, unit: UnitInfo | None, params: Mapping[str, Any] | None
    ) -> bool:
        """Whether a cursor the next request of ``unit_name`` carries is marked to copy
        afresh (``recopy.py``)."""
        if unit is None or unit.direction == "push":
            return False
        holder = subscription_id(unit_name, params) if params else None
        names = [holds.cursor_name(s, holder) for s in unit.streams]
        catalog = self.client.store.catalog()
        if catalog is not None and unit_name in self.client.refresh_subscriptions_with:
            for sub_id, sub_unit, _, _, _ in self.client.store.subscriptions():
                info = catalog.unit(sub_unit)
                if info is not None:
                    names += [holds.cursor_name(s, sub_id) for s in info.streams]
        return self.client.store.recopy_due(names)

    def _recopy_again(self, catalog: Catalog | None) -> None:
        """Held subscriptions refreshed in this run with a stream marked to copy afresh
        since go again."""
        if catalog is None:
            return
        for sub_id, sub_unit, _, _, _ in self.client.store.subscriptions():
            info = catalog.unit(sub_unit)
            if sub_id in self._refreshed and info is not None:
                names = [holds.cursor_name(s, sub_id) for s in info.streams]
                if self.client.store.recopy_due(names):
                    self._refreshed.discard(sub_id)

    def _request(
        self,
        unit_name: str,
        unit: UnitInfo | None,
        catalog: Catalog | None,
        mutations: list[Mutation],
        result: SyncResult,
        params: Mapping[str, Any] | None = None,
        *,
        snapshots: bool = True,
        ahead: NumberAhead | None = None,
    ) -> tuple[bool, int]:
        """One request; returns whether the server completed the run, and the chunks it sent.

        ``ahead`` numbers the next batch in a thread while this request is on its
        way and the server applies it; it is done before the response is read.
        """
        self._offers = []
        with ahead if ahead is not None else contextlib.nullcontext():
            while True:
                request, holder = self._build(
                    unit_name, unit, catalog, mutations, params, snapshots
                )
                try:
                    response = self._post(unit_name, request, result)
                    break
                except RequestRejected as exc:  # refused whole: nothing was applied
                    if not self.too_many_subscriptions(exc, len(request.subscriptions)):
                        raise
        carried = [s.id for s in request.subscriptions]
        return self._finish(response, catalog, result, holder, carried, set(request.cursors))

    def _build(
        self,
        unit_name: str,
        unit: UnitInfo | None,
        catalog: Catalog | None,
        mutations: list[Mutation],
        params: Mapping[str, Any] | None,
        snapshots: bool,
    ) -> tuple[SyncRequest, str | None]:
        """The request of one round, and the subscription whose cursors it carries."""
        stream_names = unit.streams if unit is not None and unit.direction != "push" else []
        holder = subscription_id(unit_name, params) if params else None
        if not stream_names:
            cursors = {}
        elif holder:
            # Streams marked to copy afresh go without their cursors (``recopy.py``).
            self.client.store.take_recopies([holds.cursor_name(s, holder) for s in stream_names])
            cursors = self.client.store.subscription_cursors(holder, stream_names)
        else:
            self.client.store.take_recopies(stream_names)
            cursors = self.client.store.cursors(stream_names)
        subscriptions = (
            held(
                self.client,
                unit_name,
                catalog,
                take=True,
                skip=self._refreshed,
                limit=self.subscription_bound(),
            )
            if stream_names
            else []
        )
        if mutations:  # the pull after a push reads every stream again
            self._done.clear()
        # Only streams that keep their cursor: one marked to copy afresh goes again.
        carried = set(cursors) | {
            holds.cursor_name(name, sub.id) for sub in subscriptions for name in sub.cursors
        }
        request = SyncRequest(
            protocol=self.protocol,
            client_id=self.client.client_id,
            schema_hash="" if catalog is None else catalog.schema_hash,
            cursors=cursors,
            mutations=mutations,
            chunk_size=self.client.chunk_size,
            snapshots=self.client.snapshots and snapshots and not holder,
            params=dict(params or {}),
            subscriptions=subscriptions,
            # A pull may bring rows that changes still in flight wrote: their verdicts
            # come first (``Answered``), or the device would keep its own version. A
            # push says where its sequence continues if the server forgot it (a restore).
            unanswered_from=(
                self.client.outbox.in_flight_from() if stream_names or mutations else 0
            ),
            json_rows=True,
            done=sorted(self._done & carried),
        )
        return request, holder

    def _finish(
        self,
        response: httpx.Response,
        catalog: Catalog | None,
        result: SyncResult,
        holder: str | None = None,
        carried: Sequence[str] = (),
        sent: Collection[str] = (),
    ) -> tuple[bool, int]:
        """Read and apply ``response``'s frames, then close it; see ``_request``.
        ``carried``: the ids of the held subscriptions the request carried; ``sent``:
        the cursors it carried."""
        try:
            complete, chunks = self._read_frames(response, catalog, result, holder, sent)
            self.refreshed(carried, complete)
            return complete, chunks
        finally:
            result.bytes_in += response.num_bytes_downloaded
            response.close()

    def _post(self, unit_name: str, request: SyncRequest, result: SyncResult) -> httpx.Response:
        """Send ``request``; return the response once its headers arrived (its frames
        unread). For a push, the server has then committed the batch."""
        body = encode_request(request, self.client.encoding)
        mutations = len(request.mutations)
        headers = {
            "Content-Type": content_type(self.client.encoding),
            "Accept": content_type(self.client.encoding),
        }
        if len(body) > COMPRESS_ABOVE:
            body = gzip.compress(body, compresslevel=COMPRESS_LEVEL, mtime=0)
            headers["Content-Encoding"] = "gzip"
        result.bytes_out += len(body)
        result.rows_out += mutations
        response = self.client._send(
            "POST", f"/v1/sync/{unit_name}", result=result, content=body, headers=headers
        )
        syncunit_answer(response, content_type(self.client.encoding))
        self.client._queues_pushes = response.headers.get(QUEUES_PUSHES) == "1"
        return response

    def _read_frames(
        self,
        response: httpx.Response,
        catalog: Catalog | None,
        result: SyncResult,
        holder: str | None = None,
        sent: Collection[str] = (),
    ) -> tuple[bool, int]:
        deferred: dict[str, StreamInfo] = {}  # streams whose indexes wait for the copy's end
        self.client.store.rereading.clear()  # dropped by an earlier response: copied now
        try:
            with self.client.store.bulk():
                end, chunks = self._apply_frames(response, catalog, result, deferred, holder, sent)
        except httpx.HTTPError as exc:
            raise NetworkError(f"the sync of {result.unit!r} was cut: {exc}") from exc
        finally:
            self.client.store.copying.clear()
            self.client.store.fresh_copies.clear()
            for info in deferred.values():
                self.client.store.restore_indexes(info)
        if end is None:
            raise NetworkError(
                f"the sync of {result.unit!r} ended early; applied chunks are kept and"
                " the next run resumes from the last one"
            )
        return end.complete, chunks

    def _apply_frames(
        self,
        response: httpx.Response,
        catalog: Catalog | None,
        result: SyncResult,
        deferred: dict[str, StreamInfo],
        holder: str | None = None,
        sent: Collection[str] = (),
    ) -> tuple[End | None, int]:
        """Apply frames as they arrive; return the response's end frame (None: it was
        cut) and how many chunks it brought.

        A stream whose cursor the request did not carry (``sent``) comes as a first
        copy: the whole picture, even where the device holds the stream's rows and
        cursor already (a unit the catalog in hand did not list it in): its first
        chunk replaces them (``LocalStore.fresh_copies``).

        A reader thread receives and decodes the next frames while this thread
        writes the current chunk into SQLite (which runs without the GIL).
        """
        total = done = chunks = 0
        begun: set[str] = set()  # streams whose chunks came in this response
        # A full stream is replaced whole: its chunks apply in one local transaction,
        # opened at its start and committed with its last chunk (or rolled back).
        whole = contextlib.ExitStack()
        with whole, FramePrefetch(response, self.client.encoding) as frames:
            for frame in frames:
                if self.client._cancel.is_set():
                    raise SyncCancelled(
                        "the sync was cancelled by close(); applied chunks are kept"
                    )
                if isinstance(frame, CatalogFrame):
                    # A first sync, or the server's schema changed: migrate, then apply.
                    catalog = frame.catalog
                    self.client.store.apply_catalog(catalog)
                    self.client.client_id = self.client.store.client_id()  # may be renewed
                    self.client._report_closed(result)
                    self._new_catalog = True
                    self._done.clear()  # streams may have changed: each is read again
                    continue
                if isinstance(frame, End):
                    return frame, chunks
                if isinstance(frame, Failure):
                    raise problem_error(frame.status, frame.code, frame.title, frame.detail)
                if catalog is None:
                    raise ProtocolError("the server sent changes before its catalog")
                if isinstance(frame, Chunk):
                    chunks += 1
                    info = catalog.stream(frame.stream)
                    if info is None:
                        raise ProtocolError(f"server sent unknown stream {frame.stream!r}")
                    if self.client.encoding == "json":
                        frame = chunk_bytes(frame, info)
                    sub = frame.subscription or holder
                    if not sub and frame.stream not in sent and frame.stream not in begun:
                        self.client.store.fresh_copies.add(frame.stream)
                    begun.add(frame.stream)
                    upserted, removed = (
                        self.client.store.apply_chunk(info, frame, sub)
                        if sub
                        else self.client.store.apply_chunk(info, frame)
                    )
                    t = info.local_table
                    result.rows_in[t] = result.rows_in.get(t, 0) + upserted
                    result.rows_removed[t] = result.rows_removed.get(t, 0) + removed
                    if frame.reset:
                        result.resets.append(frame.stream)
                    done += upserted + len(frame.removed)
                    if frame.complete:
                        self._done.add(holds.cursor_name(frame.stream, frame.subscription))
                        self.client.store.copying.discard(frame.stream)
                        whole.close()
                        if frame.stream in deferred:
                            self.client.store.restore_indexes(deferred.pop(frame.stream))
                    self.client._emit(self.client.on_progress, result.unit, done, max(total, done))
                    self.client._feed.downloaded(result.unit, done, total)
                    self.client._status_changed()
                elif isinstance(frame, StreamStart):
                    total += frame.total
                    if frame.copy:  # every row new: no index entries to spare
                        self.client.store.copying.add(frame.stream)
                    info = catalog.stream(frame.stream)
                    if info is not None and info.mode == "full" and frame.reset:
                        whole.enter_context(self.client.store.atomic())
                    if (
                        frame.copy
                        and frame.total >= self.defer_indexes_above
                        and info is not None
                        and self.client.store.suspend_indexes(info)
                    ):
                        deferred[frame.stream] = info
                    self.client._emit(self.client.on_progress, result.unit, done, total)
                elif isinstance(frame, PushResults):
                    self._on_push_results(frame, catalog, result)
                elif isinstance(frame, Answered):  # verdicts on earlier requests' changes
                    pushed = PushResults(results=frame.results, last_seq=frame.last_seq)
                    self._on_push_results(pushed, catalog, result, sent_now=False)
                elif isinstance(frame, SnapshotOffer):
                    self._offers.append(frame)
        return None, chunks

    def _on_push_results(
        self, frame: PushResults, catalog: Catalog, result: SyncResult, *, sent_now: bool = True
    ) -> None:
        if self.client.store.get_fact("bound") != self.client.client_id:
            # The server has bound this session to its principal: parked later, its
            # changes can be offered to whoever logs in (the server refuses others).
            with self.client.store.atomic():
                self.client.store.set_fact("bound", self.client.client_id)
        json_answer = self.client.encoding == "json"
        applied, kept = self.client.outbox.complete(frame, catalog.streams, json_answer=json_answer)
        if sent_now and self.client._feed.upload is not None:  # the progress of this upload
            self.client._feed.answered(len(frame.results))
            self.client._status_changed()
        result.applied += applied
        for change in kept:
            target = result.conflicts if change.status == "conflict" else result.rejected
            target.append(change.to_dict())


def forget_unit(client: SyncClient, unit_name: str, catalog: Catalog) -> int:
    """The principal may no longer run ``unit_name``: remove what it brought.

    Each subscription of the unit is closed (its holds, cursors and record go;
    rows no one else holds go with them). The unit's streams without client
    parameters start over: their cursors go, so a unit still allowed later
    downloads afresh, and so do their rows that no subscription holds. Rows of
    other streams, and the rows subscriptions of other units hold, stay; rows
    with local changes not yet pushed stay until the push is answered
    (``holds.carry_out``). Returns the number of rows removed.
    """
    unit = catalog.unit(unit_name)
    streams = [s for s in catalog.streams if unit is not None and s.name in unit.streams]
    removed = 0
    for sub_id, sub_unit, _, _, _ in client.store.subscriptions():
        if sub_unit == unit_name:
            removed += client.store.close_subscription(sub_id, streams)
    for info in streams:
        if info.params:  # read only with parameter values: its rows are subscriptions'
            continue
        # complete: applied in place at once (an incomplete reset would go to a shadow table)
        empty = Chunk(
            stream=info.name, columns=[], data=[], removed=[], cursor="", reset=True, complete=True
        )
        with client.store.atomic() as c:
            removed += client.store.apply_chunk(info, empty)[1]
            c.execute("DELETE FROM syncunit_cursors WHERE stream = ?", (info.name,))
            # The rows it kept for their unpushed changes go once those are answered.
            t, k = quote(info.local_table), quote(info.key)
            kept = c.execute(
                f"SELECT {k} FROM {t} WHERE {k} IN"
                " (SELECT row_key FROM syncunit_outbox WHERE table_name = ?)",
                (info.local_table,),
            ).fetchall()
            holds.defer(c, info.local_table, [r[0] for r in kept])
    log.info("unit %r is no longer allowed: %d local rows were removed", unit_name, removed)
    return removed


def forbidden_unit(exc: ProblemError) -> str | None:
    """The unit a ``unit-forbidden`` problem names (``may not run unit 'Name'``)."""
    named = exc.extra.get("unit")
    if isinstance(named, str):
        return named
    found = re.search(r"may not run unit (['\"])(.+?)\1", exc.detail)
    return found.group(2) if found else None


def refused_own_params(exc: ProblemError, unit_name: str, carried_others: bool) -> bool:
    """Whether ``exc`` refuses the parameter values of the run's own unit (not those of
    a subscription it carried): the problem names no subscription, and either names
    the run's unit or nothing else was carried (a server that names neither)."""
    if exc.code != "invalid-parameter" or exc.extra.get("subscription"):
        return False
    return exc.extra.get("unit") == unit_name or not carried_others


def held(
    client: SyncClient,
    unit_name: str,
    catalog: Catalog | None,
    *,
    take: bool = False,
    skip: Collection[str] = (),
    limit: int | None = None,
) -> list[Subscription]:
    """Every held subscription, with its cursors, to refresh beside ``unit_name``
    (in the order they were opened).

    ``take``: for a sync request, whose response is applied; those marked to copy
    afresh go without their cursors (``recopy.py``). ``skip``: ids left out;
    ``limit``: at most this many."""
    if catalog is None or unit_name not in client.refresh_subscriptions_with:
        return []
    beside = catalog.unit(unit_name)
    if beside is None or beside.direction == "push":  # its requests read no stream
        return []
    subs: list[Subscription] = []
    for sub_id, unit, raw, _, _ in client.store.subscriptions():
        info = catalog.unit(unit)
        if info is None or sub_id in skip:
            continue
        if limit is not None and len(subs) >= limit:
            break
        if take:
            client.store.take_recopies([holds.cursor_name(s, sub_id) for s in info.streams])
        cursors = client.store.subscription_cursors(sub_id, info.streams)
        subs.append(Subscription(id=sub_id, unit=unit, params=json.loads(raw), cursors=cursors))
    return subs


def syncunit_answer(response: httpx.Response, *media_types: str) -> None:
    """Refuse a successful answer whose Content-Type no syncunit server sends there (a
    web page, another API): the URL points elsewhere, and no retry will fix it."""
    got = response.headers.get("content-type", "").partition(";")[0].strip().lower()
    if got in media_types:
        return
    response.close()
    raise ProtocolError(
        f"{response.request.url} is not a syncunit server (Content-Type"
        f" {got or 'missing'}, expected {' or '.join(media_types)}): check the server URL"
    )
