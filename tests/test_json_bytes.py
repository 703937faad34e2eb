"""Bytes over the JSON encoding: JSON carries them as base64 text, and they arrive as
the same bytes wherever a value travels (pulled rows, pushed values and bases,
server rows in verdicts, parked sessions). The server turns the text of a blob
column back into bytes in a JSON request, the device in a JSON answer; text that
is not base64 is refused, naming the column. Non-finite reals, which JSON has not
either, travel as text the same way.
"""

from __future__ import annotations

import base64
import math
import uuid
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa

from syncunit.client.blobtext import chunk_bytes
from syncunit.errors import ProtocolError
from syncunit.policies import Detect
from syncunit.protocol import Chunk, ColumnInfo, Frame, Mutation, StreamInfo, encode_frame
from tests.support import owned_table_server
from tests.test_push_support import local_note, post_sync, push_results

PHOTO = b"\x00\x01\xffhello\x00"


def _json_device(app: Any, **options: Any) -> Any:
    device = app.client(encoding="json", **options)
    device.sync("Sync")
    return device


def _stored(device: Any, key: str) -> tuple[Any, str]:
    """The local ``data`` value of ``key`` and its SQLite storage class."""
    [row] = device.store.query("SELECT data, typeof(data) FROM LocalNote WHERE id = ?", (key,))
    return row[0], row[1]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_bytes_pulled_over_json_are_stored_as_the_same_bytes(notes_app: Any) -> None:
    app = notes_app()
    app.add("photo", data=PHOTO)
    app.add("empty", data=b"")
    app.add("none", data=None)
    device = _json_device(app)

    assert _stored(device, "photo") == (PHOTO, "blob")
    assert _stored(device, "empty") == (b"", "blob")  # not NULL, not text
    assert _stored(device, "none") == (None, "null")

    # A change on the server comes as a delta, and a removal removes.
    app.backoffice("UPDATE note SET data = NULL WHERE id = 'photo'")
    app.backoffice("DELETE FROM note WHERE id = 'empty'")
    app.add("later", data=b"\xfe" * 3)
    device.sync("Sync")
    assert _stored(device, "photo") == (None, "null")
    assert local_note(device, "empty") is None
    assert _stored(device, "later") == (b"\xfe" * 3, "blob")


def test_bytes_pushed_over_json_reach_the_server_as_the_same_bytes(notes_app: Any) -> None:
    app = notes_app(policy=Detect())
    device = _json_device(app)
    device.insert("LocalNote", {"id": "photo", "owner": "u1", "title": "p", "data": PHOTO})
    device.insert("LocalNote", {"id": "empty", "owner": "u1", "title": "e", "data": b""})
    device.insert("LocalNote", {"id": "gone", "owner": "u1", "title": "g", "data": PHOTO})
    result = device.sync("Sync")
    assert (result.applied, result.conflicts, result.rejected) == (3, [], [])
    assert app.row("photo")["data"] == PHOTO
    assert app.row("empty")["data"] == b""

    # The updates' bases hold bytes as well (Detect compares them with the server's row).
    device.update("LocalNote", "photo", {"data": b"\xff" * 10})
    device.update("LocalNote", "empty", {"data": None})
    device.delete("LocalNote", "gone")
    result = device.sync("Sync")
    assert (result.applied, result.conflicts, result.rejected) == (3, [], [])
    assert app.row("photo")["data"] == b"\xff" * 10
    assert app.row("empty")["data"] is None
    assert app.row("gone") is None
    assert _stored(device, "photo") == (b"\xff" * 10, "blob")


def test_an_edit_of_another_column_of_a_row_with_bytes_is_applied(notes_app: Any) -> None:
    app = notes_app(policy=Detect())
    app.add("photo", title="before", data=PHOTO)
    device = _json_device(app)

    device.update("LocalNote", "photo", {"title": "after"})
    result = device.sync("Sync")

    assert (result.applied, result.conflicts, result.rejected) == (1, [], [])
    assert app.row("photo")["title"] == "after"
    assert app.row("photo")["data"] == PHOTO
    assert device.outbox.rejected() == []


def test_a_conflict_brings_the_servers_bytes(notes_app: Any) -> None:
    app = notes_app(policy=Detect())
    app.add("photo", title="before", data=PHOTO)
    device = _json_device(app)
    device.update("LocalNote", "photo", {"title": "mine", "data": b"\x01"})
    app.backoffice("UPDATE note SET title = 'theirs', data = ? WHERE id = 'photo'", (b"\x02\x00",))

    result = device.sync("Sync")

    assert len(result.conflicts) == 1
    [kept] = device.outbox.rejected()
    assert kept.server_row is not None
    assert kept.server_row["data"] == b"\x02\x00"
    assert kept.attempted["data"] == b"\x01"
    # The local row is the server's again, its bytes as bytes.
    assert _stored(device, "photo") == (b"\x02\x00", "blob")
    assert local_note(device, "photo")["title"] == "theirs"  # type: ignore[index]


