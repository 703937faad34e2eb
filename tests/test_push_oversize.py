"""Pushes sized under the server's bounds, and changes too large for any push.

The server refuses a whole push request that holds a value over its per-value
limit (``field-too-large``) or that is over its body limit (``body-too-large``),
before it applies anything, and says its bounds in every answer
(``protocol.PUSH_LIMITS``). The device sizes each batch by its encoded bytes under
them; a change that alone cannot pass them is surfaced as a rejection with its
values kept (never numbered, or withdrawn from flight with the numbers after it
moved down), and the changes after it go on (invariant 2: no lost write; 3:
exactly once, in order).
"""

from __future__ import annotations

import json
import random
import sqlite3
import string
from typing import Any

import httpx
import msgspec
import pytest

from syncunit.errors import NetworkError
from syncunit.policies import Detect, LastWriteWins
from syncunit.protocol import MAX_SUBSCRIPTIONS, PUSH_LIMITS, PushLimits
from syncunit.server.limits import Limits
from tests.test_push_support import FaultTransport, local_note, local_notes, outbox_rows

KB = 1024
#: Small bounds keep the bodies small: 64 KiB a value, 1 MiB a request.
SMALL = Limits(
    max_field_bytes=64 * KB,
    max_body_bytes=1024 * KB,
    requests_per_second=1e6,
    request_burst=10**6,
)


def _text(n: int, seed: int) -> str:
    """``n`` characters that gzip cannot shrink much."""
    rnd = random.Random(seed)
    return "".join(rnd.choices(string.ascii_letters, k=n))


def _note(device: Any, key: str, **values: Any) -> None:
    device.insert("LocalNote", {"id": key, "owner": "u1", "title": key, **values})


def _device(notes_app: Any, limits: Limits = SMALL, **options: Any) -> tuple[Any, Any, Any]:
    app = notes_app(limits=limits)
    app.add("s1", title="on the server")
    fault = options.pop("transport", None) or FaultTransport()
    device = app.client(transport=fault, **options)
    device.sync("Sync")
    return app, device, fault


def _push_bodies(fault: FaultTransport) -> list[int]:
    return [len(r.mutations) for r in fault.sent if r.mutations]


def _assert_surfaced(device: Any, key: str, code: str, attempted: dict[str, Any]) -> None:
    [rejected] = device.outbox.rejected()
    assert (rejected.table, rejected.key, rejected.status, rejected.code) == (
        "LocalNote",
        key,
        "rejected",
        code,
    )
    assert "then retry the change with" in rejected.reason
    for column, value in attempted.items():
        assert rejected.attempted[column] == value  # the values are kept


@pytest.mark.parametrize("unit", ["Sync", "Push"])
def test_a_value_over_the_field_limit_is_surfaced_and_the_changes_after_it_go_on(
    notes_app: Any, unit: str
) -> None:
    app, device, fault = _device(notes_app)
    photo = b"\x89PNG" + b"\x00" * (300 * KB)  # a 300 KB value
    _note(device, "before")
    _note(device, "photo", data=photo)
    _note(device, "after")
    device.update("LocalNote", "s1", {"title": "an edit written later"})

    result = device.sync(unit)

    assert result.applied == 3
    assert [r["key"] for r in result.rejected] == ["photo"]
    _assert_surfaced(device, "photo", "field-too-large", {"data": photo})
    assert outbox_rows(device) == []
    assert local_note(device, "photo") is None  # as for a rejected insert: not on the server
    rows = {r[0]: r[2] for r in app.rows("u1")}
    assert rows == {"s1": "an edit written later", "before": "before", "after": "after"}
    # No number was spent on it: the server saw 1, 2, 3 and waits for nothing.
    assert [seq for seq, _ in app.logged(device.client_id)] == [1, 2, 3]
    # Later changes go on; the app retries it with a smaller value.
    _note(device, "later")
    [rejected] = device.outbox.rejected()
    device.outbox.retry(rejected.id, {"data": b"small"})
    assert device.sync(unit).applied == 2
    assert app.row("photo")["data"] == b"small"  # type: ignore[index]
    assert device.outbox.rejected() == []
    assert device.outbox.count() == 0
    assert max(_push_bodies(fault)) <= 3


