"""Bad input gets a clear problem+json error and changes nothing (DESIGN section 7).

Each case is sent as a raw HTTP request (to check the wire answer) and, where a
client can produce it, through ``SyncClient`` (to check the exception it raises).
"""

from __future__ import annotations

import gzip

import httpx
import msgspec
import pytest

import syncunit.client.client as client_module
from syncunit.errors import AuthError, RequestRejected, SyncError, UnknownUnitError
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