def test_a_parked_session_over_json_keeps_its_bytes(notes_app: Any) -> None:
    app = notes_app(policy=Detect())
    app.add("photo", title="before", data=PHOTO)
    app.add("other", title="before", data=PHOTO)
    device = _json_device(app)
    device.insert("LocalNote", {"id": "new", "owner": "u1", "title": "n", "data": b"\x00"})
    device.update("LocalNote", "photo", {"title": "edited"})  # its base holds bytes
    device.update("LocalNote", "other", {"title": "mine"})
    assert device.logout(clear=False, push=False) == 3
    app.backoffice("UPDATE note SET title = 'theirs', data = ? WHERE id = 'other'", (b"\x09",))

    device.login("t1")

    assert app.row("new")["data"] == b"\x00"
    assert (app.row("photo")["title"], app.row("photo")["data"]) == ("edited", PHOTO)
    [conflict] = device.outbox.rejected()
    assert (conflict.key, conflict.status) == ("other", "conflict")
    assert conflict.server_row is not None
    assert conflict.server_row["data"] == b"\x09"
    assert _stored(device, "other") == (b"\x09", "blob")
    assert device.outbox.parked() == {}


def _insert(key: str, data: Any) -> Mutation:
    values = {"id": key, "owner": "u1", "title": key, "data": data}
    mid = str(uuid.uuid4())
    return Mutation(seq=1, id=mid, table="LocalNote", key=key, op="insert", values=values)


def test_text_that_is_not_base64_in_a_json_push_is_refused_by_column(notes_app: Any) -> None:
    app = notes_app()
    response = post_sync(
        app.url, "Sync", token="t1", client_id="raw-json",
        mutations=[_insert("bad", "%%%%")], encoding="json",
    )  # fmt: skip
    [result] = push_results(response, "json").results
    assert (result.status, result.code) == ("rejected", "invalid-value")
    assert "column 'data'" in result.reason
    assert "base64" in result.reason
    assert app.row("bad") is None

    # A JSON request's base64 text is bytes; in MessagePack, text stays text.
    ok = post_sync(
        app.url, "Sync", token="t1", client_id="raw-json-2",
        mutations=[_insert("good", _b64(PHOTO))], encoding="json",
    )  # fmt: skip
    assert push_results(ok, "json").results[0].status == "applied"
    assert app.row("good")["data"] == PHOTO
    packed = post_sync(
        app.url, "Sync", token="t1", client_id="raw-msgpack",
        mutations=[_insert("text", _b64(PHOTO))],
    )  # fmt: skip
    [refused] = push_results(packed).results
    assert (refused.status, refused.code) == ("rejected", "invalid-value")


_BLOB_KEYED = StreamInfo(
    name="files",
    local_table="File",
    key="hash",
    mode="delta",
    columns=[ColumnInfo("hash", "blob"), ColumnInfo("name", "text"), ColumnInfo("body", "blob")],
)


def test_a_json_chunk_of_rows_brings_bytes() -> None:
    # Rows as JSON text (Chunk.json_rows). No key is bytes (the declaration refuses
    # one): removed keys are left as they came.
    aa, bb = _b64(b"\xaa"), _b64(b"\xbb")
    chunk = Chunk(
        stream="files", columns=["hash", "name", "body"], data=[],
        removed=["k1"], cursor="c",
        json_rows=f'[["{aa}", "a", null], ["{bb}", "b", ""]]',
        json_count=2,
    )  # fmt: skip
    got = chunk_bytes(chunk, _BLOB_KEYED)
    assert list(got.row_list()) == [(b"\xaa", "a", None), (b"\xbb", "b", b"")]
    assert got.removed == ["k1"]

    bad = Chunk(stream="files", columns=["hash"], data=[["%%"]], removed=[], cursor="c")
    with pytest.raises(ProtocolError, match=r"'hash'.*base64"):
        chunk_bytes(bad, _BLOB_KEYED)


# -- non-finite reals --------------------------------------------------------------------


