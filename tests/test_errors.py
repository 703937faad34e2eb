"""Bad input gets a clear problem+json error and changes nothing (DESIGN section 7).

Each case is sent as a raw HTTP request (to check the wire answer) and, where a
client can produce it, through ``SyncClient`` (to check the exception it raises).
"""

from __future__ import annotations

import gzip
import sqlite3
import subprocess
import sys

import httpx
import msgspec
import pytest

import syncunit.client.client as client_module
from syncunit.errors import (
    AuthError,
    LocalStoreError,
    RequestRejected,
    SyncError,
    UnknownUnitError,
)
from syncunit.protocol import JSON, MSGPACK, PROBLEM
from tests.support import db_state, local_keys, sync_body

OK_BODY = sync_body()
AUTH = {"Authorization": "Bearer token-h1"}


def _json_body(**fields):
    return msgspec.json.encode({"protocol": 1, "client_id": "raw", **fields})


CASES = [
    # id, method, path, headers, body, status, code
    ("unknown-unit", "POST", "/v1/sync/Nope", {**AUTH, "Content-Type": MSGPACK}, OK_BODY, 404,
     "unknown-unit"),
    ("garbage-msgpack", "POST", "/v1/sync/Login", {**AUTH, "Content-Type": MSGPACK},
     b"\x93\xff\x00garbage", 400, "malformed-request"),
    ("garbage-json", "POST", "/v1/sync/Login", {**AUTH, "Content-Type": JSON}, b"{not json",
     400, "malformed-request"),
    ("wrong-field-type", "POST", "/v1/sync/Login", {**AUTH, "Content-Type": JSON},
     _json_body(cursors=["not", "a", "map"]), 400, "malformed-request"),
    ("empty-body", "POST", "/v1/sync/Login", {**AUTH, "Content-Type": MSGPACK}, b"", 400,
     "malformed-request"),
    ("bad-gzip-body", "POST", "/v1/sync/Login",
     {**AUTH, "Content-Type": MSGPACK, "Content-Encoding": "gzip"}, b"not gzip at all", 400,
     "malformed-request"),
    ("protocol-99", "POST", "/v1/sync/Login", {**AUTH, "Content-Type": JSON},
     _json_body(protocol=99), 400, "unsupported-protocol"),
    ("text-plain", "POST", "/v1/sync/Login", {**AUTH, "Content-Type": "text/plain"}, OK_BODY,
     415, "unsupported-media-type"),
    ("no-content-type", "POST", "/v1/sync/Login", AUTH, OK_BODY, 415, "unsupported-media-type"),
    ("chunk-size-0", "POST", "/v1/sync/Login", {**AUTH, "Content-Type": JSON},
     _json_body(chunk_size=0), 422, "invalid-request"),
    ("empty-client-id", "POST", "/v1/sync/Login", {**AUTH, "Content-Type": JSON},
     _json_body(client_id=""), 422, "invalid-request"),
    ("no-token", "POST", "/v1/sync/Login", {"Content-Type": MSGPACK}, OK_BODY, 401,
     "unauthenticated"),
    ("wrong-token", "POST", "/v1/sync/Login",
     {"Authorization": "Bearer nope", "Content-Type": MSGPACK}, OK_BODY, 401, "unauthenticated"),
    ("wrong-scheme", "POST", "/v1/sync/Login",
     {"Authorization": "Basic dG9rZW4taDE6", "Content-Type": MSGPACK}, OK_BODY, 401,
     "unauthenticated"),
    ("catalog-no-token", "GET", "/v1/catalog", {}, None, 401, "unauthenticated"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_bad_request_gets_a_problem_and_changes_nothing(
    live, store, method, path, headers, body, status, code
):
    before = db_state(store.engine)

    r = httpx.request(method, live.url + path, headers=headers, content=body)

    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert problem["code"] == code
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    assert problem["type"].endswith(code)
    assert "Traceback" not in r.text
    assert 'File "' not in r.text
    assert db_state(store.engine) == before


def test_a_good_raw_request_passes_the_same_checks(live):
    """The control case: the same helpers and headers do work when the input is right."""
    r = httpx.post(
        live.url + "/v1/sync/Login",
        headers={**AUTH, "Content-Type": MSGPACK, "Content-Encoding": "gzip"},
        content=gzip.compress(OK_BODY),
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == MSGPACK


def _assert_untouched(client, unit):
    assert client.store.last_sync_on(unit) is None
    assert local_keys(client, "LocalAppointment") == set()


def test_client_unknown_unit_raises_unknown_unit_error(client, store):
    client.catalog()
    before = db_state(store.engine)

    with pytest.raises(UnknownUnitError) as info:
        client.sync("Nope")

    assert info.value.status == 404
    assert info.value.code == "unknown-unit"
    assert "Login" in info.value.detail  # says which units exist
    assert not info.value.retryable
    _assert_untouched(client, "Nope")
    assert db_state(store.engine) == before


def test_an_unknown_path_or_method_gets_a_problem(live):
    """The router's refusals are problems like every other: a code, and what to do."""
    nowhere = httpx.post(f"{live.url}/v1/sync/", content=b"", timeout=10)
    wrong_method = httpx.get(f"{live.url}/v1/sync/Login", timeout=10)

    for r, status, code in ((nowhere, 404, "not-found"), (wrong_method, 405, "method-not-allowed")):
        assert r.status_code == status
        assert r.headers["content-type"] == PROBLEM
        assert r.json()["code"] == code
    assert "mounted" in nowhere.json()["detail"]
    assert wrong_method.headers["allow"] == "POST"
    assert "use POST" in wrong_method.json()["detail"]


def test_a_client_with_a_wrong_base_url_is_told_so_not_that_the_unit_is_unknown(
    make_client, live, store
):
    before = db_state(store.engine)
    client = make_client(url=f"{live.url}/sync")  # the server is not mounted there

    with pytest.raises(SyncError) as info:
        client.sync("Login")

    assert not isinstance(info.value, UnknownUnitError)
    assert (info.value.status, info.value.code) == (404, "not-found")
    assert "/sync/v1/sync/Login" in info.value.detail
    assert db_state(store.engine) == before


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_client_without_valid_token_raises_auth_error(make_client, store, token):
    client = make_client(token)
    before = db_state(store.engine)

    with pytest.raises(AuthError) as info:
        client.sync("Login")

    assert info.value.status == 401
    assert info.value.code == "unauthenticated"
    assert not info.value.retryable
    assert client.store.last_sync_on("Login") is None
    assert db_state(store.engine) == before


def test_client_with_oversized_chunk_size_raises_request_rejected(make_client, store):
    client = make_client(chunk_size=10**9)
    client.catalog()
    before = db_state(store.engine)

    with pytest.raises(RequestRejected) as info:
        client.sync("Login")

    assert info.value.status == 422
    assert info.value.code == "invalid-request"
    assert "chunk_size" in info.value.detail
    _assert_untouched(client, "Login")
    assert db_state(store.engine) == before


def test_client_speaking_another_protocol_raises_request_rejected(client, store, monkeypatch):
    client.catalog()
    before = db_state(store.engine)
    monkeypatch.setattr(client_module, "PROTOCOL_VERSION", 99)

    with pytest.raises(RequestRejected) as info:
        client.sync("Login")

    assert info.value.status == 400
    assert info.value.code == "unsupported-protocol"
    _assert_untouched(client, "Login")
    assert db_state(store.engine) == before


def test_errors_do_not_break_the_next_sync(client, in_sync):
    with pytest.raises(SyncError):
        client.sync("Nope")
    client.sync("Login")
    in_sync(client)


# -- misuse of the device API: a clear syncunit error, nothing written ------------------------


def _local(client) -> list[tuple]:
    """The device's rows and bookkeeping that a refused call must leave as they are."""
    return [
        *client.store.query("SELECT * FROM LocalAppointment ORDER BY id"),
        *client.store.query("SELECT * FROM LocalDoctor ORDER BY id"),
        *client.store.query("SELECT id, table_name, row_key, op FROM syncunit_outbox"),
        *client.store.query("SELECT id FROM syncunit_rejected"),
    ]


def test_every_call_after_close_says_the_client_is_closed(client):
    client.sync("Login")
    key = client.store.query("SELECT id FROM LocalAppointment LIMIT 1")[0][0]
    client.close()

    calls = {
        "insert": lambda: client.insert("LocalAppointment", {"room": "r"}),
        "update": lambda: client.update("LocalAppointment", key, {"room": "r"}),
        "delete": lambda: client.delete("LocalAppointment", key),
        "login": lambda: client.login("token-h1"),
        "logout": lambda: client.logout(),
        "push_parked": lambda: client.push_parked(),
        "catalog": lambda: client.catalog(),
        "catalog(refresh)": lambda: client.catalog(refresh=True),
        "unsubscribe": lambda: client.unsubscribe("PatientDetails", {"patient_id": 1}),
        "subscriptions": lambda: client.subscriptions(),
        "expire_subscriptions": lambda: client.expire_subscriptions(),
        "watch_query": lambda: client.watch_query("SELECT 1"),
        "watch": lambda: client.watch("Login"),
        "trigger": lambda: client.trigger("Login"),
        "start": lambda: client.start(),
        "sync": lambda: client.sync("Login"),
    }
    for name, call in calls.items():
        with pytest.raises(SyncError, match="the client is closed") as info:
            call()
        assert type(info.value) is SyncError, name
    assert client._live is None  # no watcher thread was started


def test_an_async_client_after_aclose_says_the_client_is_closed(tmp_path, live):
    import asyncio

    from syncunit import AsyncSyncClient

    async def main() -> None:
        device = AsyncSyncClient(live.url, str(tmp_path / "a.sqlite"), token="token-h1")
        await device.sync("Login")
        await device.aclose()
        for call in (
            lambda: device.insert("LocalAppointment", {"room": "r"}),
            lambda: device.update("LocalAppointment", "k", {"room": "r"}),
            lambda: device.delete("LocalAppointment", "k"),
            lambda: device.login("token-h1"),
            lambda: device.query("SELECT 1"),
            lambda: anext(device.query_updates("SELECT 1")),
        ):
            with pytest.raises(SyncError, match="the client is closed"):
                await call()

    asyncio.run(main())


def test_an_async_client_used_from_another_loop_is_refused(tmp_path, live):
    import asyncio

    from syncunit import AsyncSyncClient

    async def make() -> AsyncSyncClient:
        return AsyncSyncClient(live.url, str(tmp_path / "a.sqlite"), token="token-h1")

    with pytest.raises(SyncError, match="inside the running event loop"):
        AsyncSyncClient(live.url, str(tmp_path / "outside.sqlite"))
    assert not (tmp_path / "outside.sqlite").exists()
    device = asyncio.run(make())  # that loop is closed now

    async def elsewhere() -> None:
        for call in (
            lambda: device.sync("Login"),
            lambda: device.insert("LocalAppointment", {"room": "r"}),
            lambda: device.query("SELECT 1"),
            lambda: anext(device.query_updates("SELECT 1")),
        ):
            with pytest.raises(SyncError, match="created in another event loop"):
                await call()
        with pytest.raises(SyncError, match="created in another event loop"):
            device.watch_query("SELECT 1", callback=print)
        with pytest.raises(SyncError, match="created in another event loop"):
            device.on_status = print
        with pytest.raises(SyncError, match="created in another event loop"):
            device.trigger("Login")
        await device.aclose()  # releasing it is allowed from anywhere

    asyncio.run(elsewhere())


def test_a_read_only_database_gives_a_local_store_error(client, tmp_path):
    import sqlite3

    from syncunit import SyncClient

    client.sync("Login")
    client.insert("LocalAppointment", {"doctor_id": 1, "patient_id": 1, "room": "R1"})
    path = client.store.conn.execute("PRAGMA database_list").fetchone()[2]
    url = client.http.base_url
    client.close()
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    device = SyncClient(str(url), ro, token="token-h1")
    try:
        before = _local(device)
        for call in (lambda: device.sync("Online"), lambda: device.logout()):
            with pytest.raises(LocalStoreError, match="readonly"):
                call()
        assert _local(device) == before
    finally:
        device.close()


def _app_write(client, notes, *, nested=False):
    """A write of the app's to a table of its own (no triggers: a full disk makes SQLite
    roll the whole transaction back), in the store's transaction or a savepoint."""
    with client.store.atomic() as c:
        if nested:
            with client.store.atomic() as inner:
                inner.execute("INSERT INTO app_notes VALUES (?)", (notes,))
        else:
            c.execute("INSERT INTO app_notes VALUES (?)", (notes,))


def test_a_full_disk_gives_a_retryable_local_store_error_and_writes_nothing(client):
    """The error says the disk is full, chained from the driver's, whether SQLite undid
    the statement or the whole transaction (not "cannot rollback - no transaction is
    active"), and the store goes on once there is room."""
    client.sync("Login")
    key = client.store.query("SELECT id FROM LocalAppointment LIMIT 1")[0][0]
    client.update("LocalAppointment", key, {"notes": "kept"})
    with client.store.atomic() as c:
        c.execute("CREATE TABLE app_notes (notes TEXT)")
    before = _local(client)
    conn = client.store.conn
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full: no page more
    big = "x" * 100_000

    for call in (
        lambda: client.insert("LocalAppointment", {"doctor_id": 1, "notes": big}),
        lambda: client.update("LocalAppointment", key, {"notes": big}),
        lambda: _app_write(client, big),
        lambda: _app_write(client, big, nested=True),
    ):
        with pytest.raises(LocalStoreError, match="database or disk is full") as info:
            call()
        assert info.value.retryable
        assert not conn.in_transaction
    assert _local(client) == before
    assert client.store.query("SELECT count(*) FROM app_notes") == [(0,)]

    conn.execute(f"PRAGMA max_page_count = {2**30}")  # room again
    _app_write(client, big, nested=True)
    client.update("LocalAppointment", key, {"notes": big})
    assert client.store.query("SELECT count(*) FROM app_notes") == [(1,)]


#: A process whose commit cannot be written: files may not grow past 8 KB, and the WAL
#: was just emptied. SQLite rolls the transaction back when its COMMIT fails.
_COMMIT_ON_A_FULL_DISK = """
import resource, signal, sys
from syncunit.client.store import LocalStore
from syncunit.errors import LocalStoreError
store = LocalStore(sys.argv[1])
with store.atomic() as c:
    c.execute("CREATE TABLE t (x)")
store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
try:
    with store.atomic() as c:
        c.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,))  # in the cache until COMMIT
except LocalStoreError as exc:
    print(type(exc.__cause__).__module__, exc.retryable, exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
with store.atomic() as c:
    c.execute("INSERT INTO t VALUES ('after')")
print(store.query("SELECT x FROM t"))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file size limit")
def test_a_commit_the_disk_cannot_take_gives_a_local_store_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _COMMIT_ON_A_FULL_DISK, str(tmp_path / "device.sqlite")],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    refused, rows = done.stdout.splitlines()
    assert refused.startswith("sqlite3 True cannot commit a local transaction: "), refused
    assert rows == "[('after',)]"  # nothing of the failed transaction


def test_a_local_store_error_is_retryable_when_its_cause_may_pass(client, tmp_path):
    client.sync("Login")
    key = client.store.query("SELECT id FROM LocalAppointment LIMIT 1")[0][0]
    app = sqlite3.connect(tmp_path / "device.sqlite", isolation_level=None)
    app.execute("BEGIN IMMEDIATE")  # the app's own write transaction, held long
    client.store.conn.execute("PRAGMA busy_timeout = 0")
    try:
        with pytest.raises(LocalStoreError, match="database is locked") as busy:
            client.update("LocalAppointment", key, {"notes": "waits"})
    finally:
        app.execute("ROLLBACK")
        app.close()
    assert busy.value.retryable
    with pytest.raises(LocalStoreError) as wrong:  # a constraint: the same again next time
        client.insert("LocalAppointment", {"id": key, "doctor_id": 1})
    assert not wrong.value.retryable
    assert not LocalStoreError("closed").retryable  # no driver error behind it


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c, k: c.insert("LocalAppointment", {"id": 2**70}), id="insert-key"),
        pytest.param(lambda c, k: c.update("LocalAppointment", k, {"room": 2**70}), id="update"),
        pytest.param(lambda c, k: c.update("LocalAppointment", k, None), id="update-None"),
        pytest.param(lambda c, k: c.insert("LocalAppointment", [1, 2]), id="insert-list"),
    ],
)
def test_a_value_sqlite_cannot_hold_is_named_not_raised_raw(client, call):
    client.sync("Login")
    key = client.store.query("SELECT id FROM LocalAppointment LIMIT 1")[0][0]
    before = _local(client)

    with pytest.raises(LocalStoreError) as info:
        call(client, key)

    assert "'id'" in str(info.value) or "'room'" in str(info.value) or "dict" in str(info.value)
    assert _local(client) == before


def _rejected(client) -> int:
    """A rejected change on the device (a copied column is read-only on the server)."""
    client.sync("Login")
    key = client.store.query("SELECT id FROM LocalAppointment LIMIT 1")[0][0]
    client.update("LocalAppointment", key, {"doctor_name": "Dr X"})
    client.sync("Online")
    [rejected] = client.outbox.rejected()
    return rejected.id


def test_retry_refuses_values_it_cannot_write_and_takes_a_string_as_one_name(client):
    rid = _rejected(client)
    before = _local(client)

    with pytest.raises(LocalStoreError, match=r"column 'room'.*64-bit"):
        client.outbox.retry(rid, {"room": 2**80})
    with pytest.raises(LocalStoreError, match="dict of column names"):
        client.outbox.retry(rid, [1, 2])
    assert _local(client) == before

    client.outbox.retry(rid, {"notes": "kept"}, without="doctor_name")  # one name, not letters
    [pending] = client.outbox.pending()
    assert "doctor_name" not in pending.changed
    assert client.outbox.rejected() == []


def test_discard_of_an_unknown_id_raises_like_retry(client):
    rid = _rejected(client)
    client.outbox.discard(rid)
    for call in (lambda: client.outbox.discard(rid), lambda: client.outbox.discard(987654)):
        with pytest.raises(LocalStoreError, match="no rejected change with id"):
            call()


def test_pending_and_count_agree_on_a_table_named_by_a_string(client):
    client.sync("Login")
    client.insert("LocalAppointment", {"doctor_id": 1, "patient_id": 1, "room": "R1"})

    assert len(client.outbox.pending("LocalAppointment")) == 1
    assert client.outbox.count("LocalAppointment") == 1
    assert client.outbox.pending("Appointment") == []  # not a part of the name
    assert client.outbox.count("Appointment") == 0


def test_a_write_to_a_table_no_unit_pushes_is_refused(client):
    client.sync("Login")
    before = _local(client)
    doctor = client.store.query("SELECT id FROM LocalDoctor LIMIT 1")[0][0]

    for call in (
        lambda: client.insert("LocalDoctor", {"id": 999, "name": "x"}),
        lambda: client.update("LocalDoctor", doctor, {"name": "changed"}),
        lambda: client.delete("LocalDoctor", doctor),
    ):
        with pytest.raises(LocalStoreError, match="no unit pushes it"):
            call()
    assert _local(client) == before


@pytest.mark.parametrize(
    "option",
    [
        {"push_batch": 0},
        {"push_batch": -1},
        {"push_batch": 1.5},
        {"chunk_size": 0},
        {"lock_timeout": -1},
        {"lock_timeout": float("nan")},
        {"timeout": 0},
        {"timeout": float("inf")},
    ],
    ids=str,
)
def test_a_setting_no_sync_could_run_with_is_refused_at_construction(tmp_path, option):
    from syncunit import SyncClient

    name = next(iter(option))
    with pytest.raises(ValueError, match=name):
        SyncClient("http://127.0.0.1:9", tmp_path / "d.sqlite", **option)
    assert not (tmp_path / "d.sqlite").exists()  # nothing made


def test_the_outbox_and_status_after_close_say_the_client_is_closed(tmp_path):
    from syncunit import SyncClient

    client = SyncClient("http://127.0.0.1:9", tmp_path / "d.sqlite")
    client.close()
    for call in (client.outbox.pending, client.outbox.rejected, client.outbox.count):
        with pytest.raises(LocalStoreError, match="its client was closed"):
            call()
    with pytest.raises(LocalStoreError, match="its client was closed"):
        client.status  # noqa: B018
    with pytest.raises(SyncError, match="the client is closed"):
        client.connect()


@pytest.mark.parametrize(
    ("url", "option"),
    [(None, {}), ("127.0.0.1:8000", {}), ("http://127.0.0.1:9", {"encoding": "xml"})],
    ids=["no-url", "no-scheme", "encoding"],
)
def test_a_server_url_or_encoding_no_request_could_use_is_refused_at_construction(
    tmp_path, url, option
):
    """Before: ``None`` was an ``AttributeError``, a URL without its scheme and an
    unknown encoding failed only at the first request."""
    from syncunit import SyncClient

    name = "encoding" if option else "server_url"
    with pytest.raises(ValueError, match=name):
        SyncClient(url, tmp_path / "d.sqlite", **option)
    assert not (tmp_path / "d.sqlite").exists()  # nothing made


def test_watch_reports_an_unknown_unit_and_stops_and_a_refused_token_and_goes_on(make_client):
    """An unknown unit cannot come to exist by polling: told, and the watcher stops. A
    refused token may be renewed (a provider's next answer, a login): told once, and
    the watcher polls on, backing off."""
    import threading

    errors: list[tuple[str, Exception]] = []
    seen = threading.Event()

    def on_error(unit: str, exc: Exception) -> None:
        errors.append((unit, exc))
        seen.set()

    for token, unit, kind in (
        ("token-h1", "Nope", UnknownUnitError),
        ("not-a-token", "Login", AuthError),
    ):
        errors.clear()
        seen.clear()
        device = make_client(token, name=f"w-{unit}", on_error=on_error)
        device.watch(unit)
        assert seen.wait(10)
        device._live._thread.join(2)
        assert device._live._thread.is_alive() == (kind is AuthError)
        [(named, exc)] = errors
        assert (named, type(exc)) == (unit, kind)
        assert device.status.last_error == str(exc)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_a_url_that_is_not_a_syncunit_server_is_told_not_retried(tmp_path, serve, encoding):
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    from syncunit import ProtocolError, SyncClient

    async def page(request):
        return HTMLResponse("<html><body>hello</body></html>")

    async def api(request):
        return JSONResponse({"status": "ok"})

    web = serve(
        Starlette(routes=[Route("/web/{p:path}", page, methods=["GET", "POST"]),
                          Route("/api/{p:path}", api, methods=["GET", "POST"])])
    )  # fmt: skip
    for base, shown in (("web", "text/html"), ("api", "application/json")):
        device = SyncClient(f"{web.url}/{base}", tmp_path / f"{base}.sqlite", encoding=encoding)
        try:
            with pytest.raises(ProtocolError, match=f"not a syncunit server.*{shown}") as info:
                device.sync("Login")
            assert "check the server URL" in str(info.value)
            if base == "web":
                with pytest.raises(ProtocolError, match="not a syncunit server"):
                    device.catalog(refresh=True)
        finally:
            device.close()


def test_an_error_page_that_is_not_a_syncunit_server_s_is_told_by_status(tmp_path, serve):
    """A plain 404 or 405 (a syncunit server answers those with a problem) is a wrong
    URL, not retried; a proxy's 502 page is a transient failure, retried."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    from syncunit import ProblemError, ProtocolError, SyncClient

    async def page(request):
        return HTMLResponse("<html><body>hello</body></html>")

    async def bad_gateway(request):
        return HTMLResponse("<html><body>502 Bad Gateway</body></html>", status_code=502)

    web = serve(
        Starlette(routes=[Route("/read-only/{p:path}", page, methods=["GET"]),
                          Route("/down/{p:path}", bad_gateway, methods=["GET", "POST"])])
    )  # fmt: skip
    for base, shown in (("nowhere", "HTTP 404 Not Found"), ("read-only", "HTTP 405")):
        device = SyncClient(f"{web.url}/{base}", tmp_path / f"{base}.sqlite")
        try:
            with pytest.raises(ProtocolError, match=f"not a syncunit server \\({shown}") as info:
                device.sync("Login")
            assert "check the server URL" in str(info.value)
        finally:
            device.close()
    device = SyncClient(f"{web.url}/down", tmp_path / "down.sqlite")
    try:
        with pytest.raises(ProblemError) as problem:
            device.sync("Login")
        assert (problem.value.status, problem.value.code) == (502, "http-error")
        assert problem.value.retryable
    finally:
        device.close()


def test_no_timeout_is_no_read_timeout(tmp_path):
    """``timeout=None`` is httpx's: no read timeout (a connection still has 10 s)."""
    from syncunit import SyncClient

    client = SyncClient("http://127.0.0.1:9", tmp_path / "d.sqlite", timeout=None)
    try:
        assert client.http.timeout.read is None
    finally:
        client.close()
