"""The inspector's data: who may read it, and what it says about devices, lag and conflicts.

The page itself is tested in a real browser in ``test_inspector_browser``; here
the JSON behind it is checked over real HTTP against the hospital server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Generator, Iterator
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
from syncunit.server.limits import Limits
from syncunit.server.store import ServerStore
from tests.conftest import SIZE, PlainSQL
from tests.filelock import held
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
    first = a.sync("Login")
    a.sync("Splash")
    b.sync("Login")
    data = overview(ops_live).json()
    rows = {d["client_id"]: d for d in data["devices"]}
    assert set(rows) == {a.client_id, b.client_id}
    units = {u["unit"]: u for u in rows[a.client_id]["units"]}
    assert set(units) == {"Login", "Splash"}
    login = units["Login"]
    assert login["outcome"] == "ok"
    assert login["rows"] == first.total_in + first.total_removed > 0  # rows, not columns
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

    # The app retries it at another time: applied, so it is no longer pending.
    [change] = second.outbox.rejected()
    moved = {"starts_at": "2032-05-06T09:10:00", "ends_at": "2032-05-06T09:40:00"}
    second.outbox.retry(change.id, moved)
    assert second.sync("SendAppointments").applied == 1
    assert overview(ops_live).json()["problems"] == []


def test_a_response_the_servers_budget_ended_is_not_a_failure(
    store: ServerStore, serve: Callable[[Any], LiveServer], tmp_path: Path
) -> None:
    """A first copy split by the server's response budget (``End(complete=false)``, the
    client continues at once) is recorded as ``more``, as metrics count it, not ``cut``."""
    srv = SyncServer(
        schema, store, authenticate=admin_or_staff(store), limits=Limits(response_chunks=3)
    )
    generate(store.engine, **SIZE)
    live = serve(srv.app)
    with SyncClient(live.url, tmp_path / "d.sqlite", token="token-h1", chunk_size=16) as c:
        assert c.sync("Login").requests > 2
    outcomes = [r.outcome for r in srv.sync_log.recent()]
    assert set(outcomes[:-1]) == {"more"}, outcomes
    assert outcomes[-1] == "ok"
    data = overview(live).json()
    assert (_total(data, "ok"), _total(data, "failed")) == (len(outcomes), 0)
    [unit] = data["devices"][0]["units"]
    assert unit["outcome"] == "ok"


# -- the log on its own ---------------------------------------------------------------------


def _frames(fail: bool = False) -> Generator[Frame, None, None]:
    yield Chunk(stream="doctors", columns=["id"], data=[[1, 2]], removed=[], cursor="")
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
    inner = _frames()
    cut = log.observe(unit, who, SyncRequest(protocol=1, client_id="other"), inner)
    next(cut)
    cut.close()  # the client went away after the first frame
    assert inner.gi_frame is None  # closed at once (it may hold a database snapshot)
    assert [r.outcome for r in log.recent()] == ["failed", "cut"]  # bounded to 2
    assert [r.rows for r in log.recent()] == [2, 2]
    [latest] = log.latest()  # one device remembered
    assert latest.client_id == "other"
    assert latest.copying  # its cursors say nothing yet


# -- the page, in a real headless Chromium ------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1100",
]
#: Set to write the page's screenshot into the docs (``docs/images/inspector.png``).
SCREENSHOT_ENV = "SYNCUNIT_SCREENSHOTS"


@pytest.fixture(scope="module")
def chrome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Debian's chromium and chromedriver, driven by Selenium; installed when missing."""
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        with held("apt"):  # parallel test workers would race for dpkg's lock
            done = subprocess.run(
                [str(ROOT / "scripts" / "install-browser")],
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
        if not (shutil.which("chromium") and shutil.which("chromedriver")):
            pytest.skip(f"no Chromium could be installed here: {done.stderr.strip()}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    service = webdriver.ChromeService(executable_path=str(shutil.which("chromedriver")))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _open_with(driver: Any, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.execute_script("delete document.body.dataset.loaded;")
    field = driver.find_element(By.ID, "token")
    field.send_keys(token)
    field.submit()


def _wait(driver: Any, condition: Callable[[Any], Any]) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 15, poll_frequency=0.05).until(condition)


def _hostile_sync(live: LiveServer, client_id: str) -> None:
    """A device that names itself with markup (a client id is the device's to choose)."""
    from syncunit.protocol import PROTOCOL_VERSION, content_type, encode_request

    body = encode_request(SyncRequest(protocol=PROTOCOL_VERSION, client_id=client_id), "json")
    r = httpx.post(
        f"{live.url}/v1/sync/Splash",
        content=body,
        headers={"Authorization": "Bearer token-h1", "Content-Type": content_type("json")},
        timeout=10,
    )
    assert r.status_code == 200


@pytest.mark.timeout(900)  # the first use may install Chromium
def test_the_page_in_a_browser(
    chrome: Any,
    ops_server: SyncServer,
    ops_live: LiveServer,
    device: Callable[..., SyncClient],
    plain_sql: PlainSQL,
) -> None:
    from selenium.webdriver.common.by import By

    ops_server.inspector.bucket_seconds = 1  # a minute of syncs, per second
    ward, desk, lab = device("ward-tablet"), device("front-desk"), device("lab", "token-h2")
    for d in (ward, desk, lab):
        d.sync("Login")
        d.sync("Splash")
        time.sleep(0.7)  # spread the timeline over a few seconds
    ward.insert("LocalAppointment", booking(0))
    ward.sync("SendAppointments")
    desk.insert("LocalAppointment", booking(15))  # the same doctor, overlapping
    desk.sync("SendAppointments")
    plain_sql("UPDATE doctor SET name = name || ' Jr' WHERE id = 1")
    lab.sync("Login")
    syncs = 9

    chrome.get(f"{ops_live.url}/inspector")
    error = chrome.find_element(By.ID, "error")
    _wait(chrome, lambda d: "admin token" in error.text)

    _open_with(chrome, "token-h1")  # a staff token: authenticated, but not an admin
    _wait(chrome, lambda d: "not an admin" in error.text)
    assert not chrome.find_elements(By.CSS_SELECTOR, "#devices tbody tr")

    _open_with(chrome, ADMIN)
    _wait(chrome, lambda d: d.execute_script("return document.body.dataset.loaded") == "yes")
    assert not error.is_displayed()

    def unit_row(client: SyncClient, unit: str) -> list[str]:
        sel = f'#devices tr[data-client="{client.client_id}"][data-unit="{unit}"] td'
        return [td.text for td in chrome.find_elements(By.CSS_SELECTOR, sel)]

    ward_login = unit_row(ward, "Login")
    assert ward_login[0] == ward.client_id
    assert ward_login[4] == "ok"
    # Behind by its own booking, pushed since, and a rename. (PostgreSQL's versions are
    # transaction ids: every transaction in the cluster counts, the refused booking too.)
    if plain_sql.backend == "sqlite":
        assert ward_login[6] == "2"
    else:
        assert int(ward_login[6]) >= 2
    assert unit_row(lab, "Login")[6] == "0"  # synced after the rename
    assert unit_row(ward, "Splash")[6] == "\u2014"  # a full stream: no lag
    problems = chrome.find_elements(By.CSS_SELECTOR, "#problems tbody tr[data-status]")
    assert len(problems) == 1
    cells = [td.text for td in problems[0].find_elements(By.TAG_NAME, "td")]
    assert cells[1] == desk.client_id
    assert cells[3:7] == ["LocalAppointment", cells[4], "insert", "rejected"]
    assert "already booked" in cells[8]
    bars = chrome.find_elements(By.CSS_SELECTOR, "#timeline rect.bar")
    counts = {"ok": 0, "problems": 0, "failed": 0}
    for bar in bars:
        kind = bar.get_attribute("class").split("bar-")[1]
        counts[kind] += int(bar.get_attribute("data-count"))
    assert counts == {"ok": syncs - 1, "problems": 1, "failed": 0}
    assert len(bars) >= 2  # spread over several seconds

    shot = chrome.get_screenshot_as_png()
    assert shot.startswith(b"\x89PNG")
    if os.environ.get(SCREENSHOT_ENV):
        (ROOT / "docs" / "images" / "inspector.png").write_bytes(shot)

    # Device ids are shown as text, never as markup.
    hostile = "<img src=x onerror=\"document.title='pwned'\">evil"
    _hostile_sync(ops_live, hostile)
    chrome.execute_script("delete document.body.dataset.loaded; load();")
    _wait(chrome, lambda d: d.execute_script("return document.body.dataset.loaded") == "yes")
    texts = [td.text for td in chrome.find_elements(By.CSS_SELECTOR, "#devices td")]
    assert hostile in texts
    assert not chrome.find_elements(By.CSS_SELECTOR, "#devices img")
    assert chrome.title == "syncunit inspector"


def test_a_tokens_file_marks_admins(
    tmp_path: Path, server_db_url: str, store: ServerStore, serve: Callable[[Any], LiveServer]
) -> None:
    from syncunit.cli import load_server

    tokens = tmp_path / "tokens.json"
    tokens.write_text(
        '{"t1": {"id": "staff:1", "params": {"hospital_id": 1}},'
        ' "ops": {"id": "ops", "admin": true}}'
    )
    srv = load_server("hospital.units:schema", server_db_url, app_dir=".", tokens=str(tokens))
    live = serve(srv.app)
    assert overview(live, "t1").status_code == 403
    assert overview(live, "ops").status_code == 200
