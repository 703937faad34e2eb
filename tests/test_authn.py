"""Authentication and units per principal, over the real HTTP app.

Signed bearer tokens (JWT, with expiry and key rotation by ``kid``) beside
the pluggable function; a principal runs only the units it is allowed, and one
that loses a unit has its rows removed on its next sync.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa
from hospital.generate import generate
from hospital.models import appointment
from hospital.server import staff_auth
from hospital.units import schema

from syncunit.client import RetryPolicy, SyncClient
from syncunit.errors import AuthError
from syncunit.protocol import (
    MSGPACK,
    PROTOCOL_VERSION,
    Chunk,
    FrameDecoder,
    Subscription,
    SyncRequest,
    encode_request,
)
from syncunit.server import JWTAuth, Principal, SyncServer, TokenAuth, first_of
from tests.support import local_keys, sync_body, wait_until

KEYS = {"2026-a": "secret-a" * 4, "2026-b": "secret-b" * 4}


def _token(kid: str | None = "2026-a", key: str | None = None, **claims: Any) -> str:
    body = {"sub": "ana", "params": {"hospital_id": 1}, "exp": int(time.time()) + 600, **claims}
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(body, key or KEYS[kid or "2026-a"], algorithm="HS256", headers=headers)


@pytest.fixture
def jwt_live(store, serve):
    auth = first_of(JWTAuth(KEYS), staff_auth(store.engine))
    server = SyncServer(schema, store, authenticate=auth)
    generate(store.engine, appointments=40, hospitals=2, doctors=4, patients=20)
    return serve(server.app)


def _status(url: str, token: str, unit: str = "Login") -> int:
    r = httpx.post(
        f"{url}/v1/sync/{unit}",
        content=sync_body(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": MSGPACK},
        timeout=30,
    )
    return r.status_code


def test_signed_tokens_with_expiry_and_rotation(jwt_live):
    url = jwt_live.url
    assert _status(url, _token("2026-a")) == 200
    assert _status(url, _token("2026-b")) == 200  # the next key, during a rotation
    assert _status(url, _token("2026-a", key="forged" * 6)) == 401  # bad signature
    assert _status(url, _token("2026-z", key="whatever" * 4)) == 401  # unknown key id
    assert _status(url, _token(exp=int(time.time()) - 3600)) == 401  # expired
    assert _status(url, _token(sub=None)) == 401  # no subject
    unsigned = jwt.encode({"sub": "ana", "exp": int(time.time()) + 60}, None, algorithm="none")
    assert _status(url, unsigned) == 401
    assert _status(url, "token-h1") == 200  # the example's staff tokens keep working


def test_a_token_without_expiry_is_refused(jwt_live):
    token = jwt.encode({"sub": "ana", "params": {"hospital_id": 1}}, KEYS["2026-a"],
                       algorithm="HS256", headers={"kid": "2026-a"})  # fmt: skip
    assert _status(jwt_live.url, token) == 401


def test_a_token_names_the_units_it_may_run(jwt_live):
    token = _token(units=["Splash"])
    assert _status(jwt_live.url, token, "Splash") == 200
    r = httpx.post(
        f"{jwt_live.url}/v1/sync/Login",
        content=sync_body(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": MSGPACK},
    )
    assert r.status_code == 403
    assert r.json()["code"] == "unit-forbidden"


def test_a_principal_that_loses_a_unit_loses_its_rows(store, serve, make_client):
    allowed = {"units": None}

    def lookup(request: Any) -> Principal | None:
        return Principal("ana", {"hospital_id": 1}, units=allowed["units"])

    server = SyncServer(schema, store, authenticate=lookup)
    generate(store.engine, appointments=40, hospitals=2, doctors=4, patients=20)
    live = serve(server.app)
    client = make_client(url=live.url)
    client.sync("Login")
    assert local_keys(client, "LocalAppointment")

    allowed["units"] = frozenset({"Splash"})  # withdrawn: e.g. the user was disabled
    with pytest.raises(AuthError) as err:
        client.sync("Login")

    assert err.value.code == "unit-forbidden"
    assert err.value.status == 403
    assert local_keys(client, "LocalAppointment") == set()
    assert local_keys(client, "LocalDoctor") == set()
    assert client.store.cursors(["appointments", "doctors"]) == {}
    allowed["units"] = None  # given back: a clean download
    client.sync("Login")
    assert local_keys(client, "LocalAppointment")


def test_a_subscription_to_a_forbidden_unit_refuses_the_whole_request(store, serve):
    """A unit the principal may not run is refused as a subscription too, on every
    endpoint that reads subscriptions, and the answer names it (not the carrier)."""
    generate(store.engine, appointments=40, hospitals=2, doctors=4, patients=20)
    may_not_open = frozenset({"Login", "Online", "Splash", "SendAppointments"})
    principals = {
        "limited": Principal("ana", {"hospital_id": 1}, units=may_not_open),
        "full": Principal("rui", {"hospital_id": 1}),
    }
    server = SyncServer(schema, store, authenticate=TokenAuth(principals))
    url = serve(server.app).url
    with store.engine.connect() as conn:
        patient_id = conn.execute(sa.select(appointment.c.patient_id).limit(1)).scalar_one()

    def post(token: str, path: str, subscribed: bool = True) -> httpx.Response:
        subs = [Subscription(id="s1", unit="PatientDetails", params={"patient_id": patient_id})]
        params = {} if subscribed else {"patient_id": patient_id}
        body = SyncRequest(
            protocol=PROTOCOL_VERSION, client_id="raw", params=params,
            subscriptions=subs if subscribed else [],
        )  # fmt: skip
        return httpx.post(
            f"{url}{path}",
            content=encode_request(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": MSGPACK},
            timeout=30,
        )

    direct = post("limited", "/v1/sync/PatientDetails", subscribed=False)
    assert (direct.status_code, direct.json()["code"]) == (403, "unit-forbidden")
    assert direct.json()["unit"] == "PatientDetails"
    for path in ("/v1/sync/Online", "/v1/sync/Login", "/v1/live/Online?wait=0"):
        r = post("limited", path)
        assert r.status_code == 403, path
        problem = r.json()
        assert problem["code"] == "unit-forbidden"
        assert problem["unit"] == "PatientDetails"  # the one to drop, not the request's unit
        assert "'s1'" in problem["detail"]

    # A principal that may run it gets the subscription's rows in the same request.
    r = post("full", "/v1/sync/Online")
    assert r.status_code == 200
    frames = list(FrameDecoder("msgpack").feed(r.content))
    assert any(isinstance(f, Chunk) and f.subscription == "s1" and f.data for f in frames)
    assert post("full", "/v1/live/Online?wait=0").status_code == 200


def test_jwt_auth_refuses_the_none_algorithm():
    with pytest.raises(ValueError, match="none"):
        JWTAuth(KEYS, algorithms=["none"])


def test_a_principal_whose_scope_changes_loses_the_old_rows(server, client, plain_sql, store):
    from tests.support import appointments_of, assert_in_sync

    client.sync("Login")
    assert local_keys(client, "LocalAppointment") == set(appointments_of(store, 1))

    plain_sql("UPDATE staff SET hospital_id = 2 WHERE token = 'token-h1'")  # moved hospital
    client.sync("Login")

    assert local_keys(client, "LocalAppointment") == set(appointments_of(store, 2))
    assert_in_sync(server, client, "token-h1", "Login")


def test_admin_and_units_are_keyword_only():
    # Positional units would land in ``admin`` (a truthy set): an admin with every unit.
    with pytest.raises(TypeError):
        Principal("ana", {"hospital_id": 1}, {"Login"})  # type: ignore[misc]

    ana = Principal("ana", {"hospital_id": 1}, units=frozenset({"Login"}))
    assert ana.admin is False
    assert ana.units == frozenset({"Login"})


@pytest.mark.parametrize(
    "value", [[1, 2], {"a": 1}, 2**70, "1\x00"], ids=["list", "object", "int-past-64-bits", "nul"]
)
def test_a_claim_parameter_the_database_cannot_compare_is_refused_by_name(jwt_live, value):
    """Refused before any row is read (403, no traceback), not a 200 whose stream fails."""
    r = httpx.post(
        f"{jwt_live.url}/v1/sync/Login",
        content=sync_body(),
        headers={
            "Authorization": f"Bearer {_token(params={'hospital_id': value})}",
            "Content-Type": MSGPACK,
        },
        timeout=30,
    )
    assert r.status_code == 403, r.text
    assert r.json()["code"] == "forbidden"
    assert "parameter 'hospital_id'" in r.json()["detail"]


def test_a_claim_no_stream_filters_on_may_hold_anything(jwt_live):
    """Parameters only an ``authorize`` hook reads (roles, say) are the hook's business."""
    token = _token(params={"hospital_id": 1, "roles": ["desk", {"ward": 2}], "big": 2**70})
    assert _status(jwt_live.url, token) == 200


