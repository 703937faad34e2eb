"""A multi-device model: random work on several devices, a backoffice, and faults.

Three devices (two start as principal u1, one as u2) and a backoffice work on
one notes server. Steps: local inserts, updates and deletes (conflicting edits
of the same rows on two devices; the table detects conflicts), backoffice
writes, deletes and moves of rows between owners (scope changes), a device's
catalog going stale on a column's type (schema change), devices going offline
and online, user switches (logout, login of the other principal), syncs of
random units, all through seeded fault transports (``tests/faults.py``).

When the faults heal and the queues drain:

* every device holds exactly the server's rows for its principal;
* every local insert was applied exactly once, or is listed as rejected or
  conflicting, or is parked for its principal (a user switch offline); the
  server's rule refuses new notes whose title holds ``cc``, and none of those is
  applied. Runs of new notes are written as batches (the rule has a set-based
  form), and a batch with a refused note goes one by one;
* no row deleted on the server came back.

It runs on each server database. Bounded in CI. ``SYNCUNIT_FUZZ_STEPS=10000`` runs
at least that many steps on each (``SYNCUNIT_FUZZ_SEED`` picks the run). A failure
shrinks to the shortest sequence of steps that still fails, printed as code that
replays it (the fault seeds are part of the steps).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from syncunit.client import SyncClient
from syncunit.errors import ProblemError, SyncError
from syncunit.policies import BatchContext, Detect, MutationContext, set_check
from syncunit.server.batch import BATCH_MIN
from syncunit.server.limits import Limits
from tests.faults import KINDS, SeededFaults
from tests.test_push_support import NotesApp, local_notes

STEPS = int(os.environ.get("SYNCUNIT_FUZZ_STEPS", "0"))
#: With STEPS, the seed of the run (unset: a new one each time; CI's runs are fixed).
SEED = int(os.environ["SYNCUNIT_FUZZ_SEED"]) if os.environ.get("SYNCUNIT_FUZZ_SEED") else None
#: Changes per push request. ``SYNCUNIT_FUZZ_PUSH_BATCH=1`` makes most pushes several
#: batches, numbered ahead and (``Push``) overlapped; the fault transport's draws then
#: come from two threads, so a failure replays from its seed less exactly.
PUSH_BATCH = int(os.environ.get("SYNCUNIT_FUZZ_PUSH_BATCH", "2000"))
STEPS_PER_RUN = 50 if STEPS else 25
# Hypothesis ends some runs early (about 42 steps of 50 on average): a margin.
RUNS = max(1, -(-STEPS * 3 // (STEPS_PER_RUN * 2))) if STEPS else 6
TOKENS = {"u1": "t1", "u2": "t2"}
#: New notes whose title holds this are refused by the server's rule (``no_cc``).
REFUSED = "cc"
OWNERS = ["u1", "u1", "u2"]
#: What the last run did, for docs/reliability.md (summed over all runs of a session).
TOTALS: dict[str, int] = {}


def _stale(catalog: Any) -> Any:
    def text_n(c: Any) -> Any:
        return msgspec.structs.replace(c, type="text") if c.name == "n" else c

    streams = [
        msgspec.structs.replace(s, columns=[text_n(c) for c in s.columns], definition="stale")
        for s in catalog.streams
    ]
    return msgspec.structs.replace(catalog, streams=streams, schema_hash="stale")


def _no_cc_at_once(batch: BatchContext) -> bool:
    if any(REFUSED in r["title"] for r in batch.rows):
        TOTALS["refused-batches"] = TOTALS.get("refused-batches", 0) + 1
        return False
    return True


@set_check(_no_cc_at_once)
def no_cc(ctx: MutationContext) -> str | None:
    """New notes whose title holds ``cc`` are refused: a rule that says no, in batches
    of new rows too (the batch then goes one by one; on SQLite the request is split in
    two transactions at that point)."""
    if ctx.op == "insert" and REFUSED in ctx.row["title"]:
        return f"a new note's title may not hold {REFUSED!r}"
    return None


def _emptied(app: NotesApp) -> NotesApp:
    """The model's server, emptied for a new run."""
    app.backoffice("DELETE FROM note")
    app.backoffice("DELETE FROM audit")
    return app


def _sync_through(device: SyncClient) -> None:
    """Sync once the faults healed; the server may still ask to wait (429: rate limit)."""
    for _ in range(20):
        try:
            device.sync("Sync")
            return
        except ProblemError as exc:
            if exc.status != 429:
                raise
            time.sleep(0.25)
    device.sync("Sync")


