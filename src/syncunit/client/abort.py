"""Connections that ``close()`` can cut from another thread.

A thread blocked reading a socket is not woken when another thread closes the
socket; it waits for its read timeout (a minute by default) on a server that
accepted the request and never answers. ``shutdown()`` wakes it at once. The
client's own transport therefore opens its connections through a network
backend that remembers each open socket, and ``abort()`` shuts them all down:
the blocked read ends with an error, the sync sees it was cancelled, and the
worker lets go of the database within moments.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterable

import httpcore
import httpx

__all__ = ["AbortableBackend", "abortable_transport"]

_SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


class _Stream(httpcore.NetworkStream):
    """A network stream the backend can shut down (its TLS stream too)."""

    def __init__(self, inner: httpcore.NetworkStream, backend: AbortableBackend) -> None:
        self.inner = inner
        self.backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, timeout)

    def close(self) -> None:
        self.backend._forget(self)
        self.inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # Wrapping moves the socket into a new object: follow it.
        self.backend._forget(self)
        return self.backend._track(self.inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> object:
        return self.inner.get_extra_info(info)

    def shutdown(self) -> None:
        sock = self.inner.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            # Already closed, or never connected: nothing blocks on it.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class AbortableBackend(httpcore.NetworkBackend):
    """httpcore's synchronous backend, with ``abort()`` to cut every open connection."""

    def __init__(self) -> None:
        self.inner = httpcore.SyncBackend()
        self._lock = threading.Lock()
        self._streams: set[_Stream] = set()
        self._aborted = False

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        return self._track(
            self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        )

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        return self._track(self.inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)

    def abort(self) -> None:
        """Shut down every open connection (and any opened from now on): blocked reads end."""
        with self._lock:
            self._aborted = True
            streams = list(self._streams)
        for stream in streams:
            stream.shutdown()

    def _track(self, inner: httpcore.NetworkStream) -> _Stream:
        stream = _Stream(inner, self)
        with self._lock:
            self._streams.add(stream)
            aborted = self._aborted
        if aborted:  # connected while close() was cutting the others
            stream.shutdown()
        return stream

    def _forget(self, stream: _Stream) -> None:
        with self._lock:
            self._streams.discard(stream)


def abortable_transport(
    ssl_context: ssl.SSLContext, limits: httpx.Limits
) -> tuple[httpx.HTTPTransport, AbortableBackend]:
    """httpx's default transport (same TLS and limits), over an ``AbortableBackend``."""
    backend = AbortableBackend()
    transport = httpx.HTTPTransport(verify=ssl_context, limits=limits)
    transport._pool = httpcore.ConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=True,
        http2=False,
        network_backend=backend,
    )
    return transport, backend
