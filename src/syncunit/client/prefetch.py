"""Reading a sync response on a second thread, a few frames ahead.

While the sync thread writes one chunk into SQLite (which releases the GIL),
the reader receives, decompresses and decodes the next ones. The queue is
bounded, so memory stays a few chunks whatever the response size; errors on
the reader's side are raised on the sync thread, in order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from types import TracebackType

import httpx

from syncunit.protocol import Encoding, Frame, FrameDecoder

_END = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class FramePrefetch:
    """Iterate the frames of ``response``; they are read ``ahead`` at most in advance."""

    def __init__(self, response: httpx.Response, encoding: Encoding, *, ahead: int = 4) -> None:
        self._response = response
        self._decoder = FrameDecoder(encoding)
        self._queue: queue.Queue[object] = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="syncunit-read", daemon=True)

    def __enter__(self) -> FramePrefetch:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def __iter__(self) -> Iterator[Frame]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item  # type: ignore[misc]

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            for data in self._response.iter_bytes():
                for frame in self._decoder.feed(data):
                    if not self._put(frame):
                        return
        except BaseException as exc:  # handed to the sync thread, which raises it
            self._put(_Raised(exc))
            return
        self._put(_END)
