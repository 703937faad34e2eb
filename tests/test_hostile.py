"""A hostile device against the live hospital app: every bad request is a 4xx
problem saying what was wrong, changes nothing, logs one line, and the server
keeps serving everybody else.
"""

from __future__ import annotations

import gc
import gzip
import itertools
import logging
import random
import socket
import time
import tracemalloc
from functools import partial
from typing import Any

import anyio
import httpx
import msgspec
import psycopg
import pytest
import sqlalchemy as sa
import zstandard

from syncunit.errors import ProblemError, ProtocolError
from syncunit.policies import Detect
from syncunit.protocol import (
    JSON,
    MSGPACK,
    PROBLEM,
    Chunk,
    End,
    Mutation,
    MutationResult,
    PushResults,
    StreamStart,
    SyncRequest,
    decode_request,
)
from syncunit.server.auth import Principal
from syncunit.server.changes import StreamReader
from syncunit.server.cursor import decode_cursor, encode_cursor
from syncunit.server.inspector import SyncLog
from syncunit.server.limits import Limits, check_mutations, decode_checked, inflate
from syncunit.server.problems import ProblemException
from tests.support import (
    TapTransport,
    appointments_of,
    assert_in_sync,
    db_state,
    expected_rows,
    final_cursors,
    local_keys,
    local_rows,
    owned_table_server,
    principal_params,
    raw_sync,
    removed_keys,
    sync_body,
    wait_until,
)
from tests.test_push_support import frames_of, post_sync

AUTH = {"Authorization": "Bearer token-h1"}


def _post(url: str, body: bytes, headers: dict[str, str] | None = None, unit: str = "Login"):
    h = {**AUTH, "Content-Type": MSGPACK, "Accept-Encoding": "identity", **(headers or {})}
    return httpx.post(f"{url}/v1/sync/{unit}", content=body, headers=h, timeout=30)


def _assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert problem["code"] == code
    assert problem["detail"]
    assert "Traceback" not in r.text
    return dict(problem)


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _push(mutation: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode(
        {"protocol": 1, "client_id": "hostile", "mutations": [
            {"seq": 1, "id": "m1", "table": "LocalAppointment", "op": "insert",
             "key": "0190aaaa-0000-7000-8000-0000000000aa", **mutation}]}
    )  # fmt: skip


# -- bodies ----------------------------------------------------------------------------


def test_a_zstd_bomb_is_stopped_at_the_limit(live, store):
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (512 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    before = db_state(store.engine)

    r = _post(live.url, bomb, {"Content-Encoding": "zstd"})

    _assert_problem(r, 413, "body-too-large")
    assert db_state(store.engine) == before


@pytest.mark.parametrize("coding", ["zstd", "gzip"])
def test_decompression_stops_at_the_limit_without_growing_memory(coding):
    raw = b"\0" * (256 * 1024 * 1024)
    packed = zstandard.ZstdCompressor().compress(raw) if coding == "zstd" else gzip.compress(raw)
    del raw
    limit = 1024 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(Exception, match="more than"):
            inflate(packed, coding, limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit


def test_a_slow_upload_is_cut(make_server, serve, store):
    from hospital.generate import generate

    server = make_server(limits=Limits(upload_timeout=0.5))
    generate(store.engine, appointments=10, hospitals=1, doctors=2, patients=5)
    live = serve(server.app)

    def trickle():
        yield b"\x82"
        time.sleep(1.5)
        yield b"\xa8protocol\x01"

    r = httpx.post(f"{live.url}/v1/sync/Login", content=trickle(), timeout=10,
                   headers={**AUTH, "Content-Type": MSGPACK})  # fmt: skip
    _assert_problem(r, 408, "upload-timeout")


# -- fields ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutation", "status", "code"),
    [
        pytest.param({"values": {"notes": "x" * (300 * 1024)}}, 413, "field-too-large",
                     id="huge-value"),
        pytest.param({"values": {"n" * 5000: 1}}, 413, "field-too-large", id="huge-column-name"),
        pytest.param({"table": "T" * 5000}, 413, "field-too-large", id="huge-table-name"),
        pytest.param({"key": 2**63}, 422, "invalid-request", id="key-2^63"),
        pytest.param({"values": {"doctor_id": 2**64 - 1}}, 422, "invalid-request",
                     id="value-2^64-1"),
        pytest.param({"values": {"notes": _nested(20)}}, 422,
                     "invalid-request", id="nested-20"),
        pytest.param({"seq": 2**63 + 5}, 422, "invalid-request", id="seq-2^63"),
    ],
)  # fmt: skip
def test_out_of_bounds_fields_are_refused(live, store, mutation, status, code):
    before = db_state(store.engine)
    r = _post(live.url, _push(mutation), unit="SendAppointments")
    problem = _assert_problem(r, status, code)
    assert len(problem["detail"]) < 300  # the value is never echoed whole
    assert db_state(store.engine) == before


_SMALL = Limits(max_name_length=8, max_columns=3, max_field_bytes=40)  # 10 characters


def _body(encoding: str, **mutation: Any) -> bytes:
    m = {"seq": 1, "id": "m1", "table": "T", "op": "insert", "key": "k1", **mutation}
    req = {"protocol": 1, "client_id": "d", "mutations": [m]}
    return msgspec.msgpack.encode(req) if encoding == "msgpack" else msgspec.json.encode(req)


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
@pytest.mark.parametrize(
    ("mutation", "within", "refused"),
    [
        ({"values": {"a": "x" * 10, "b": 2**63 - 1, "c": -(2**63)}}, True, False),
        ({"values": {"a": 1.5, "b": True, "c": None}, "changed": ["a", "b", "c"]}, True, False),
        ({"key": ["k", 2], "base": {"abcdefgh": "y"}}, True, False),
        ({"values": {"a": "x" * 11}}, False, False),  # may be over 40 bytes: counted exactly
        ({"values": {"a": 2**63}}, False, True),
        ({"values": {"a": 2**64 - 1}}, False, True),
        ({"seq": 2**63}, False, True),
        ({"values": {"abcdefghi": 1}}, False, True),
        ({"base": {"abcdefghi": 1}}, False, True),
        ({"changed": ["abcdefghi"]}, False, True),
        ({"id": "m" * 9}, False, True),
        ({"table": "T" * 9}, False, True),
        ({"key": "k" * 11}, False, False),
        ({"key": "k" * 41}, False, True),
        ({"values": {"a": "\u00e9" * 21}}, False, True),
        ({"values": {"a": 1, "b": 2, "c": 3, "d": 4}}, False, True),
        ({"changed": ["a", "b", "c", "d"]}, False, True),
        ({"values": {"a": [1]}}, False, False),
        ({"values": {"a": {"b": 1}}}, False, False),
        ({"key": [["k"]]}, False, False),
    ],
)
def test_a_push_body_is_checked_while_decoded_exactly_within_the_limits(
    encoding, mutation, within, refused
):
    body = _body(encoding, **mutation)
    want = decode_request(body, encoding)

    req, checked = decode_checked(body, encoding, _SMALL)

    assert checked is within
    got = [msgspec.structs.asdict(m) for m in req.mutations]
    assert got == [msgspec.structs.asdict(m) for m in want.mutations]
    assert all(isinstance(m, Mutation) for m in req.mutations)
    if refused:  # the caller's check says what is wrong
        with pytest.raises(ProblemException):
            check_mutations(req.mutations, _SMALL)
    else:  # passed by the decoder, or found within the limits by the full check
        check_mutations(req.mutations, _SMALL)


def test_a_bytes_value_or_a_list_key_without_nesting_goes_to_the_full_check():
    body = msgspec.msgpack.encode(
        {"protocol": 1, "client_id": "d", "mutations": [
            {"seq": 1, "id": "m", "table": "T", "op": "insert", "key": "k",
             "values": {"a": b"\x00"}}]}
    )  # fmt: skip
    assert decode_checked(body, "msgpack", _SMALL)[1] is False
    flat = Limits(max_depth=0)
    assert decode_checked(_body("msgpack", key=["k", 1]), "msgpack", flat)[1] is False
    assert decode_checked(_body("msgpack", key="k"), "msgpack", flat)[1] is True


def test_decoded_mutations_and_their_results_stay_out_of_the_cycle_collector():
    # Thousands a request: tracked, they would trigger collections of the whole heap.
    req, checked = decode_checked(_body("msgpack", values={"a": 1, "b": "x"}), "msgpack", _SMALL)
    assert checked
    m = req.mutations[0]
    assert not gc.is_tracked(m)
    assert not gc.is_tracked(m.values)
    assert not gc.is_tracked(decode_request(_body("json"), "json").mutations[0])
    conflict = MutationResult(seq=1, id="m1", status="conflict", server_row={"tags": ["a"]})
    assert not gc.is_tracked(conflict)


def test_a_malformed_body_still_says_so():
    with pytest.raises(ProtocolError, match="malformed sync request"):
        decode_checked(b"\x93\x01", "msgpack", Limits())


def test_nesting_a_thousand_deep_is_a_400(live, store):
    body = (
        b'{"protocol":1,"client_id":"x","mutations":[{"seq":1,"id":"a","table":"t",'
        b'"op":"insert","key":' + b"[" * 1000 + b"]" * 1000 + b"}]}"
    )
    _assert_problem(_post(live.url, body, {"Content-Type": JSON}), 400, "malformed-request")


def test_a_rejection_reason_never_echoes_the_whole_value(live, store):
    r = _post(live.url, _push({"values": {"starts_at": "y" * 200_000}}), unit="SendAppointments")
    [pushed] = [f for f in frames_of(r) if isinstance(f, PushResults)]
    (result,) = pushed.results
    assert result.status == "rejected"
    assert len(result.reason) < 300


# -- client parameters and other request fields -------------------------------------------


def _request(**fields: Any) -> bytes:
    """A sync request as JSON (which, unlike MessagePack, holds any integer)."""
    return msgspec.json.encode({"protocol": 1, "client_id": "hostile", **fields})


def _no_error_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"params": {"patient_id": 2**63}}, id="param-2^63"),
        pytest.param({"params": {"patient_id": 2**64 - 1}}, id="param-2^64-1"),
        pytest.param({"params": {"patient_id": -(2**63) - 1}}, id="param-below-int64"),
        pytest.param({"params": {"patient_id": 1}, "subscriptions": [
            {"id": "s", "unit": "PatientDetails", "params": {"patient_id": 2**64 - 1}}]},
            id="subscription-param-2^64-1"),
        pytest.param({"params": {"patient_id": 1}, "unanswered_from": 2**64 - 1},
                     id="unanswered-from-2^64-1"),
    ],
)  # fmt: skip
def test_integers_past_64_bits_anywhere_in_a_request_are_a_422(live, store, caplog, fields):
    caplog.set_level(logging.INFO, logger="syncunit")
    before = db_state(store.engine)
    with httpx.Client(timeout=30) as http:
        headers = {**AUTH, "Content-Type": JSON, "Accept-Encoding": "identity"}
        url = f"{live.url}/v1/sync/PatientDetails"

        r = http.post(url, content=_request(**fields), headers=headers)

        problem = _assert_problem(r, 422, "invalid-request")
        assert "64 bits" in problem["detail"]
        assert len(problem["detail"]) < 300
        assert db_state(store.engine) == before
        # The connection goes on serving this device.
        ok = http.post(url, content=_request(params={"patient_id": 1}), headers=headers)
        assert ok.status_code == 200
    _no_error_logged(caplog)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"params": {"patient_id": "7" * 1_000_000}}, id="long-value"),
        pytest.param({"params": {"patient_id": ["x" * 100_000]}}, id="long-list-value"),
        pytest.param({"params": {"patient_id": 1, "p" * 100_000: 1}}, id="long-name"),
        pytest.param({"params": {"patient_id": 1, **{f"p{i}" * 500: 1 for i in range(50)}}},
                     id="many-long-names"),
        pytest.param({"params": {"patient_id": 1},
                      "subscriptions": [{"id": "s" * 100_000, "unit": "Nope" * 10_000}]},
                     id="subscription"),
        pytest.param({"params": {"patient_id": 1}, "subscriptions": [
            {"id": "s" * 100_000, "unit": "PatientDetails", "params": {"patient_id": 1}},
            {"id": "s" * 100_000, "unit": "PatientDetails", "params": {"patient_id": 1}}]},
            id="subscription-repeated"),
    ],
)  # fmt: skip
def test_a_problem_never_echoes_a_long_value_or_name_whole(live, fields):
    r = _post(live.url, _request(**fields), {"Content-Type": JSON}, unit="PatientDetails")

    assert r.status_code in (400, 422), r.text
    assert len(r.json()["detail"]) < 500