def test_a_claim_taken_as_an_array_or_as_json_is_not_refused_for_its_shape():
    """``= ANY(:teams)`` with an ARRAY-typed parameter takes a list (PostgreSQL's idiom
    beside an expanding IN); a JSON-typed parameter takes any JSON value."""
    from sqlalchemy.dialects.postgresql import ARRAY, JSONB

    from syncunit.server.auth import bound_parameters, unusable
    from syncunit.units import Stream, SyncSchema, SyncUnit

    meta = sa.MetaData()
    t = sa.Table(
        "doc", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("team", sa.Integer),
        sa.Column("meta", JSONB), sa.Column("owner", sa.Integer),
    )  # fmt: skip
    teams = sa.bindparam("teams", type_=ARRAY(sa.Integer))
    shape = sa.bindparam("shape", type_=JSONB)
    docs = Stream(
        "docs", t, [t.c.id, t.c.team],
        where=sa.and_(t.c.team == sa.any_(teams), t.c.meta.contains(shape),
                      t.c.owner == sa.bindparam("owner")),
    )  # fmt: skip
    bound = bound_parameters(SyncSchema([SyncUnit("Docs", [docs])]))

    assert bound == {"teams": True, "owner": False}
    ok = Principal("u", {"teams": [1, 2], "shape": {"kind": ["a"]}, "owner": 3})
    assert unusable(ok, bound) is None
    assert "parameter 'owner' is a list" in (unusable(Principal("u", {"owner": [3]}), bound) or "")


