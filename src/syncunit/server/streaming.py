"""The sync response: frames read on a worker thread, sent to a client that may not read.

A worker thread reads the database and encodes chunk by chunk into a bounded
queue, so server memory does not grow with the result and reading overlaps
with sending. The worker holds a database snapshot (and a sync slot) only while
it reads, and never for long:

* after ``response_chunks`` chunks or ``response_seconds`` seconds it stops and
  ends the response with ``End(complete=False)``: the client continues from the
  cursors it has, with another request of the same sync run;
* when the client takes no data for ``stall_seconds`` (the queue stays full),
  the worker stops the same way: its snapshot and slot go at once, and the few
  frames already encoded wait for the client without holding anything;
* one write to a client that stays blocked for ``send_timeout`` seconds drops
  the connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import itertools
import logging
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
from starlette.responses import StreamingResponse
from starlette.types import Send

from syncunit.errors import DatabaseRestored
from syncunit.protocol import (
    Chunk,
    Encoding,
    End,
    Failure,
    Frame,
    StreamStart,
    close_frames,
    encode_frame,
)
from syncunit.server.admission import Slot
from syncunit.server.limits import Limits
from syncunit.server.problems import (
    DATABASE_BUSY,
    DATABASE_LOST,
    ProblemException,
    database_busy,
    database_lost,
    first_line,
    problem,
)

try:  # optional: zstd is preferred when both sides have it
    import zstandard

    HAVE_ZSTD = True
except ImportError:  # pragma: no cover
    HAVE_ZSTD = False

log = logging.getLogger("syncunit.server")

__all__ = ["ENDING", "FramePump", "FrameResponse", "compressor_for"]

#: Set on the worker thread while the pump closes a response's frames because the
#: server's budget ended the response (``"more"``), so that an observer seeing its
#: frames closed (``GeneratorExit``) tells that end from a client gone.
ENDING: contextvars.ContextVar[str] = contextvars.ContextVar("syncunit_ending", default="")

AHEAD = 4  # encoded pieces waiting between the worker and the event loop
_DONE = object()


class Compressor:
    """Compresses the response frame by frame (flushing each, so frames arrive whole)."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "zstd":
            self._z: Any = zstandard.ZstdCompressor(level=1).compressobj()
        elif name == "gzip":
            self._z = zlib.compressobj(6, zlib.DEFLATED, 31)

    def feed(self, data: bytes) -> bytes:
        return self._z.compress(data) if self.name else data

    def flush(self, final: bool = False) -> bytes:
        if not self.name:
            return b""
        if self.name == "zstd":
            mode = (
                zstandard.COMPRESSOBJ_FLUSH_FINISH if final else zstandard.COMPRESSOBJ_FLUSH_BLOCK
            )
            return bytes(self._z.flush(mode))
        return bytes(self._z.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH))


def compressor_for(accept_encoding: str) -> Compressor:
    offered = {p.split(";")[0].strip().lower() for p in accept_encoding.split(",")}
    if "zstd" in offered and HAVE_ZSTD:
        return Compressor("zstd")
    if "gzip" in offered:
        return Compressor("gzip")
    return Compressor("")