# -- NUL characters ----------------------------------------------------------------------


def _booking(seq: int, doctor: int, notes: str = "", **fields: Any) -> dict[str, Any]:
    key = f"0190aaaa-0000-7000-8000-{seq:012}"
    at = f"2031-01-01T{8 + seq // 4:02}:{15 * (seq % 4):02}:00"
    until = f"2031-01-01T{8 + seq // 4:02}:{15 * (seq % 4) + 10:02}:00"
    values = {"id": key, "doctor_id": doctor, "patient_id": 1, "starts_at": at,
              "ends_at": until, "status": "booked", "room": "R1", "notes": notes}  # fmt: skip
    return {"seq": seq, "id": f"m{seq}", "table": "LocalAppointment", "key": key,
            "op": "insert", "values": values, **fields}  # fmt: skip


def _doctor_of_hospital_1(store: Any) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT id FROM doctor WHERE hospital_id = 1")).scalar())


@pytest.mark.parametrize(
    ("fields", "mutation"),
    [
        pytest.param({"client_id": "dev\x00ice"}, {}, id="client-id"),
        pytest.param({}, {"id": "m\x001"}, id="mutation-id"),
        pytest.param({}, {"key": "k\x00ey"}, id="key"),
        pytest.param({}, {"key": ["k", "e\x00y"]}, id="list-key"),
        pytest.param({}, {"table": "Local\x00Appointment"}, id="table"),
    ],
)
def test_a_nul_in_an_identifier_is_a_422_on_every_database(live, store, caplog, fields, mutation):
    caplog.set_level(logging.INFO, logger="syncunit")
    doctor = _doctor_of_hospital_1(store)
    before = db_state(store.engine)

    body = {"protocol": 1, "client_id": "hostile", **fields,
            "mutations": [{**_booking(1, doctor), **mutation}]}  # fmt: skip
    r = _post(live.url, msgspec.msgpack.encode(body), unit="SendAppointments")

    problem = _assert_problem(r, 422, "invalid-request")
    assert "NUL" in problem["detail"]
    assert db_state(store.engine) == before
    _no_error_logged(caplog)


def test_a_pull_whose_client_id_holds_a_nul_is_a_422(live, store, caplog):
    caplog.set_level(logging.INFO, logger="syncunit")
    body = _request(client_id="pull\x00dev", unanswered_from=1)

    r = _post(live.url, body, {"Content-Type": JSON})

    assert "NUL" in _assert_problem(r, 422, "invalid-request")["detail"]
    _no_error_logged(caplog)


@pytest.mark.parametrize("count", [1, 40], ids=["alone", "in-a-batch"])
def test_a_nul_in_a_text_value_is_rejected_where_the_database_cannot_store_it(
    backend, live, store, caplog, count
):
    """PostgreSQL's text cannot hold NUL: that mutation is rejected ``invalid-value``,
    the others go ahead, and nothing is logged as a server fault. SQLite's can: the
    value is stored as sent."""
    caplog.set_level(logging.INFO, logger="syncunit")
    doctor = _doctor_of_hospital_1(store)
    odd = count // 2  # the one mutation whose notes hold a NUL
    mutations = [_booking(i + 1, doctor, "no\x00tes" if i == odd else "ok") for i in range(count)]
    body = msgspec.msgpack.encode({"protocol": 1, "client_id": "hostile", "mutations": mutations})

    r = _post(live.url, body, unit="SendAppointments")

    [pushed] = [f for f in frames_of(r) if isinstance(f, PushResults)]
    statuses = [res.status for res in pushed.results]
    key = mutations[odd]["key"]
    with store.engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT notes FROM appointment WHERE id = :k"), {"k": key}
        ).scalar()
        count_stored = conn.execute(
            sa.text("SELECT count(*) FROM appointment WHERE notes = 'ok'")
        ).scalar()
    if backend == "postgres":
        rejected = pushed.results[odd]
        assert (rejected.status, rejected.code) == ("rejected", "invalid-value")
        assert "NUL" in rejected.reason
        assert "'notes'" in rejected.reason
        assert statuses.count("applied") == count - 1
        assert stored is None
    else:
        assert statuses == ["applied"] * count
        assert stored == "no\x00tes"
    assert count_stored == count - 1
    _no_error_logged(caplog)


def _documents_server(database: str, policy: Any = None) -> tuple[Any, sa.Table]:
    """A server of one ``doc`` table with a JSON column of each kind: ``j`` (``json``
    on PostgreSQL, which keeps the text as sent) and ``jb`` (``jsonb`` there)."""
    from sqlalchemy.dialects.postgresql import JSONB

    from syncunit.server import Principal

    doc = sa.Table(
        "doc", sa.MetaData(),
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("j", sa.JSON, nullable=True),
        sa.Column("jb", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True),
    )  # fmt: skip
    tokens = {"t-ana": Principal("ana", {"owner": "ana"}),
              "t-nul": Principal("a\x00na", {"owner": "ana"}),
              "t-empty": Principal("", {"owner": "ana"}),
              "t-nul-param": Principal("ana", {"owner": "a\x00na"})}  # fmt: skip
    server = owned_table_server(database, doc, "LocalDoc", "Docs", policy=policy, tokens=tokens)
    return server, doc