def test_non_finite_reals_travel_over_json_both_ways(
    serve: Any, new_database: Any, tmp_path: Any
) -> None:
    """JSON writes infinity as null: a real's infinity pushed or pulled over JSON
    arrived as NULL (a NOT NULL column's default on the server), and an edit over it
    conflicted with itself. As text, it arrives as the float, both ways."""
    from syncunit import SyncClient

    reading = sa.Table(
        "reading", sa.MetaData(),
        sa.Column("id", sa.String(20), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("f", sa.Float, nullable=True),
        sa.Column("g", sa.Float, nullable=False, server_default="0"),
        sa.Column("note", sa.String(20), nullable=True),
    )  # fmt: skip
    server = owned_table_server(
        new_database("readings"), reading, "LocalReading", "Readings", policy=Detect()
    )
    inf = math.inf

    def on_server(key: str) -> tuple[Any, Any]:
        with server.store.engine.connect() as conn:
            row = conn.execute(sa.select(reading.c.f, reading.c.g).where(reading.c.id == key))
            return tuple(row.one())  # type: ignore[return-value]

    def local(key: str) -> tuple[Any, Any]:
        [row] = device.store.query("SELECT f, g FROM LocalReading WHERE id = ?", (key,))
        return row[0], row[1]

    with server.store.engine.begin() as conn:
        conn.execute(reading.insert(), {"id": "srv", "owner": "ana", "f": inf, "g": -inf})
    live = serve(server.app)
    device = SyncClient(live.url, tmp_path / "readings.sqlite", token="t", encoding="json")
    try:
        device.sync("Readings")
        assert local("srv") == (inf, -inf)

        device.insert("LocalReading", {"id": "a", "owner": "ana", "f": inf, "g": 1.0})
        device.insert("LocalReading", {"id": "b", "owner": "ana", "f": 1.0, "g": -inf})
        assert device.sync("Readings").applied == 2
        assert (on_server("a"), on_server("b")) == ((inf, 1.0), (1.0, -inf))
        assert (local("a"), local("b")) == ((inf, 1.0), (1.0, -inf))

        # The base holds the infinities: no conflict with the server's own values.
        device.update("LocalReading", "srv", {"note": "seen"})
        result = device.sync("Readings")
        assert (result.applied, result.conflicts) == (1, [])

        # A conflict's server row brings the server's infinity.
        with server.store.engine.begin() as conn:
            conn.execute(reading.update().where(reading.c.id == "srv").values(f=-inf))
        device.update("LocalReading", "srv", {"f": 2.0})
        assert [c["key"] for c in device.sync("Readings").conflicts] == ["srv"]
        [kept] = device.outbox.rejected()
        assert kept.server_row is not None
        assert (kept.server_row["f"], kept.server_row["g"]) == (-inf, -inf)
        assert local("srv") == (-inf, -inf)
    finally:
        device.close()
        server.store.engine.dispose()


_READINGS = StreamInfo(
    name="readings",
    local_table="LocalReading",
    key="id",
    mode="delta",
    columns=[ColumnInfo("id", "text"), ColumnInfo("f", "real"), ColumnInfo("note", "text")],
)


def test_a_json_chunk_brings_non_finite_reals_and_leaves_text_as_text() -> None:
    chunk = Chunk(
        stream="readings", columns=["id", "f", "note"],
        data=[["a", "b", "c", "d"], [math.inf, -math.inf, math.nan, 1.5],
              ["Infinity", "NaN", None, "x"]],
        removed=[], cursor="c",
    )  # fmt: skip
    sent = msgspec.json.decode(encode_frame(chunk, "json"), type=Frame)
    assert isinstance(sent, Chunk)
    assert sent.data[1] == ["Infinity", "-Infinity", "NaN", 1.5]
    got = chunk_bytes(sent, _READINGS)
    assert got.data[1][:2] == [math.inf, -math.inf]
    assert math.isnan(got.data[1][2])
    assert got.data[1][3] == 1.5
    assert got.data[2] == ["Infinity", "NaN", None, "x"]  # a text column's text


def test_other_text_in_a_real_column_of_a_json_push_is_refused_by_column(
    serve: Any, new_database: Any
) -> None:
    reading = sa.Table(
        "reading", sa.MetaData(),
        sa.Column("id", sa.String(20), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("f", sa.Float, nullable=True),
    )  # fmt: skip
    server = owned_table_server(new_database("readings"), reading, "LocalReading", "Readings")
    live = serve(server.app)
    try:
        mutations = [
            Mutation(seq=n, id=f"m{n}", table="LocalReading", key=key, op="insert",
                     values={"id": key, "owner": "ana", "f": f})
            for n, (key, f) in enumerate([("inf", "inf"), ("nan", math.nan)], 1)
        ]  # fmt: skip
        response = post_sync(
            live.url, "Readings", token="t", client_id="raw-json", mutations=mutations,
            encoding="json",
        )  # fmt: skip
        refused, nan = push_results(response, "json").results
        assert (refused.status, refused.code) == ("rejected", "invalid-value")
        assert "column 'f'" in refused.reason
        assert nan.status == "applied"
        with server.store.engine.connect() as conn:
            stored = conn.execute(sa.select(reading.c.f).where(reading.c.id == "nan")).scalar()
        # PostgreSQL stores NaN; SQLite stores NULL for it, whatever the encoding.
        assert stored is None or math.isnan(stored)
    finally:
        server.store.engine.dispose()