def test_an_update_over_the_field_limit_keeps_the_row_the_server_has(notes_app: Any) -> None:
    app, device, _ = _device(notes_app)
    device.update("LocalNote", "s1", {"body": _text(100 * KB, 1), "title": "long"})
    _note(device, "after")
    result = device.sync("Sync")
    assert result.applied == 1
    assert [r["code"] for r in result.rejected] == ["field-too-large"]
    assert local_note(device, "s1")["title"] == "on the server"  # type: ignore[index]
    assert app.row("s1")["title"] == "on the server"  # type: ignore[index]
    assert app.row("after") is not None


def _server_writes(app: Any, key: str, **values: Any) -> None:
    """A change to row ``key`` written on the server (its values may be of any size)."""
    with app.server.store.engine.begin() as conn:
        conn.execute(app.note.update().where(app.note.c.id == key).values(values))


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
@pytest.mark.parametrize(
    "policy",
    [Detect(), Detect(merge=False), LastWriteWins()],
    ids=["detect", "detect-whole-row", "last-write-wins"],
)
def test_a_row_holding_values_over_the_field_limit_can_be_edited_and_deleted(
    notes_app: Any, encoding: str, policy: Any
) -> None:
    """Values written on the server may be over the field limit (a pull carries them).
    The base of a change to such a row carries their digests: an edit of another
    column, of the large value itself, and a delete are sent, and a change the
    server made meanwhile is caught wherever the policy looks for one."""
    app = notes_app(limits=SMALL, policy=policy)
    photo, body = b"\x01" * (100 * KB), _text(100 * KB, 7)
    app.add("big", title="t0", data=photo, body=body)
    fault = FaultTransport()
    device = app.client(transport=fault, encoding=encoding)
    device.sync("Sync")
    detects = policy.detects

    device.update("LocalNote", "big", {"title": "edited"})
    assert device.sync("Sync").applied == 1
    [sent] = [m for r in fault.sent for m in r.mutations]
    assert sorted(sent.digested) == ["body", "data"]
    assert (app.row("big")["title"], app.row("big")["data"], app.row("big")["body"]) == (
        "edited",
        photo,
        body,
    )

    # The large value replaced, after the server changed it: a conflict where detected.
    device.update("LocalNote", "big", {"data": b"small"})
    _server_writes(app, "big", data=b"\x02" * (100 * KB))
    result = device.sync("Sync")
    if detects:
        assert [(c["key"], c["reason"]) for c in result.conflicts] == [
            ("big", "changed on the server since you saw it: data")
        ]
        assert local_note(device, "big")["data"] == b"\x02" * (100 * KB)  # type: ignore[index]
        [conflict] = device.outbox.rejected()
        device.outbox.retry(conflict.id)  # now made over the server's value: applied
        assert device.sync("Sync").applied == 1
    else:
        assert result.applied == 1
    assert app.row("big")["data"] == b"small"  # type: ignore[index]

    # A delete, after the server changed the large text the device did not change.
    device.sync("Sync")
    _server_writes(app, "big", body=_text(100 * KB, 8))
    device.delete("LocalNote", "big")
    result = device.sync("Sync")
    if detects:
        assert [c["key"] for c in result.conflicts] == ["big"]
        assert app.row("big") is not None
        device.delete("LocalNote", "big")
        assert device.sync("Sync").applied == 1
    else:
        assert result.applied == 1
    assert app.row("big") is None
    assert device.outbox.count() == 0
    assert local_notes(device) == app.rows("u1")


@pytest.mark.parametrize("numbered", [False, True], ids=["refused", "withdrawn"])
def test_a_row_refused_as_too_large_ends_as_the_server_has_it_now(
    notes_app: Any, numbered: bool
) -> None:
    """The server changed the row after the edit; the pulls since skipped it (it had a
    change). Refused on the device (before numbering, or withdrawn from flight), the
    row is not left as the device last saw it: the sync brings the server's version."""
    app, device, _ = _device(notes_app)
    device.update("LocalNote", "s1", {"body": _text(100 * KB, 5), "title": "long"})
    if numbered:
        assert [m.seq for m in device.outbox.number(device.catalog().streams, 10)] == [1]
    app.backoffice("UPDATE note SET title = 'changed on the server' WHERE id = 's1'")
    device.sync("Pull")
    assert local_note(device, "s1")["title"] == "long"  # type: ignore[index]

    result = device.sync("Sync")

    assert [(r["key"], r["code"]) for r in result.rejected] == [("s1", "field-too-large")]
    assert local_note(device, "s1")["title"] == "changed on the server"  # type: ignore[index]
    assert local_notes(device) == app.rows("u1")
    [rejected] = device.outbox.rejected()
    device.outbox.discard(rejected.id)
    device.sync("Sync")
    assert local_notes(device) == app.rows("u1")