def _insert_doc(url: str, token: str, client_id: str, key: str, **values: Any) -> httpx.Response:
    body = {"protocol": 1, "client_id": client_id, "mutations": [
        {"seq": 1, "id": f"m-{key}", "table": "LocalDoc", "key": key, "op": "insert",
         "values": {"id": key, "owner": "ana", **values}}]}  # fmt: skip
    return httpx.post(
        f"{url}/v1/sync/Docs",
        content=msgspec.msgpack.encode(body),
        headers={"Authorization": f"Bearer {token}", "Content-Type": MSGPACK},
        timeout=30,
    )


@pytest.mark.parametrize(
    "value",
    [{"note": "a\x00b"}, {"na\x00me": 1}, ["x", ["a\x00"]], '{"note": "a\\u0000b"}'],
    ids=["in-a-string", "in-a-name", "nested", "as-json-text"],
)
def test_a_nul_in_json_is_rejected_only_where_jsonb_cannot_store_it(
    backend, new_database, serve, caplog, value
):
    """``jsonb`` refuses NUL (PostgreSQL: "unsupported Unicode escape sequence"): such a
    value is rejected ``invalid-value`` naming its column, never a ``server-error``;
    ``json`` there, and SQLite's JSON, store it."""
    caplog.set_level(logging.INFO, logger="syncunit")
    server, doc = _documents_server(new_database("docs"))
    url = serve(server.app).url
    expected = msgspec.json.decode(value) if isinstance(value, str) else value

    plain = _insert_doc(url, "t-ana", "dev-j", "k-j", j=value)
    binary = _insert_doc(url, "t-ana", "dev-jb", "k-jb", jb=value)

    [plain_result] = next(f for f in frames_of(plain) if isinstance(f, PushResults)).results
    [binary_result] = next(f for f in frames_of(binary) if isinstance(f, PushResults)).results
    assert plain_result.status == "applied"
    with server.store.engine.connect() as conn:
        stored = {r.id: (r.j, r.jb) for r in conn.execute(sa.select(doc))}
    assert stored["k-j"] == (expected, None)
    if backend == "postgres":
        assert (binary_result.status, binary_result.code) == ("rejected", "invalid-value")
        assert "'jb'" in binary_result.reason
        assert "NUL" in binary_result.reason
        assert "k-jb" not in stored
    else:
        assert binary_result.status == "applied"
        assert stored["k-jb"] == (None, expected)
    _no_error_logged(caplog)


@pytest.mark.parametrize("token", ["t-nul", "t-empty", "t-nul-param"])
def test_a_principal_id_the_server_cannot_record_is_refused_before_anything_runs(
    backend, new_database, serve, caplog, token
):
    """The server records the principal each device pushes as, and reads rows with its
    parameters; an id or a parameter the database cannot hold (a token subject or
    claim holding NUL), or an empty id, is a 403, the database unchanged, and a
    warning for the operator, not a server fault."""
    caplog.set_level(logging.INFO, logger="syncunit")
    server, _ = _documents_server(new_database("docs"))
    url = serve(server.app).url
    before = db_state(server.store.engine)

    r = _insert_doc(url, token, "dev-1", "k-1", j={"a": 1})

    assert "principal cannot be used" in _assert_problem(r, 403, "forbidden")["detail"]
    assert db_state(server.store.engine) == before
    _no_error_logged(caplog)
    assert any("principal whose" in rec.getMessage() for rec in caplog.records)
    assert _insert_doc(url, "t-ana", "dev-1", "k-1", j={"a": 1}).status_code == 200


# -- cursors ---------------------------------------------------------------------------


def _forge(token: str, **fields: Any) -> str:
    cur = decode_cursor(token.rpartition(".")[0])
    assert cur is not None
    return encode_cursor(msgspec.structs.replace(cur, **fields))


def test_a_forged_cursor_resets_instead_of_failing_or_leaking(server, live, store, plain_sql):
    frames = raw_sync(live.url, "Login", token="token-h1", chunk_size=50)
    cursors = final_cursors(frames)
    theirs = appointments_of(store, 2)[0]
    plain_sql("DELETE FROM appointment WHERE id = :id", {"id": theirs})

    bad_field = {**cursors, "appointments": _forge(cursors["appointments"], after=[{"x": 1}],
                                                   phase="upserts")}  # fmt: skip
    frames = raw_sync(live.url, "Login", token="token-h1", cursors=bad_field, chunk_size=50)
    starts = {s.stream: s for s in frames if isinstance(s, StreamStart)}
    assert starts["appointments"].reset  # not a 500 failure frame: a clean re-download

    since_zero = {**cursors, "appointments": _forge(cursors["appointments"], since=0,
                                                    phase="removals", after=None)}  # fmt: skip
    frames = raw_sync(live.url, "Login", token="token-h1", cursors=since_zero, chunk_size=50)
    assert theirs not in removed_keys(frames, "appointments")
    assert isinstance(frames[-1], End)


# -- the live endpoint -----------------------------------------------------------------


@pytest.mark.parametrize("wait", ["nan", "inf", "-inf", "1e999", "abc"])
def test_live_wait_must_be_a_finite_number(server, live, wait):
    r = httpx.post(f"{live.url}/v1/live/Login?wait={wait}", content=sync_body(),
                   headers={**AUTH, "Content-Type": MSGPACK}, timeout=10)  # fmt: skip
    _assert_problem(r, 422, "invalid-request")
    assert server.monitor.waiters == 0


# -- logging ---------------------------------------------------------------------------


def test_a_malformed_request_logs_one_line_and_no_traceback(live, caplog):
    caplog.set_level(logging.INFO, logger="syncunit")
    caplog.clear()
    r = _post(live.url, b"\x93\xff\x00garbage")
    assert r.status_code == 400

    def records() -> list[logging.LogRecord]:
        return [rec for rec in caplog.records if rec.name.startswith("syncunit")]

    deadline = time.monotonic() + 5
    while not records() and time.monotonic() < deadline:
        time.sleep(0.02)  # the request's line is written as its response ends
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"
    assert len(records()) == 1
    assert "malformed-request" in records()[0].getMessage()


# -- admission -------------------------------------------------------------------------


def test_a_principal_over_its_rate_gets_429_with_retry_after(make_server, serve, store):
    from hospital.generate import generate

    server = make_server(limits=Limits(requests_per_second=0.5, request_burst=3))
    generate(store.engine, appointments=10, hospitals=2, doctors=2, patients=5)
    live = serve(server.app)
    statuses = [_post(live.url, sync_body(), unit="Splash").status_code for _ in range(4)]
    assert statuses[:3] == [200, 200, 200]
    r = _post(live.url, sync_body(), unit="Splash")
    _assert_problem(r, 429, "rate-limited")
    assert int(r.headers["retry-after"]) >= 1
    # another principal is not slowed down
    other = _post(live.url, sync_body(), {"Authorization": "Bearer token-h2"}, unit="Splash")
    assert other.status_code == 200


def _stall(url: str, unit: str = "Login", token: str = "token-h1") -> socket.socket:
    """Send a sync request and never read the answer (a tiny receive window)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    body = sync_body(chunk_size=20, encoding="json")
    head = (
        f"POST /v1/sync/{unit} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {JSON}\r\nAccept-Encoding: identity\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def _holding_a_slot(server: Any, url: str) -> socket.socket:
    """``_stall``, once the stalled sync holds one of the server's sync slots."""
    sock = _stall(url)
    try:
        wait_until(lambda: server.sync_slots.used >= 1, timeout=5)
    except BaseException:
        sock.close()
        raise
    return sock


def _until_released(server: Any, store: Any) -> None:
    """Wait until no sync holds a slot and no connection is checked out but those the
    store keeps (the live-changes monitor checks one out for a moment now and then)."""
    wait_until(
        lambda: (
            server.sync_slots.used == 0
            and store.engine.pool.checkedout() == store.kept_connections()
        ),
        10,
    )


def _big(store: Any) -> None:
    """Appointments with long notes: a response far larger than the socket buffers."""
    from hospital.generate import generate

    generate(store.engine, appointments=4000, hospitals=2, doctors=10, patients=200)
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE appointment SET notes = :n"), {"n": "0" * 3000})


def test_readers_that_stall_hold_no_database_connection(make_server, serve, store):
    limits = Limits(stall_seconds=0.5, max_concurrent_syncs=3, syncs_per_principal=10,
                    send_timeout=60)  # fmt: skip
    server = make_server(limits=limits)
    _big(store)
    live = serve(server.app)
    stalled = [_stall(live.url) for _ in range(6)]
    try:
        wait_until(lambda: server.sync_slots.used == 3, timeout=5)  # they took every slot
        _until_released(server, store)
        # the stalled clients are still connected, and everybody else is served
        frames = raw_sync(live.url, "Login", token="token-h2", chunk_size=500)
        assert isinstance(frames[-1], End)
    finally:
        for sock in stalled:
            sock.close()


