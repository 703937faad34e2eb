"""uvicorn's HTTP protocol with a deadline on request headers.

uvicorn starts no timer until a whole request has arrived: its keep-alive timer
runs only between requests and stops at the first byte. A connection that sends
half a request line and then nothing is held for ever, and enough of them use up
the process's file descriptors. Here a connection whose request headers are not
complete within ``header_timeout`` seconds, counted from its opening or from the
first byte after a response, is closed.

``header_timeout_protocol(seconds)`` is the class to pass as ``uvicorn.run(http=...)``.
It subclasses the protocol uvicorn would pick itself (httptools where installed,
else h11) and has a module-level name, so ``--workers`` (which pickles uvicorn's
config for each worker process) finds it again.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

__all__ = ["HeaderDeadline", "header_timeout_protocol"]

_NAME = re.compile(r"HeaderTimeout(\d+)ms$")
_made: dict[str, type[asyncio.Protocol]] = {}


class HeaderDeadline(asyncio.Protocol):
    """A mixin over uvicorn's HTTP protocol: close a connection whose request headers
    are late. uvicorn's protocols set ``cycle`` once a request's headers are complete."""

    header_timeout: float  # seconds, set by header_timeout_protocol()
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any
    _header_timer: asyncio.TimerHandle | None = None
    _cycle_waited_on: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        between_requests = self.cycle is None or getattr(self.cycle, "response_complete", True)
        if self._header_timer is None and between_requests:
            self._start_header_timer()  # the first byte of the next request
        super().data_received(data)
        if self._header_timer is not None and (
            self.cycle is not self._cycle_waited_on or self.transport.get_protocol() is not self
        ):  # a request has started (or the connection was upgraded)
            self._stop_header_timer()

    def on_message_begin(self) -> None:  # httptools: the first byte of any request
        super().on_message_begin()  # type: ignore[misc]
        if self._header_timer is None or self._cycle_waited_on is not self.cycle:
            self._stop_header_timer()  # one pipelined behind a request already read
            self._start_header_timer()

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()  # type: ignore[misc]
        # h11: part of the next request came in while this one was answered.
        unread = getattr(getattr(self, "conn", None), "trailing_data", (b"", False))[0]
        closing = self.transport.is_closing()
        if self._header_timer is None and unread and self.cycle is answered and not closing:
            self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        self._cycle_waited_on = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.get_protocol() is self and not self.transport.is_closing():
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class, closing connections whose headers take longer
    than ``seconds``."""
    if not seconds > 0:
        raise ValueError(f"the header timeout must be a positive number of seconds, not {seconds}")
    return _protocol(f"HeaderTimeout{round(seconds * 1000)}ms")


def _protocol(name: str) -> type[asyncio.Protocol]:
    if name not in _made:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        seconds = int(name.removeprefix("HeaderTimeout").removesuffix("ms")) / 1000
        made = type(name, (HeaderDeadline, AutoHTTPProtocol), {"header_timeout": seconds})
        made.__module__ = __name__
        _made[name] = made
    return _made[name]


def __getattr__(name: str) -> Any:
    """A worker process unpickling uvicorn's config finds each class by its name."""
    if _NAME.match(name):
        return _protocol(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