class Devices(RuleBasedStateMachine):
    #: The live notes server every run of the model uses (set by the test).
    server: NotesApp

    def __init__(self) -> None:
        super().__init__()
        self.app = _emptied(self.server)
        self.tmp = Path(tempfile.mkdtemp(prefix="syncunit-devices-", dir=self.app.tmp_path))
        self.run = os.urandom(4).hex()  # keys unique across runs on the shared server
        self.devices: list[SyncClient] = []
        self.faults: list[SeededFaults] = []
        self.owner: list[str] = []
        self.inserted: dict[str, int] = {}  # key -> device that inserted it
        self.refused: set[str] = set()  # inserted with a title the rule refuses
        self.batches_before = self.app.batches
        self.deleted_on_server: set[str] = set()
        self.n = 0
        self.steps = 0

    @initialize(seeds=st.lists(st.integers(0, 2**32), min_size=3, max_size=3))
    def start(self, seeds: list[int]) -> None:
        for i, seed in enumerate(seeds):
            faults = SeededFaults(seed)
            self.faults.append(faults)
            self.owner.append(OWNERS[i])
            device = SyncClient(
                self.app.url,
                self.tmp / f"d{i}.sqlite",
                token=TOKENS[OWNERS[i]],
                transport=faults,
                chunk_size=3,
                timeout=10,
                push_batch=PUSH_BATCH,
            )
            device.catalog()  # a device learns its tables before the app writes them
            self.devices.append(device)
        for i in range(6):
            self.app.add(f"{self.run}-s{i}", owner=OWNERS[i % 2 + 1], title=f"server {i}")

    def _key(self) -> str:
        self.n += 1
        return f"{self.run}-k{self.n:04d}"

    def _pick(self, d: int, pick: int) -> str | None:
        keys = sorted(r[0] for r in local_notes(self.devices[d]))
        return keys[pick % len(keys)] if keys else None

    # -- local work ---------------------------------------------------------------------

    @rule(d=st.integers(0, 2), title=st.text("abc", max_size=3))
    def local_insert(self, d: int, title: str) -> None:
        key = self._key()
        self.devices[d].insert("LocalNote", {"id": key, "owner": self.owner[d], "title": title})
        self.inserted[key] = d
        if REFUSED in title:
            self.refused.add(key)

    @rule(
        d=st.integers(0, 2),
        titles=st.lists(st.text("abc", max_size=3), min_size=4, max_size=9),
        spoil=st.booleans(),
    )
    def local_inserts(self, d: int, titles: list[str], spoil: bool) -> None:
        """Several new notes in a row: the server writes such runs as one batch (``spoil``:
        one of them is refused, and the batch goes one by one)."""
        for i, title in enumerate(titles):
            self.local_insert(d, title + REFUSED if spoil and i == len(titles) // 2 else title)

    @rule(d=st.integers(0, 2), pick=st.integers(0, 100), title=st.text("xyz", max_size=3))
    def local_update(self, d: int, pick: int, title: str) -> None:
        key = self._pick(d, pick)
        if key is not None:
            self.devices[d].update("LocalNote", key, {"title": title, "n": pick})
            self.refused.discard(key)  # its insert, if not pushed yet, goes with this title

    @rule(d=st.integers(0, 2), pick=st.integers(0, 100))
    def local_delete(self, d: int, pick: int) -> None:
        key = self._pick(d, pick)
        if key is not None:
            self.devices[d].delete("LocalNote", key)

    # -- the backoffice -------------------------------------------------------------------

    @rule(owner=st.sampled_from(["u1", "u2"]))
    def server_insert(self, owner: str) -> None:
        key = self._key()
        self.app.add(key, owner=owner, title="backoffice")
        self.deleted_on_server.discard(key)

    @rule(pick=st.integers(0, 100), what=st.sampled_from(["update", "delete", "move"]))
    def server_write(self, pick: int, what: str) -> None:
        rows = self.app.rows("u1") + self.app.rows("u2")
        if not rows:
            return
        key = sorted(r[0] for r in rows)[pick % len(rows)]
        if what == "update":
            self.app.backoffice("UPDATE note SET title = 'edited', n = n + 1 WHERE id = ?", (key,))
        elif what == "delete":
            self.app.backoffice("DELETE FROM note WHERE id = ?", (key,))
            self.deleted_on_server.add(key)
        else:  # the row leaves one principal's scope for the other's
            self.app.backoffice(
                "UPDATE note SET owner = CASE owner WHEN 'u1' THEN 'u2' ELSE 'u1' END WHERE id = ?",
                (key,),
            )

    # -- devices ----------------------------------------------------------------------------

    @rule(d=st.integers(0, 2), unit=st.sampled_from(["Sync", "Pull", "Push"]))
    def sync(self, d: int, unit: str) -> None:
        with contextlib.suppress(SyncError):  # a fault: the next run resumes
            self.devices[d].sync(unit)

    @rule()
    def sync_all(self) -> None:
        """Every device pushes and pulls (under the faults): where most faults bite."""
        for device in self.devices:
            with contextlib.suppress(SyncError):
                device.sync("Sync")

    @rule(d=st.integers(0, 2), offline=st.booleans())
    def connectivity(self, d: int, offline: bool) -> None:
        self.faults[d].offline = offline

    @rule(d=st.integers(0, 2))
    def switch_user(self, d: int) -> None:
        device = self.devices[d]
        device.logout(clear=True)
        self.owner[d] = "u2" if self.owner[d] == "u1" else "u1"
        with contextlib.suppress(SyncError):
            device.login(TOKENS[self.owner[d]])

    @rule(d=st.integers(0, 2))
    def stale_catalog(self, d: int) -> None:
        catalog = self.devices[d].store.catalog()
        if catalog is not None:
            self.devices[d].store.apply_catalog(_stale(catalog))

    @invariant()
    def count(self) -> None:
        self.steps += 1

    # -- the end: heal, drain, check ------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.devices:
                self._drain_and_check()
        finally:
            for f in self.faults:
                for k, v in f.injected.items():
                    TOTALS[k] = TOTALS.get(k, 0) + v
            TOTALS["steps"] = TOTALS.get("steps", 0) + self.steps
            TOTALS["batches"] = TOTALS.get("batches", 0) + self.app.batches - self.batches_before
            TOTALS["runs"] = TOTALS.get("runs", 0) + 1
            TOTALS["requests"] = TOTALS.get("requests", 0) + sum(f.requests for f in self.faults)
            for device in self.devices:
                device.close()
            for f in self.faults:
                f.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _drain_and_check(self) -> None:
        for f in self.faults:
            f.offline = False
        for _ in range(2):  # a last round under the faults, then they heal
            self.sync_all()
        for f in self.faults:
            f.enabled = False
        for device in self.devices:
            device.push_parked()  # a principal's own parked changes, if it is back
            for _ in range(4):
                _sync_through(device)
                if not device.outbox.pending():
                    break
            assert device.outbox.pending() == []
        for device in self.devices:  # the others' pushes may have changed its scope
            _sync_through(device)
        for d, device in enumerate(self.devices):
            assert local_notes(device) == self.app.rows(self.owner[d]), f"device {d}"
            for key in self.deleted_on_server:
                if self.app.row(key) is None:
                    assert key not in {r[0] for r in local_notes(device)}
        surfaced = {
            (r.key, d) for d, device in enumerate(self.devices) for r in device.outbox.rejected()
        }
        parked: set[str] = set()
        for device in self.devices:
            for client_id in device.outbox.parked():
                parked |= {str(m.key) for m in device.outbox.parked_mutations(client_id)}
        with self.app.server.store.engine.connect() as conn:
            inserts = dict(
                conn.execute(
                    sa.select(self.app.audit.c.note_id, sa.func.count())
                    .where(self.app.audit.c.op == "insert")
                    .group_by(self.app.audit.c.note_id)
                ).all()
            )
        for key, d in self.inserted.items():
            applied = inserts.get(key, 0)
            assert applied <= 1, f"{key} inserted {applied} times"
            assert not (applied and key in self.refused), f"{key}: refused, applied"
            if applied == 0:
                # Never applied: cancelled by a local delete before it went out, or
                # surfaced (rejected, conflict) or parked for its principal.
                gone_locally = key not in {r[0] for r in local_notes(self.devices[d])}
                assert gone_locally or (key, d) in surfaced or key in parked, key


MODEL_SETTINGS = settings(
    max_examples=RUNS,
    stateful_step_count=STEPS_PER_RUN,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=not STEPS,
    database=None,
    **({"print_blob": True} if STEPS else {}),
)


@pytest.mark.timeout(max(600, STEPS))
def test_devices_converge_under_faults(notes_app: Callable[..., NotesApp]) -> None:
    """The model, on each server database (one live server for all its runs)."""
    # The model's devices sync far faster than people: no rate limit (admission has
    # its own tests); a 429 is still waited out at the end (``_sync_through``).
    limits = Limits(requests_per_second=1e6, request_burst=10**6)
    app = notes_app(policy=Detect(), rules=[no_cc], batches=True, limits=limits)
    machine = type("Devices", (Devices,), {"server": app})
    if STEPS and SEED is not None:  # the run to repeat: its sequences and their faults
        machine = hypothesis_seed(SEED)(machine)
    run_state_machine_as_test(machine, settings=MODEL_SETTINGS)


def test_the_model_ran_and_injected_faults() -> None:
    """Runs after the model (file order): it really worked under faults."""
    if not TOTALS:
        pytest.skip("the model did not run in this session")
    print("model totals:", dict(sorted(TOTALS.items())))
    # CI's fixed run, or a long one (a short one may not); a run of pushes of fewer
    # changes than a batch takes writes none.
    if (not STEPS or STEPS >= 1000) and PUSH_BATCH >= BATCH_MIN:
        assert TOTALS.get("batches", 0) > 0, "no push was written as a batch"
        assert TOTALS.get("refused-batches", 0) > 0, "no batch was refused"
    assert TOTALS["steps"] >= max(STEPS, TOTALS["runs"])
    assert TOTALS["requests"] > 0
    assert sum(TOTALS.get(k, 0) for k in KINDS) > 0