def test_syncs_beyond_the_limit_get_503_with_retry_after(make_server, serve, store):
    limits = Limits(stall_seconds=5, max_concurrent_syncs=1, syncs_per_principal=1)
    server = make_server(limits=limits)
    _big(store)
    live = serve(server.app)
    sock = _holding_a_slot(server, live.url)
    try:
        r = _post(live.url, sync_body(), {"Authorization": "Bearer token-h2"})
        _assert_problem(r, 503, "overloaded")
        assert r.headers["retry-after"] == "1"
    finally:
        sock.close()


def test_a_response_ends_early_and_the_client_continues_in_the_same_run(
    make_server, serve, store, make_client
):
    from hospital.generate import generate

    from tests.support import assert_in_sync

    server = make_server(limits=Limits(response_chunks=3))
    generate(store.engine, appointments=400, hospitals=2, doctors=10, patients=60)
    live = serve(server.app)

    frames = raw_sync(live.url, "Login", token="token-h1", chunk_size=16)
    assert frames[-1] == End(server_time=frames[-1].server_time, complete=False)  # type: ignore[union-attr]

    client = make_client(url=live.url, chunk_size=16)
    result = client.sync("Login")
    assert result.requests >= 4
    assert_in_sync(server, client, "token-h1", "Login")


def test_a_response_of_empty_deltas_is_never_cut_short(make_server, serve, store, make_client):
    """The budget ends a response only once it moved a stream on: a unit whose streams
    have nothing new (here more streams than the budget's chunks) gets its whole
    answer in one response, not a cut one asked again for ever."""
    from hospital.generate import generate

    server = make_server(limits=Limits(response_chunks=1))
    generate(store.engine, appointments=40, hospitals=2, doctors=4, patients=10)
    live = serve(server.app)
    client = make_client(url=live.url, chunk_size=16)
    client.sync("Login")

    cursors = client.store.cursors(["doctors", "appointments"])
    frames = raw_sync(live.url, "Login", token="token-h1", cursors=cursors)
    assert frames[-1] == End(server_time=frames[-1].server_time, complete=True)  # type: ignore[union-attr]
    assert client.sync("Login").requests == 1


def test_a_stream_that_always_has_news_does_not_hold_back_the_next_ones(
    make_server, serve, store, make_client
):
    """Every request finds a new doctor (the unit's first stream), and the budget cuts
    each response after it: the continuations skip the streams this run already
    brought to their end, so the appointments arrive and the run ends."""
    import sqlalchemy as sa
    from hospital.generate import generate
    from hospital.models import doctor

    server = make_server(limits=Limits(response_chunks=1))
    generate(store.engine, appointments=60, hospitals=1, doctors=4, patients=10)
    requests = 0

    async def busy_backoffice(scope: Any, receive: Any, send: Any) -> None:
        nonlocal requests
        if scope["type"] == "http" and scope["path"].startswith("/v1/sync/"):
            requests += 1
            assert requests < 50, "the run never ends"
            with store.engine.begin() as conn:
                conn.execute(
                    sa.insert(doctor).values(
                        id=1000 + requests, name=f"new {requests}", hospital_id=1, specialty_id=1
                    )
                )
        await server.app(scope, receive, send)

    live = serve(busy_backoffice)
    client = make_client(url=live.url, chunk_size=16)
    result = client.sync("Login")

    params = principal_params(server.store, "token-h1")
    [appointments] = [s for s in server.schema.units["Login"].streams if s.name == "appointments"]
    assert local_rows(client, server, appointments) == expected_rows(server, appointments, params)
    assert result.rows_in["LocalDoctor"] >= 5  # as of its first response: after the start
    # the doctors, then a chunk of appointments each (their last one with its ending)
    assert result.requests == 1 + -(-60 // 16)


@pytest.mark.parametrize("between", ["redeploy", "new-parameters"])
def test_a_stream_done_earlier_in_the_run_is_read_again_when_its_scope_changed(
    store, serve, tmp_path, between
):
    """The first response brings stream A to its end and the budget cuts B part-way;
    before the next request A's filter narrows (a redeploy) or the principal's
    parameters change: A is read again in the same run, not skipped as done."""
    from syncunit.client import SyncClient
    from syncunit.server import Principal, SyncServer, TokenAuth
    from syncunit.units import Stream, SyncSchema, SyncUnit

    meta = sa.MetaData()
    note = sa.Table("note", meta, sa.Column("id", sa.String(20), primary_key=True),
                    sa.Column("owner", sa.String(20)), sa.Column("tag", sa.String(20)))  # fmt: skip
    task = sa.Table("task", meta, sa.Column("id", sa.String(20), primary_key=True),
                    sa.Column("owner", sa.String(20)))  # fmt: skip

    def schema(narrow: bool) -> SyncSchema:
        mine = note.c.owner == sa.bindparam("owner")
        where = sa.and_(mine, sa.func.coalesce(note.c.tag, "") != "secret") if narrow else mine
        a = Stream("A", note, [note.c.id, note.c.owner, note.c.tag], where=where, local_table="LA")
        b = Stream("B", task, [task.c.id, task.c.owner],
                   where=task.c.owner == sa.bindparam("owner"), local_table="LB")  # fmt: skip
        return SyncSchema([SyncUnit("U", [a, b])])

    who = {"owner": "u"}
    auth = TokenAuth(lambda token: Principal("p", dict(who)) if token == "t" else None)
    limits = Limits(response_chunks=2)
    v1 = SyncServer(schema(False), store, authenticate=auth, install=False, limits=limits)
    meta.create_all(store.engine)
    store.install(v1.schema)
    with store.engine.begin() as conn:
        conn.execute(note.insert(), [{"id": "n1", "owner": "u", "tag": None},
                                     {"id": "n2", "owner": "u", "tag": "secret"},
                                     {"id": "m1", "owner": "v", "tag": None}])  # fmt: skip
        conn.execute(task.insert(), [{"id": f"t{i:02}{o}", "owner": o}
                                     for i in range(12) for o in "uv"])  # fmt: skip
    live = serve(v1.app)
    v2 = v1
    if between == "redeploy":
        v2 = SyncServer(schema(True), store, authenticate=auth, install=False, limits=limits)
        store.install(v2.schema)
    requests = 0

    def on_request(request: httpx.Request) -> None:
        nonlocal requests
        if request.url.path.startswith("/v1/sync/"):
            requests += 1
            if requests == 2:  # between the first response and the next request
                live.app = v2.app
                if between == "new-parameters":
                    who["owner"] = "v"

    with SyncClient(live.url, tmp_path / "device.sqlite", token="t", chunk_size=2) as client:
        client.http.event_hooks["request"].append(on_request)
        client.sync("U")
        rows = client.store.query('SELECT id FROM "LA" ORDER BY id')

    assert requests > 2
    assert [r[0] for r in rows] == (["n1"] if between == "redeploy" else ["m1"])


def test_push_through_a_unit_that_does_not_push_is_refused(server, live, store):
    m = Mutation(seq=1, id="m", table="LocalAppointment", key="k", op="delete")
    r = post_sync(live.url, "Login", token="token-h1", client_id="c", mutations=[m])
    _assert_problem(r, 422, "invalid-request")


def test_a_client_that_reads_nothing_is_dropped_after_the_send_timeout(make_server, serve, store):
    limits = Limits(stall_seconds=0.2, send_timeout=0.5)
    server = make_server(limits=limits)
    _big(store)
    live = serve(server.app)
    sock = _stall(live.url)
    try:
        time.sleep(2.5)  # the worker stops at once; the blocked write gives up after 0.5 s
        sock.settimeout(5)
        received, closed = bytearray(), False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                closed = True
                break
            received += data
        assert closed
        # cut mid-response: the chunked body never got its last (empty) chunk
        assert not received.endswith(b"0\r\n\r\n"), "the response was sent to the end"
        assert server.sync_slots.used == 0
    finally:
        sock.close()


@pytest.mark.backends("postgres")
def test_a_database_connection_killed_mid_response_frees_the_sync_slot(
    make_server, serve, store, pg
):
    """A failover (or an administrator) ends the server's database connection while
    a sync streams: the response ends, its slot and connection are given back, and
    the next sync is served from a fresh connection."""
    limits = Limits(stall_seconds=30, max_concurrent_syncs=1, syncs_per_principal=1,
                    send_timeout=60)  # fmt: skip
    server = make_server(limits=limits)
    _big(store)
    live = serve(server.app)
    sock = _holding_a_slot(server, live.url)
    try:
        database = store.engine.url.database
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).fetchone()
        assert killed is not None
        assert killed[0] >= 1  # the sync's own connection among them
    finally:
        sock.close()  # the worker goes on, meets the dead connection and ends
    _until_released(server, store)
    frames = raw_sync(live.url, "Login", token="token-h1", chunk_size=500)
    assert isinstance(frames[-1], End)
    gc.collect()  # a cursor of the dead connection left open would warn here


