"""``SyncClient``: runs sync units against a server into a local SQLite file.

It learns units, streams and local table schemas from the server's catalog,
so it shares no Python code with the server, and needs only the standard
library's sqlite3 and httpx. One unit run is one HTTP request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from syncunit.client.store import LocalStore
from syncunit.errors import NetworkError, ProblemError, ProtocolError, problem_error
from syncunit.protocol import (
    PROTOCOL_VERSION,
    Catalog,
    Chunk,
    Encoding,
    End,
    Failure,
    FrameDecoder,
    PushResults,
    StreamStart,
    SyncRequest,
    content_type,
    decode_catalog,
    decode_problem,
    encode_request,
)

try:
    import zstandard  # noqa: F401

    ACCEPT_ENCODING = "zstd, gzip"
except ImportError:  # pragma: no cover
    ACCEPT_ENCODING = "gzip"

__all__ = ["ProgressCallback", "SyncClient", "SyncResult"]

ProgressCallback = Callable[[str, int, int], None]


@dataclass
class SyncResult:
    """What one unit run did."""

    unit: str
    rows_in: dict[str, int] = field(default_factory=dict)
    rows_removed: dict[str, int] = field(default_factory=dict)
    rows_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    requests: int = 0
    resets: list[str] = field(default_factory=list)
    applied: int = 0
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_in(self) -> int:
        return sum(self.rows_in.values())

    @property
    def total_removed(self) -> int:
        return sum(self.rows_removed.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 4)
        return out


class SyncClient:
    """Syncs units of a syncunit server into a local SQLite database.

    ``transport`` is any ``httpx.BaseTransport`` (real HTTP by default; tests
    pass fault-injecting ones). ``chunk_size`` asks the server for a chunk size.
    """

    def __init__(
        self,
        server_url: str,
        local_db: str | Path | LocalStore,
        *,
        token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        encoding: Encoding = "msgpack",
        chunk_size: int | None = None,
        timeout: float = 60.0,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.store = local_db if isinstance(local_db, LocalStore) else LocalStore(local_db)
        self.encoding: Encoding = encoding
        self.chunk_size = chunk_size
        self.on_progress = on_progress
        headers = {"Accept-Encoding": ACCEPT_ENCODING, "User-Agent": "syncunit-client/0.1"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(
            base_url=server_url.rstrip("/"),
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
        )
        self.client_id = self.store.client_id()

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        self.http.close()
        self.store.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- catalog -------------------------------------------------------------------------

    def catalog(self, *, refresh: bool = False) -> Catalog:
        """The server's catalog (cached locally); local tables are created or migrated."""
        cached = None if refresh else self.store.catalog()
        if cached is not None:
            return cached
        response = self._send("GET", "/v1/catalog")
        try:
            body = response.read()
        finally:
            response.close()
        catalog = decode_catalog(body)
        self.store.apply_catalog(catalog)
        return catalog

    # -- sync ----------------------------------------------------------------------------

    def sync(self, unit: str) -> SyncResult:
        """Run ``unit`` now, in one request; block until done and return what it did."""
        result = SyncResult(unit=unit)
        started = time.perf_counter()
        try:
            with self.store.lock:
                catalog = self.store.catalog()
                if catalog is None:
                    result.requests += 1
                    catalog = self.catalog(refresh=True)
                try:
                    self._run(unit, catalog, result)
                except ProblemError as exc:
                    if exc.code != "schema-changed":
                        raise
                    result.requests += 1
                    catalog = self.catalog(refresh=True)
                    self._run(unit, catalog, result)
        finally:
            result.seconds = time.perf_counter() - started
        self.store.complete_unit(unit, json.dumps(result.to_dict()))
        return result

    def _run(self, unit_name: str, catalog: Catalog, result: SyncResult) -> None:
        unit = catalog.unit(unit_name)
        stream_names = unit.streams if unit is not None and unit.direction != "push" else []
        request = SyncRequest(
            protocol=PROTOCOL_VERSION,
            client_id=self.client_id,
            schema_hash=catalog.schema_hash,
            cursors=self.store.cursors(stream_names) if stream_names else {},
            chunk_size=self.chunk_size,
        )
        body = encode_request(request, self.encoding)
        result.bytes_out += len(body)
        result.requests += 1
        response = self._send(
            "POST",
            f"/v1/sync/{unit_name}",
            content=body,
            headers={
                "Content-Type": content_type(self.encoding),
                "Accept": content_type(self.encoding),
            },
        )
        try:
            self._read_frames(response, catalog, result)
        finally:
            result.bytes_in += response.num_bytes_downloaded
            response.close()

    def _read_frames(self, response: httpx.Response, catalog: Catalog, result: SyncResult) -> None:
        decoder = FrameDecoder(self.encoding)
        total = done = 0
        ended = False
        try:
            for data in response.iter_bytes():
                for frame in decoder.feed(data):
                    if isinstance(frame, Chunk):
                        info = catalog.stream(frame.stream)
                        if info is None:
                            raise ProtocolError(f"server sent unknown stream {frame.stream!r}")
                        upserted, removed = self.store.apply_chunk(info, frame)
                        t = info.local_table
                        result.rows_in[t] = result.rows_in.get(t, 0) + upserted
                        result.rows_removed[t] = result.rows_removed.get(t, 0) + removed
                        if frame.reset:
                            result.resets.append(frame.stream)
                        done += upserted + len(frame.removed)
                        if self.on_progress is not None:
                            self.on_progress(result.unit, done, max(total, done))
                    elif isinstance(frame, StreamStart):
                        total += frame.total
                        if self.on_progress is not None:
                            self.on_progress(result.unit, done, total)
                    elif isinstance(frame, PushResults):
                        self._on_push_results(frame, result)
                    elif isinstance(frame, End):
                        ended = True
                    elif isinstance(frame, Failure):
                        raise problem_error(frame.status, frame.code, frame.title, frame.detail)
        except httpx.HTTPError as exc:
            raise NetworkError(f"the sync of {result.unit!r} was cut: {exc}") from exc
        if not ended:
            raise NetworkError(
                f"the sync of {result.unit!r} ended early; applied chunks are kept and"
                " the next run resumes from the last one"
            )

    def _on_push_results(self, frame: PushResults, result: SyncResult) -> None:
        raise ProtocolError("this client sent no mutations but received push results")

    # -- http -------------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            request = self.http.build_request(method, path, **kwargs)
            response = self.http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise NetworkError(f"cannot reach the server: {exc}") from exc
        if response.status_code >= 400:
            try:
                body = response.read()
            except httpx.HTTPError as exc:
                raise NetworkError(f"the server's error response was cut: {exc}") from exc
            finally:
                response.close()
            problem = decode_problem(body)
            if problem is None:
                raise problem_error(
                    response.status_code,
                    "http-error",
                    response.reason_phrase,
                    body[:200].decode("utf-8", "replace"),
                )
            raise problem_error(problem.status, problem.code, problem.title, problem.detail)
        return response