def test_a_logout_that_clears_leaves_no_mark_naming_the_previous_rows(notes_app: Any) -> None:
    """A refusal on the device marks the row's streams to copy afresh; a logout that
    clears the rows leaves nothing of the previous principal, those marks included."""
    _, device, _ = _device(notes_app)
    device.update("LocalNote", "s1", {"body": _text(100 * KB, 6)})
    device.sync("Push")  # refused on the device; the next pull would copy afresh
    marks = "SELECT name, row_key FROM syncunit_recopy WHERE name LIKE 'recopy:%'"
    assert "s1" in str(device.store.query(marks))

    device.logout()

    assert device.store.query(marks) == []


def test_each_row_refused_on_the_device_is_marked_by_a_write_of_its_own(notes_app: Any) -> None:
    """Marking a row to copy afresh writes that row's mark alone, never the marks made
    before it again: a burst of refusals (or a catalog change) marking thousands of
    rows costs one small write each, not a rewrite of a growing list."""
    app, device, _ = _device(notes_app)
    keys = [f"row{i:02d}" for i in range(12)]
    for k in keys:
        app.add(k, title="on the server")
    device.sync("Sync")
    for i, k in enumerate(keys):
        device.update("LocalNote", k, {"body": _text(100 * KB, 10 + i)})
    traced: list[str] = []
    device.store.conn.set_trace_callback(traced.append)
    try:
        result = device.sync("Push")  # every change refused on the device
    finally:
        device.store.conn.set_trace_callback(None)

    assert sorted(r["key"] for r in result.rejected) == keys
    writes = [s for s in traced if "syncunit_recopy" in s or "syncunit_local" in s]
    assert writes
    assert [s for s in writes if sum(k in s for k in keys) > 1] == []
    marks = device.store.query("SELECT name, local_table, row_key FROM syncunit_recopy")
    assert sorted(k for _, _, k in marks) == keys  # one row a mark, each row once
    assert {(n, t) for n, t, _ in marks} == {("recopy:notes", "LocalNote")}


def test_marks_kept_by_an_earlier_version_are_carried_over(notes_app: Any) -> None:
    """A device file whose marks an earlier version kept as JSON lists in
    ``syncunit_local`` opens with them moved to ``syncunit_recopy``: the stream still
    copies afresh, and a parked session's rows are still marked when it comes back."""
    app, device, fault = _device(notes_app)
    device.update("LocalNote", "s1", {"body": _text(100 * KB, 7), "title": "long"})
    app.backoffice("UPDATE note SET title = 'changed on the server' WHERE id = 's1'")
    device.sync("Pull")  # skips s1: it has a change
    device.sync("Push")  # refused on the device: s1 is marked
    assert local_note(device, "s1")["title"] == "on the server"  # type: ignore[index]
    device.close()
    # The file as version 4 left it: each name's marks as one JSON list.
    path = app.tmp_path / "device.sqlite"
    conn = sqlite3.connect(path)
    with conn:
        marks: dict[str, list[list[Any]]] = {}
        for name, table, key in conn.execute("SELECT * FROM syncunit_recopy"):
            marks.setdefault(name, []).append([table, key])
        marks["recopy-parked:gone"] = [["LocalNote", "s1"], ["LocalNote", 7]]
        conn.execute("DROP TABLE syncunit_recopy")
        conn.executemany(
            "INSERT INTO syncunit_local VALUES (?, ?)",
            [(name, json.dumps(entries)) for name, entries in marks.items()],
        )
        conn.execute("UPDATE syncunit_local SET value = '4' WHERE key = 'store_version'")
    conn.close()

    device = app.client(transport=fault)

    assert device.store.migrated == [5, 6]
    assert device.store.query("SELECT key FROM syncunit_local WHERE key LIKE 'recopy%'") == []
    assert sorted(device.store.query("SELECT * FROM syncunit_recopy"), key=str) == sorted(
        [
            ("recopy-parked:gone", "LocalNote", 7),
            ("recopy-parked:gone", "LocalNote", "s1"),
            ("recopy:notes", "LocalNote", "s1"),
        ],
        key=str,
    )
    device.sync("Pull")
    assert local_note(device, "s1")["title"] == "changed on the server"  # type: ignore[index]
    assert local_notes(device) == app.rows("u1")
    assert device.store.query("SELECT name FROM syncunit_recopy") == [("recopy-parked:gone",)] * 2


