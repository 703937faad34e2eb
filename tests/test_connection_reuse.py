"""A kept-alive connection the server closes as a request goes out costs no sync.

A server times out idle kept-alive connections (uvicorn after 5 s); a request
sent on one just as it closes gets no answer at all. The client sends such a
request once more (``SyncClient._transmit``). Here the close is real: a TCP
proxy on 127.0.0.1 reads the request and closes the connection (FIN), without
forwarding it, so httpx raises what it raises in the field.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncunit.client.client import IDLE_CONNECTION_S
from syncunit.errors import NetworkError
from syncunit.server import SyncServer


class HangUpProxy:
    """Forwards 127.0.0.1 connections to ``port``; ``hang_up(n)``: each of the next
    ``n`` requests is read, then its connection closed."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.pending = 0
        self.lock = threading.Lock()
        self.connections = 0
        self.hung_up = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def hang_up(self, n: int = 1) -> None:
        with self.lock:
            self.pending = n

    def _take(self) -> bool:
        with self.lock:
            if not self.pending:
                return False
            self.pending -= 1
            return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        while data := self._recv(client):
            if self._take():  # (a request's first bytes: the tests arm between requests)
                client.settimeout(0.2)  # the rest of the request, so the close is a FIN
                while self._recv(client):
                    pass
                self.hung_up += 1
                client.shutdown(socket.SHUT_RDWR)
                break
            upstream.sendall(data)
        client.close()
        upstream.close()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        while data := self._recv(src):
            try:
                dst.sendall(data)
            except OSError:
                break

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:  # closed, reset, or the drain's timeout
            return b""

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        for s in self._sockets:
            s.close()


@pytest.fixture
def proxy(server: SyncServer, serve: Any) -> Iterator[HangUpProxy]:
    p = HangUpProxy(serve(server.app).port)
    yield p
    p.close()


def test_a_request_on_a_connection_closed_without_an_answer_is_sent_again(
    proxy, make_client, in_sync
):
    client = make_client(url=proxy.url)
    client.sync("Login")
    assert proxy.connections == 1

    proxy.hang_up()
    result = client.sync("Login")

    assert proxy.hung_up == 1
    # The kept-alive connection was closed; the request went again on a new one.
    assert proxy.connections == 2
    assert result.requests == 1
    in_sync(client)


def test_two_closes_in_a_row_are_a_network_error_and_the_next_sync_works(
    proxy, make_client, in_sync
):
    client = make_client(url=proxy.url)
    client.sync("Login")

    proxy.hang_up(2)
    with pytest.raises(NetworkError, match="without sending a response"):
        client.sync("Login")

    assert proxy.hung_up == 2  # sent again once, not in a loop
    client.sync("Login")
    in_sync(client)


def _answer(conn: socket.socket, request: bytes) -> bytes:
    """Send ``request`` on ``conn``; the status line and headers of its answer (b"" if
    the server had closed the connection)."""
    try:
        conn.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                return b""
            data += more
    except ConnectionError:
        return b""
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:  # the rest of the body, so the next answer starts clean
        more = conn.recv(65536)
        assert more, "the server closed the connection in the middle of an answer"
        body += more
    return head


def _idle_then_asked(url: str, idle_s: float) -> bytes:
    """A request, ``idle_s`` seconds of nothing on the same connection, and a second
    request: the second's answer."""
    request = b"GET /v1/catalog HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        assert _answer(conn, request).startswith(b"HTTP/1.1 401")
        time.sleep(idle_s)
        return _answer(conn, request)


def test_syncunit_serve_keeps_an_idle_connection_longer_than_the_client(
    serve_process: Any, tmp_path: Path
) -> None:
    """The client lets an idle connection go first, so it never sends a request on one
    the server is closing (uvicorn's default, 5 s, is the client's own)."""
    url, _ = serve_process(f"sqlite:///{tmp_path / 'server.sqlite'}")
    # Past the client's expiry the server still answers on the connection.
    assert _idle_then_asked(url, IDLE_CONNECTION_S + 1).startswith(b"HTTP/1.1 401")

    # --keep-alive sets it; past it the server has closed the connection.
    short, _ = serve_process(f"sqlite:///{tmp_path / 'short.sqlite'}", 1, "--keep-alive", "1")
    assert _idle_then_asked(short, 2) == b""
