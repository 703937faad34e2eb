"""What a sync request is answered: its frames, every pull of it in one snapshot.

Methods of ``SyncServer`` (``app.py``), kept here as a mixin: the catalog when
the device's is missing or stale, the push's results, then, in one read
snapshot (a replica's when the request pushed nothing and the replica has
reached the device's cursors), the verdicts on changes the device still has in
flight, and each stream's frames (or a snapshot offer for a first copy),
subscriptions' included; ``End`` last. ``sign_frames`` signs the cursors on
the way out.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import TYPE_CHECKING

import msgspec

from syncunit.protocol import (
    Catalog,
    CatalogFrame,
    Chunk,
    End,
    Frame,
    PushResults,
    SnapshotOffer,
    StreamStart,
    SyncRequest,
    close_frames,
)
from syncunit.server.auth import Principal
from syncunit.server.changes import StreamReader
from syncunit.server.cursor import newest_cursor, sign_cursor
from syncunit.units import SyncUnit

if TYPE_CHECKING:
    from syncunit.server.push import PushApplier
    from syncunit.server.snapshots import Snapshots
    from syncunit.server.store import ServerStore
    from syncunit.units import SyncSchema

__all__ = ["SyncAnswer", "sign_frames"]


class SyncAnswer:
    """``SyncServer``'s answer to a sync request: the server is ``self``."""

    if TYPE_CHECKING:  # what it uses of the server
        catalog: Catalog
        chunk_size: int
        schema: SyncSchema
        store: ServerStore
        pusher: PushApplier
        snapshots: Snapshots | None

    def _frames(
        self,
        unit: SyncUnit,
        principal: Principal,
        req: SyncRequest,
        pushed: PushResults | None,
    ) -> Iterator[Frame]:
        if req.schema_hash != self.catalog.schema_hash:
            # A first sync, or a client with an old catalog: it migrates from this one.
            yield CatalogFrame(catalog=self.catalog)
        if pushed is not None:
            yield pushed
        if unit.pulls:
            chunk = req.chunk_size or self.chunk_size
            runs = [("", unit, req.params, req.cursors)]
            runs += [
                (sub.id, self.schema.units[sub.unit], sub.params, sub.cursors)
                for sub in req.subscriptions
            ]
            # A read replica may serve a pull, unless this request pushed (the device
            # reads its own writes on the primary) or the replica is behind its cursors.
            newest = max(newest_cursor(c.values()) for _, _, _, c in runs)
            snapshot = self.store.snapshot(
                replica=pushed is None, at_least=newest, scope=principal.params
            )
            with snapshot as (conn, watermark):
                # Verdicts on changes the device still has in flight, before any row
                # they wrote: read in the pull's snapshot, so each such row has one.
                answered = self.pusher.answered(conn, principal, req)
                if answered is not None:
                    yield answered
                epoch, horizon = self.store.epoch_and_horizon(conn)
                done = set(req.done)
                for sub_id, run, client_params, cursors in runs:
                    for stream in run.streams:
                        params = principal.scope(stream, client_params)
                        reader = StreamReader(
                            self.store, stream, params, chunk_size=chunk, json_rows=req.json_rows
                        )
                        token = cursors.get(stream.name)
                        if (
                            f"{stream.name}@{sub_id}" if sub_id else stream.name
                        ) in done and reader.continues(conn, token, watermark, epoch, horizon):
                            # Brought to its end earlier in this run, under the same
                            # definition, scope and epoch (a redeploy or a principal's
                            # new parameters meanwhile: read again).
                            continue
                        if (
                            token is None
                            and not sub_id
                            and not stream.client_params
                            and req.snapshots
                            and self.snapshots
                            and stream.mode == "delta"
                        ):
                            snap = self.snapshots.offer(conn, watermark, epoch, horizon, reader)
                            if snap is not None:
                                yield SnapshotOffer(
                                    stream=stream.name,
                                    path=f"/v1/snapshots/{stream.name}/{snap.name}",
                                    size=snap.size,
                                    sha256=snap.sha256,
                                    rows=snap.rows,
                                    cursor=snap.cursor,
                                )
                                continue
                        frames = reader.frames(conn, watermark, epoch, horizon, token)
                        try:
                            for frame in frames:
                                if sub_id and isinstance(frame, StreamStart | Chunk):
                                    frame = msgspec.structs.replace(frame, subscription=sub_id)
                                yield frame
                        finally:
                            frames.close()  # its open database cursor, before the snapshot ends
        yield End(server_time=dt.datetime.now(dt.UTC).isoformat())


def sign_frames(frames: Iterator[Frame], key: bytes) -> Iterator[Frame]:
    """``frames`` with every chunk's (and snapshot offer's) cursor signed (closing it
    closes ``frames``)."""
    try:
        for frame in frames:
            if isinstance(frame, Chunk | SnapshotOffer):
                frame = msgspec.structs.replace(frame, cursor=sign_cursor(frame.cursor, key))
            yield frame
    finally:
        close_frames(frames)
