"""A first copy's rows as JSON the database writes (SQLite), exact or not sent that way.

A client that asks (``SyncRequest.json_rows``, the client always does) may get
a first copy's chunks as one JSON text of rows each (``Chunk.json_rows``),
which a SQLite server writes in the database instead of making a Python
object per value. JSON cannot carry every value SQLite holds exactly (a real
loses digits, a blob cannot be written at all): from such a value on, the copy
comes as columns, from the last row sent. Deltas, and other stores, send
columns.
"""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest

from syncunit.client.store import LocalStore
from syncunit.errors import ProtocolError
from syncunit.protocol import (
    MSGPACK,
    Chunk,
    FrameDecoder,
    SyncRequest,
    encode_request,
)

ODD = {
    # 1/3 written with 15 digits reads back as another double; a blob is no JSON.
    "real in an INTEGER column": ("patient_id", 1 / 3),
    "blob in a TEXT column": ("notes", b"\x00\xffnot text"),
}


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, bool]]:
    """(stream, rows, came as JSON) of every chunk a device applies."""
    seen: list[tuple[str, int, bool]] = []
    apply_chunk = LocalStore.apply_chunk

    def spy(self: LocalStore, stream: Any, chunk: Chunk) -> Any:
        seen.append((chunk.stream, chunk.row_count(), bool(chunk.json_rows)))
        return apply_chunk(self, stream, chunk)

    monkeypatch.setattr(LocalStore, "apply_chunk", spy)
    return seen


def _in_scope(plain_sql: Any) -> list[str]:
    with plain_sql.transaction() as run:
        rows = run(
            "SELECT a.id FROM appointment a JOIN doctor d ON d.id = a.doctor_id"
            " WHERE d.hospital_id = 1 ORDER BY a.id"
        )
    return [r[0] for r in rows]


def test_a_first_copy_travels_as_json_on_sqlite_and_a_delta_as_columns(
    backend, make_client, plain_sql, in_sync, received
):
    device = make_client(chunk_size=16)
    device.sync("Login")
    in_sync(device)
    copy = [(n, js) for stream, n, js in received if stream == "appointments" and n]
    assert sum(n for n, _ in copy) == len(_in_scope(plain_sql))
    # Only a SQLite store writes the JSON; PostgreSQL's rows come as columns.
    assert {js for _, js in copy} == {backend == "sqlite"}

    received.clear()
    with plain_sql.transaction() as run:
        run(
            "UPDATE appointment SET notes = 'moved' WHERE id IN (SELECT a.id FROM appointment a"
            " JOIN doctor d ON d.id = a.doctor_id WHERE d.hospital_id = 1 LIMIT 3)"
        )
    assert device.sync("Login").rows_in.get("LocalAppointment") == 3
    delta = [js for stream, n, js in received if stream == "appointments" and n]
    assert delta == [False]
    in_sync(device)


@pytest.mark.parametrize("odd", sorted(ODD))
def test_a_value_json_cannot_carry_exactly_sends_the_rest_as_columns(
    odd, backend, make_client, plain_sql, in_sync, received
):
    if backend != "sqlite":
        pytest.skip("only a SQLite store writes JSON rows")
    column, value = ODD[odd]
    keys = _in_scope(plain_sql)
    middle = keys[len(keys) // 2]
    with plain_sql.transaction() as run:  # a backoffice's raw write; no foreign keys here
        run(f"UPDATE appointment SET {column} = ? WHERE id = ?", (value, middle))

    device = make_client(chunk_size=16)
    device.sync("Login")

    got = device.store.query(
        f'SELECT typeof("{column}"), "{column}" FROM "LocalAppointment" WHERE id = ?', (middle,)
    )
    assert got == [("real" if isinstance(value, float) else "blob", value)]
    copy = [(n, js) for stream, n, js in received if stream == "appointments" and n]
    # Every row once: JSON up to the chunk before the odd row, columns from there on.
    assert sum(n for n, _ in copy) == len(keys)
    kinds = [js for _, js in copy]
    assert kinds == sorted(kinds, reverse=True)
    assert kinds.count(True) == keys.index(middle) // 16
    in_sync(device)


def test_a_client_that_does_not_ask_gets_columns(backend, live, plain_sql):
    request = SyncRequest(protocol=1, client_id="plain")  # json_rows: False
    r = httpx.post(
        f"{live.url}/v1/sync/Login",
        content=encode_request(request, "msgpack"),
        headers={"Authorization": "Bearer token-h1", "Content-Type": MSGPACK},
        timeout=30,
    )
    assert r.status_code == 200
    chunks = [
        f for f in FrameDecoder("msgpack").feed(r.content)
        if isinstance(f, Chunk) and f.stream == "appointments"
    ]  # fmt: skip
    assert sum(len(c.data[0]) for c in chunks if c.data) == len(_in_scope(plain_sql))
    assert not any(c.json_rows for c in chunks)


def test_json_rows_that_do_not_match_their_chunk_are_a_protocol_error():
    rows = msgspec.json.encode([["a", 1], ["b", 2]]).decode()
    ok = Chunk("s", ["id", "n"], [], [], "c", json_rows=rows, json_count=2)
    assert ok.row_list() == [("a", 1), ("b", 2)]
    assert ok.row_count() == 2
    for bad, why in [
        (Chunk("s", ["id", "n"], [], [], "c", json_rows=rows, json_count=3), "said 3 rows"),
        (Chunk("s", ["id"], [], [], "c", json_rows=rows, json_count=2), "length 1"),
        (Chunk("s", ["id", "n"], [], [], "c", json_rows="[[1,", json_count=1), "malformed"),
        (Chunk("s", ["id", "n"], [], [], "c", json_rows='{"a": 1}', json_count=1), "malformed"),
    ]:
        with pytest.raises(ProtocolError, match=why):
            bad.row_list()