BAD_TOKENS = ["", "token-h1\n", " token-h1 ", "token-h1\r\nX-Evil: 1", "t\u00f6ken-h1", None]


@pytest.mark.parametrize(
    "bad", BAD_TOKENS, ids=["empty", "newline", "spaces", "crlf", "non-ascii", "none"]
)
def test_a_provider_token_that_cannot_be_sent_is_refused_and_the_provider_asked_again(
    make_client, bad
):
    """Never stored (it would fail every request as 'cannot reach the server'): an
    AuthError says what is wrong with it, and the next sync asks the provider again."""
    answers: list[Any] = [bad]

    def provider() -> Any:
        return answers.pop(0) if answers else "token-h1"

    client = make_client(provider)
    with pytest.raises(AuthError) as err:
        client.sync("Login")

    assert err.value.code == "token-provider"
    assert err.value.retryable  # the provider's next answer may be good
    assert "cannot be sent" in str(err.value)
    assert "Authorization" not in client.http.headers
    client.sync("Login")
    assert not answers
    assert local_keys(client, "LocalAppointment")


def test_a_sync_whose_token_the_provider_renewed_counts_both_requests(make_client, tap):
    """Refused (401: the token expired), then sent again with the provider's next token:
    two requests, and the result says two."""
    answers = ["expired", "token-h1"]
    client = make_client(lambda: answers.pop(0) if answers else "token-h1", transport=tap)

    result = client.sync("Login")

    assert tap.log == [("POST", "/v1/sync/Login", 401), ("POST", "/v1/sync/Login", 200)]
    assert result.requests == 2
    assert local_keys(client, "LocalAppointment")


def test_a_token_that_cannot_be_sent_is_refused_when_given(make_client, tmp_path):
    with pytest.raises(ValueError, match="non-ASCII character U\\+00F6 at position 1"):
        SyncClient("http://127.0.0.1:9", tmp_path / "never.sqlite", token="t\u00f6ken")
    assert not (tmp_path / "never.sqlite").exists()  # refused before anything opened
    client = make_client()
    with pytest.raises(ValueError, match="control character U\\+000A"):
        client.login("token-h1\n")
    assert client.http.headers["Authorization"] == "Bearer token-h1"  # kept


def test_the_worker_reports_a_provider_token_that_cannot_be_sent_and_retries(make_client):
    """The background run is reported once and retried after its backoff; the retry asks
    the provider again, whose token now works."""
    answers: list[str] = ["t\u00f6ken-h1"]
    errors: list[tuple[str, Exception]] = []
    done: list[Any] = []

    def provider() -> str:
        return answers.pop(0) if answers else "token-h1"

    client = make_client(
        provider,
        retry=RetryPolicy(base_delay=0.05, jitter=0.0),
        on_error=lambda unit, exc: errors.append((unit, exc)),
        on_complete=done.append,
    )
    client.start()
    client.trigger("Login")
    wait_until(lambda: done)

    assert local_keys(client, "LocalAppointment")

    assert [(u, type(e).__name__, getattr(e, "code", None)) for u, e in errors] == [
        ("Login", "AuthError", "token-provider")
    ]
    assert "non-ASCII" in str(errors[0][1])