def test_a_json_device_measures_bytes_as_they_travel(notes_app: Any) -> None:
    # 60,000 bytes fit 64 KiB; as the base64 text a JSON request carries (80,000), not.
    app, device, fault = _device(notes_app, encoding="json")
    data = b"\x03" * 60_000
    _note(device, "blob", data=data)
    _note(device, "after")
    assert device.sync("Sync").applied == 1
    _assert_surfaced(device, "blob", "field-too-large", {"data": data})
    assert "holds 80000 bytes" in device.outbox.rejected()[0].reason  # never sent
    assert _push_bodies(fault) == [1]
    assert app.row("after") is not None


def test_a_change_alone_over_the_body_limit_is_surfaced(notes_app: Any) -> None:
    tight = Limits(max_field_bytes=64 * KB, max_body_bytes=100 * KB, requests_per_second=1e6)
    app, device, _ = _device(notes_app, tight)
    # Each value fits; together they are over the body limit.
    body, data = _text(60 * KB, 2), b"\x01" * (60 * KB)
    _note(device, "big", body=body, data=data)
    _note(device, "small")
    result = device.sync("Sync")
    assert result.applied == 1
    _assert_surfaced(device, "big", "body-too-large", {"body": body, "data": data})
    assert app.row("small") is not None
    assert app.row("big") is None
    assert outbox_rows(device) == []


@pytest.mark.parametrize("unit", ["Sync", "Push"])
def test_many_large_values_are_all_applied_in_several_requests(notes_app: Any, unit: str) -> None:
    # 300 notes of 40 KB (12 MB) under a 1 MiB body limit: each fits, no batch of 2000 does.
    app, device, fault = _device(notes_app, push_batch=100)
    with device.store.atomic() as conn:
        conn.executemany(
            "INSERT INTO LocalNote (id, owner, title, body, n) VALUES (?, 'u1', ?, ?, 0)",
            [(f"n{i:03d}", f"note {i}", _text(40 * KB, i)) for i in range(300)],
        )
    _note(device, "later")

    result = device.sync(unit)

    assert result.applied == 301
    assert result.rejected == []
    assert device.outbox.count() == 0
    assert device.outbox.rejected() == []
    assert len(app.rows("u1")) == 302
    assert [seq for seq, _ in app.logged(device.client_id)] == list(range(1, 302))
    assert app.applications() == 301  # each once
    sizes = _push_bodies(fault)
    assert len(sizes) >= 12
    assert sum(sizes) == 301


