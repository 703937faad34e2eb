"""The inspector: a read-only page for the people who run a sync server.

* ``GET /inspector``               the page (a shell with no data; it asks for a token)
* ``GET /inspector/api/overview``  what the page shows, as JSON; the same
  authentication as the sync endpoints, and only for admin principals
  (``Principal(..., admin=True)``): 401 without a valid token, 403 for others

It shows the devices with their last sync per unit and how far behind the
server their cursors are (in versions), the conflicts and rejections the server
answered recently, and a timeline of recent syncs.

``SyncLog`` is where the facts come from: it watches the frames of every sync
response as they go out (``SyncServer.observers``) and keeps bounded, in-memory
windows (the last ``capacity`` syncs, the last sync per device and unit for
``devices`` devices, the last ``problems`` conflicts and rejections not settled
since by a later applied change of the same row). Nothing is
written to the database, so a pull stays a read (it works on a read replica), at
the cost that each server process sees its own syncs and forgets them on restart.
Devices that ever pushed are also read from the database (``syncunit_clients``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import heapq
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import anyio.to_thread
import msgspec
import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from syncunit.protocol import (
    Chunk,
    End,
    Failure,
    Frame,
    PushResults,
    SyncRequest,
    close_frames,
)
from syncunit.server.auth import Principal
from syncunit.server.cursor import decode_cursor
from syncunit.server.limits import shorten
from syncunit.server.problems import ProblemException
from syncunit.server.store import ServerStore, clients
from syncunit.server.streaming import ENDING
from syncunit.units import SyncUnit

__all__ = ["Inspector", "PushProblem", "SyncLog", "SyncRecord"]

#: What a sync observer is: it sees a response's frames as they go out, and passes them on.
FrameObserver = Callable[[SyncUnit, Principal, SyncRequest, Iterator[Frame]], Iterator[Frame]]


@dataclass(frozen=True)
class SyncRecord:
    """One sync response, as it ended."""

    at: float  #: Unix time at the end
    client_id: str
    principal: str
    unit: str
    #: ``ok`` (the last frame went out), ``more`` (the server's response budget ended
    #: it; the client continues at once), ``failed`` (a failure frame or an error),
    #: or ``cut`` (the client went away before the end)
    outcome: str
    seconds: float
    rows: int  #: rows sent, upserted and removed
    applied: int
    conflicts: int
    rejected: int
    #: The lowest version the device holds of the unit's delta streams after this
    #: sync (None: the unit pulls no delta stream, or a first copy is unfinished)
    since: int | None
    copying: bool  #: a first copy (or a re-download) of some stream is unfinished


@dataclass(frozen=True)
class PushProblem:
    """A mutation the server answered with a conflict or a rejection."""

    at: float
    client_id: str
    principal: str
    unit: str
    seq: int
    table: str
    key: Any
    op: str
    status: str  #: ``conflict`` or ``rejected``
    code: str
    reason: str


class SyncLog:
    """Bounded in-memory windows of recent syncs; thread-safe.

    ``observe`` is a frame observer for ``SyncServer.observers``.
    """

    def __init__(self, capacity: int = 10_000, devices: int = 10_000, problems: int = 1_000):
        self.started = time.time()
        self._lock = threading.Lock()
        self._recent: deque[SyncRecord] = deque(maxlen=capacity)
        self._latest: OrderedDict[tuple[str, str], SyncRecord] = OrderedDict()
        self._max_latest = devices
        #: The last answer per (device, table, key) that was a conflict or a rejection,
        #: until a later change of that row from that device is applied.
        self._problems: OrderedDict[tuple[str, str, bytes], PushProblem] = OrderedDict()
        self._max_problems = problems

    def observe(
        self, unit: SyncUnit, principal: Principal, req: SyncRequest, frames: Iterator[Frame]
    ) -> Iterator[Frame]:
        """Pass ``frames`` on unchanged; record the sync when they end (closing it closes
        ``frames``)."""
        t0 = time.monotonic()
        rows = 0
        cursors = dict(req.cursors)
        pushed: PushResults | None = None
        outcome = "failed"
        try:
            for frame in frames:
                if isinstance(frame, Chunk):
                    rows += frame.row_count() + len(frame.removed)
                    cursors[frame.stream] = frame.cursor
                elif isinstance(frame, PushResults):
                    pushed = frame
                elif isinstance(frame, End):
                    outcome = "ok"
                elif isinstance(frame, Failure):
                    outcome = "failed"
                yield frame
        except GeneratorExit:
            # Closed early: by the server's budget (the client continues), or because
            # the client went away.
            if outcome != "ok":  # closed after its End: complete all the same
                outcome = ENDING.get() or "cut"
            raise
        finally:
            try:
                close_frames(frames)  # ``frames`` may hold a database snapshot
            finally:
                seconds = time.monotonic() - t0
                self._record(unit, principal, req, pushed, outcome, seconds, rows, cursors)

    def _record(
        self,
        unit: SyncUnit,
        principal: Principal,
        req: SyncRequest,
        pushed: PushResults | None,
        outcome: str,
        seconds: float,
        rows: int,
        cursors: dict[str, str],
    ) -> None:
        now = time.time()
        since, copying = _holds(unit, cursors)
        results = pushed.results if pushed is not None else []
        counts = {"applied": 0, "conflict": 0, "rejected": 0}
        # In order: (device, table, key) and its problem, or None when a change was applied.
        answers: list[tuple[tuple[str, str, bytes], PushProblem | None]] = []
        sent = {m.seq: m for m in req.mutations}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
            m = sent.get(r.seq)
            seq_only = (req.client_id, "", str(r.seq).encode())
            key, shown = _shown_key(m.key) if m else (None, b"")
            row = (req.client_id, m.table, shown) if m else seq_only
            if r.status == "applied":
                answers.append((row, None))
                continue
            problem = PushProblem(
                at=now,
                client_id=req.client_id,
                principal=principal.id,
                unit=unit.name,
                seq=r.seq,
                table=m.table if m else "",
                key=key,
                op=m.op if m else "",
                status=r.status,
                code=r.code,
                reason=r.reason,
            )
            answers.append((row, problem))
        record = SyncRecord(
            at=now,
            client_id=req.client_id,
            principal=principal.id,
            unit=unit.name,
            outcome=outcome,
            seconds=seconds,
            rows=rows,
            applied=counts["applied"],
            conflicts=counts["conflict"],
            rejected=counts["rejected"],
            since=since,
            copying=copying,
        )
        with self._lock:
            self._recent.append(record)
            key = (req.client_id, unit.name)
            self._latest[key] = record
            self._latest.move_to_end(key)
            while len(self._latest) > self._max_latest:
                self._latest.popitem(last=False)
            for row, answer in answers:
                if answer is None:  # a later change of that row went through: settled
                    self._problems.pop(row, None)
                    continue
                self._problems[row] = answer
                self._problems.move_to_end(row)
                while len(self._problems) > self._max_problems:
                    self._problems.popitem(last=False)

    def recent(self) -> list[SyncRecord]:
        """The recorded syncs, oldest first."""
        with self._lock:
            return list(self._recent)

    def latest(self) -> list[SyncRecord]:
        """The last sync of each (device, unit) still remembered, least recent first."""
        with self._lock:
            return list(self._latest.values())

    def problems(self) -> list[PushProblem]:
        """Conflicts and rejections not settled since, oldest first.

        One per (device, table, key): the latest. A later change of the same row
        from the same device that is applied (the app retried it) settles it; a
        change the app discarded on the device stays listed (the server never
        hears of it) until the window drops it.
        """
        with self._lock:
            return list(self._problems.values())


def _shown_key(key: Any) -> tuple[Any, bytes]:
    """``key`` as the page shows it, and as JSON (``problems`` tells rows apart by it):
    itself if JSON holds it, else with what JSON cannot hold described. Never an error:
    an answered sync is recorded whatever a device sent."""
    try:
        return key, msgspec.json.encode(key)
    except (TypeError, ValueError, OverflowError):
        pass
    try:
        shown = msgspec.json.encode(key, enc_hook=_described)
    except (TypeError, ValueError, OverflowError):
        shown = msgspec.json.encode(shorten(key, 200))
    return msgspec.json.decode(shown), shown


def _described(value: Any) -> str:
    if isinstance(value, msgspec.msgpack.Ext):
        return f"<MessagePack extension {value.code}: {shorten(bytes(value.data), 80)}>"
    return f"<{type(value).__name__}: {shorten(value, 80)}>"


def _holds(unit: SyncUnit, cursors: dict[str, str]) -> tuple[int | None, bool]:
    """The lowest version held of ``unit``'s delta streams, and whether a copy is unfinished."""
    since: int | None = None
    copying = False
    for stream in unit.streams if unit.pulls else ():
        cur = decode_cursor(cursors.get(stream.name))
        if cur is not None and cur.phase == "content":
            continue  # a full stream: replaced whole, it has no version to lag behind
        if cur is None or cur.since is None:
            copying = True
            continue
        since = cur.since if since is None else min(since, cur.since)
    return (None if copying else since), copying


