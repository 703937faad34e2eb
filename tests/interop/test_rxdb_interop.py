"""The real RxDB under Node, and a Python device, syncing one hospital's appointments.

``tests/interop/js`` pins rxdb and rxjs in its package-lock.json; ``npm ci``
installs them into its (git-ignored) node_modules, once per change of the lock.
The JavaScript device (``js/device.mjs``) runs the replication of
``js/syncunit-rxdb.mjs`` (what docs/javascript.md shows) with RxDB's memory
storage, schema validation and dev-mode checks, and answers commands on stdin.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import queue
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from syncunit.client import SyncClient
from syncunit.server import SyncServer
from syncunit.server.store import mutation_log
from tests.conftest import PlainSQL
from tests.filelock import held
from tests.support import (
    LiveServer,
    appointments_of,
    assert_in_sync,
    expected_rows,
    patients_of,
    principal_params,
)

JS = Path(__file__).parent / "js"
STAMP = JS / "node_modules" / ".syncunit-lock.sha256"
JS_CLIENT = "rxdb:tablet:appointments"  # the server's client id of its pushes


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, with the pinned packages installed (``npm ci`` when the lock changed)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js (node and npm) is not installed: the RxDB interop test needs it")
    lock = hashlib.sha256((JS / "package-lock.json").read_bytes()).hexdigest()
    with held("npm"):  # parallel test workers (pytest -n) would both empty node_modules
        if not STAMP.exists() or STAMP.read_text().strip() != lock:
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=JS,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
            STAMP.write_text(lock)
    return node


def test_the_docs_show_the_replication_code_the_test_runs() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "javascript.md").read_text()
    helper = (JS / "syncunit-rxdb.mjs").read_text()
    assert f"```js\n{helper}```" in doc, "docs/javascript.md: copy js/syncunit-rxdb.mjs again"


class JsDevice:
    """One Node process running RxDB; ``call`` sends a command and waits for its answer."""

    def __init__(self, node: str) -> None:
        self.proc = subprocess.Popen(
            [node, "device.mjs"],
            cwd=JS,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.answers: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self.pumps = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.answers.put)),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append)),
        ]
        for t in self.pumps:
            t.start()

    @staticmethod
    def _pump(stream: Any, put: Callable[[str], None]) -> None:
        for line in stream:
            put(line)

    def call(self, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"the JS device did not answer {cmd!r}: {''.join(self.stderr)[-2000:]}"
            ) from None
        answer: dict[str, Any] = json.loads(line)
        assert answer.pop("ok"), f"{cmd} failed in the JS device: {answer.get('error')}"
        return answer

    def docs(self) -> dict[str, dict[str, Any]]:
        return {d["id"]: d for d in self.call("docs")["docs"]}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("stop", timeout=10)
                self.proc.wait(10)
            except (AssertionError, subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait(10)
        for t in self.pumps:
            t.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def js_device(node: str) -> Iterator[Callable[[], JsDevice]]:
    devices: list[JsDevice] = []

    def make() -> JsDevice:
        d = JsDevice(node)
        devices.append(d)
        return d

    yield make
    for d in devices:
        d.close()


def server_docs(server: SyncServer, token: str = "token-h1") -> dict[str, dict[str, Any]]:
    s = server.schema.streams["appointments"]
    rows = expected_rows(server, s, principal_params(server.store, token))
    return {r[0]: dict(zip(s.columns, r, strict=True)) for r in rows}


def booking(doctor: int, patient: int, day: int, hour: int, **extra: Any) -> dict[str, Any]:
    start = dt.datetime(2031, 3, 1) + dt.timedelta(days=day, hours=hour)
    return {
        "doctor_id": doctor,
        "patient_id": patient,
        "starts_at": start.isoformat(),
        "ends_at": (start + dt.timedelta(minutes=30)).isoformat(),
        "status": "booked",
        "room": "",
        "notes": "",
        **extra,
    }


@pytest.mark.timeout(300)
def test_a_python_device_and_the_real_rxdb_share_one_hospital(
    js_device: Callable[[], JsDevice],
    make_client: Callable[..., SyncClient],
    live: LiveServer,
    server: SyncServer,
    plain_sql: PlainSQL,
) -> None:
    py = make_client("token-h1", name="py")
    py.sync("Online")
    js = js_device()
    started = js.call(
        "start", timeout=120, name="hospital1", url=live.url, token="token-h1",
        unit="Online", stream="appointments", clientId="tablet", batchSize=16,
    )  # fmt: skip
    assert started["count"] == len(server_docs(server)) == 200

    doctors = [r[0] for r in plain_sql("SELECT id FROM doctor WHERE hospital_id = 1 ORDER BY id")]
    far = plain_sql("SELECT id FROM doctor WHERE hospital_id = 2 ORDER BY id LIMIT 1")[0][0]
    patient = plain_sql("SELECT id FROM patient ORDER BY id LIMIT 1")[0][0]
    doc_a, doc_b = doctors[0], doctors[1]

    # Both book. The JS device's second booking takes the Python device's slot: refused.
    py_b1 = py.insert("LocalAppointment", booking(doc_a, patient, 1, 9))
    py_b2 = py.insert("LocalAppointment", booking(doc_a, patient, 1, 10))
    py.sync("Online")
    js_b1, js_b2, js_b3 = (str(uuid.uuid4()) for _ in range(3))
    js.call("insert", doc={"id": js_b1, **booking(doc_a, patient, 1, 11)})
    js.call("insert", doc={"id": js_b2, **booking(doc_a, patient, 1, 9, notes="clash")})
    js.call("insert", doc={"id": js_b3, **booking(doc_b, patient, 2, 9)})

    # Each edits the other's booking; each cancels one (JS deletes, Python sets the status).
    js.call("sync")
    js.call("patch", id=py_b2, fields={"room": "J-2"})
    py.sync("Online")
    py.update("LocalAppointment", js_b1, {"notes": "seen by python"})
    js.call("remove", id=js_b3)
    py.update("LocalAppointment", py_b1, {"status": "cancelled"})
    py.sync("Online")

    # A conflicting edit each way (notes are watched by Detect on the server).
    x, y = sorted(k for k in server_docs(server) if k not in {py_b1, py_b2, js_b1})[:2]
    js.call("sync")
    js.call("pause")
    py.update("LocalAppointment", x, {"notes": "python first"})
    py.sync("Online")
    js.call("patch", id=x, fields={"notes": "js late"})
    js.call("resume")
    py.update("LocalAppointment", y, {"notes": "python late"})
    js.call("patch", id=y, fields={"notes": "js first"})
    py.sync("Online")

    # The backoffice renames a doctor and moves an appointment out of this hospital.
    z = sorted(k for k in server_docs(server) if k not in {x, y, py_b1, py_b2, js_b1})[0]
    plain_sql("UPDATE doctor SET name = 'Dr. Renamed' WHERE id = :id", {"id": doc_a})
    plain_sql("UPDATE appointment SET doctor_id = :d WHERE id = :id", {"d": far, "id": z})
    py.sync("Online")
    # RxDB hears of it on its event stream, with no sync asked for.
    deadline = time.monotonic() + 20
    while z in js.docs() or any(
        d["doctor_name"] != "Dr. Renamed" for d in js.docs().values() if d["doctor_id"] == doc_a
    ):
        assert time.monotonic() < deadline, "the change never reached RxDB on its own"
        time.sleep(0.1)
    js.call("sync")

    # Both devices hold exactly the server's scope.
    want = server_docs(server)
    got = js.docs()
    assert set(got) == set(want)
    diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not diff, json.dumps(dict(list(diff.items())[:3]), indent=1)
    assert_in_sync(server, py, "token-h1", "Online")
    assert z not in got
    assert all(d["doctor_name"] == "Dr. Renamed" for d in got.values() if d["doctor_id"] == doc_a)

    # Every change was applied once, or reported to the device that made it.
    assert want[py_b1]["status"] == "cancelled"
    assert want[py_b2]["room"] == "J-2"
    assert want[js_b1]["notes"] == "seen by python"
    assert js_b2 not in want
    assert js_b3 not in want
    assert want[x]["notes"] == "python first"
    assert want[y]["notes"] == "js first"
    report = js.call("results")
    assert report["errors"] == []
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for r in report["results"]:
        first.setdefault((r["id"], r["op"]), r)
    verdicts = {k: (r["status"], r.get("code")) for k, r in first.items()}
    assert verdicts == {
        (js_b1, "insert"): ("applied", None),
        (js_b2, "insert"): ("rejected", "rule"),
        (js_b3, "insert"): ("applied", None),
        (js_b3, "delete"): ("applied", None),
        (py_b2, "update"): ("applied", None),
        (x, "update"): ("conflict", "conflict"),
        (y, "update"): ("applied", None),
    }
    assert "already booked" in first[(js_b2, "insert")]["reason"]
    assert [(c.key, c.status) for c in py.outbox.rejected()] == [(y, "conflict")]
    assert py.outbox.pending() == []
    with server.store.engine.connect() as conn:
        logged = conn.execute(
            sa.select(sa.func.count()).where(mutation_log.c.client_id == JS_CLIENT)
        ).scalar()
    assert logged == len(report["results"])

    # The desk moves to the other hospital: a clean re-sync leaves nothing of the first.
    plain_sql("UPDATE staff SET hospital_id = 2 WHERE token = 'token-h1'")
    js.call("sync")
    py.sync("Online")
    want = server_docs(server)
    assert set(want) == set(appointments_of(server.store, 2))
    assert js.docs() == want
    assert_in_sync(server, py, "token-h1", "Online")


@pytest.mark.timeout(300)
def test_the_real_rxdb_replicates_a_unit_opened_on_one_patient(
    js_device: Callable[[], JsDevice], live: LiveServer, server: SyncServer, plain_sql: PlainSQL
) -> None:
    mine, theirs = patients_of(server.store, 1)[:2]
    s = server.schema.streams["patient_history"]

    def selection() -> dict[str, dict[str, Any]]:
        rows = expected_rows(server, s, {"hospital_id": 1, "patient_id": mine})
        return {r[0]: dict(zip(s.columns, r, strict=True)) for r in rows}

    js = js_device()
    started = js.call(
        "start", timeout=120, name="patient", url=live.url, token="token-h1",
        unit="PatientDetails", stream="patient_history", clientId="tablet", batchSize=4,
        params={"patient_id": mine},
    )  # fmt: skip
    assert started["count"] == len(selection()) >= 2
    assert js.docs() == selection()

    # The backoffice edits one appointment of each patient: only this one's reaches
    # RxDB, on its event stream, with no sync asked for.
    key_of = {
        p: plain_sql("SELECT id FROM appointment WHERE patient_id = :p LIMIT 1", {"p": p})[0][0]
        for p in (mine, theirs)
    }
    plain_sql("UPDATE appointment SET notes = 'theirs' WHERE id = :id", {"id": key_of[theirs]})
    plain_sql("UPDATE appointment SET notes = 'mine' WHERE id = :id", {"id": key_of[mine]})
    deadline = time.monotonic() + 20
    while js.docs()[key_of[mine]]["notes"] != "mine":
        assert time.monotonic() < deadline, "the change never reached RxDB on its own"
        time.sleep(0.1)
    js.call("sync")
    assert js.docs() == selection()
    assert key_of[theirs] not in js.docs()
    assert js.call("results")["errors"] == []


def _tallies_server(database: str) -> tuple[SyncServer, sa.Table]:
    """One ``tally`` table of big integers and a NOT NULL float, under
    Detect(merge=False): every column of a base is checked, an edit's or a delete's."""
    from syncunit.policies import Detect
    from tests.support import owned_table_server

    tally = sa.Table(
        "tally", sa.MetaData(),
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("big", sa.BigInteger, nullable=True),
        sa.Column("f", sa.Float, nullable=False, default=0.0),
        sa.Column("note", sa.String(50), nullable=False, default=""),
    )  # fmt: skip
    return owned_table_server(
        database, tally, "LocalTally", "Tallies", policy=Detect(merge=False)
    ), tally


@pytest.mark.timeout(300)
def test_rxdb_writes_over_values_javascript_cannot_hold_are_never_stuck_or_false_conflicts(
    js_device: Callable[[], JsDevice],
    serve: Callable[[Any], LiveServer],
    new_database: Callable[[str], str],
) -> None:
    """Integers from 2**53 on reach RxDB as doubles, infinities as null: sent back as
    the base of an edit or a delete, they are the server's values (applied, none
    stuck, no conflict); a value past 64 bits the app writes is refused for its
    document alone; a real change on the server is still a conflict."""
    server, tally = _tallies_server(new_database("tallies"))
    rows = {
        "max": {"big": 2**63 - 1, "f": 1.5},
        "min": {"big": -(2**63), "f": 1.5},
        "odd": {"big": 2**53 + 1, "f": float("inf")},
        "neg": {"big": 7, "f": float("-inf")},
        "moved": {"big": 2**53 + 3, "f": 2.5},
    }

    def server_rows() -> dict[str, dict[str, Any]]:
        with server.store.engine.connect() as conn:
            found = conn.execute(sa.select(tally.c.id, tally.c.big, tally.c.f, tally.c.note))
            return {r.id: {"big": r.big, "f": r.f, "note": r.note} for r in found}

    with server.store.engine.begin() as conn:
        conn.execute(tally.insert(), [{"id": k, "owner": "ana", **v} for k, v in rows.items()])
    live = serve(server.app)
    js = js_device()
    started = js.call(
        "start", timeout=120, name="tallies", url=live.url, token="t",
        unit="Tallies", stream="tallys", clientId="tablet", batchSize=10,
    )  # fmt: skip
    # RxDB holds them all: a non-finite float of a NOT NULL column arrives as null.
    assert started["count"] == 5
    held = js.docs()
    assert {k: (d["big"], d["f"]) for k, d in held.items()} == {
        "max": (9223372036854776000, 1.5),  # JSON.stringify of 2**63 as a double
        "min": (-9223372036854776000, 1.5),
        "odd": (2**53, None),
        "neg": (7, None),
        "moved": (2**53 + 4, 2.5),
    }

    # Edits of other columns, in one push with a new document: all applied, the
    # values RxDB could not hold kept exactly.
    js.call("pause")
    for key in ("max", "min", "odd", "neg"):
        js.call("patch", id=key, fields={"note": "js"})
    js.call("insert", doc={"id": "new", "owner": "ana", "big": 2**53 + 2, "f": 0.5, "note": ""})
    with server.store.engine.begin() as conn:  # a real change meanwhile: a conflict
        conn.execute(tally.update().where(tally.c.id == "moved").values(big=2**53 + 100))
    js.call("patch", id="moved", fields={"note": "js"})
    js.call("resume")
    now = server_rows()
    assert {k: now[k] for k in rows} == {
        **{k: {**v, "note": "js"} for k, v in rows.items()},
        "moved": {"big": 2**53 + 100, "f": 2.5, "note": ""},
    }
    assert now["new"] == {"big": 2**53 + 2, "f": 0.5, "note": ""}  # as the app wrote it

    # A value past 64 bits is refused for its document alone; deletes over the
    # inexact values apply.
    js.call("pause")
    js.call("patch", id="neg", fields={"big": 2**64, "note": "too big"})
    for key in ("max", "min", "odd"):
        js.call("remove", id=key)
    js.call("resume")
    now = server_rows()
    assert set(now) == {"neg", "moved", "new"}
    assert now["neg"] == {"big": 7, "f": float("-inf"), "note": "js"}
    assert js.docs()["neg"]["big"] == 7  # RxDB takes the server's row back

    report = js.call("results")
    assert report["errors"] == []
    verdicts = [(r["id"], r["op"], r["status"], r.get("code")) for r in report["results"]]
    assert sorted(verdicts) == sorted(
        [
            *[(k, "update", "applied", None) for k in ("max", "min", "odd", "neg")],
            ("new", "insert", "applied", None),
            ("moved", "update", "conflict", "conflict"),
            ("neg", "update", "rejected", "invalid-value"),
            *[(k, "delete", "applied", None) for k in ("max", "min", "odd")],
        ]
    )
    [refusal] = [r for r in report["results"] if r["status"] == "rejected"]
    assert "64 bits" in refusal["reason"]