class _Unsaid(httpx.BaseTransport):
    """A server that does not say its bounds (one from before they were said): the
    header is taken off every answer."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        del response.headers[PUSH_LIMITS]
        return response

    def close(self) -> None:
        self.inner.close()  # its connections, with the client's close


def test_a_batch_refused_for_one_value_is_split_and_the_value_withdrawn(notes_app: Any) -> None:
    fault = FaultTransport()
    app, device, _ = _device(notes_app, transport=_Unsaid(fault))
    assert device.push_limits is None
    _note(device, "ok-1")
    _note(device, "big", body=_text(100 * KB, 3))
    _note(device, "ok-2")
    device.update("LocalNote", "s1", {"title": "edited"})

    result = device.sync("Sync")

    assert result.applied == 3
    _assert_surfaced(device, "big", "field-too-large", {})
    assert "the server refuses any request holding it" in device.outbox.rejected()[0].reason
    # Sent: all four (refused), the one before it, it alone (refused), the two after it,
    # numbered down one: the server saw no gap.
    assert _push_bodies(fault) == [4, 1, 1, 2]
    assert [seq for seq, _ in app.logged(device.client_id)] == [1, 2, 3]
    pushes = [r.mutations for r in fault.sent if r.mutations]
    assert [(m.id, m.seq) for m in pushes[-1]] == [(m.id, m.seq - 1) for m in pushes[0][2:]]
    assert outbox_rows(device) == []
    _note(device, "later")
    assert device.sync("Sync").applied == 1
    assert [seq for seq, _ in app.logged(device.client_id)] == [1, 2, 3, 4]


def test_a_batch_over_the_body_limit_is_halved_when_the_server_does_not_say_it(
    notes_app: Any,
) -> None:
    fault = FaultTransport()
    app, device, _ = _device(notes_app, transport=_Unsaid(fault))
    with device.store.atomic() as conn:
        conn.executemany(
            "INSERT INTO LocalNote (id, owner, title, body, n) VALUES (?, 'u1', ?, ?, 0)",
            [(f"n{i:03d}", f"note {i}", _text(40 * KB, i)) for i in range(40)],
        )
    result = device.sync("Sync")
    assert result.applied == 40
    assert device.outbox.count() == 0
    assert [seq for seq, _ in app.logged(device.client_id)] == list(range(1, 41))
    sizes = _push_bodies(fault)
    assert sizes[0] == 40
    assert sum(sizes[1:]) >= 40


def test_changes_numbered_before_the_bounds_were_known_go_alone_and_are_withdrawn(
    notes_app: Any,
) -> None:
    """In flight before the device knew the bounds: each large one goes alone (the
    server may have applied it, its answer lost: only the server can tell), and
    once the server refuses it, it is withdrawn and the changes after it go on."""
    app, device, fault = _device(notes_app)
    _note(device, "ok-1")
    _note(device, "big", data=b"\x02" * (100 * KB))
    _note(device, "big-too", body=_text(70 * KB, 4))
    _note(device, "ok-2")
    streams = device.catalog().streams
    assert [m.seq for m in device.outbox.number(streams, 10)] == [1, 2, 3, 4]  # in flight
    result = device.sync("Sync")
    assert result.applied == 2
    assert [r["key"] for r in result.rejected] == ["big", "big-too"]
    seqs = device.store.query("SELECT seq FROM syncunit_rejected ORDER BY id")
    assert [r[0] for r in seqs] == [2, 2]  # the second, numbered down once the first left
    assert [seq for seq, _ in app.logged(device.client_id)] == [1, 2]
    pushes = [[(m.key, m.seq) for m in r.mutations] for r in fault.sent if r.mutations]
    assert pushes == [[("ok-1", 1)], [("big", 2)], [("big-too", 2)], [("ok-2", 2)]]
    _note(device, "later")
    assert device.sync("Sync").applied == 1
    assert [seq for seq, _ in app.logged(device.client_id)] == [1, 2, 3]


def test_the_server_says_its_bounds_in_every_answer(notes_app: Any) -> None:
    app = notes_app(limits=SMALL)
    headers = {"Authorization": "Bearer t1"}
    said = PushLimits(body=1024 * KB, field=64 * KB, mutations=10_000)
    with httpx.Client(base_url=app.url, headers=headers) as http:
        catalog = http.get("/v1/catalog")
        too_big = http.post(
            "/v1/sync/Sync",
            content=b"\x00" * (1100 * KB),
            headers={"Content-Type": "application/vnd.syncunit.v1+msgpack"},
        )
    assert PushLimits.parse(catalog.headers[PUSH_LIMITS]) == said
    assert too_big.status_code == 413
    assert too_big.json()["code"] == "body-too-large"
    assert PushLimits.parse(too_big.headers[PUSH_LIMITS]) == said
    assert Limits().push_limits() == PushLimits()  # the device's defaults are the server's
    assert PushLimits.parse("body=1, field=x") is None
    assert PushLimits.parse(None) is None
    # The subscriptions a request may carry, said beside; a server that says none
    # (older) has the default bound.
    assert "subscriptions=200" in catalog.headers[PUSH_LIMITS]
    older = PushLimits.parse("body=1, field=2, mutations=3")
    assert older == PushLimits(body=1, field=2, mutations=3, subscriptions=MAX_SUBSCRIPTIONS)
    assert PushLimits.parse(PushLimits(subscriptions=3).header()) == PushLimits(subscriptions=3)


class _CutBody(httpx.BaseTransport):
    """``cut``: the next sync request is handled and its answer's headers come back
    (with the server's bounds), then its body breaks."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner, self.cut = inner, False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if not (self.cut and request.url.path.startswith("/v1/sync/")):
            return response
        self.cut = False
        response.read()
        return httpx.Response(
            response.status_code, headers=response.headers, stream=_Broken(), request=request
        )

    def close(self) -> None:
        self.inner.close()


class _Broken(httpx.SyncByteStream):
    def __iter__(self) -> Any:
        raise httpx.ReadError("connection reset")


def test_a_change_the_server_applied_is_never_withdrawn_by_the_device(notes_app: Any) -> None:
    """Sent before the device knew the bounds, a change just under the server's body
    limit is applied, and the answer is lost after its headers told the bounds. By
    them the change looks too large (the device keeps an envelope's margin), but only
    the server can tell it was applied: it goes again, alone, and is answered from
    the server's log, as is the change after it."""
    limits = Limits(
        max_field_bytes=64 * KB,
        max_body_bytes=100 * KB,
        requests_per_second=1e6,
        request_burst=10**6,
    )
    app = notes_app(limits=limits)
    cut = _CutBody(FaultTransport())
    device = app.client(transport=cut)
    device.sync("Sync")
    device.close()
    device = app.client(transport=cut)  # a new process: it has not heard the bounds
    assert device.push_limits is None
    rnd = random.Random(1)
    data = rnd.randbytes(40 * KB)
    device.insert("LocalNote", {"id": "big", "owner": "u1", "title": "t", "data": data})
    size = _numbered_size(device)
    # Under the server's limit, but within the envelope the device keeps under it.
    device.update("LocalNote", "big", {"body": _text(100 * KB - 700 - size, 2)})
    assert 100 * KB - 1024 < _numbered_size(device) < 100 * KB
    _note(device, "after")

    cut.cut = True
    with pytest.raises(NetworkError):
        device.sync("Sync")
    assert device.push_limits is not None
    assert app.row("big") is not None  # both applied
    assert app.row("after") is not None

    result = device.sync("Sync")
    assert result.rejected == []
    assert device.outbox.rejected() == []
    assert [seq for seq, _ in app.logged(device.client_id)] == [1, 2]
    assert local_note(device, "big") is not None
    assert local_note(device, "after") is not None


class _Undo(Exception):
    pass


def _numbered_size(device: Any) -> int:
    """The encoded size the next unsent change would have, numbered (then undone)."""
    try:
        with device.store.atomic():
            [m] = device.outbox.number(device.catalog().streams, 1)
            size = len(msgspec.msgpack.encode(m))
            raise _Undo
    except _Undo:
        return size


@pytest.mark.parametrize("newer_numbered", [False, True], ids=["unsent", "in-flight"])
def test_a_change_after_a_withdrawn_one_is_sent_against_the_server_s_row(
    notes_app: Any, newer_numbered: bool
) -> None:
    """A large edit is in flight, then a small edit of the same row is made: its base
    holds the large value. The large one is withdrawn; the small one is checked
    against the row the server has (the large value never reached it), so it is
    applied in the same sync, not refused for a value it does not carry."""
    app, device, _ = _device(notes_app)
    streams = device.catalog().streams
    body = app.row("s1")["body"]  # type: ignore[index]
    device.update("LocalNote", "s1", {"body": _text(100 * KB, 6)})
    assert [m.seq for m in device.outbox.number(streams, 10)] == [1]
    device.update("LocalNote", "s1", {"title": "a small edit"})
    if newer_numbered:
        assert [m.seq for m in device.outbox.number(streams, 10)] == [2]

    result = device.sync("Sync")

    assert [(r["key"], r["code"]) for r in result.rejected] == [("s1", "field-too-large")]
    assert result.applied == 1
    assert app.row("s1")["title"] == "a small edit"  # type: ignore[index]
    assert app.row("s1")["body"] == body  # type: ignore[index]
    assert outbox_rows(device) == []
    assert [seq for seq, _ in app.logged(device.client_id)] == [1]
    assert local_notes(device) == app.rows("u1")
