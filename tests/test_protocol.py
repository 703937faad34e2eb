"""The wire: frames in MessagePack and JSON, HTTP compression, incremental decoding.

DESIGN section 7: typed messages, MessagePack by default and JSON for
debugging, columnar rows, HTTP compression.
"""

from __future__ import annotations

import gzip
import itertools
import zlib

import httpx
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncunit.errors import ProtocolError
from syncunit.protocol import (
    JSON,
    MSGPACK,
    Chunk,
    End,
    Failure,
    FrameDecoder,
    MutationResult,
    PushResults,
    StreamStart,
    content_type,
    encode_frame,
)
from tests.support import chunks, local_rows, raw_sync, sync_body

FRAMES = [
    StreamStart(stream="appointments", total=200, reset=True),
    Chunk(
        stream="appointments",
        columns=["id", "n", "x", "name", "none", "flag"],
        data=[
            ["a", "b"],
            [1, -(2**62)],
            [0.5, -1e300],
            ["Jos\u00e9 \u2764 \n'q'", ""],
            [None, None],
            [True, False],
        ],
        removed=["gone-1", 7],
        cursor="c1.abc",
        reset=True,
        complete=False,
    ),
    Chunk(stream="doctors", columns=[], data=[], removed=[], cursor="c1.x", complete=True),
    PushResults(
        results=[
            MutationResult(seq=1, id="m1", status="applied"),
            MutationResult(
                seq=2,
                id="m2",
                status="conflict",
                reason="changed by someone else",
                code="conflict",
                server_row={"id": "a", "notes": None},
            ),
        ],
        last_seq=2,
    ),
    End(server_time="2026-01-05T08:00:00+00:00"),
    Failure(status=500, code="internal", title="The server failed", detail="see the log"),
]


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_every_frame_round_trips(encoding):
    for frame in FRAMES:
        assert list(FrameDecoder(encoding).feed(encode_frame(frame, encoding))) == [frame]


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_frames_fed_one_byte_at_a_time(encoding):
    wire = b"".join(encode_frame(f, encoding) for f in FRAMES)
    decoder = FrameDecoder(encoding)
    out = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
    assert out == FRAMES
    assert decoder.pending == 0


def test_malformed_frames_raise_protocol_error():
    with pytest.raises(ProtocolError):
        list(FrameDecoder("msgpack").feed(b"\x00\x00\x00\x02\xc1\xc1"))
    with pytest.raises(ProtocolError):
        list(FrameDecoder("json").feed(b'{"type": "nope"}\n'))
    with pytest.raises(ProtocolError):
        list(FrameDecoder("msgpack", max_frame=10).feed(b"\x00\x00\x01\x00"))


# -- Hypothesis: chunks through the decoder in random splits ------------------------------------

ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)


@st.composite
def chunk_frames(draw):
    ncols = draw(st.integers(0, 5))
    nrows = draw(st.integers(1, 8)) if ncols else 0
    columns = draw(st.lists(st.text(min_size=1, max_size=8), min_size=ncols, max_size=ncols))
    data = [draw(st.lists(scalars, min_size=nrows, max_size=nrows)) for _ in columns]
    return Chunk(
        stream=draw(st.text(min_size=1, max_size=12)),
        columns=columns,
        data=data,
        removed=draw(st.lists(st.one_of(st.text(max_size=10), ints), max_size=5)),
        cursor=draw(st.text(max_size=30)),
        reset=draw(st.booleans()),
        complete=draw(st.booleans()),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(chunk_frames(), min_size=1, max_size=6),
    encoding=st.sampled_from(["msgpack", "json"]),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_chunks_survive_any_split_of_the_byte_stream(frames, encoding, cuts):
    wire = b"".join(encode_frame(f, encoding) for f in frames)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    decoder = FrameDecoder(encoding)
    out = []
    for a, b in itertools.pairwise(points):
        out += decoder.feed(wire[a:b])
    assert out == frames
    assert decoder.pending == 0


# -- over HTTP ----------------------------------------------------------------------------------


def test_client_syncs_with_json_encoding(make_client, tap, in_sync):
    client = make_client(encoding="json", transport=tap)

    client.sync("Splash")
    client.sync("Login")

    assert len(tap.responses) == 2
    assert len(chunks(tap.last, "appointments")) > 2  # decoded as JSON lines by the tap
    in_sync(client, "Login")
    in_sync(client, "Splash")


def test_json_and_msgpack_responses_carry_the_same_rows(live):
    as_msgpack = raw_sync(live.url, "Login", token="token-h1", chunk_size=50)
    as_json = raw_sync(live.url, "Login", token="token-h1", chunk_size=50, encoding="json")
    assert chunks(as_json) == chunks(as_msgpack)


def _decompressor(coding):
    if coding == "gzip":
        d = zlib.decompressobj(31)
        return d.decompress
    return zstandard.ZstdDecompressor().decompressobj().decompress


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_compressed_response_decodes_to_the_same_frames(live, coding, encoding):
    plain = raw_sync(live.url, "Login", token="token-h1", chunk_size=30, encoding=encoding)
    headers = {
        "Authorization": "Bearer token-h1",
        "Content-Type": content_type(encoding),
        "Accept": content_type(encoding),
        "Accept-Encoding": coding,
    }
    body = sync_body(chunk_size=30, encoding=encoding)
    raw = bytearray()
    with (
        httpx.Client(base_url=live.url, timeout=60.0) as http,
        http.stream("POST", "/v1/sync/Login", content=body, headers=headers) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-encoding"] == coding
        assert r.headers["content-type"] == (MSGPACK if encoding == "msgpack" else JSON)
        for data in r.iter_raw():
            raw += data
    decoder = FrameDecoder(encoding)
    frames = list(decoder.feed(_decompressor(coding)(bytes(raw))))
    assert decoder.pending == 0
    assert chunks(frames) == chunks(plain)
    assert isinstance(frames[-1], End)
    assert len(raw) < sum(len(encode_frame(f, encoding)) for f in frames)


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_compressed_request_body_is_accepted(live, coding):
    body = sync_body(chunk_size=40)
    packed = gzip.compress(body) if coding == "gzip" else zstandard.ZstdCompressor().compress(body)
    r = httpx.post(
        live.url + "/v1/sync/Login",
        content=packed,
        headers={
            "Authorization": "Bearer token-h1",
            "Content-Type": MSGPACK,
            "Content-Encoding": coding,
            "Accept-Encoding": "identity",
        },
    )
    assert r.status_code == 200
    frames = list(FrameDecoder("msgpack").feed(r.content))
    assert len(chunks(frames, "appointments")) == 200 // 40 + 1


def test_default_client_negotiates_compression_and_stays_in_sync(live, client, server, in_sync):
    result = client.sync("Login")
    assert result.bytes_in > 0
    in_sync(client)
    # The bytes counted are the compressed ones: well below the raw frames' size.
    raw = raw_sync(live.url, "Login", token="token-h1", chunk_size=16)
    assert result.bytes_in < sum(len(encode_frame(f)) for f in raw)
    assert len(local_rows(client, server, "appointments")) == 200
