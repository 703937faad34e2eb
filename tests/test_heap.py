"""A started server's heap is frozen: full collections after it skip its start-up objects."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Message

from syncunit.server import SyncServer
from syncunit.server.heap import FreezeOnStartup
from tests.conftest import EXAMPLES


class _Cycle:
    """Garbage only a collection frees: it refers to itself."""

    def __init__(self) -> None:
        self.me = self


def _tracked(obj: object) -> bool:
    """Whether ``obj`` is in a generation the collector walks (not frozen)."""
    return any(o is obj for o in gc.get_objects())


async def _started(app: ASGIApp, body: Callable[[], Awaitable[None]]) -> None:
    """Start ``app`` as uvicorn does (the lifespan protocol), run ``body``, shut it down."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    started = asyncio.Event()

    async def send(message: Message) -> None:
        assert not message["type"].endswith(".failed"), message
        if message["type"] == "lifespan.startup.complete":
            started.set()

    await inbox.put({"type": "lifespan.startup"})
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    lifespan = asyncio.create_task(app(scope, inbox.get, send))
    await asyncio.wait_for(started.wait(), 10)
    await body()
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(lifespan, 10)


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Only the collections the code under test runs; the heap unfrozen afterwards."""
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.enable()


def test_the_started_app_is_frozen_after_its_garbage_is_collected(
    make_server: Callable[..., SyncServer], no_automatic_gc: None
) -> None:
    server = make_server()
    garbage = _Cycle()
    before = weakref.ref(garbage)
    del garbage
    app = FreezeOnStartup(server.app)
    assert app.frozen == 0
    assert _tracked(server.app)

    async def running() -> None:
        assert app.frozen > 0
        assert gc.get_freeze_count() > 0
        assert not _tracked(server.app)  # frozen: no full collection walks it again
        assert before() is None  # collected first, not frozen as garbage
        # Requests go through to the app.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            assert (await http.get("/v1/catalog")).status_code == 401
        later = _Cycle()
        after = weakref.ref(later)
        del later
        assert _tracked(after())  # what comes after the start is collected as before
        gc.collect()
        assert after() is None

    asyncio.run(_started(app, running))


def _captured_app(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    return seen


def test_syncunit_serve_runs_the_app_frozen_on_startup_and_keeps_connections(
    server_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from syncunit.cli import _WORKER_ENV, KEEP_ALIVE_S, main, worker_app

    seen = _captured_app(monkeypatch)
    monkeypatch.setenv(_WORKER_ENV, "")  # restored after the test: serve --workers sets it
    argv = ["serve", "hospital.server:build", "--database", server_db_url]
    assert main([*argv, "--app-dir", str(EXAMPLES), "--port", "1"]) == 0
    assert isinstance(seen["app"], FreezeOnStartup)
    assert seen["app"].frozen == 0  # uvicorn (not run here) would start it
    assert seen["timeout_keep_alive"] == KEEP_ALIVE_S  # see test_connection_reuse.py

    # With --workers, each worker process builds its app from the environment.
    assert main([*argv, "--app-dir", str(EXAMPLES), "--workers", "2"]) == 0
    assert seen["app"] == "syncunit.cli:worker_app"
    assert seen["factory"] is True
    assert seen["timeout_keep_alive"] == KEEP_ALIVE_S
    assert json.loads(os.environ[_WORKER_ENV])["database"] == server_db_url
    assert isinstance(worker_app(), FreezeOnStartup)
