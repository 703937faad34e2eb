"""RxDB's replication protocol over HTTP: pull, push and the event stream, from Python.

These drive the endpoints the way RxDB does (``tests/interop`` runs the real
RxDB): a pull loop that stops at the first batch shorter than ``batchSize``,
push rows of ``{assumedMasterState, newDocumentState}``, and ``pull.stream$``
read as Server-Sent Events.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hospital.models import appointment

from syncunit.server import SyncServer
from syncunit.server.rxdb import CLIENT_HEADER
from syncunit.server.store import clients
from tests.conftest import PlainSQL
from tests.support import (
    LiveServer,
    appointments_of,
    expected_rows,
    owned_table_server,
    patients_of,
    principal_params,
    wait_until,
)

BASE = "/v1/rxdb/Online/appointments"
DETAILS = "/v1/rxdb/PatientDetails/patient_history"  # a unit opened on one patient


def auth(token: str = "token-h1", device: str | None = "js-1") -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if device is not None:
        headers[CLIENT_HEADER] = device
    return headers


class RxPeer:
    """What RxDB keeps of one collection: documents by key, and a checkpoint."""

    def __init__(
        self,
        http: httpx.Client,
        base: str = BASE,
        token: str = "token-h1",
        key: str = "id",
        params: dict[str, Any] | None = None,
    ) -> None:
        self.http = http
        self.key = key
        self.base = base
        self.token = token
        self.params = params  # a unit opened on a selection: its client parameters
        self.docs: dict[str, dict[str, Any]] = {}
        self.checkpoint: Any = None
        self.batches: list[int] = []

    def pull_once(self, batch: int) -> dict[str, Any]:
        r = self.http.post(
            f"{self.base}/pull",
            json={"checkpoint": self.checkpoint, "batchSize": batch},
            params=None if self.params is None else {"params": json.dumps(self.params)},
            headers=auth(self.token),
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    def apply(self, body: dict[str, Any]) -> None:
        if body.get("reset"):  # a re-download: what this batch does not hold goes
            held = {d[self.key] for d in body["documents"]}
            self.docs = {k: v for k, v in self.docs.items() if k in held}
        for d in body["documents"]:
            if d["_deleted"]:
                self.docs.pop(d[self.key], None)
            else:
                self.docs[d[self.key]] = {k: v for k, v in d.items() if k != "_deleted"}
        if body["documents"]:  # RxDB keeps no checkpoint from an empty batch
            self.checkpoint = {**(self.checkpoint or {}), **body["checkpoint"]}

    def pull(self, batch: int = 10) -> None:
        """RxDB's downstream loop: stop at an empty or short batch."""
        while True:
            body = self.pull_once(batch)
            self.batches.append(len(body["documents"]))
            self.apply(body)
            if len(body["documents"]) < batch:
                return

    def push(self, rows: list[dict[str, Any]], device: str = "js-1") -> dict[str, Any]:
        r = self.http.post(f"{self.base}/push", json=rows, headers=auth(self.token, device))
        assert r.status_code == 200, r.text
        return dict(r.json())


def server_docs(server: SyncServer, token: str = "token-h1") -> dict[str, dict[str, Any]]:
    s = server.schema.streams["appointments"]
    rows = expected_rows(server, s, principal_params(server.store, token))
    return {r[0]: dict(zip(s.columns, r, strict=True)) for r in rows}


@pytest.fixture
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as c:
        yield c


@pytest.fixture
def peer(http: httpx.Client) -> RxPeer:
    return RxPeer(http)


def test_a_pull_loop_that_stops_at_a_short_batch_gets_the_whole_scope(
    peer: RxPeer, server: SyncServer, plain_sql: PlainSQL
) -> None:
    peer.pull(batch=7)
    assert peer.docs == server_docs(server)
    assert all(n == 7 for n in peer.batches[:-1])
    # Removals and changes together: the removal chunk alone is shorter than a batch,
    # so the batch must go on into the upserts, or RxDB stops with half the delta.
    keys = appointments_of(server.store, 1)
    plain_sql("DELETE FROM appointment WHERE id IN (:a, :b)", {"a": keys[0], "b": keys[1]})
    plain_sql.many(
        "UPDATE appointment SET notes = 'changed' WHERE id = :id", [{"id": k} for k in keys[5:25]]
    )
    peer.batches.clear()
    peer.pull(batch=7)
    assert peer.docs == server_docs(server)
    assert peer.batches[0] >= 7


def test_a_row_changed_during_a_first_copy_comes_once_per_batch(
    peer: RxPeer, server: SyncServer, plain_sql: PlainSQL
) -> None:
    peer.apply(peer.pull_once(20))  # a first copy, cut after one batch
    keys = appointments_of(server.store, 1)
    later = keys[100:110]  # not sent yet: the copy sends them, and its catch-up again
    plain_sql.many(
        "UPDATE appointment SET notes = 'during' WHERE id = :id", [{"id": k} for k in later]
    )
    body = peer.pull_once(1000)
    ids = [d["id"] for d in body["documents"]]
    assert len(ids) == len(set(ids))
    peer.apply(body)
    assert peer.docs == server_docs(server)


def test_removals_and_scope_exits_arrive_as_deleted_documents(
    peer: RxPeer, server: SyncServer, plain_sql: PlainSQL
) -> None:
    peer.pull()
    keys = appointments_of(server.store, 1)
    other = plain_sql("SELECT id FROM doctor WHERE hospital_id = 2 LIMIT 1")[0][0]
    plain_sql("DELETE FROM appointment WHERE id = :id", {"id": keys[0]})
    plain_sql("UPDATE appointment SET doctor_id = :d WHERE id = :id", {"d": other, "id": keys[1]})
    body = peer.pull_once(100)
    deleted = {d["id"]: d for d in body["documents"] if d["_deleted"]}
    assert deleted == {
        keys[0]: {"id": keys[0], "_deleted": True},
        keys[1]: {"id": keys[1], "_deleted": True},
    }
    peer.apply(body)
    assert peer.docs == server_docs(server)


def test_a_changed_scope_arrives_as_a_clean_resync(
    peer: RxPeer, server: SyncServer, plain_sql: PlainSQL
) -> None:
    peer.pull()
    plain_sql("UPDATE staff SET hospital_id = 2 WHERE token = 'token-h1'")
    body = peer.pull_once(10)
    assert body["reset"] is True
    peer.apply(body)
    peer.pull(batch=10)
    assert peer.docs == server_docs(server)
    assert set(peer.docs) == set(appointments_of(server.store, 2))


