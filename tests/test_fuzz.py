"""Fuzz the live app: requests drawn from the protocol's own structs, and raw bytes.

The strategies are derived from ``msgspec.inspect.type_info`` of ``SyncRequest``
(so a new field is fuzzed without editing this file), with edge values mixed in:
integers past 64 bits, deep nesting, long strings, wrong types, real table and
column names. Every response must be below 500; a refused one (4xx) must be a
problem document and leave the database exactly as it was.

``SYNCUNIT_FUZZ_EXAMPLES`` raises the number of examples for a long run.
"""

from __future__ import annotations

import gzip
import os
import urllib.parse
from typing import Any

import httpx
import msgspec
import msgspec.inspect as mi
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncunit.protocol import JSON, MSGPACK, PROBLEM, Failure, FrameDecoder, SyncRequest
from syncunit.server import Limits
from syncunit.server import push as push_module
from tests.support import db_state

EXAMPLES = int(os.environ.get("SYNCUNIT_FUZZ_EXAMPLES", "60"))
pytestmark = pytest.mark.timeout(max(120, EXAMPLES))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
UNITS = ["Splash", "Login", "SendAppointments", "Online", "Nope"]
TABLES = ["LocalAppointment", "LocalDoctor", "LocalSummary", "syncunit_clients", ""]
COLUMNS = ["id", "doctor_id", "patient_id", "starts_at", "ends_at", "status", "room", "notes",
           "patient_name", "hospital_id", "name", "syncunit_version"]  # fmt: skip

edge_ints = st.sampled_from([0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64 - 1])
ints = st.one_of(st.integers(-(2**63), 2**63 - 1), edge_ints)
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(TABLES + COLUMNS + ["2030-01-01T09:00:00", "booked", "nan"]),
    st.builds(lambda n: "x" * n, st.sampled_from([300, 70_000, 300_000])),
)
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(), texts, st.binary(max_size=40))


def _nest(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


values = st.one_of(
    st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
        max_leaves=12,
    ),
    st.builds(_nest, st.sampled_from([17, 40, 200])),
)


def strategy(t: mi.Type) -> st.SearchStrategy[Any]:
    """Wire values for a protocol type, plus (now and then) a value of another type."""
    return st.one_of(_strategy(t), scalars) if not isinstance(t, mi.AnyType) else values


def _strategy(t: mi.Type) -> st.SearchStrategy[Any]:
    if isinstance(t, mi.StructType):
        required = {f.encode_name: strategy(f.type) for f in t.fields if f.required}
        optional = {f.encode_name: strategy(f.type) for f in t.fields if not f.required}
        if t.cls.__name__ == "Mutation":
            required["table"] = st.sampled_from(TABLES) | texts
            optional["values"] = st.dictionaries(st.sampled_from(COLUMNS) | texts, values,
                                                 max_size=6)  # fmt: skip
        return st.fixed_dictionaries(required, optional=optional)
    if isinstance(t, mi.IntType):
        return ints
    if isinstance(t, mi.StrType):
        return texts
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(list(t.values)) | texts
    if isinstance(t, mi.UnionType):
        return st.one_of([_strategy(x) for x in t.types])
    if isinstance(t, mi.DictType):
        return st.dictionaries(_strategy(t.key_type), strategy(t.value_type), max_size=4)
    if isinstance(t, mi.ListType):
        return st.lists(strategy(t.item_type), max_size=4)
    if isinstance(t, mi.AnyType):
        return values
    raise NotImplementedError(t)  # a new kind of field: teach the fuzzer about it


requests = _strategy(mi.type_info(SyncRequest)).map(
    lambda r: {**r, "protocol": 1} if r.get("protocol") == 0 else r
)


def _encode(body: dict[str, Any], encoding: str) -> bytes:
    if encoding == "msgpack":
        try:
            return msgspec.msgpack.encode(body)
        except OverflowError:  # MessagePack holds no integer outside 64 bits: JSON does
            pass
    return msgspec.json.encode(body)  # bytes become base64 strings


def _compress(data: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(data)
    if coding == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


@pytest.fixture
def fuzzed(make_server, serve, store, monkeypatch):
    from hospital.generate import generate

    # A push past the client's last seq waits for its predecessor before its 409: 2 s
    # for each such body the fuzzer makes. The wait has tests of its own.
    monkeypatch.setattr(push_module, "PREDECESSOR_WAIT_S", 0.05)

    # No rate limit (the fuzzer is one fast principal), and no background pruning: a
    # prune started by an accepted sync would write while a refused request is checked.
    server = make_server(
        limits=Limits(requests_per_second=1e9, request_burst=10**9), tombstone_retention=None
    )
    generate(store.engine, appointments=60, hospitals=2, doctors=4, patients=20)
    live = serve(server.app)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        yield http, store


def _check(http: httpx.Client, store: Any, unit: str, body: bytes, headers: dict[str, str]):
    before = db_state(store.engine)
    r = http.post(f"/v1/sync/{unit}", content=body, headers=headers)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.headers["content-type"] == PROBLEM, r.text
        assert db_state(store.engine) == before
        return
    encoding = "json" if r.headers["content-type"] == JSON else "msgpack"
    for frame in FrameDecoder(encoding).feed(r.content):  # type: ignore[arg-type]
        if isinstance(frame, Failure):
            assert frame.status < 500, frame


@FUZZ
@given(
    body=requests,
    unit=st.sampled_from(UNITS),
    encoding=st.sampled_from(["msgpack", "json"]),
    coding=st.sampled_from(["identity", "identity", "gzip", "zstd"]),
)
def test_requests_from_the_protocol_structs(fuzzed, body, unit, encoding, coding):
    http, store = fuzzed
    raw = _encode(body, encoding)
    headers = {
        "Authorization": "Bearer token-h1",
        "Content-Type": JSON if raw[:1] == b"{" else MSGPACK,
        "Content-Encoding": coding,
        "Accept-Encoding": "identity",
    }
    _check(http, store, unit, _compress(raw, coding), headers)


@FUZZ
@given(
    body=st.binary(max_size=400),
    unit=st.sampled_from(UNITS) | st.text(min_size=1, max_size=20).filter(lambda u: "/" not in u),
    content_type=st.sampled_from([MSGPACK, JSON, "text/plain", ""]),
    coding=st.sampled_from(["identity", "gzip", "zstd", "br", "x" * 300]),
    token=st.sampled_from(["token-h1", "token-h2", "", "x" * 9000]),
)
def test_raw_bytes(fuzzed, body, unit, content_type, coding, token):
    http, store = fuzzed
    headers = {
        "Authorization": f"Bearer {token}".strip(),
        "Content-Type": content_type,
        "Content-Encoding": coding,
        "Accept-Encoding": "identity",
    }
    _check(http, store, urllib.parse.quote(unit, safe=""), body, headers)
