"""The inspector's data: who may read it, and what it says about devices, lag and conflicts.

The page itself is tested in a real browser in ``test_inspector_browser``; here
the JSON behind it is checked over real HTTP against the hospital server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hospital.generate import generate
from hospital.server import staff_auth
from hospital.units import schema
from starlette.requests import Request

from syncunit.client import SyncClient
from syncunit.protocol import Chunk, End, Frame, SyncRequest
from syncunit.server import Principal, SyncServer
from syncunit.server.inspector import SyncLog
from syncunit.server.store import ServerStore
from tests.conftest import SIZE, PlainSQL
from tests.support import LiveServer

ADMIN = "token-admin"


def admin_or_staff(store: ServerStore) -> Callable[[Request], Principal | None]:
    """The hospital's staff tokens, plus one admin token (as an app's auth would mark one)."""
    staff = staff_auth(store.engine)

    def authenticate(request: Request) -> Principal | None:
        if request.headers.get("authorization") == f"Bearer {ADMIN}":
            return Principal("ops", admin=True)
        return staff(request)

    return authenticate


@pytest.fixture
def ops_server(store: ServerStore) -> SyncServer:
    srv = SyncServer(schema, store, authenticate=admin_or_staff(store))
    generate(store.engine, **SIZE)
    return srv


@pytest.fixture
def ops_live(ops_server: SyncServer, serve: Callable[[Any], LiveServer]) -> LiveServer:
    return serve(ops_server.app)


@pytest.fixture
def device(ops_live: LiveServer, tmp_path: Path) -> Iterator[Callable[..., SyncClient]]:
    made: list[SyncClient] = []

    def make(name: str, token: str = "token-h1") -> SyncClient:
        c = SyncClient(ops_live.url, tmp_path / f"{name}.sqlite", token=token, chunk_size=16)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def overview(live: LiveServer, token: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{live.url}/inspector/api/overview", headers=headers, timeout=10)


def _total(data: dict[str, Any], kind: str) -> int:
    return sum(b[kind] for b in data["timeline"]["buckets"])


def booking(minute: int) -> dict[str, Any]:
    return {
        "doctor_id": 1,
        "patient_id": 5,
        "starts_at": f"2032-05-06T08:{minute:02d}:00",
        "ends_at": f"2032-05-06T08:{minute + 30:02d}:00",
        "status": "booked",
        "room": "R9",
        "notes": "",
    }


def test_only_admin_principals_read_it(ops_live: LiveServer) -> None:
    missing = overview(ops_live, None)
    assert missing.status_code == 401
    assert missing.headers["content-type"].startswith("application/problem+json")
    assert overview(ops_live, "no-such-token").status_code == 401
    staff = overview(ops_live, "token-h1")
    assert staff.status_code == 403
    assert "not an admin" in staff.json()["detail"]
    assert overview(ops_live).status_code == 200
    # The page is a shell with no data; what it shows comes from the endpoint above.
    page = httpx.get(f"{ops_live.url}/inspector", timeout=10)
    assert page.status_code == 200
    assert "admin bearer token" in page.text
    assert "token-h1" not in page.text


def test_devices_show_their_last_sync_per_unit_and_their_lag(
    ops_live: LiveServer, device: Callable[..., SyncClient], plain_sql: PlainSQL
) -> None:
    a, b = device("a"), device("b", token="token-h2")
    a.sync("Login")
    a.sync("Splash")
    b.sync("Login")
    data = overview(ops_live).json()
    rows = {d["client_id"]: d for d in data["devices"]}
    assert set(rows) == {a.client_id, b.client_id}
    units = {u["unit"]: u for u in rows[a.client_id]["units"]}
    assert set(units) == {"Login", "Splash"}
    login = units["Login"]
    assert login["outcome"] == "ok"
    assert login["rows"] > 0
    assert login["lag"] == 0  # it holds everything up to the current version
    assert units["Splash"]["lag"] is None  # a full stream has no version to lag behind
    assert rows[a.client_id]["principal"] == "staff:1"

    # Writes on the server: the devices fall behind until they sync again.
    plain_sql("UPDATE doctor SET name = name || ' Jr' WHERE id = 1")
    plain_sql("UPDATE doctor SET name = name || ' Sr' WHERE id = 1")
    behind = {d["client_id"]: d for d in overview(ops_live).json()["devices"]}
    lag = {u["unit"]: u["lag"] for u in behind[a.client_id]["units"]}
    assert lag["Login"] == 2
    a.sync("Login")
    caught_up = {d["client_id"]: d for d in overview(ops_live).json()["devices"]}
    assert {u["unit"]: u["lag"] for u in caught_up[a.client_id]["units"]}["Login"] == 0
    assert _total(data, "ok") == 3  # the three syncs before the writes


def test_conflicts_and_rejections_are_listed_with_what_was_refused(
    ops_live: LiveServer, device: Callable[..., SyncClient]
) -> None:
    first, second = device("first"), device("second")
    for d in (first, second):
        d.sync("Login")
    first.insert("LocalAppointment", booking(0))
    assert first.sync("SendAppointments").applied == 1
    key = second.insert("LocalAppointment", booking(10))  # the same doctor, overlapping
    result = second.sync("SendAppointments")
    assert len(result.rejected) == 1

    data = overview(ops_live).json()
    [problem] = data["problems"]
    assert problem["client_id"] == second.client_id
    assert problem["unit"] == "SendAppointments"
    assert problem["table"] == "LocalAppointment"
    assert problem["key"] == key
    assert problem["op"] == "insert"
    assert problem["status"] == "rejected"
    assert "already booked" in problem["reason"]
    # Devices that pushed are known from the database too, with their last sequence.
    pushed = {d["client_id"]: d["last_seq"] for d in data["devices"]}
    assert pushed[first.client_id] == 1
    assert pushed[second.client_id] == 1
    assert _total(data, "problems") == 1
    assert _total(data, "ok") == 3
    assert _total(data, "failed") == 0


# -- the log on its own ---------------------------------------------------------------------


def _frames(fail: bool = False) -> Iterator[Frame]:
    yield Chunk(stream="doctors", columns=["id"], data=[[1], [2]], removed=[], cursor="")
    if fail:
        raise RuntimeError("the database went away")
    yield End(server_time="now")


def test_the_log_tells_completed_failed_and_cut_responses_apart() -> None:
    log = SyncLog(capacity=2, devices=1)
    unit = schema.units["Login"]
    req = SyncRequest(protocol=1, client_id="dev")
    who = Principal("staff:1")
    assert [type(f) for f in log.observe(unit, who, req, _frames())] == [Chunk, End]
    with pytest.raises(RuntimeError):
        list(log.observe(unit, who, req, _frames(fail=True)))
    cut = log.observe(unit, who, SyncRequest(protocol=1, client_id="other"), _frames())
    next(cut)
    cut.close()  # the client went away after the first frame
    assert [r.outcome for r in log.recent()] == ["failed", "cut"]  # bounded to 2
    assert [r.rows for r in log.recent()] == [2, 2]
    [latest] = log.latest()  # one device remembered
    assert latest.client_id == "other"
    assert latest.copying  # its cursors say nothing yet