# -- the page and its data --------------------------------------------------------------


class Inspector:
    """The inspector's routes over a ``SyncLog`` and the server database."""

    def __init__(
        self,
        store: ServerStore,
        log: SyncLog,
        principal_of: Callable[[Request], Awaitable[Principal]],
        *,
        max_devices: int = 500,
        bucket_seconds: int = 60,
        buckets: int = 60,
    ) -> None:
        self.store = store
        self.log = log
        self.principal_of = principal_of
        self.max_devices = max_devices
        self.bucket_seconds = bucket_seconds
        self.buckets = buckets
        self._page = resources.files(__package__).joinpath("inspector.html").read_bytes()
        # The page's one inline script, allowed by its hash: no other script may run.
        script = self._page.split(b"<script>", 1)[1].split(b"</script>", 1)[0]
        digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
        self._policy = (
            f"default-src 'none'; connect-src 'self'; script-src 'sha256-{digest}';"
            " style-src 'unsafe-inline'; base-uri 'none'; form-action 'none';"
            " frame-ancestors 'none'"
        )

    def routes(self) -> list[Route]:
        return [
            Route("/inspector", self.page, methods=["GET"]),
            Route("/inspector/api/overview", self.api_overview, methods=["GET"]),
        ]

    async def page(self, request: Request) -> Response:
        """The page itself holds no data: it asks for a token and fetches the overview."""
        return HTMLResponse(
            self._page,
            headers={
                "Cache-Control": "no-store",
                "Content-Security-Policy": self._policy,
                "X-Frame-Options": "DENY",
            },
        )

    async def api_overview(self, request: Request) -> Response:
        principal = await self.principal_of(request)
        if not principal.admin:
            raise ProblemException(
                "forbidden",
                f"principal {principal.id!r} is not an admin; the inspector is for admins only",
            )
        data = await anyio.to_thread.run_sync(self.overview)
        return Response(
            msgspec.json.encode(data),
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    def overview(self, now: float | None = None) -> dict[str, Any]:
        """Everything the page shows, as plain data."""
        now = time.time() if now is None else now
        with self.store.engine.connect() as conn, conn.begin():
            watermark = self.store.watermark(conn)
            known = conn.execute(
                sa.select(clients.c.client_id, clients.c.principal)
                .add_columns(clients.c.last_seq, clients.c.last_seen)
                .order_by(clients.c.last_seen.desc())
                .limit(self.max_devices)
            ).all()
            count = sa.select(sa.func.count()).select_from(clients)
            total_known = int(conn.execute(count).scalar_one())
        devices: dict[str, dict[str, Any]] = {}
        active: dict[str, float] = {}
        for row in known:
            d = devices[row.client_id] = _device(row.client_id, row.principal)
            d["last_seq"], d["last_push"] = int(row.last_seq), row.last_seen
            active[row.client_id] = _timestamp(row.last_seen)
        seen: dict[str, list[SyncRecord]] = {}
        for rec in self.log.latest():
            seen.setdefault(rec.client_id, []).append(rec)
            active[rec.client_id] = max(active.get(rec.client_id, 0.0), rec.at)
        # Only the most recently active devices are shown; only they are built.
        shown = heapq.nlargest(self.max_devices, active, key=active.__getitem__)
        listed = []
        for client_id in shown:
            records = seen.get(client_id, [])
            d = devices.get(client_id) or _device(client_id, records[0].principal)
            d["units"] = [_unit(rec, watermark) for rec in sorted(records, key=_by_unit)]
            if records:
                d["last_sync"] = _iso(max(rec.at for rec in records))
            listed.append(d)
        problems = self.log.problems()[-200:]
        return {
            "now": _iso(now),
            "watermark": watermark,
            "watching_since": _iso(self.log.started),
            "devices": listed,
            "devices_total": max(total_known, len(active)),
            "problems": [_problem(p) for p in reversed(problems)],
            "timeline": self._timeline(now),
        }

    def _timeline(self, now: float) -> dict[str, Any]:
        width = self.bucket_seconds
        end = (int(now) // width + 1) * width
        start = end - width * self.buckets
        counts = [{"ok": 0, "problems": 0, "failed": 0} for _ in range(self.buckets)]
        for rec in self.log.recent():
            i = int((rec.at - start) // width)
            if not 0 <= i < self.buckets:
                continue
            if rec.outcome not in ("ok", "more"):
                counts[i]["failed"] += 1
            elif rec.conflicts or rec.rejected:
                counts[i]["problems"] += 1
            else:
                counts[i]["ok"] += 1
        buckets = [{"start": _iso(start + i * width), **c} for i, c in enumerate(counts)]
        return {"bucket_seconds": width, "buckets": buckets}


def _device(client_id: str, principal: str) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "principal": principal,
        "last_seq": None,  # the last mutation applied (devices that pushed)
        "last_push": None,
        "last_sync": None,  # seen by this process
        "units": [],
    }


def _by_unit(rec: SyncRecord) -> str:
    return rec.unit


def _unit(rec: SyncRecord, watermark: int) -> dict[str, Any]:
    return {
        "unit": rec.unit,
        "at": _iso(rec.at),
        "outcome": rec.outcome,
        "seconds": round(rec.seconds, 4),
        "rows": rec.rows,
        "applied": rec.applied,
        "conflicts": rec.conflicts,
        "rejected": rec.rejected,
        "since": rec.since,
        "copying": rec.copying,
        "lag": None if rec.since is None else max(0, watermark - rec.since),
    }


def _timestamp(iso: str | None) -> float:
    if not iso:
        return 0.0
    try:
        t = dt.datetime.fromisoformat(iso)
    except ValueError:
        return 0.0
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


def _problem(p: PushProblem) -> dict[str, Any]:
    out = dict(vars(p))
    out["at"] = _iso(p.at)
    return out


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")
