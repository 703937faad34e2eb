"""A mutation that fails on the server never blocks the ones behind it.

DESIGN invariant 2 (no lost write) and the push's promise: a mutation that
fails for a non-transient reason (a business rule whose query hits a database
error) is rejected with its reason; a transient failure (a lock) is tried
again a bounded number of times, then surfaced the same way; the rest of the
push is applied.
"""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy as sa

from syncunit.errors import NetworkError
from syncunit.policies import MutationContext
from syncunit.server import mutation
from tests.test_push_support import FaultTransport, local_notes


def _poison(ctx: MutationContext) -> str | None:
    if ctx.row.get("title") == "poison":
        ctx.conn.execute(sa.text("SELECT * FROM no_such_table"))
    return None


def test_a_poison_mutation_is_rejected_and_the_rest_of_the_push_applies(notes_app):
    app = notes_app(rules=[_poison])
    device = app.client()
    for key, title in [("a", "fine"), ("b", "poison"), ("c", "fine too")]:
        device.insert("LocalNote", {"id": key, "owner": "u1", "title": title})

    result = device.sync("Sync")

    assert result.applied == 2
    assert [(r["key"], r["code"]) for r in result.rejected] == [("b", "server-error")]
    assert "no_such_table" in result.rejected[0]["reason"]
    assert [r[0] for r in app.rows("u1")] == ["a", "c"]
    assert device.outbox.pending() == []
    [kept] = device.outbox.rejected()
    assert kept.attempted["title"] == "poison"  # kept for the app, not dropped
    # The device is not stuck: later changes go through.
    device.insert("LocalNote", {"id": "d", "owner": "u1", "title": "later"})
    assert device.sync("Sync").applied == 1
    assert local_notes(device) == app.rows("u1")


def _locked(times: list[int], fail_first: int):
    def rule(ctx: MutationContext) -> str | None:
        times.append(1)
        if ctx.row.get("title") == "busy" and len(times) <= fail_first:
            raise sa.exc.OperationalError(
                "UPDATE note", {}, sqlite3.OperationalError("database is locked")
            )
        return None

    return rule


def test_a_transient_failure_is_tried_again_and_applies(notes_app, monkeypatch):
    monkeypatch.setattr(mutation, "TRANSIENT_PAUSE", 0.0)
    calls: list[int] = []
    app = notes_app(rules=[_locked(calls, fail_first=2)])
    device = app.client()
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "busy"})

    result = device.sync("Sync")

    assert result.applied == 1
    assert result.rejected == []
    assert len(calls) == 3  # two failures, then the write went through
    assert app.applications("a") == 1


def test_a_transient_failure_past_its_retries_is_surfaced_and_nothing_waits(notes_app, monkeypatch):
    monkeypatch.setattr(mutation, "TRANSIENT_PAUSE", 0.0)
    calls: list[int] = []
    app = notes_app(rules=[_locked(calls, fail_first=10**6)])
    device = app.client()
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "busy"})
    device.insert("LocalNote", {"id": "b", "owner": "u1", "title": "free"})

    result = device.sync("Sync")

    assert [(r["key"], r["code"]) for r in result.rejected] == [("a", "unavailable")]
    assert f"tried {mutation.TRANSIENT_ATTEMPTS} times" in result.rejected[0]["reason"]
    assert result.applied == 1
    assert app.row("b") is not None
    assert app.row("a") is None
    [kept] = device.outbox.rejected()
    device.outbox.retry(kept.id)  # the app decides to send it again
    assert device.outbox.count() == 1


def test_an_update_behind_an_unanswered_insert_is_not_refused_for_its_nulls(notes_app):
    """The base of such an update holds NULL where the server filled a default."""
    app = notes_app()
    fault = FaultTransport()
    device = app.client(transport=fault)
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "first"})  # body NULL
    fault.lose_next()
    with pytest.raises(NetworkError):
        device.sync("Sync")
    device.update("LocalNote", "a", {"title": "second"})

    result = device.sync("Sync")

    assert result.rejected == []
    assert result.applied == 2
    assert app.row("a")["title"] == "second"
    assert local_notes(device) == app.rows("u1")