class FramePump:
    """Runs ``frames`` on a worker thread within the response budgets of ``limits``.

    Start it before the response begins (``start()``): the worker then always
    runs to its end and releases ``slot``, even if the response is never sent,
    and then calls ``on_end(pump)`` once (on the worker thread, in the request's
    context), when ``outcome`` and ``bytes_out`` are final.
    """

    def __init__(
        self,
        frames: Iterator[Frame],
        encoding: Encoding,
        comp: Compressor,
        limits: Limits,
        slot: Slot | None = None,
        on_end: Callable[[FramePump], None] | None = None,
    ) -> None:
        self.frames = frames
        self.encoding = encoding
        self.comp = comp
        self.limits = limits
        self.slot = slot
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[Any, bool]] = asyncio.Queue()
        self.slots = threading.Semaphore(AHEAD)
        self.stop = threading.Event()
        #: Why the worker ended the response early (None: it did not).
        self.cut: str | None = None
        #: How the response ended: ``ok``, ``more`` (the budget ended it), ``failed``,
        #: ``stalled`` (the client read nothing for a while) or ``cut`` (it went away).
        self.outcome = "cut"
        self.bytes_out = 0  #: encoded (and compressed) bytes handed to the response
        self.on_end = on_end
        context = contextvars.copy_context()  # log lines of the worker name the request
        self.worker = threading.Thread(
            target=context.run, args=(self._produce,), name="syncunit-frames", daemon=True
        )

    def start(self) -> FramePump:
        self.worker.start()
        return self

    # -- the worker thread -------------------------------------------------------------

    def _hand_over(self, item: Any, counted: bool) -> bool:
        if isinstance(item, bytes):
            self.bytes_out += len(item)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (item, counted))
        except RuntimeError:  # the event loop is gone
            self.stop.set()
            return False
        return True

    def _put(self, item: Any) -> bool:
        """Queue ``item``; False when the client stopped reading (stalled or gone)."""
        deadline = time.monotonic() + self.limits.stall_seconds
        while not self.stop.is_set():
            if self.slots.acquire(timeout=0.2):
                return self._hand_over(item, True)
            if time.monotonic() >= deadline:
                self.cut = "stalled"
                self._hand_over(item, False)  # a few frames past the bound, never more
                return False
        return False

    def _encode(self, frame: Frame) -> bytes:
        return self.comp.feed(encode_frame(frame, self.encoding)) + self.comp.flush()

    def _produce(self) -> None:
        started = time.monotonic()
        chunks = 0
        moved = False
        frames = self.frames
        ended = False
        outcome = ""
        try:
            for frame in frames:
                ended = isinstance(frame, End)
                if isinstance(frame, Failure):
                    outcome = "failed"
                data = self._encode(frame)
                if data and not self._put(data):
                    outcome = "stalled" if self.cut == "stalled" else "cut"
                    break
                if isinstance(frame, Chunk):
                    chunks += 1
                    moved = moved or bool(
                        frame.reset or frame.removed or frame.row_count() or not frame.complete
                    )
                # Cut only a response that moved a stream on (rows, or a stream part-way):
                # one of only complete empty deltas (a unit of many streams, a slow
                # database) would be asked again for ever.
                if (
                    moved
                    and not ended
                    and (
                        chunks >= self.limits.response_chunks
                        or time.monotonic() - started >= self.limits.response_seconds
                    )
                ):
                    closing = _closing(frames, frame)
                    sent = all(self._put(d) for d in map(self._encode, closing) if d)
                    if not sent:
                        outcome = "stalled" if self.cut == "stalled" else "cut"
                        break
                    if closing and isinstance(closing[-1], End):  # nothing was left: not cut
                        ended = True
                        continue  # to the frames' own end (an observer records the sync)
                    self.cut = "budget"
                    outcome = "more"
                    ENDING.set(outcome)  # in this worker's own context
                    break
            outcome = outcome or ("ok" if ended else "cut")
        except Exception as exc:
            ended = True
            outcome = "failed"
            if isinstance(exc, ProblemException):
                p = problem(exc.code, exc.detail)
            elif isinstance(exc, DatabaseRestored):  # the operator must renew the epoch
                log.error("sync stream refused: %s", exc)
                p = problem("database-restored", str(exc))
            elif database_lost(exc):  # a restart or a failover: one line, and a 503
                log.error(
                    "sync stream failed: its database connection ended or could not be made: %s",
                    first_line(exc),
                )
                p = problem("database-unavailable", DATABASE_LOST)
            elif (busy := database_busy(exc)) is not None:  # a lock, a timeout: a 503
                log.error("sync stream failed: the database could not take it: %s", busy)
                p = problem("database-unavailable", DATABASE_BUSY.format(why=busy))
            else:
                log.exception("sync stream failed", exc_info=exc)
                p = problem("internal", "see the server log")
            fail = Failure(status=p.status, code=p.code, title=p.title, detail=p.detail)
            self._put(self._encode(fail))
        finally:
            try:  # ends the snapshot: the database is free before the client reads on
                close_frames(frames)
            except Exception:  # e.g. an observer failed: the slot goes back all the same
                outcome = outcome or "failed"
                log.exception("ending a sync's frames failed")
            if self.slot is not None:
                self.slot.release()
            if not self.stop.is_set():
                if not ended:
                    more = End(server_time=dt.datetime.now(dt.UTC).isoformat(), complete=False)
                    self._hand_over(self._encode(more), False)
                tail = self.comp.flush(final=True)
                if tail:
                    self._hand_over(tail, False)
            self._hand_over(_DONE, False)
            self.outcome = outcome or "cut"
            if self.on_end is not None:
                try:
                    self.on_end(self)
                except Exception:
                    log.exception("recording the end of a sync failed")

    # -- the event loop ------------------------------------------------------------------

    async def body(self) -> AsyncIterator[bytes]:
        try:
            while True:
                item, counted = await self.queue.get()
                if counted:
                    self.slots.release()
                if item is _DONE:
                    break
                yield item
        finally:
            self.stop.set()
            # Even when the response is cancelled (the client went away, the server
            # shuts down): the worker gives back its snapshot before the response ends.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.worker.join, 5.0)


#: How many frames a cut response reads ahead for its stream's closing chunk.
_CLOSING_FRAMES = 4


def _closing(frames: Iterator[Frame], last: Frame) -> list[Frame]:
    """What to send after ``last`` before a response is cut by its budget: the empty
    frames that end ``last``'s stream (at most ``_CLOSING_FRAMES``: a chunk with no
    rows, a delta that finds nothing after a copy) when they are next, then ``End``
    when nothing follows; frames read ahead otherwise are left for the next request.

    A stream's last rows come before its closing chunk: sent, the stream ends in this
    response and the run's next requests skip it (``SyncRequest.done``); a stream that
    always has something new would otherwise hold back the streams after it for good.
    """
    if not isinstance(last, Chunk) or last.complete:
        return []
    ahead: list[Frame] = []
    for frame in itertools.islice(frames, _CLOSING_FRAMES):
        ahead.append(frame)
        if isinstance(frame, End):
            return ahead  # the stream was the last one
        if isinstance(frame, StreamStart):
            empty = not (frame.total or frame.reset or frame.copy)
        elif isinstance(frame, Chunk):
            empty = not (frame.row_count() or frame.removed or frame.reset)
        else:
            return []
        if not empty or frame.stream != last.stream or frame.subscription != last.subscription:
            return []
        if isinstance(frame, Chunk) and frame.complete:
            after = next(frames, None)
            return [*ahead, after] if isinstance(after, End) else ahead
    return []


class FrameResponse(StreamingResponse):
    """A streaming response whose every write to the client has a deadline."""

    def __init__(self, pump: FramePump, *, send_timeout: float, **kwargs: Any) -> None:
        super().__init__(pump.body(), **kwargs)
        self.pump = pump
        self.send_timeout = send_timeout

    async def stream_response(self, send: Send) -> None:
        iterator = self.body_iterator
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code,
                 "headers": self.raw_headers}
            )  # fmt: skip
            async for piece in iterator:
                with anyio.fail_after(self.send_timeout):
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
            with anyio.fail_after(self.send_timeout):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            # The client stopped reading: drop the connection (returning without
            # completing the response makes the server close it).
            log.info("dropped a client that read nothing for %gs", self.send_timeout)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