@pytest.mark.backends("postgres")
def test_a_device_whose_copy_loses_the_database_keeps_its_chunks_and_resumes(
    make_server, serve, store, pg, make_client
):
    """The database ends the server's connections while a device's first copy
    streams: the device is told (503 ``database-unavailable``, not a hang, not a
    silent end), keeps the chunks it applied, and its next sync completes the copy."""
    server = make_server()
    _big(store)
    live = serve(server.app)
    tap = TapTransport()
    device = make_client(url=live.url, transport=tap, chunk_size=20)
    killed: list[int] = []

    def end_the_connections(frame: Any) -> None:
        if not killed and isinstance(frame, Chunk) and frame.stream == "appointments":
            with psycopg.connect(pg.dsn(), autocommit=True) as admin:
                row = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (store.engine.url.database,),
                ).fetchone()
            killed.append(row[0] if row else 0)

    tap.on_frame = end_the_connections
    with pytest.raises(ProblemError) as info:
        device.sync("Login")
    assert (info.value.status, info.value.code) == (503, "database-unavailable")
    assert info.value.retryable
    assert killed[0] >= 1
    kept = local_keys(device, "LocalAppointment")
    assert kept  # the chunks applied before the failure stay
    tap.on_frame = None
    result = device.sync("Login")
    assert result.rows_in["LocalAppointment"] == 2000 - len(kept)  # the rest, nothing twice
    assert_in_sync(server, device, "token-h1", "Login")


@pytest.mark.backends("postgres")
def test_a_statement_on_a_dead_connection_leaves_no_cursor_open(store, pg):
    """SQLAlchemy drops a dead connection without closing the statement's cursor;
    the store closes it (psycopg would warn when collecting it)."""
    cursors: list[Any] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda _c, cur, *_: cursors.append(cur))
    with store.engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        pg.admin(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(sa.exc.OperationalError) as info:  # a server-side cursor
            conn.execute(sa.text("SELECT 1"), execution_options={"yield_per": 10})
        assert info.value.connection_invalidated
    assert cursors[-1].name  # it was the server-side one
    assert cursors[-1].closed


@pytest.mark.backends("postgres")
def test_a_read_whose_connection_dies_leaves_no_cursor_open(server, store, pg):
    """A stream's read holding a server-side cursor when its connection dies: the
    reader's close leaves the cursor closed (closing it the first time fails on the
    dead connection, and SQLAlchemy only logs that)."""
    from hospital.units import schema

    cursors: list[Any] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda _c, cur, *_: cursors.append(cur))
    stream = next(s for s in schema.units["Login"].streams if s.name == "appointments")
    reader = StreamReader(store, stream, {"hospital_id": 1}, chunk_size=10)

    def read_a_chunk_then_lose_the_connection() -> None:
        with store.snapshot() as (conn, watermark):
            epoch, horizon = store.epoch_and_horizon(conn)
            frames = reader.frames(conn, watermark, epoch, horizon, None)
            assert any(isinstance(f, Chunk) for f in itertools.islice(frames, 3))
            pid = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
            pg.admin(f"SELECT pg_terminate_backend({pid})")
            frames.close()

    with pytest.raises(sa.exc.OperationalError):  # the snapshot's end, on the dead connection
        read_a_chunk_then_lose_the_connection()
    reading = [c for c in cursors if getattr(c, "name", None)]
    assert reading  # the read was the server-side cursor's
    assert all(c.closed for c in reading)


def test_a_response_whose_frames_fail_to_close_still_frees_its_slot(make_server, serve, store,
                                                                     caplog):  # fmt: skip
    """An observer (or a dead database connection) raising while a response ends
    early: the error is logged, and the slot goes back all the same."""
    from hospital.generate import generate

    server = make_server(limits=Limits(response_chunks=1, max_concurrent_syncs=1,
                                       syncs_per_principal=1))  # fmt: skip

    def observe(unit: Any, principal: Any, req: Any, frames: Any) -> Any:
        try:
            yield from frames
        finally:
            raise RuntimeError("the observer broke")

    server.observers.append(observe)
    generate(store.engine, appointments=100, hospitals=2, doctors=10, patients=20)
    live = serve(server.app)
    for _ in range(2):  # the second is not refused: the first gave its slot back
        frames = raw_sync(live.url, "Login", token="token-h1", chunk_size=16)
        assert frames[-1] == End(server_time=frames[-1].server_time, complete=False)  # type: ignore[union-attr]
        wait_until(lambda: server.sync_slots.used == 0, timeout=5)
    assert "ending a sync's frames failed" in caplog.text
    assert "the observer broke" in caplog.text


def test_a_cancelled_response_ends_after_its_worker(make_server, store):
    """Under an ASGI server that cancels a response when its client goes away (ASGI
    spec before 2.4), the response ends only once its worker has given back the
    database snapshot and the slot: the app's call returning means nothing is held."""
    server = make_server(limits=Limits(stall_seconds=30, send_timeout=60))
    _big(store)
    body = sync_body(chunk_size=20, encoding="json")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.0"},
        "http_version": "1.1", "method": "POST", "scheme": "http", "root_path": "",
        "path": "/v1/sync/Login", "raw_path": b"/v1/sync/Login", "query_string": b"",
        "headers": [(b"authorization", b"Bearer token-h1"), (b"content-type", JSON.encode()),
                    (b"accept-encoding", b"identity"), (b"content-length", b"%d" % len(body))],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    pieces: list[bytes] = []

    async def call() -> None:
        reading = anyio.Event()
        asked = False

        async def receive() -> dict[str, Any]:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": body, "more_body": False}
            await reading.wait()  # the client goes away once the response has begun
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                pieces.append(message["body"])
                reading.set()

        await server.app(scope, receive, send)

    anyio.run(call)
    assert pieces  # the response had begun
    assert server.sync_slots.used == 0