def test_a_full_stream_comes_whole_and_again_when_it_changed(
    http: httpx.Client, server: SyncServer, plain_sql: PlainSQL
) -> None:
    peer = RxPeer(http, base="/v1/rxdb/Online/summary", key="doctor_id")
    peer.pull(batch=3)
    assert len(peer.docs) == 5  # one per doctor of hospital 1
    assert all(isinstance(k, str) for k in peer.docs)  # RxDB keys are strings
    unchanged = peer.pull_once(3)
    assert unchanged["documents"] == []
    keys = appointments_of(server.store, 1)
    plain_sql("DELETE FROM appointment WHERE id = :id", {"id": keys[0]})
    body = peer.pull_once(3)
    assert body["reset"] is True
    assert len(body["documents"]) == 5
    peer.apply(body)
    s = server.schema.streams["summary"]
    rows = expected_rows(server, s, {"hospital_id": 1})
    assert peer.docs == {
        str(r[0]): {**dict(zip(s.columns, r, strict=True)), "doctor_id": str(r[0])} for r in rows
    }


def test_a_doctor_rename_reaches_every_denormalized_document(
    peer: RxPeer, server: SyncServer, plain_sql: PlainSQL
) -> None:
    peer.pull()
    doctor_id = plain_sql("SELECT id FROM doctor WHERE hospital_id = 1 LIMIT 1")[0][0]
    plain_sql("UPDATE doctor SET name = 'Dr. Renamed' WHERE id = :id", {"id": doctor_id})
    peer.pull()
    mine = [d for d in peer.docs.values() if d["doctor_id"] == doctor_id]
    assert mine
    assert all(d["doctor_name"] == "Dr. Renamed" for d in mine)
    assert peer.docs == server_docs(server)


def _slot(day: int, hour: int) -> tuple[str, str]:
    start = dt.datetime(2031, 1, 1) + dt.timedelta(days=day, hours=hour)
    return start.isoformat(), (start + dt.timedelta(minutes=30)).isoformat()


def _new_booking(peer: RxPeer, doctor_id: int, day: int, hour: int) -> dict[str, Any]:
    start, end = _slot(day, hour)
    patient_id = next(iter(peer.docs.values()))["patient_id"]
    return {
        "id": str(uuid.uuid4()),
        "doctor_id": doctor_id,
        "patient_id": patient_id,
        "starts_at": start,
        "ends_at": end,
        "status": "booked",
        "room": "12",
        "notes": "",
        "_deleted": False,
    }


def test_push_applies_reports_and_returns_the_server_state_of_what_it_did_not_apply(
    peer: RxPeer, server: SyncServer, plain_sql: PlainSQL
) -> None:
    peer.pull()
    doctor_id = plain_sql("SELECT id FROM doctor WHERE hospital_id = 1 LIMIT 1")[0][0]
    other_doctor = plain_sql("SELECT id FROM doctor WHERE hospital_id = 2 LIMIT 1")[0][0]
    booking = _new_booking(peer, doctor_id, 1, 9)
    clash = {**_new_booking(peer, doctor_id, 1, 9), "notes": "same slot"}
    a, b = sorted(peer.docs)[:2]
    doc_a, doc_b = peer.docs[a], peer.docs[b]
    # The backoffice edits the notes of a; the device edits them too (a conflict under
    # Detect); the device moves b to a doctor of another hospital (out of its scope).
    plain_sql("UPDATE appointment SET notes = 'backoffice' WHERE id = :id", {"id": a})
    edit_a = {
        "assumedMasterState": {**doc_a, "_deleted": False},
        "newDocumentState": {**doc_a, "notes": "device", "_deleted": False},
    }
    move_b = {
        "assumedMasterState": {**doc_b, "_deleted": False},
        "newDocumentState": {**doc_b, "doctor_id": other_doctor, "_deleted": False},
    }
    out = peer.push(
        [
            {"newDocumentState": booking},
            {"newDocumentState": clash},
            edit_a,
            move_b,
        ]
    )
    results = out["results"]
    assert [r["status"] for r in results] == ["applied", "rejected", "conflict", "rejected"]
    assert results[1]["code"] == "rule"
    assert "already booked" in results[1]["reason"]
    assert results[3]["code"] == "out-of-scope"
    by_id = {d["id"]: d for d in out["conflicts"]}
    assert set(by_id) == {clash["id"], a, b}
    assert by_id[clash["id"]] == {"id": clash["id"], "_deleted": True}
    assert by_id[a]["notes"] == "backoffice"
    assert by_id[a]["_deleted"] is False
    assert by_id[b] == {**server_docs(server)[b], "_deleted": False}
    with server.store.engine.connect() as conn:
        got = conn.execute(sa.select(appointment).where(appointment.c.id == booking["id"])).one()
    assert got.room == "12"


def test_pushes_of_a_device_follow_one_sequence_applied_once(
    peer: RxPeer, server: SyncServer, plain_sql: PlainSQL
) -> None:
    peer.pull()
    doctor_id = plain_sql("SELECT id FROM doctor WHERE hospital_id = 1 LIMIT 1")[0][0]
    first = [{"newDocumentState": _new_booking(peer, doctor_id, 2, h)} for h in (8, 9)]
    second = [{"newDocumentState": _new_booking(peer, doctor_id, 2, 10)}]
    assert [r["status"] for r in peer.push(first)["results"]] == ["applied", "applied"]
    assert [r["status"] for r in peer.push(second)["results"]] == ["applied"]
    with server.store.engine.connect() as conn:
        last = conn.execute(
            sa.select(clients.c.last_seq).where(clients.c.client_id == "rxdb:js-1:appointments")
        ).scalar_one()
    assert last == 3
    # A retried push (its response was lost) leaves the row as it is.
    again = peer.push(first)
    assert [r["status"] for r in again["results"]] == ["applied", "applied"]
    assert again["conflicts"] == []
    peer.pull()
    assert peer.docs == server_docs(server)


def test_a_device_pushes_again_after_the_database_gets_a_new_epoch(
    peer: RxPeer, server: SyncServer, plain_sql: PlainSQL
) -> None:
    """``renew_epoch`` forgets every client's sequence (``last_seq`` -1): the bridge
    numbers the device's next push from 1 again, not from 0, which the applier
    refuses (every push of the device was refused for good)."""
    peer.pull()
    doctor_id = plain_sql("SELECT id FROM doctor WHERE hospital_id = 1 LIMIT 1")[0][0]
    before = [{"newDocumentState": _new_booking(peer, doctor_id, 3, 8)}]
    assert [r["status"] for r in peer.push(before)["results"]] == ["applied"]
    server.store.renew_epoch()

    after = [{"newDocumentState": _new_booking(peer, doctor_id, 3, 9)}]
    assert [r["status"] for r in peer.push(after)["results"]] == ["applied"]
    assert after[0]["newDocumentState"]["id"] in server_docs(server)


