"""Real processes for the crash matrix (``tests/test_kill_matrix.py``); no tests here.

``python -m tests.procs device URL PATH POINT``: a device that writes, pushes,
pulls, migrates, resets or logs out, and SIGKILLs itself at the named point.
It prints ``wrote KEY`` once each local write has committed.

``python -m tests.procs server DIR PORT``: the notes server of
``tests/test_push_support.py`` on 127.0.0.1:PORT, in its own process, so a test
can kill it with SIGKILL. A note titled ``slow`` makes the push wait (after
touching ``DIR/push-arrived``; once); every response body part is sent 20 ms apart,
so a pull is slow enough to be killed in the middle.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

#: The named points at which ``device`` kills itself.
POINTS = [
    "before-local-write",
    "after-local-write",
    "after-outbox-numbered",
    "after-server-commit",
    "after-push-results",
    "mid-chunk-before-cursor",
    "mid-reset",
    "mid-reset-swap",
    "mid-migration",
    "mid-logout",
]

WRITES = 6


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_after(obj: Any, name: str, *, nth: int = 1, before: bool = False) -> None:
    """Make ``obj.name`` SIGKILL the process on its ``nth`` call (before or after it runs)."""
    original = getattr(obj, name)
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if before and calls[0] == nth:
            _die()
        result = original(*args, **kwargs)
        if calls[0] == nth:
            _die()
        return result

    setattr(obj, name, wrapper)


def device(url: str, path: str, point: str) -> None:
    from syncunit.client import SyncClient, schema, store
    from syncunit.client.client import SyncClient as Client

    client = SyncClient(url, path, token="t1", chunk_size=4)
    if point == "mid-migration":
        catalog = client.catalog()
        streams = []
        for s in catalog.streams:
            cols = [
                msgspec.structs.replace(c, type="text") if c.name == "n" else c for c in s.columns
            ]
            streams.append(msgspec.structs.replace(s, columns=cols, definition="older"))
        older = msgspec.structs.replace(catalog, streams=streams, schema_hash="older")
        client.store.apply_catalog(older)
        _kill_after(schema, "retype_in_flight", before=True)
    if point in ("mid-reset", "mid-reset-swap"):
        client.sync("Pull")  # the test then changes the server's epoch: this run resets
        print("pulled", flush=True)
        sys.stdin.readline()
        if point == "mid-reset":
            _kill_after(store.LocalStore, "_apply_shadow", nth=2)
        else:
            _kill_after(store.LocalStore, "_drop_shadow", before=True)
        client.sync("Pull")
        return
    if point == "mid-chunk-before-cursor":
        client.sync("Pull")  # chunks of the later pull apply in place, each with its cursor
    if point == "before-local-write":
        _kill_after(Client, "insert", nth=4, before=True)
    if point == "after-local-write":
        _kill_after(Client, "insert", nth=4)
    for i in range(WRITES):
        key = client.insert("LocalNote", {"id": f"w{i}", "owner": "u1", "title": f"w{i}", "n": i})
        print("wrote", key, flush=True)
    if point == "after-outbox-numbered":
        _kill_after(client.outbox, "prepare")
    if point == "after-server-commit":
        _kill_after(client, "_send_once")  # the response's head arrived: the push committed
    if point == "after-push-results":
        _kill_after(client.outbox, "complete")
    if point == "mid-chunk-before-cursor":
        _kill_after(store.LocalStore, "_save_cursor", nth=2, before=True)
    if point == "mid-logout":
        _kill_after(store.LocalStore, "end_session", before=True)
        client.logout(push=False)  # the changes are parked, then the process dies
        return
    client.sync("Sync")
    print("the sync finished: the test meant to kill it first", flush=True)


def server(directory: str, port: int, database: str) -> None:
    from syncunit.policies import MutationContext
    from tests.support import LiveServer
    from tests.test_push_support import NotesApp

    arrived = Path(directory) / "push-arrived"

    def slow(ctx: MutationContext) -> str | None:
        if ctx.row.get("title") == "slow" and not arrived.exists():  # once
            arrived.touch()
            time.sleep(60)
        return None

    def serve(app: Any) -> LiveServer:
        async def paced(scope: Any, receive: Any, send: Any) -> None:
            async def send_slowly(message: Any) -> None:
                if message["type"] == "http.response.body" and message.get("body"):
                    await asyncio.sleep(0.02)
                await send(message)

            await app(scope, receive, send_slowly)

        return LiveServer(paced, port=port)

    NotesApp(Path(directory), serve, rules=[slow], name="killable", database=database)
    print("serving", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    if sys.argv[1] == "device":
        device(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        server(sys.argv[2], int(sys.argv[3]), sys.argv[4])