@pytest.mark.parametrize(
    ("kind", "sent", "stored"),
    [
        (sa.Uuid(), "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        (sa.DateTime(), "2027-03-01 09:00:00", "2027-03-01T09:00:00"),
        (sa.Numeric(10, 2), "1.5", "1.50"),
        (sa.Numeric(10, 2), "-0.00", "0.00"),
        (sa.Numeric(), "1E+2", {"postgres": "100", "sqlite": "100.0000000000"}),
        (
            sa.DateTime(timezone=True),
            "2027-03-01T09:00:00+00:00",
            {"postgres": None, "sqlite": "2027-03-01T09:00:00"},
        ),
        (  # without an offset: UTC
            sa.DateTime(timezone=True),
            "2027-03-01T09:00:00",
            {"postgres": "2027-03-01T09:00:00+00:00", "sqlite": None},
        ),
    ],
    ids=["uuid", "datetime", "numeric", "negative-zero", "exponent", "zone", "no-zone"],
)
def test_a_key_the_server_would_store_in_another_form_is_refused_naming_it(
    serve: Any, new_database: Any, tmp_path: Any, backend: str, kind: Any, sent: str, stored: Any
) -> None:
    """Stored in its own form, the row would come back as a second row beside the
    device's: the key is refused (its value kept for the app), the server's form taken.
    (A form the database keeps, ``None``, is taken as it is.)"""
    if isinstance(stored, dict):
        stored = stored[backend]
    from syncunit import SyncClient

    item = sa.Table(
        "item", sa.MetaData(),
        sa.Column("id", kind, primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
    )  # fmt: skip
    server = owned_table_server(new_database("items"), item, "LocalItem", "Items")
    live = serve(server.app)
    device = SyncClient(live.url, tmp_path / "items.sqlite", token="t")
    try:
        device.insert("LocalItem", {"id": sent, "owner": "ana"})
        if stored is None:
            assert device.sync("Items").applied == 1
            device.sync("Items")
            assert device.store.query("SELECT id FROM LocalItem") == [(sent,)]
            return
        result = device.sync("Items")
        assert [(r["key"], r["code"]) for r in result.rejected] == [(sent, "invalid-value")]
        assert f"is stored as '{stored}'" in result.rejected[0]["reason"]
        device.insert("LocalItem", {"id": stored, "owner": "ana"})
        assert device.sync("Items").applied == 1
        device.sync("Items")
        assert device.store.query("SELECT id FROM LocalItem") == [(stored,)]
    finally:
        device.close()
        server.store.engine.dispose()


def test_a_date_time_with_an_offset_is_stored_as_the_same_instant(
    serve: Any, new_database: Any, tmp_path: Any, backend: str
) -> None:
    """Sent with an offset, a date-time keeps its instant on both databases: in UTC in a
    column with time zone, and in UTC without the offset in one without (SQLite stored
    the wall time with the offset dropped, another instant)."""
    import datetime as dt

    from syncunit import SyncClient

    visit = sa.Table(
        "visit", sa.MetaData(),
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("aware", sa.DateTime(timezone=True), nullable=True),
        sa.Column("naive", sa.DateTime(), nullable=True),
    )  # fmt: skip
    server = owned_table_server(
        new_database("visits"), visit, "LocalVisit", "Visits", policy=Detect(), push_unit="Push"
    )
    live = serve(server.app)
    device = SyncClient(live.url, tmp_path / "visits.sqlite", token="t")
    sent = "2027-03-01T09:00:00.123456+05:30"
    try:
        device.insert("LocalVisit", {"id": "v1", "owner": "ana", "aware": sent, "naive": sent})
        device.insert("LocalVisit", {"id": "v2", "owner": "ana"})
        assert device.sync("Visits").applied == 2
        device.update("LocalVisit", "v2", {"aware": sent, "naive": sent})
        assert device.sync("Visits").applied == 1
        instant = dt.datetime(2027, 3, 1, 3, 30, 0, 123456)
        with server.store.engine.connect() as conn:
            rows = conn.execute(sa.select(visit.c.aware, visit.c.naive)).all()
        for aware, naive in rows:
            assert naive == instant
            if aware.tzinfo is not None:  # PostgreSQL's: in the session's zone
                aware = aware.astimezone(dt.UTC).replace(tzinfo=None)
            assert aware == instant
        # Pushed only, the row on the device is still as written: an edit over it is
        # checked against the same instant, not a conflict with itself.
        device.insert("LocalVisit", {"id": "v3", "owner": "ana", "aware": sent, "naive": sent})
        assert device.sync("Push").applied == 1
        later = "2027-03-01T10:00:00+05:30"
        device.update("LocalVisit", "v3", {"aware": later, "naive": later})
        result = device.sync("Push")
        assert (result.applied, result.conflicts) == (1, [])
    finally:
        device.close()
        server.store.engine.dispose()


def _times_server(database: str, key: Any = None) -> tuple[Any, sa.Table]:
    """A server of one ``event`` table (key ``id``: text, or of type ``key``) with a
    date-time, zoned date-time, time, zoned time and interval column; conflicts detected,
    unit ``Events`` (and ``Push``, push only) for token ``t``."""
    event = sa.Table(
        "event", sa.MetaData(),
        sa.Column("id", key if key is not None else sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("ts", sa.DateTime(), nullable=True),
        sa.Column("tstz", sa.DateTime(timezone=True), nullable=True),
        sa.Column("t", sa.Time(), nullable=True),
        sa.Column("ttz", sa.Time(timezone=True), nullable=True),
        sa.Column("dur", sa.Interval(), nullable=True),
    )  # fmt: skip
    server = owned_table_server(
        database, event, "LocalEvent", "Events", policy=Detect(), push_unit="Push"
    )
    return server, event


def _ts_insert(seq: int, key: str, ts: str) -> Mutation:
    """An insert of only ``id``, ``owner`` and ``ts`` (inserts of the same columns and
    no NULL are read a column at a time)."""
    values = {"id": key, "owner": "ana", "ts": ts}
    return Mutation(seq, f"m{seq}", "LocalEvent", key, "insert", values=values)


def _rejected(result: Any) -> dict[Any, str]:
    """Each rejected key's reason, all of them ``invalid-value``."""
    assert {r["code"] for r in result.rejected} <= {"invalid-value"}, result.rejected
    return {r["key"]: r["reason"] for r in result.rejected}


def test_a_date_time_whose_instant_in_utc_is_outside_the_years_is_rejected_alone(
    serve: Any, new_database: Any, tmp_path: Any, backend: str
) -> None:
    """An offset can move a date-time past year 1 or 9999 in UTC, which Python cannot
    hold: that change alone is rejected naming its column (as a value, in a batch of
    inserts, as a base and from RxDB); the push goes on and nothing is held behind it."""
    from syncunit import SyncClient
    from syncunit.server.rxdb import CLIENT_HEADER

    server, event = _times_server(new_database("events"))
    live = serve(server.app)
    device = SyncClient(live.url, tmp_path / "events.sqlite", token="t")
    early, late = "0001-01-01T00:00:00+01:00", "9999-12-31T23:30:00-01:00"
    try:
        device.insert("LocalEvent", {"id": "a", "owner": "ana", "tstz": "2027-03-01T09:00:00Z"})
        assert device.sync("Events").applied == 1
        year_one = "0001-01-01T00:00:00"
        for key, ts in (("b", early), ("c", "2027-03-01T09:00:00"), ("d", late), ("e", year_one)):
            device.insert("LocalEvent", {"id": key, "owner": "ana", "ts": ts})
        device.update("LocalEvent", "a", {"tstz": late})

        result = device.sync("Events")

        reasons = _rejected(result)
        assert sorted(reasons) == ["a", "b", "d"]
        assert "column 'tstz'" in reasons["a"]
        assert "column 'ts'" in reasons["b"]
        assert all("outside the years 1 to 9999 in UTC" in r for r in reasons.values())
        assert result.applied == 2
        assert device.outbox.count() == 0
        with server.store.engine.connect() as conn:
            rows = conn.execute(sa.select(event.c.id).order_by(event.c.id)).scalars().all()
        assert rows == ["a", "c", "e"]

        # A batch of inserts read a column at a time, and a base (what the device says
        # it saw), are read the same way.
        inserts = [
            _ts_insert(n, k, late if k == "h" else year_one) for n, k in enumerate("ghij", 1)
        ]
        edit = Mutation(
            seq=5, id="m5", table="LocalEvent", key="c", op="update",
            values={"ts": "2027-03-02T09:00:00"}, changed=["ts"], base={"ts": early},
        )  # fmt: skip
        raw = post_sync(live.url, "Push", token="t", client_id="raw", mutations=[*inserts, edit])
        [frame, *_] = frames_of(raw)
        assert isinstance(frame, PushResults)
        answers = [(r.status, r.code) for r in frame.results]
        ok, refused = ("applied", ""), ("rejected", "invalid-value")
        assert answers == [ok, refused, ok, ok, refused]
        rxdb = httpx.post(
            f"{live.url}/v1/rxdb/Events/events/push",
            json=[{"newDocumentState": {"id": "f", "owner": "ana", "ts": late, "_deleted": False}}],
            headers={"Authorization": "Bearer t", CLIENT_HEADER: "js-1"},
        )
        assert rxdb.status_code == 200, rxdb.text
        [answer_js] = rxdb.json()["results"]
        assert (answer_js["status"], answer_js["code"]) == ("rejected", "invalid-value")
    finally:
        device.close()
        server.store.engine.dispose()


def test_a_time_of_day_keeps_its_offset_only_where_the_database_does(
    serve: Any, new_database: Any, tmp_path: Any, backend: str
) -> None:
    """A time with an offset is refused naming its column where the database would drop
    the offset (a ``Time()`` column, a key, any time on SQLite), not stored as another
    time beside the device's. PostgreSQL's ``time with time zone`` keeps the offset
    sent, and a plain time there is UTC: an edit over either is no conflict."""
    from syncunit import SyncClient

    server, _ = _times_server(new_database("events"), key=sa.Time())
    live = serve(server.app)
    device = SyncClient(live.url, tmp_path / "events.sqlite", token="t")
    zoned = backend == "postgres"
    try:
        device.insert("LocalEvent", {"id": "08:00:00+05:30", "owner": "ana"})
        device.insert("LocalEvent", {"id": "09:00:00", "owner": "ana", "t": "09:00:00+05:30"})
        device.insert("LocalEvent", {"id": "10:00:00", "owner": "ana", "ttz": "10:00:00+05:30"})
        device.insert("LocalEvent", {"id": "11:00:00", "owner": "ana", "ttz": "11:00:00"})
        device.insert("LocalEvent", {"id": "12:00:00", "owner": "ana", "t": "12:00:00"})

        result = device.sync("Events")

        reasons = _rejected(result)
        assert sorted(reasons) == ["08:00:00+05:30", "09:00:00", *([] if zoned else ["10:00:00"])]
        assert "column 'id' keeps no offset" in reasons["08:00:00+05:30"]
        assert "column 't' keeps no offset" in reasons["09:00:00"]
        assert "send a plain time" in reasons["09:00:00"]
        device.sync("Events")
        rows = device.store.query("SELECT id, t, ttz FROM LocalEvent ORDER BY id")
        assert rows == [
            *([("10:00:00", None, "10:00:00+05:30")] if zoned else []),
            ("11:00:00", None, "11:00:00+00:00" if zoned else "11:00:00"),
            ("12:00:00", "12:00:00", None),
        ]
        # Pushed only (the device keeps the time as written): its edit is checked
        # against the time stored, the same one.
        device.insert("LocalEvent", {"id": "13:00:00", "owner": "ana", "ttz": "13:00:00"})
        if zoned:
            device.insert("LocalEvent", {"id": "14:00:00", "owner": "ana", "ttz": "14:00:00+05:30"})
        assert device.sync("Push").applied == (2 if zoned else 1)
        device.update("LocalEvent", "13:00:00", {"ttz": "13:30:00"})
        if zoned:
            device.update("LocalEvent", "14:00:00", {"ttz": "14:30:00+05:30"})
        result = device.sync("Push")
        assert (result.applied, result.conflicts, result.rejected) == (2 if zoned else 1, [], [])
    finally:
        device.close()
        server.store.engine.dispose()


def test_a_fraction_of_a_second_finer_than_microseconds_is_refused_not_cut(
    serve: Any, new_database: Any, tmp_path: Any, backend: str
) -> None:
    """Python's parsers would drop digits past the microseconds (the precision both
    databases keep): such a value is rejected naming its column, in a batch of inserts
    too. A base is compared as the database reads the value: cut, not refused (SQLite
    sends text another writer stored as it is)."""
    from syncunit import SyncClient

    server, event = _times_server(new_database("events"))
    live = serve(server.app)
    device = SyncClient(live.url, tmp_path / "events.sqlite", token="t")
    fine = "2027-03-01T09:00:00.123456"
    try:
        for key, ts in (("a", fine), ("b", fine + "789"), ("c", fine), ("d", fine)):
            device.insert("LocalEvent", {"id": key, "owner": "ana", "ts": ts})
        device.insert("LocalEvent", {"id": "e", "owner": "ana", "t": "09:00:00.1234567"})
        device.insert("LocalEvent", {"id": "f", "owner": "ana", "dur": "PT0.0000001S"})

        result = device.sync("Events")

        reasons = _rejected(result)
        assert sorted(reasons) == ["b", "e", "f"]
        for key, column in (("b", "ts"), ("e", "t"), ("f", "dur")):
            assert f"column {column!r}" in reasons[key]
            assert "microseconds" in reasons[key]
        assert result.applied == 3
        inserts = [_ts_insert(n, k, fine + "7" * (k == "h")) for n, k in enumerate("ghij", 1)]
        edit = Mutation(
            seq=5, id="m5", table="LocalEvent", key="a", op="update",
            values={"ts": "2027-03-02T09:00:00"}, changed=["ts"], base={"ts": fine + "9"},
        )  # fmt: skip
        raw = post_sync(live.url, "Push", token="t", client_id="raw", mutations=[*inserts, edit])
        [frame, *_] = frames_of(raw)
        assert isinstance(frame, PushResults)
        assert [r.status for r in frame.results] == ["applied", "rejected", *["applied"] * 3]
        with server.store.engine.connect() as conn:
            stored = conn.execute(sa.select(event.c.ts).where(event.c.id == "a")).scalar()
        assert stored.isoformat() == "2027-03-02T09:00:00"
    finally:
        device.close()
        server.store.engine.dispose()


@pytest.mark.parametrize(
    ("server", "policy"),
    [("current", "detect"), ("current", "last-write-wins"), ("old", "detect")],
)
def test_a_key_its_collation_takes_for_a_stored_one_is_refused_and_the_device_keeps_that_row(
    serve: Any,
    new_database: Any,
    tmp_path: Any,
    backend: str,
    monkeypatch: Any,
    server: str,
    policy: str,
) -> None:
    """A key column that compares text without regard to case (SQLite's NOCASE, a
    nondeterministic ICU collation on PostgreSQL) finds the stored 'ABC' for a pushed
    'abc': the change is refused naming both, the stored row is left as it is (not
    overwritten by last-write-wins), and the device holds it alone, not wedged on its
    own 'abc'. From a server that takes 'abc' for the stored row (one that does not
    compare the keys, ``old``), a conflict still leaves the device able to sync."""
    from syncunit import SyncClient
    from syncunit.policies import LastWriteWins
    from syncunit.server import mutation

    if server == "old":  # under last-write-wins, it overwrites 'ABC': no device undoes that
        monkeypatch.setattr(mutation, "_other_key", lambda stored, key: False)
    database = new_database("items")
    collation = "NOCASE"
    if backend == "postgres":
        collation = "ci"
        engine = sa.create_engine(database)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2',"
                " deterministic = false)"
            )
        engine.dispose()
    item = sa.Table(
        "item", sa.MetaData(),
        sa.Column("id", sa.String(20, collation=collation), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("note", sa.String(20)),
    )  # fmt: skip
    served = owned_table_server(
        database, item, "LocalItem", "Items",
        policy=Detect(merge=False) if policy == "detect" else LastWriteWins(),
    )  # fmt: skip
    with served.store.engine.begin() as conn:
        conn.execute(item.insert(), {"id": "ABC", "owner": "ana", "note": "server"})
    live = serve(served.app)
    device = SyncClient(live.url, tmp_path / "items.sqlite", token="t")
    try:
        device.sync("Items")
        device.insert("LocalItem", {"id": "abc", "owner": "ana", "note": "device"})
        result = device.sync("Items")
        if server == "old":
            assert [(c["key"], c["code"]) for c in result.conflicts] == [("abc", "conflict")]
        else:
            assert [(r["key"], r["code"]) for r in result.rejected] == [("abc", "invalid-value")]
            assert "collides with the stored key 'ABC'" in result.rejected[0]["reason"]
        [kept] = device.outbox.rejected()
        assert (kept.key, kept.attempted["note"]) == ("abc", "device")
        with served.store.engine.connect() as conn:
            assert conn.execute(sa.select(item.c.id, item.c.note)).all() == [("ABC", "server")]
        assert device.store.query("SELECT id, note FROM LocalItem") == [("ABC", "server")]
        device.insert("LocalItem", {"id": "xyz", "owner": "ana", "note": "later"})
        assert device.sync("Items").applied == 1
        assert device.store.query("SELECT id, note FROM LocalItem ORDER BY id") == [
            ("ABC", "server"),
            ("xyz", "later"),
        ]
    finally:
        device.close()
        served.store.engine.dispose()


# -- what a request's body may make the server hold -------------------------------------


def _notes(value_raw: bytes, key_raw: bytes | None = None) -> bytes:
    """A push of one booking whose ``notes`` (and key, if given) are raw MessagePack."""
    enc = msgspec.msgpack.encode
    key = key_raw if key_raw is not None else enc("0190aaaa-0000-7000-8000-0000000000aa")
    mutation = (
        b"\x86"
        + enc("seq")
        + b"\x01"
        + enc("id")
        + enc("m1")
        + enc("table")
        + enc("LocalAppointment")
        + enc("key")
        + key
        + enc("op")
        + enc("insert")
        + enc("values")
        + b"\x81"
        + enc("notes")
        + value_raw
    )
    return (b"\x83" + enc("protocol") + b"\x01" + enc("client_id") + enc("odd")
            + enc("mutations") + b"\x91" + mutation)  # fmt: skip


def test_the_items_of_a_request_s_values_are_bounded_in_all():
    small = Limits(max_value_items=10)

    def mutation(seq: int, key: Any = "k", **fields: Any) -> Mutation:
        return Mutation(seq=seq, id=f"m{seq}", table="T", key=key, op="insert", **fields)

    within = [
        mutation(1, values={"a": [1, 2, 3], "b": {"x": [4]}}),
        mutation(2, key=[1, 2, 3, 4, 5]),
    ]
    check_mutations(within, small)  # 3 + 1 + 1 + 5: ten
    over = [*within, mutation(3, base={"a": [None]})]
    with pytest.raises(ProblemException, match=r"mutation 2 .*at most 10 list items") as caught:
        check_mutations(over, small)
    assert caught.value.code == "field-too-large"
    # A composite key of plain values passes the decoder's own check only within it too.
    body = _body("msgpack", key=list(range(11)))
    req, checked = decode_checked(body, "msgpack", Limits(max_value_items=10, max_columns=20))
    assert not checked
    with pytest.raises(ProblemException, match="at most 10 list items"):
        check_mutations(req.mutations, small)


def test_counting_a_value_s_items_holds_no_list_as_long_as_the_value():
    value = [[i] for i in range(200_000)]
    m = Mutation(seq=1, id="m", table="T", key="k", op="insert", values={"a": value})
    tracemalloc.start()
    try:
        check_mutations([m], Limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000  # a few iterators, not one entry per item


def test_a_push_holding_too_many_items_is_a_413_naming_the_bound(make_server, serve, store):
    from hospital.generate import generate

    server = make_server(limits=Limits(max_value_items=1000))
    generate(store.engine, appointments=10, hospitals=2, doctors=2, patients=5)
    live = serve(server.app)
    before = db_state(store.engine)
    many_maps = b"\xdc" + (1001).to_bytes(2, "big") + b"\x80" * 1001

    r = _post(live.url, _notes(many_maps), unit="SendAppointments")

    problem = _assert_problem(r, 413, "field-too-large")
    assert "values['notes']" in problem["detail"]
    assert "1000 list items" in problem["detail"]
    assert db_state(store.engine) == before


@pytest.mark.parametrize("where", ["key", "values"])
def test_a_messagepack_extension_value_is_refused_naming_where(live, store, caplog, where):
    ext = b"\xd4\x05\x01"  # extension type 5
    body = _notes(ext, key_raw=ext) if where == "key" else _notes(ext)
    before = db_state(store.engine)

    r = _post(live.url, body, unit="SendAppointments")

    problem = _assert_problem(r, 422, "invalid-request")
    assert f"mutation 0 (seq 1): {where}" in problem["detail"]
    assert "extension value (type 5)" in problem["detail"]
    assert "0x" not in problem["detail"]
    assert db_state(store.engine) == before
    _no_error_logged(caplog)


def test_the_sync_log_records_a_push_whatever_its_key_holds():
    from hospital.units import schema as hospital

    log = SyncLog()
    odd = msgspec.msgpack.Ext(5, b"\x01")
    req = SyncRequest(protocol=1, client_id="dev", mutations=[
        Mutation(seq=1, id="m1", table="LocalAppointment", key=odd, op="delete")])  # fmt: skip
    results = PushResults(
        results=[MutationResult(seq=1, id="m1", status="rejected", reason="no")], last_seq=1
    )
    frames = iter([results, End(server_time="now")])

    assert len(list(log.observe(hospital.units["Online"], Principal("p"), req, frames))) == 2

    [record] = log.recent()
    assert (record.outcome, record.rejected) == ("ok", 1)
    [problem] = log.problems()
    assert "extension 5" in msgspec.json.encode(problem).decode()


def test_every_member_of_a_gzip_body_is_read(live, store):
    body = _push({"values": _booking_values()})
    r = _post(live.url, gzip.compress(body[:40]) + gzip.compress(body[40:]),
              {"Content-Encoding": "gzip"}, unit="SendAppointments")  # fmt: skip
    assert r.status_code == 200, r.text
    [pushed] = [f for f in frames_of(r) if isinstance(f, PushResults)]
    assert [x.status for x in pushed.results] == ["applied"]


@pytest.mark.parametrize("trailer", [b"not gzip at all", b"\x1f\x8b\x08", b"\0" * 8])
def test_bytes_after_the_gzip_data_are_a_400_and_nothing_is_applied(live, store, trailer):
    before = db_state(store.engine)
    body = gzip.compress(_push({"values": _booking_values()})) + trailer

    r = _post(live.url, body, {"Content-Encoding": "gzip"}, unit="SendAppointments")

    problem = _assert_problem(r, 400, "malformed-request")
    assert "gzip" in problem["detail"]
    assert db_state(store.engine) == before


def _booking_values() -> dict[str, Any]:
    return {"id": "0190aaaa-0000-7000-8000-0000000000aa", "doctor_id": 1, "patient_id": 1,
            "starts_at": "2031-01-01T10:00:00", "ends_at": "2031-01-01T10:30:00",
            "status": "booked", "room": "1", "notes": ""}  # fmt: skip


def _uploading(url: str, size: int, sent: int) -> socket.socket:
    """A sync request declaring ``size`` bytes of body, of which ``sent`` are sent."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(
        f"POST /v1/sync/Login HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer token-h2\r\n"
        f"Content-Type: {MSGPACK}\r\nContent-Length: {size}\r\n\r\n".encode()
        + b"\0" * sent
    )
    return s


def test_a_body_share_given_back_holds_nothing_more():
    """A request cancelled while a body worker inflates its body gives its share back
    at once; the worker, still running, must not hold bytes nobody will give back
    (the budget would fill, and every later request be refused 503)."""
    from syncunit.server.limits import BodyBudget

    budget = BodyBudget(100)
    held = budget.hold()
    held.grow(60)
    held.release()  # the request ended (cancelled): its share is given back

    with pytest.raises(ProblemException, match="ended while its body was read"):
        held.grow(30)  # the worker inflating its body goes on
    assert budget.held == 0
    other = budget.hold()
    other.grow(100)  # the whole budget is there for others
    other.release()


def test_request_bodies_held_at_once_are_bounded_in_all(make_server, serve, store):
    from hospital.generate import generate

    server = make_server(limits=Limits(max_buffered_bytes=10_000, max_body_bytes=10_000))
    generate(store.engine, appointments=10, hospitals=2, doctors=2, patients=5)
    live = serve(server.app)
    pull = sync_body()
    assert _post(live.url, pull).status_code == 200
    # One upload holds 8,000 bytes (declared) while it arrives...
    slow = _uploading(live.url, 8_000, 100)
    try:
        wait_until(lambda: server.bodies.held == 8_000)
        # ... so another principal's request of more than the rest is refused unread.
        r = _post(live.url, pull + b"\0" * 2_500)
        problem = _assert_problem(r, 503, "overloaded")
        assert r.headers["Retry-After"] == "1"
        assert "holds 8000 bytes of request bodies" in problem["detail"]
        assert "at most 10000 at once" in problem["detail"]
        assert "syncs" not in problem["title"].split("(")[0]  # not only about sync slots
        assert "request bodies" in problem["title"]
        assert _post(live.url, pull).status_code == 200  # a small one still fits
        # A small body inflating past the rest counts as it inflates.
        r = _post(live.url, gzip.compress(pull + b"\0" * 5_000), {"Content-Encoding": "gzip"})
        _assert_problem(r, 503, "overloaded")
    finally:
        slow.close()
    wait_until(lambda: server.bodies.held == 0)  # given back, refused or not
    assert _post(live.url, pull + b"\0" * 0).status_code == 200


def test_a_body_budget_below_the_largest_body_is_refused_at_construction(make_server):
    """A budget that one body the server takes could overrun would answer that body
    503 "retry" for ever: such limits are refused at once, naming both."""
    with pytest.raises(ValueError, match="max_buffered_bytes") as refused:
        Limits(max_buffered_bytes=1_000_000)  # max_body_bytes is 8 MiB
    assert "max_body_bytes" in str(refused.value)
    with pytest.raises(ValueError, match=r"max_buffered_bytes.*max_body_bytes"):
        make_server(limits=Limits(max_buffered_bytes=1_000_000, max_body_bytes=1_000_000),
                    max_body_bytes=2_000_000)  # fmt: skip
    assert Limits(max_buffered_bytes=1_000_000, max_body_bytes=1_000_000)  # equal: fine


def test_a_body_that_could_never_be_held_is_too_large_not_overloaded(make_server, serve, store):
    """A compressed body holds its compressed and its inflated bytes at once: with a
    budget equal to the largest body, one near that size never fits, however idle
    the server. 503 "retry in 1 s" made a device send it for ever; 413 says to send
    less (a device splits its push)."""
    from hospital.generate import generate

    server = make_server(limits=Limits(max_buffered_bytes=10_000, max_body_bytes=10_000))
    generate(store.engine, appointments=10, hospitals=2, doctors=2, patients=5)
    live = serve(server.app)
    noise = random.Random(7).randbytes(6_000)  # incompressible
    r = _post(live.url, gzip.compress(sync_body() + noise), {"Content-Encoding": "gzip"})
    problem = _assert_problem(r, 413, "body-too-large")
    assert "max_buffered_bytes" in problem["detail"]
    assert server.bodies.held == 0
    assert _post(live.url, sync_body()).status_code == 200


def _stalled_decoding(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> Any:
    """Make ``module.name`` wait until the second event returned is set (at most 10 s);
    the first is set once it waits."""
    import threading

    entered, release = threading.Event(), threading.Event()
    real = getattr(module, name)

    def stalled(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, stalled)
    return entered, release


@pytest.mark.parametrize("path", ["sync", "rxdb"])
def test_others_are_served_while_a_large_body_is_decoded(live, store, monkeypatch, path):
    import threading

    from syncunit.server import app as app_module
    from syncunit.server import rxdb as rxdb_module
    from syncunit.server.limits import INLINE_BODY_BYTES

    notes = "n" * 1000
    if path == "sync":
        entered, release = _stalled_decoding(monkeypatch, app_module, "decode_checked")
        mutations = [{"seq": i + 1, "id": f"m{i}", "table": "LocalAppointment", "op": "update",
                      "key": f"0190aaaa-0000-7000-8000-{i:012x}", "values": {"notes": notes},
                      "changed": ["notes"]} for i in range(100)]  # fmt: skip
        body = msgspec.msgpack.encode({"protocol": 1, "client_id": "big", "mutations": mutations})
        send = partial(_post, live.url, body, unit="SendAppointments")
    else:
        entered, release = _stalled_decoding(monkeypatch, rxdb_module, "check_mutations")
        rows = [{"assumedMasterState": None, "newDocumentState": {
            **_booking_values(), "id": f"0190aaaa-0000-7000-8000-{i:012x}", "notes": notes}}
            for i in range(100)]  # fmt: skip
        body = msgspec.json.encode(rows)
        headers = {**AUTH, "Syncunit-Client-Id": "big"}
        url = f"{live.url}/v1/rxdb/Online/appointments/push"
        send = partial(httpx.post, url, content=body, headers=headers, timeout=30)
    assert len(body) > INLINE_BODY_BYTES
    answers: list[httpx.Response] = []
    big = threading.Thread(target=lambda: answers.append(send()))
    big.start()
    try:
        assert entered.wait(10)
        # While the body waits on its worker, the event loop answers another principal.
        r = httpx.get(f"{live.url}/v1/catalog", headers={"Authorization": "Bearer token-h2"},
                      timeout=5)  # fmt: skip
        assert r.status_code == 200
    finally:
        release.set()
        big.join(30)
    [answer] = answers
    assert answer.status_code == 200, answer.text