@pytest.fixture
def second_process(
    server: SyncServer, server_db_url: str, serve: Callable[[Any], LiveServer]
) -> Iterator[httpx.Client]:
    """Another server process on the same database (its own store, locks and applier)."""
    from hospital.server import staff_auth

    from syncunit.server import open_store

    store = open_store(server_db_url)
    other = SyncServer(server.schema, store, authenticate=staff_auth(store.engine))
    with httpx.Client(base_url=serve(other.app).url, timeout=30) as c:
        yield c
    store.engine.dispose()


def _edit(peer: RxPeer, key: str, notes: str) -> dict[str, Any]:
    doc = {**peer.docs[key], "_deleted": False}
    return {"assumedMasterState": doc, "newDocumentState": {**doc, "notes": notes}}


def _other_push_first(
    server: SyncServer, other: RxPeer, rows: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Make the device's next push through ``server`` take its sequence numbers, then
    wait while ``other`` (the same device, through another process) pushes ``rows``."""
    answers: dict[str, Any] = {}
    apply = server.pusher.apply

    def after_the_other(*args: Any, **kwargs: Any) -> Any:
        if not answers:
            answers.update(other.push(rows))
        return apply(*args, **kwargs)

    monkeypatch.setattr(server.pusher, "apply", after_the_other)
    return answers


def test_pushes_of_one_device_through_two_server_processes_each_apply(
    peer: RxPeer,
    server: SyncServer,
    second_process: httpx.Client,
    plain_sql: PlainSQL,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    peer.pull()
    keys = sorted(peer.docs)[:4]
    mine = [_edit(peer, k, f"tab one {i}") for i, k in enumerate(keys[:3])]
    theirs = [_edit(peer, keys[3], "tab two")]
    other = _other_push_first(server, RxPeer(second_process), theirs, monkeypatch)

    out = peer.push(mine)

    # The other push took the first number; the rows that had it go again after it.
    assert [r["status"] for r in other["results"]] == ["applied"]
    assert [r["status"] for r in out["results"]] == ["applied"] * 3
    assert out["conflicts"] == other["conflicts"] == []
    notes = dict(plain_sql("SELECT id, notes FROM appointment WHERE id IN (:a, :b, :c, :d)",
                           dict(zip("abcd", keys, strict=True))))  # fmt: skip
    assert notes == {**{k: f"tab one {i}" for i, k in enumerate(keys[:3])}, keys[3]: "tab two"}
    with server.store.engine.connect() as conn:
        last = conn.execute(
            sa.select(clients.c.last_seq).where(clients.c.client_id == "rxdb:js-1:appointments")
        ).scalar_one()
    assert last == 4


def test_a_row_refused_unread_comes_back_as_the_server_has_it_not_deleted(
    peer: RxPeer,
    server: SyncServer,
    second_process: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from syncunit.server import rxdb

    monkeypatch.setattr(rxdb, "NUMBERING_ATTEMPTS", 1)  # no renumbering: the refusal stays
    peer.pull()
    a, b, c = sorted(peer.docs)[:3]
    other = _other_push_first(server, RxPeer(second_process), [_edit(peer, c, "x")], monkeypatch)

    out = peer.push([_edit(peer, a, "mine"), _edit(peer, b, "mine")])

    assert [r["status"] for r in other["results"]] == ["applied"]
    assert [(r["status"], r.get("code")) for r in out["results"]] == [
        ("rejected", "sequence-reused"),
        ("applied", None),
    ]
    assert "push it again" in out["results"][0]["reason"]
    # The device holds a, which is in its scope: RxDB gets the row, not a deletion.
    assert out["conflicts"] == [{**server_docs(server)[a], "_deleted": False}]
    assert server_docs(server)[a]["notes"] == peer.docs[a]["notes"]


def test_deleted_must_be_a_json_boolean(
    peer: RxPeer, http: httpx.Client, server: SyncServer
) -> None:
    from tests.support import db_state

    peer.pull()
    key = sorted(peer.docs)[0]
    doc = {**peer.docs[key], "_deleted": False}
    edited = {**doc, "notes": "edited"}
    before = db_state(server.store.engine)
    for row, said in [
        ({"assumedMasterState": doc, "newDocumentState": {**edited, "_deleted": "false"}},
         "'false'"),
        ({"assumedMasterState": doc, "newDocumentState": {**edited, "_deleted": 0}}, "0"),
        ({"assumedMasterState": {**doc, "_deleted": "true"}, "newDocumentState": edited},
         "'true'"),
        ({"assumedMasterState": "yes", "newDocumentState": edited}, "null"),
    ]:  # fmt: skip
        r = http.post(f"{BASE}/push", json=[row], headers=auth())
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "malformed-request"
        assert said in r.json()["detail"]
        assert key in r.json()["detail"]
    assert db_state(server.store.engine) == before
    # Left out, _deleted is false.
    out = peer.push([{"assumedMasterState": peer.docs[key], "newDocumentState": edited}])
    assert [r["status"] for r in out["results"]] == ["applied"]
    assert server_docs(server)[key]["notes"] == "edited"


def test_fields_the_stream_does_not_have_or_may_not_change_are_refused_by_name(
    peer: RxPeer, server: SyncServer
) -> None:
    peer.pull()
    a, b, c = sorted(peer.docs)[:3]
    doc_a, doc_b, doc_c = ({**peer.docs[k], "_deleted": False} for k in (a, b, c))
    without_notes = {k: v for k, v in doc_c.items() if k != "notes"}
    out = peer.push(
        [
            {"assumedMasterState": doc_a, "newDocumentState": {**doc_a, "colour": "red"}},
            {"assumedMasterState": doc_b, "newDocumentState": {**doc_b, "doctor_name": "Me"}},
            {"assumedMasterState": doc_c, "newDocumentState": without_notes},
        ]
    )
    results = out["results"]
    assert [(r["status"], r.get("code")) for r in results] == [
        ("rejected", "unknown-column"),
        ("rejected", "read-only-column"),
        ("rejected", "invalid-value"),  # a left-out field is null, and notes cannot be
    ]
    assert "colour" in results[0]["reason"]
    assert [d["id"] for d in out["conflicts"]] == [a, b, c]
    assert server_docs(server)[b]["doctor_name"] == doc_b["doctor_name"]


def test_write_authorization_is_the_push_applier_s(
    peer: RxPeer, http: httpx.Client, server: SyncServer
) -> None:
    from tests.support import db_state

    doctors = RxPeer(http, base="/v1/rxdb/Online/doctors")
    doctors.pull()
    key = sorted(doctors.docs)[0]
    doc = {**doctors.docs[key], "_deleted": False}
    before = db_state(server.store.engine)
    out = doctors.push([{"assumedMasterState": doc, "newDocumentState": {**doc, "name": "X"}}])
    assert [(r["status"], r["code"]) for r in out["results"]] == [("rejected", "read-only-table")]
    assert out["conflicts"] == [doc]  # the device keeps the doctor as the server has it
    after = db_state(server.store.engine)
    assert after["doctor"] == before["doctor"]


def test_a_push_to_a_full_stream_answers_rows_of_the_principal_s_scope_only(
    http: httpx.Client, server: SyncServer
) -> None:
    """A full stream is read-only: each row is refused, and the state RxDB gets back is
    the row the stream's query gives this principal, or a deletion: never the row of
    another scope (here a summary over several tables, keyed by doctor)."""
    from tests.support import db_state, doctors_of

    summary = RxPeer(http, base="/v1/rxdb/Online/summary", key="doctor_id")
    summary.pull()
    mine, theirs = str(doctors_of(server.store, 1)[0]), str(doctors_of(server.store, 2)[0])
    assert mine in summary.docs
    assert theirs not in summary.docs
    before = db_state(server.store.engine)
    out = summary.push(
        [
            {"assumedMasterState": None, "newDocumentState": {"doctor_id": theirs}},
            {"assumedMasterState": None, "newDocumentState": {"doctor_id": "not a key"}},
            {
                "assumedMasterState": {**summary.docs[mine], "_deleted": False},
                "newDocumentState": {**summary.docs[mine], "booked": 0, "_deleted": False},
            },
        ]
    )
    assert [(r["status"], r["code"]) for r in out["results"]] == [
        ("rejected", "read-only-table")
    ] * 3
    assert out["conflicts"] == [
        {"doctor_id": theirs, "_deleted": True},
        {"doctor_id": "not a key", "_deleted": True},
        {**summary.docs[mine], "_deleted": False},
    ]
    after = db_state(server.store.engine)
    assert {t: after[t] for t in ("doctor", "appointment")} == {
        t: before[t] for t in ("doctor", "appointment")
    }


def test_a_full_stream_over_one_table_never_answers_another_scope_s_row(
    make_server: Callable[..., SyncServer], serve: Callable[[Any], LiveServer]
) -> None:
    """Its filter lives in its query, not in a row filter: the row of a key is read
    through that query, so another hospital's patient is a deletion, not its data."""
    from hospital.generate import generate
    from hospital.models import doctor, patient
    from hospital.units import appointments, my_hospital

    from syncunit import Stream, SyncSchema, SyncUnit
    from tests.support import doctors_of

    here = Stream.full(
        "patients_here",
        sa.select(patient.c.id, patient.c.name, patient.c.phone).where(
            sa.exists()
            .where(appointment.c.patient_id == patient.c.id)
            .where(appointment.c.doctor_id == doctor.c.id)
            .where(doctor.c.hospital_id == my_hospital)
        ),
        key="id",
        local_table="LocalPatientHere",
    )
    server = make_server(SyncSchema([SyncUnit("Desk", [here, appointments], direction="both")]))
    store = server.store
    generate(store.engine, appointments=40, hospitals=2, doctors=6, patients=20)
    with store.write() as conn:
        conn.execute(patient.insert().values(id=9001, name="Elsewhere", phone="+351 900 111"))
        conn.execute(
            appointment.insert().values(
                id="0190aaaa-0000-7000-8000-00000000e001",
                doctor_id=doctors_of(store, 2)[0],
                patient_id=9001,
                starts_at=dt.datetime(2031, 1, 1, 9),
                ends_at=dt.datetime(2031, 1, 1, 9, 15),
            )
        )
    with httpx.Client(base_url=serve(server.app).url, timeout=30) as http:
        peer = RxPeer(http, base="/v1/rxdb/Desk/patients_here")
        peer.pull()
        assert "9001" not in peer.docs
        own = sorted(peer.docs)[0]
        out = peer.push(
            [
                {"assumedMasterState": None, "newDocumentState": {"id": "9001"}},
                {"assumedMasterState": None, "newDocumentState": {"id": own}},
            ]
        )
    assert [(r["status"], r["code"]) for r in out["results"]] == [
        ("rejected", "read-only-table")
    ] * 2
    assert out["conflicts"] == [
        {"id": "9001", "_deleted": True},
        {**peer.docs[own], "_deleted": False},
    ]


def test_a_stream_s_authorize_hook_guards_a_push_through_a_push_only_unit(
    make_server: Callable[..., SyncServer], serve: Callable[[Any], LiveServer]
) -> None:
    from hospital.generate import generate

    from syncunit.server import Principal, TokenAuth
    from tests.support import db_state, doctors_of
    from tests.test_write_auth import hooked_schema

    server = make_server(hooked_schema())
    server.authenticate = TokenAuth(
        {
            "ok": Principal("ok", {"hospital_id": 1}),
            "suspended": Principal("sus", {"hospital_id": 1, "suspended": True}),
        }
    )
    generate(server.store.engine, appointments=40, hospitals=2, doctors=6, patients=20)
    start, end = _slot(3, 9)
    with server.store.engine.connect() as conn:
        patient_id = conn.execute(sa.select(appointment.c.patient_id).limit(1)).scalar()
    booking = {
        "id": str(uuid.uuid4()),
        "doctor_id": doctors_of(server.store, 1)[0],
        "patient_id": patient_id,
        "starts_at": start,
        "ends_at": end,
        "status": "booked",
        "room": "12",
        "notes": "",
    }
    row = [{"assumedMasterState": None, "newDocumentState": booking}]
    before = db_state(server.store.engine)
    with httpx.Client(base_url=serve(server.app).url, timeout=30) as http:
        r = http.post("/v1/rxdb/Send/appointments/push", json=row, headers=auth("suspended"))
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "forbidden"
        assert db_state(server.store.engine) == before
        out = RxPeer(http, base="/v1/rxdb/Send/appointments", token="ok").push(row)
    assert [r["status"] for r in out["results"]] == ["applied"]


def test_a_principal_runs_only_its_units_here_too(
    make_server: Callable[..., SyncServer], serve: Callable[[Any], LiveServer]
) -> None:
    from syncunit.server import Principal, TokenAuth

    server = make_server()
    server.authenticate = TokenAuth(
        {"desk": Principal("desk", {"hospital_id": 1}, units=frozenset({"Login"}))}
    )
    live = serve(server.app)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        for path in (f"{BASE}/pull", f"{BASE}/push"):
            r = http.post(path, json={} if path.endswith("pull") else [], headers=auth("desk"))
            assert r.status_code == 403, r.text
            assert r.json()["code"] == "unit-forbidden"
        r = http.post("/v1/rxdb/Login/appointments/pull", json={}, headers=auth("desk"))
        assert r.status_code == 200, r.text


def test_a_checkpoint_the_server_did_not_sign_starts_the_stream_afresh(
    peer: RxPeer, server: SyncServer
) -> None:
    peer.pull()
    cursor = peer.checkpoint["cursor"]
    token, _, _ = cursor.rpartition(".")  # the cursor without its signature
    peer.checkpoint = {"cursor": token + ".forged"}
    body = peer.pull_once(1000)
    assert body["reset"] is True
    assert len(body["documents"]) == len(server_docs(server))
    assert body["checkpoint"]["cursor"] != peer.checkpoint["cursor"]


def test_a_deleted_document_is_a_delete_and_a_delete_again_is_harmless(
    peer: RxPeer, server: SyncServer
) -> None:
    peer.pull()
    key = sorted(peer.docs)[0]
    doc = {**peer.docs[key], "_deleted": False}
    row = {"assumedMasterState": doc, "newDocumentState": {**doc, "_deleted": True}}
    assert peer.push([row])["results"][0]["status"] == "applied"
    assert key not in appointments_of(server.store, 1)
    assert peer.push([row])["results"][0]["status"] == "applied"


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    [
        (f"{BASE}/pull", {"json": {"checkpoint": None}, "headers": auth("nope")}, 401,
         "unauthenticated"),
        ("/v1/rxdb/Nope/appointments/pull", {"json": {}}, 404, "unknown-unit"),
        ("/v1/rxdb/Online/nope/pull", {"json": {}}, 404, "unknown-stream"),
        (f"{BASE}/pull", {"json": {"checkpoint": "abc"}}, 400, "malformed-request"),
        (f"{BASE}/pull", {"json": {"batchSize": 0}}, 422, "invalid-request"),
        (f"{BASE}/pull", {"content": b"{nope"}, 400, "malformed-request"),
        (f"{BASE}/push", {"json": [{}]}, 400, "malformed-request"),
        (f"{BASE}/push", {"json": [], "headers": auth(device=None)}, 422, "invalid-request"),
        ("/v1/rxdb/Login/appointments/push", {"json": []}, 422, "invalid-request"),
        ("/v1/rxdb/SendAppointments/appointments/pull", {"json": {}}, 422, "invalid-request"),
        (f"{DETAILS}/pull", {"json": {}}, 400, "invalid-parameter"),
        (f"{DETAILS}/pull", {"json": {}, "params": {"params": "{nope"}}, 400,
         "malformed-request"),
        (f"{DETAILS}/pull", {"json": {}, "params": {"params": "[7]"}}, 400,
         "malformed-request"),
        (f"{DETAILS}/pull", {"json": {}, "params": {"params": '{"patient_id": "7"}'}}, 400,
         "invalid-parameter"),
        (f"{DETAILS}/pull", {"json": {}, "params": {"params": '{"patient_id": 0}'}}, 400,
         "invalid-parameter"),
        (f"{BASE}/pull", {"json": {}, "params": {"params": '{"patient_id": 7}'}}, 400,
         "invalid-parameter"),
        # A principal's own parameter cannot be given: it would widen the scope.
        (f"{DETAILS}/pull", {"json": {}, "params": {"params":
         '{"patient_id": 7, "hospital_id": 2}'}}, 400, "invalid-parameter"),
        (f"{DETAILS}/pull/stream", {"params": {"params":
         '{"patient_id": 7, "hospital_id": 2}'}}, 400, "invalid-parameter"),
        (f"{BASE}/push", {"json": [], "params": {"params": '{"patient_id": 7}'}}, 400,
         "invalid-parameter"),
        (f"{DETAILS}/push", {"json": []}, 422, "invalid-request"),
        (f"{DETAILS}/pull", {"json": {}, "params": {"params":
         '{"patient_id": ' + "[" * 1000 + "]" * 1000 + "}"}}, 400, "malformed-request"),
        (f"{DETAILS}/pull", {"json": {}, "params": {"params":
         '{"patient_id": 18446744073709551615}'}}, 422, "invalid-request"),
        (f"{DETAILS}/pull", {"json": {}, "params": {"params":
         '{"patient_id": 99999999999999999999999}'}}, 422, "invalid-request"),
        (f"{DETAILS}/pull/stream", {"params": {"params":
         '{"patient_id": 9223372036854775808}'}}, 422, "invalid-request"),
        ("/v1/rxdb/" + "U" * 30_000 + "/appointments/pull", {"json": {}}, 404, "unknown-unit"),
        ("/v1/rxdb/Online/" + "S" * 30_000 + "/pull", {"json": {}}, 404, "unknown-stream"),
        (f"{BASE}/push", {"json": [{"newDocumentState": {"id": "k\x00ey"}}]}, 422,
         "invalid-request"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_clear_problem_and_change_nothing(
    http: httpx.Client,
    server: SyncServer,
    caplog: pytest.LogCaptureFixture,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    from tests.support import db_state

    caplog.set_level(logging.INFO, logger="syncunit")
    before = db_state(server.store.engine)
    kwargs.setdefault("headers", auth())
    r = http.request("GET" if path.endswith("/stream") else "POST", path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == code
    assert r.json()["detail"]
    assert len(r.json()["detail"]) < 300  # a value is never echoed whole
    assert db_state(server.store.engine) == before
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]


_DEEP = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (f"{BASE}/push", b'[{"newDocumentState": {"id": "z", "notes": ' + _DEEP + b"}}]"),
        (f"{BASE}/pull", b'{"checkpoint": ' + _DEEP + b"}"),
    ],
)
def test_a_body_nested_too_deeply_is_a_400_as_on_the_native_endpoint(
    http: httpx.Client, server: SyncServer, caplog: pytest.LogCaptureFixture, path: str, body: bytes
) -> None:
    from tests.support import db_state

    caplog.set_level(logging.INFO, logger="syncunit")
    before = db_state(server.store.engine)

    r = http.post(path, content=body, headers={**auth(), "Content-Type": "application/json"})

    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "malformed-request"
    assert "nested too deeply" in r.json()["detail"]
    assert db_state(server.store.engine) == before
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]


def test_the_schema_comes_from_the_catalog(http: httpx.Client) -> None:
    r = http.get(f"{BASE}/schema", headers=auth())
    assert r.status_code == 200
    schema = r.json()
    assert schema["primaryKey"] == "id"
    assert schema["required"] == ["id"]
    props = schema["properties"]
    assert props["id"] == {"type": "string", "maxLength": 100}
    assert props["doctor_id"] == {"type": "integer"}
    assert props["starts_at"] == {"type": "string"}
    assert set(props) == {
        "id", "doctor_id", "patient_id", "starts_at", "ends_at", "status", "room", "notes",
        "patient_name", "doctor_name", "specialty", "hospital",
    }  # fmt: skip


@pytest.mark.backends("postgres")
def test_a_write_over_a_nan_a_writer_changes_meanwhile_is_a_conflict(
    serve: Any, new_database: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RxDB holds a NaN as null; a push over it reads the row to tell what the device
    saw. A writer that changes the value between that read and the apply is a
    conflict under Detect, not overwritten; with no writer, the edit applies."""
    from syncunit.policies import Detect
    from syncunit.server import rxdb

    tally = sa.Table(
        "tally", sa.MetaData(),
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("f", sa.Float, nullable=True),
    )  # fmt: skip
    server = owned_table_server(new_database("tallies"), tally, "LocalTally", "Tallies",
                                policy=Detect(merge=False))  # fmt: skip
    with server.store.engine.begin() as conn:
        conn.execute(tally.insert(), [{"id": "a", "owner": "ana", "f": float("nan")},
                                      {"id": "b", "owner": "ana", "f": float("nan")}])  # fmt: skip
    live = serve(server.app)
    base, headers = "/v1/rxdb/Tallies/tallys", {"Authorization": "Bearer t", CLIENT_HEADER: "js"}
    pulled = httpx.post(f"{live.url}{base}/pull", json={"checkpoint": None, "batchSize": 10},
                        headers=headers).json()["documents"]  # fmt: skip
    assert [d["f"] for d in pulled] == [None, None]  # JSON has no NaN
    read = rxdb.RxDBReplication._server_row

    def read_then_a_writer(self: Any, conn: Any, stream: Any, principal: Any, key: Any) -> Any:
        row = read(self, conn, stream, principal, key)
        if key == "a":  # another writer commits before the apply reads the row
            with server.store.engine.begin() as conn:
                conn.execute(tally.update().where(tally.c.id == "a").values(f=5.0))
        return row

    monkeypatch.setattr(rxdb.RxDBReplication, "_server_row", read_then_a_writer)
    rows = [{"assumedMasterState": d, "newDocumentState": {**d, "f": 3.0}} for d in pulled]
    answer = httpx.post(f"{live.url}{base}/push", json=rows, headers=headers).json()

    assert [(r["id"], r["status"]) for r in answer["results"]] == [
        ("a", "conflict"),
        ("b", "applied"),
    ]
    with server.store.engine.connect() as conn:
        assert dict(conn.execute(sa.select(tally.c.id, tally.c.f)).all()) == {"a": 5.0, "b": 3.0}


def test_a_real_column_admits_null_since_json_has_no_infinity() -> None:
    from syncunit.server.rxdb import rxdb_schema
    from syncunit.units import Stream

    t = sa.Table(
        "reading", sa.MetaData(),
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("x", sa.Float, nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
    )  # fmt: skip
    stream = Stream("readings", t, {c.name: c for c in t.columns}, local_table="LocalReading")
    props = rxdb_schema(stream.info())["properties"]
    assert props["x"] == {"type": ["number", "null"]}  # infinity arrives as null
    assert props["n"] == {"type": "integer"}


class Events:
    """An SSE client on a plain socket (so closing it ends it at once, as a browser tab
    closing would); a thread reads the events, ``next()`` waits for one."""

    def __init__(self, live: LiveServer, path: str, token: str = "token-h1") -> None:
        self.items: list[Any] = []
        self.cond = threading.Condition()
        self.sock = socket.create_connection(("127.0.0.1", live.port), timeout=30)
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        self.file = self.sock.makefile("rb")
        status = self.file.readline()
        assert b" 200 " in status, status
        headers = {}
        while (line := self.file.readline().strip()) != b"":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        assert headers["content-type"].startswith("text/event-stream")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while (line := self.file.readline()) and line != b"0\r\n":  # the body's end
                text = line.decode().strip()
                if "data: " in text:  # (a chunk-size line may not precede it)
                    with self.cond:
                        self.items.append(json.loads(text.split("data: ", 1)[1]))
                        self.cond.notify_all()
        except OSError:
            pass

    def next(self, timeout: float = 10.0) -> Any:
        with self.cond:
            assert self.cond.wait_for(lambda: self.items, timeout), "no event came"
            return self.items.pop(0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        self.file.close()  # the socket's own close waits for its file's
        self.sock.close()


def test_the_event_stream_sends_resync_then_the_changed_documents(
    live: LiveServer, peer: RxPeer, server: SyncServer, plain_sql: PlainSQL
) -> None:
    events = Events(live, f"{BASE}/pull/stream?batchSize=5")
    try:
        assert events.next() == "RESYNC"
        peer.pull()  # what RxDB does on RESYNC
        keys = appointments_of(server.store, 1)
        plain_sql("UPDATE appointment SET notes = 'live' WHERE id = :id", {"id": keys[3]})
        event = events.next()
        assert [d["id"] for d in event["documents"]] == [keys[3]]
        assert event["documents"][0]["notes"] == "live"
        peer.apply(event)
        # Another hospital's change is out of scope: no event; more than a batch: RESYNC.
        elsewhere = appointments_of(server.store, 2)[0]
        plain_sql("UPDATE appointment SET notes = 'x' WHERE id = :id", {"id": elsewhere})
        plain_sql.many(
            "UPDATE appointment SET notes = 'bulk' WHERE id = :id", [{"id": k} for k in keys[10:20]]
        )
        assert events.next() == "RESYNC"
        peer.pull()
        assert peer.docs == server_docs(server)
    finally:
        events.close()


def test_event_streams_take_the_principals_share_of_long_waits(
    server: SyncServer, make_server: Callable[..., SyncServer], serve: Callable[[Any], LiveServer]
) -> None:
    """An event stream waits on changes as a long-poll does, and counts as one: a
    principal holding its share is told to retry later, another is not, and a stream
    that ends gives its place back."""
    server = make_server(max_live_waiters=6, live_waiters_per_principal=2)
    live = serve(server.app)
    held = [Events(live, f"{BASE}/pull/stream") for _ in range(2)]
    others: list[Events] = []
    try:
        with httpx.stream("GET", f"{live.url}{BASE}/pull/stream", headers=auth(), timeout=30) as r:
            assert r.status_code == 503  # (a stream would be a 200 that never ends)
            over = json.loads(r.read())
            assert int(r.headers["Retry-After"]) >= 1
        assert over["code"] == "busy"
        assert "this principal" in over["detail"]
        others.append(Events(live, f"{BASE}/pull/stream", token="token-h2"))
        assert others[0].next() == "RESYNC"

        held.pop().close()
        wait_until(lambda: server.live_waits.used == 2)
        held.append(Events(live, f"{BASE}/pull/stream"))  # its place came back
        assert held[-1].next() == "RESYNC"
    finally:
        for events in held + others:
            events.close()
    wait_until(lambda: server.live_waits.used == 0)


def test_an_event_stream_ends_so_the_client_reconnects_as_who_it_is_now(
    live: LiveServer, peer: RxPeer, server: SyncServer, plain_sql: PlainSQL
) -> None:
    server.rxdb.stream_lifetime = 0.5
    events = Events(live, f"{BASE}/pull/stream")
    try:
        assert events.next() == "RESYNC"
        events.thread.join(10)
        assert not events.thread.is_alive(), "the stream did not end"
    finally:
        events.close()
    peer.pull()
    events = Events(live, f"{BASE}/pull/stream")
    try:
        assert events.next() == "RESYNC"
        # Moved to hospital 2, the desk gets no row of hospital 1 on the open stream.
        plain_sql("UPDATE staff SET hospital_id = 2 WHERE id = 1")
        key = appointments_of(server.store, 1)[0]
        plain_sql("UPDATE appointment SET notes = 'not for you' WHERE id = :id", {"id": key})
        events.thread.join(10)
        assert not events.thread.is_alive(), "the stream did not end"
        assert events.items == []
    finally:
        events.close()
    events = Events(live, f"{BASE}/pull/stream")
    try:
        assert events.next() == "RESYNC"
        body = peer.pull_once(10)
        assert body["reset"] is True
    finally:
        events.close()


def test_an_event_stream_ends_once_the_streams_authorize_hook_refuses_the_principal(
    make_server: Callable[..., SyncServer],
    serve: Callable[[Any], LiveServer],
    plain_sql: PlainSQL,
) -> None:
    """A hook may look up permissions that change while a stream is open: each event is
    authorized as a pull would be, and a refused principal gets no row, the stream ends."""
    from hospital.generate import generate
    from hospital.models import doctor
    from hospital.units import appointment_columns, appointment_joins, my_hospital

    from syncunit.server import Principal, TokenAuth
    from syncunit.units import Stream, SyncSchema, SyncUnit

    revoked: set[str] = set()  # e.g. a permissions table
    guarded = Stream(
        "appointments",
        appointment,
        appointment_columns,
        joins=appointment_joins,
        where=doctor.c.hospital_id == my_hospital,
        local_table="LocalAppointment",
        authorize=lambda principal, params: principal.id not in revoked,
    )
    server = make_server(SyncSchema([SyncUnit("Online", [guarded], direction="both")]))
    server.authenticate = TokenAuth({"ana": Principal("ana", {"hospital_id": 1})})
    generate(server.store.engine, appointments=40, hospitals=2, doctors=4, patients=20)
    live = serve(server.app)
    keys = appointments_of(server.store, 1)
    events = Events(live, f"{BASE}/pull/stream?batchSize=5", token="ana")
    try:
        assert events.next() == "RESYNC"
        plain_sql("UPDATE appointment SET notes = 'seen' WHERE id = :id", {"id": keys[0]})
        assert [d["notes"] for d in events.next()["documents"]] == ["seen"]
        revoked.add("ana")
        with httpx.Client(base_url=live.url, timeout=30) as http:
            r = http.post(f"{BASE}/pull", json={"checkpoint": None}, headers=auth("ana"))
        assert r.status_code == 403, r.text
        plain_sql("UPDATE appointment SET notes = 'not for you' WHERE id = :id", {"id": keys[1]})
        events.thread.join(10)
        assert not events.thread.is_alive(), "the stream did not end"
        assert events.items == []
    finally:
        events.close()
    wait_until(lambda: server.live_waits.used == 0)


def test_an_event_stream_ended_by_a_refusal_is_counted_and_logged_without_the_principal(
    make_server: Callable[..., SyncServer],
    serve: Callable[[Any], LiveServer],
    plain_sql: PlainSQL,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream ended by the ``authorize`` hook (403) or by a revoked token (401) is the
    refusal a request would get: counted under its code and logged once, and the log
    names no principal (``log_principals`` is off)."""
    from hospital.generate import generate
    from hospital.models import doctor
    from hospital.units import appointment_columns, appointment_joins, my_hospital

    from syncunit.server import Principal, TokenAuth
    from syncunit.units import Stream, SyncSchema, SyncUnit

    revoked: set[str] = set()
    guarded = Stream(
        "appointments",
        appointment,
        appointment_columns,
        joins=appointment_joins,
        where=doctor.c.hospital_id == my_hospital,
        local_table="LocalAppointment",
        authorize=lambda principal, params: principal.id not in revoked,
    )
    server = make_server(SyncSchema([SyncUnit("Online", [guarded], direction="both")]))
    tokens = {
        "ana": Principal("ana@example.org", {"hospital_id": 1}),
        "bob": Principal("bob@example.org", {"hospital_id": 1}),
    }
    server.authenticate = TokenAuth(lambda token: tokens.get(token))
    generate(server.store.engine, appointments=40, hospitals=2, doctors=4, patients=20)
    live = serve(server.app)
    caplog.set_level(logging.INFO, logger="syncunit")
    refused = server.metrics.refused
    ana = Events(live, f"{BASE}/pull/stream", token="ana")
    bob = Events(live, f"{BASE}/pull/stream", token="bob")
    try:
        assert ana.next() == "RESYNC"
        assert bob.next() == "RESYNC"
        revoked.add("ana@example.org")  # the hook refuses ana
        del tokens["bob"]  # bob's token is revoked
        key = appointments_of(server.store, 1)[0]
        plain_sql("UPDATE appointment SET notes = 'not for you' WHERE id = :id", {"id": key})
        for events in (ana, bob):
            events.thread.join(10)
            assert not events.thread.is_alive(), "the stream did not end"
            assert events.items == []
    finally:
        ana.close()
        bob.close()
    assert refused.labels("forbidden")._value.get() == 1
    assert refused.labels("unauthenticated")._value.get() == 1
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("syncunit")]
    assert not [line for line in lines if "example.org" in line], lines
    ended = [line for line in lines if "the event stream ended" in line]
    assert len(ended) == 2, lines
    assert any("forbidden: " in line and "<principal>" in line for line in ended), ended
    assert any("unauthenticated: " in line for line in ended), ended


# -- a unit opened on a selection ------------------------------------------------------


def selection_docs(server: SyncServer, stream: str, patient_id: int) -> dict[str, dict[str, Any]]:
    """What RxDB should hold of hospital 1's ``stream`` opened on ``patient_id``."""
    s = server.schema.streams[stream]
    key = s.key
    params = {"hospital_id": 1, "patient_id": patient_id}
    rows = [dict(zip(s.columns, r, strict=True)) for r in expected_rows(server, s, params)]
    return {str(r[key]): {**r, key: str(r[key])} for r in rows}  # RxDB keys are strings


def test_a_unit_opened_on_a_selection_pulls_that_selection_and_resets_on_another(
    http: httpx.Client, server: SyncServer, plain_sql: PlainSQL
) -> None:
    first, second = patients_of(server.store, 1)[:2]
    peer = RxPeer(http, base=DETAILS, params={"patient_id": first})
    peer.pull(batch=2)
    assert peer.docs == selection_docs(server, "patient_history", first)
    assert len(peer.docs) >= 2
    assert {d["patient_id"] for d in peer.docs.values()} == {first}
    # The same checkpoint with another patient: that stream starts afresh.
    peer.params = {"patient_id": second}
    body = peer.pull_once(1000)
    assert body["reset"] is True
    peer.apply(body)
    assert peer.docs == selection_docs(server, "patient_history", second)
    # The selection narrows the principal's scope, never widens it.
    here = patients_of(server.store, 1)
    elsewhere = next(p for p in patients_of(server.store, 2) if p not in here)
    other = RxPeer(http, base=DETAILS, params={"patient_id": elsewhere})
    other.pull()
    assert other.docs == {}
    card = RxPeer(http, base="/v1/rxdb/PatientDetails/patient_card", params={"patient_id": first})
    card.pull()
    assert card.docs == selection_docs(server, "patient_card", first)
    assert list(card.docs) == [str(first)]


def test_the_event_stream_of_a_selection_sends_only_its_changes(
    live: LiveServer, http: httpx.Client, server: SyncServer, plain_sql: PlainSQL
) -> None:
    mine, theirs = patients_of(server.store, 1)[:2]
    peer = RxPeer(http, base=DETAILS, params={"patient_id": mine})
    query = "params=" + json.dumps({"patient_id": mine}).replace(" ", "%20")
    events = Events(live, f"{DETAILS}/pull/stream?{query}")
    try:
        assert events.next() == "RESYNC"
        peer.pull()
        key_of = {
            p: plain_sql("SELECT id FROM appointment WHERE patient_id = :p LIMIT 1", {"p": p})[0][0]
            for p in (mine, theirs)
        }
        # Another patient's change first: were it sent, it would be the next event.
        plain_sql("UPDATE appointment SET notes = 'theirs' WHERE id = :id", {"id": key_of[theirs]})
        plain_sql("UPDATE appointment SET notes = 'mine' WHERE id = :id", {"id": key_of[mine]})
        event = events.next()
        assert [d["id"] for d in event["documents"]] == [key_of[mine]]
        peer.apply(event)
        assert peer.docs == selection_docs(server, "patient_history", mine)
    finally:
        events.close()


# -- binary columns ----------------------------------------------------------------------

_scans_meta = sa.MetaData()
scan = sa.Table(
    "scan",
    _scans_meta,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("ward", sa.String(10), nullable=False),
    sa.Column("image", sa.LargeBinary, nullable=True),
)


def test_binary_columns_travel_as_base64_both_ways(
    store: Any, serve: Callable[[Any], LiveServer], plain_sql: PlainSQL
) -> None:
    import base64

    from syncunit.server import Principal, TokenAuth
    from syncunit.units import Stream, SyncSchema, SyncUnit

    _scans_meta.create_all(store.engine)
    scans = Stream(
        "scans",
        scan,
        [scan.c.id, scan.c.ward, scan.c.image],
        where=scan.c.ward == sa.bindparam("ward"),
    )
    server = SyncServer(
        SyncSchema([SyncUnit("Scans", [scans], direction="both")]),
        store,
        authenticate=TokenAuth({"token-h1": Principal("nurse", {"ward": "w1"})}),
    )
    first = bytes(range(256))  # every byte value, NUL and 0xFF included
    plain_sql("INSERT INTO scan (id, ward, image) VALUES ('a', 'w1', :b)", {"b": first})

    def stored() -> dict[str, bytes | None]:
        rows = plain_sql("SELECT id, image FROM scan ORDER BY id")
        return {k: None if v is None else bytes(v) for k, v in rows}

    with httpx.Client(base_url=serve(server.app).url, timeout=30) as http:
        r = http.get("/v1/rxdb/Scans/scans/schema", headers=auth())
        assert r.json()["properties"]["image"] == {"type": ["string", "null"]}
        peer = RxPeer(http, base="/v1/rxdb/Scans/scans")
        peer.pull()
        assert peer.docs == {
            "a": {"id": "a", "ward": "w1", "image": base64.b64encode(first).decode()}
        }

        new = {"id": "b", "ward": "w1", "image": base64.b64encode(b"\x00scan\xff").decode()}
        changed = {**peer.docs["a"], "image": base64.b64encode(b"second").decode()}
        bad = {"id": "c", "ward": "w1", "image": "not base64!"}
        out = peer.push(
            [
                {"assumedMasterState": None, "newDocumentState": {**new, "_deleted": False}},
                {
                    "assumedMasterState": {**peer.docs["a"], "_deleted": False},
                    "newDocumentState": {**changed, "_deleted": False},
                },
                {"assumedMasterState": None, "newDocumentState": {**bad, "_deleted": False}},
            ]
        )
        assert [x["status"] for x in out["results"]] == ["applied", "applied", "rejected"]
        assert out["results"][2]["code"] == "invalid-value"
        assert "image" in out["results"][2]["reason"]
        assert stored() == {"a": b"second", "b": b"\x00scan\xff"}
        peer.pull()
        assert peer.docs == {
            "a": changed,
            "b": new,
        }


@pytest.mark.backends("postgres")
def test_an_event_stream_on_a_restored_database_is_refused_as_a_sync_is(
    live: LiveServer,
    peer: RxPeer,
    server: SyncServer,
    store: Any,
    db_backup: Any,
    plain_sql: PlainSQL,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A database restored under the running server: a stream open then ends (the
    client reconnects), and a new one is the sync's ``503 database-restored``, not
    a 200 cut by a server fault."""
    peer.pull()
    events = Events(live, f"{BASE}/pull/stream")
    try:
        assert events.next() == "RESYNC"
        db_backup.restore(db_backup.save(), store)
        plain_sql(
            "UPDATE appointment SET notes = 'after' WHERE id = :id",
            {"id": appointments_of(server.store, 1)[0]},
        )
        events.thread.join(10)
        assert not events.thread.is_alive()  # the stream ended
        assert events.items == []
    finally:
        events.close()
    with httpx.stream("GET", f"{live.url}{BASE}/pull/stream", headers=auth(), timeout=10) as r:
        assert r.status_code == 503
        assert json.loads(r.read())["code"] == "database-restored"
    assert server.metrics.refused.labels("internal")._value.get() == 0
    assert [r for r in caplog.records if r.exc_info and r.name.startswith("syncunit")] == []
