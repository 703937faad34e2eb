"""A seeded fault transport: real HTTP with faults drawn from a seed; no tests here.

Each sync request meets at most one fault, chosen by a ``random.Random(seed)``,
so a run replays exactly from its seed (the client is sequential). The faults:

* ``drop-request``: the request never reaches the server (``ConnectError``);
* ``drop-response``: the server handles it completely, then the response is lost;
* ``duplicate``: the request reaches the server twice; the client gets the second answer;
* ``delay``: up to ``max_delay`` seconds before the request goes out;
* ``reorder``: an earlier request of this client reaches the server again, after
  the later ones (its answer goes nowhere), then the current one goes out;
* ``cut``: the response is cut after a random number of bytes, usually mid-chunk;
* ``5xx``: the server answers 503 without doing anything.

``offline`` makes every request fail to connect (a device out of coverage).
``injected`` counts the faults by kind.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx

KINDS = ("drop-request", "drop-response", "duplicate", "delay", "reorder", "cut", "5xx")


class _CutStream(httpx.SyncByteStream):
    def __init__(self, inner: Any, after: int, request: httpx.Request) -> None:
        self.inner = inner
        self.after = after
        self.request = request

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for part in self.inner:
            room = self.after - sent
            if len(part) >= room:
                if room > 0:
                    yield bytes(part[:room])
                raise httpx.ReadError("cut mid-response (SeededFaults)", request=self.request)
            sent += len(part)
            yield part

    def close(self) -> None:
        self.inner.close()


class SeededFaults(httpx.BaseTransport):
    """Real HTTP to the server, with seeded faults on ``POST /v1/sync/*`` requests."""

    def __init__(self, seed: int, rate: float = 0.3, max_delay: float = 0.01) -> None:
        self.rng = random.Random(seed)
        self.rate = rate
        self.max_delay = max_delay
        self.inner = httpx.HTTPTransport(verify=False)  # plain HTTP to 127.0.0.1
        self.offline = False
        self.enabled = True
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self._earlier: list[httpx.Request] = []

    def _copy(self, request: httpx.Request) -> httpx.Request:
        return httpx.Request(
            request.method, request.url, headers=request.headers, content=request.content
        )

    def _forward_read(self, request: httpx.Request) -> None:
        response = self.inner.handle_request(self._copy(request))
        try:
            response.read()
        finally:
            response.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.offline:
            self.injected["offline"] += 1
            raise httpx.ConnectError("offline (SeededFaults)", request=request)
        if not request.url.path.startswith("/v1/sync/"):
            return self.inner.handle_request(request)
        request.read()
        self.requests += 1
        kind = None
        if self.enabled and self.rng.random() < self.rate:
            kind = self.rng.choice(KINDS)
            self.injected[kind] += 1
        earlier = self._earlier[-5:]
        self._earlier = [*earlier, request]
        if kind == "drop-request":
            raise httpx.ConnectError("request dropped (SeededFaults)", request=request)
        if kind == "5xx":
            body = json.dumps(
                {"type": "urn:syncunit:problem:busy", "title": "busy", "status": 503,
                 "code": "busy", "detail": "injected by SeededFaults"}
            )  # fmt: skip
            return httpx.Response(
                503, headers={"Content-Type": "application/problem+json"}, content=body
            )
        if kind == "delay":
            time.sleep(self.rng.random() * self.max_delay)
        if kind == "reorder" and earlier:
            self._forward_read(self.rng.choice(earlier))
        if kind in ("drop-response", "duplicate"):
            self._forward_read(request)
            if kind == "drop-response":
                raise httpx.ReadError("response lost (SeededFaults)", request=request)
        response = self.inner.handle_request(self._copy(request))
        if kind == "cut":
            return httpx.Response(
                status_code=response.status_code,
                headers=response.headers,
                stream=_CutStream(response.stream, self.rng.randint(0, 400), request),
                extensions=response.extensions,
            )
        return response

    def close(self) -> None:
        self.inner.close()
