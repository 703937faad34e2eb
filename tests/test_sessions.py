"""A shared tablet: users log out and in on one device file; tokens expire.

``logout(clear=...)`` ends a principal's session: its pending changes are
pushed, or kept (parked) for it when they cannot be; the next principal sees
none of its rows or rejections and is never refused for the previous one's
client id. A token provider is asked again when the server answers 401.
"""

from __future__ import annotations

import msgspec
import pytest

from syncunit.errors import AuthError, LocalStoreError, SyncError
from syncunit.policies import Detect
from tests.test_push_support import FaultTransport, local_notes


def _notes(app):
    app.add("u1-a", owner="u1", title="alice's")
    app.add("u2-a", owner="u2", title="bob's")


def test_a_second_user_on_the_same_device_syncs_and_sees_only_their_rows(notes_app):
    app = notes_app()
    _notes(app)
    device = app.client("t1")
    device.sync("Sync")
    device.insert("LocalNote", {"id": "u1-b", "owner": "u1", "title": "pending"})
    first_id = device.client_id

    kept = device.logout()

    assert kept == 0  # pushed before the session ended
    assert app.row("u1-b")["title"] == "pending"
    assert local_notes(device) == []
    assert device.client_id != first_id
    device.login("t2")
    device.sync("Sync")  # not 403: the new session has its own client id
    assert local_notes(device) == app.rows("u2")
    device.insert("LocalNote", {"id": "u2-b", "owner": "u2", "title": "bob's new"})
    assert device.sync("Sync").applied == 1


def test_a_logout_that_cannot_keep_a_change_as_written_ends_nothing(notes_app):
    """A synced column the app renamed: its change could be kept only without its value.
    The logout is refused whole (rows, token and the change stay), and goes through
    once the column is back."""
    app = notes_app()
    _notes(app)
    device = app.client("t1")
    device.sync("Sync")
    device.update("LocalNote", "u1-a", {"title": "offline edit"})
    device.store.conn.execute('ALTER TABLE "LocalNote" RENAME COLUMN title TO heading')

    with pytest.raises(LocalStoreError, match=r"session was not ended.*no column 'title'"):
        device.logout(push=False)

    assert device.http.headers["Authorization"] == "Bearer t1"
    assert device.outbox.count() == 1
    device.store.conn.execute('ALTER TABLE "LocalNote" RENAME COLUMN heading TO title')
    assert device.logout(push=False) == 1
    device.login("t1")  # pushes what its principal left parked
    assert app.row("u1-a")["title"] == "offline edit"


@pytest.mark.parametrize("fault", ["offline", "response-lost"])
def test_changes_that_cannot_be_pushed_at_logout_are_kept_for_their_principal(
    notes_app, net, fault
):
    app = notes_app()
    _notes(app)
    lossy = FaultTransport()
    device = app.client("t1", transport=net if fault == "offline" else lossy)
    device.sync("Sync")
    device.insert("LocalNote", {"id": "u1-b", "owner": "u1", "title": "offline write"})
    device.update("LocalNote", "u1-a", {"title": "edited offline"})
    if fault == "offline":  # the session never reached the server with a push
        net.fail("offline")
    else:  # the push at logout is applied by the server ... its answer is lost
        lossy.lose_next()

    kept = device.logout()
    net.heal()

    assert kept == 2
    assert device.outbox.parked() != {}
    assert local_notes(device) == []
    # Bob logs in: Alice's changes are not his (the server refuses her session to him).
    device.login("t2")
    device.sync("Sync")
    assert local_notes(device) == app.rows("u2")
    assert device.outbox.pending() == []
    assert device.outbox.rejected() == []
    assert sum(device.outbox.parked().values()) == 2
    device.logout()
    # Alice comes back: her parked changes are pushed (exactly once) and applied.
    device.login("t1")
    assert device.outbox.parked() == {}
    assert device.outbox.rejected() == []
    device.sync("Sync")
    assert app.row("u1-b")["title"] == "offline write"
    assert app.row("u1-a")["title"] == "edited offline"
    assert app.applications("u1-b") == 1
    assert local_notes(device) == app.rows("u1")


def test_logout_without_clear_keeps_the_rows_for_the_same_person(notes_app):
    app = notes_app()
    _notes(app)
    device = app.client("t1")
    device.sync("Sync")

    device.logout(clear=False)

    assert local_notes(device) == app.rows("u1")
    device.login("t1")
    device.sync("Sync")
    assert local_notes(device) == app.rows("u1")


def test_an_expired_token_is_refreshed_by_the_provider(notes_app):
    app = notes_app()
    _notes(app)
    tokens = iter(["expired", "t1"])
    asked: list[str] = []

    def provider() -> str:
        asked.append(token := next(tokens))
        return token

    device = app.client(token=provider)
    device.insert("LocalNote", {"id": "u1-b", "owner": "u1", "title": "x"})

    result = device.sync("Sync")

    assert asked == ["expired", "t1"]
    assert result.applied == 1
    assert local_notes(device) == app.rows("u1")


def test_a_provider_that_keeps_failing_surfaces_an_auth_error(notes_app):
    app = notes_app()
    device = app.client(token=lambda: "expired")
    with pytest.raises(AuthError) as info:
        device.sync("Sync")
    assert info.value.status == 401


def test_a_session_that_never_pushed_is_offered_only_to_its_own_token_provider(notes_app):
    app = notes_app()
    _notes(app)
    app.client("t1", name="tablet").sync("Sync")  # a pull: the session is bound to nobody
    device = app.client(token=lambda: "t1", name="tablet")  # reopened with a provider
    device.insert("LocalNote", {"id": "u1-b", "owner": "u1", "title": "alice's private note"})
    device.update("LocalNote", "u1-a", {"title": "edited offline"})

    assert device.logout(push=False) == 2

    # Bob logs in with his own provider: Alice's session is neither pushed nor shown to him.
    device.login(lambda: "t2")
    assert sum(device.outbox.parked().values()) == 2
    assert device.outbox.rejected() == []
    assert app.row("u1-b") is None
    assert app.row("u1-a")["title"] == "alice's"
    device.logout()
    # Alice comes back with her provider: her changes go out, once, under her principal.
    device.login(lambda: "t1")
    assert device.outbox.parked() == {}
    assert device.outbox.rejected() == []
    assert app.row("u1-b")["title"] == "alice's private note"
    assert app.row("u1-a")["title"] == "edited offline"
    assert app.applications("u1-b") == 1


def test_a_returning_principal_with_a_provider_gets_the_changes_parked_offline(notes_app, net):
    app = notes_app()
    _notes(app)
    device = app.client(token=lambda: "t1", transport=net)
    device.sync("Sync")
    device.insert("LocalNote", {"id": "u1-b", "owner": "u1", "title": "offline write"})
    net.fail("offline")

    assert device.logout() == 1  # the push at logout failed: parked
    net.heal()
    device.login(lambda: "t1")

    assert device.outbox.parked() == {}
    assert app.row("u1-b")["title"] == "offline write"
    assert app.applications("u1-b") == 1


def test_a_session_whose_owner_is_unknown_at_logout_stays_parked(notes_app):
    app = notes_app()
    _notes(app)
    tablet = app.client("t1", name="tablet")
    tablet.sync("Sync")  # the tables; then a session the server never answers
    tablet.logout(clear=False)

    def failing() -> str:
        raise RuntimeError("the identity provider is unreachable")

    device = app.client(token=failing, name="tablet")
    device.insert("LocalNote", {"id": "u1-b", "owner": "u1", "title": "whose?"})

    assert device.logout(push=False) == 1

    for token in ("t2", "t1"):  # nobody can prove it is theirs: it is pushed under no one
        device.login(lambda token=token: token)
        assert sum(device.outbox.parked().values()) == 1
        assert device.outbox.rejected() == []
        device.logout()
    assert app.row("u1-b") is None


def test_conflicts_left_at_logout_come_back_to_their_principal_only(notes_app):
    """A session that pushed everything but left a conflict unresolved parks the
    conflict; it is shown again to the same principal (whatever its credential),
    never to another, with no push needed."""
    app = notes_app(policy=Detect())
    _notes(app)
    device = app.client("t1")
    device.sync("Sync")
    device.update("LocalNote", "u1-a", {"title": "alice's edit"})
    app.backoffice("UPDATE note SET title = 'office edit' WHERE id = 'u1-a'")
    device.sync("Sync")
    [conflict] = device.outbox.rejected()

    assert device.logout() == 1
    device.login("t2")
    assert device.outbox.rejected() == []
    device.logout()
    device.login("t1-renewed")  # Alice again, with a new token

    [back] = device.outbox.rejected()
    assert (back.key, back.status) == ("u1-a", "conflict")
    assert back.attempted == {"title": "alice's edit"}
    assert back.server_row == conflict.server_row
    assert device.outbox.parked() == {}


def test_a_session_the_server_answered_is_its_principals_with_any_credential(notes_app):
    """A session that only pulled is bound to no one on the server, and its token may be
    unknown at logout (a provider that fails): the server's word on who it was makes
    its changes that principal's, pushed when it returns with another token."""
    app = notes_app()
    _notes(app)
    app.client("t1", name="tablet").sync("Sync")  # answered as user-1; pushed nothing

    def failing() -> str:
        raise RuntimeError("the identity provider is unreachable")

    device = app.client(token=failing, name="tablet")
    device.insert("LocalNote", {"id": "u1-b", "owner": "u1", "title": "alice's offline"})
    assert device.logout(push=False) == 1

    device.login("t2")
    assert sum(device.outbox.parked().values()) == 1
    assert app.row("u1-b") is None
    device.logout()
    device.login("t1-renewed")

    assert device.outbox.parked() == {}
    assert app.row("u1-b")["title"] == "alice's offline"
    assert app.applications("u1-b") == 1


def _no_forbidden_title(ctx):
    """A business rule: the title 'forbidden' is refused."""
    return (
        "the title 'forbidden' is not allowed"
        if (ctx.row or {}).get("title") == "forbidden"
        else None
    )


def test_a_parked_change_refused_at_login_leaves_the_servers_row(notes_app):
    """As on a normal push: a refused parked change leaves the local row what the server
    holds, so the refused value is not kept (nor pushed) once the app discards it."""
    app = notes_app(rules=[_no_forbidden_title])
    _notes(app)
    app.add("u1-c", owner="u1", title="alice's other")
    device = app.client("t1")
    device.sync("Sync")  # bound to user-1
    device.update("LocalNote", "u1-a", {"title": "forbidden"})
    device.insert("LocalNote", {"id": "u1-new", "owner": "u1", "title": "forbidden"})
    device.update("LocalNote", "u1-c", {"title": "allowed"})
    assert device.logout(clear=False, push=False) == 3

    device.login("t1")

    got = {r.key: r for r in device.outbox.rejected()}
    assert set(got) == {"u1-a", "u1-new"}
    assert got["u1-a"].attempted == {"title": "forbidden"}
    assert app.row("u1-c")["title"] == "allowed"
    assert local_notes(device) == app.rows("u1")
    for r in got.values():
        device.outbox.discard(r.id)
    device.sync("Sync")
    assert local_notes(device) == app.rows("u1")
    assert device.outbox.pending() == []


def test_a_parked_session_over_the_servers_bounds_is_pushed_in_batches(notes_app):
    """A session with more parked changes than one request may carry goes in several,
    each unparked as it is answered; one answered before a failure is not sent twice."""
    app = notes_app(max_mutations=3)
    _notes(app)
    lossy = FaultTransport()
    device = app.client("t1", transport=lossy)
    device.sync("Sync")  # bound to user-1; the answer says the server's bounds
    for i in range(8):
        device.insert("LocalNote", {"id": f"u1-n{i}", "owner": "u1", "title": f"offline {i}"})
    assert device.logout(push=False) == 8

    # The first batch is applied, its answer lost: its changes stay parked.
    lossy.lose_next()
    device.login("t1")
    assert sum(device.outbox.parked().values()) == 8
    assert app.row("u1-n0") is not None
    device.logout()

    device.login("t1")

    assert device.outbox.parked() == {}
    assert device.outbox.rejected() == []
    for i in range(8):
        assert app.row(f"u1-n{i}")["title"] == f"offline {i}"
        assert app.applications(f"u1-n{i}") == 1
    sizes = [len(r.mutations) for r in lossy.sent if r.mutations]
    assert max(sizes) <= 3


def test_a_parked_session_over_bounds_the_device_does_not_know_yet_is_pushed(notes_app):
    """The device learns the server's bounds from its refusal (413), then sends less."""
    app = notes_app(max_mutations=3)
    _notes(app)
    device = app.client("t1")
    device.sync("Sync")
    for i in range(7):
        device.insert("LocalNote", {"id": f"u1-n{i}", "owner": "u1", "title": f"offline {i}"})
    assert device.logout(push=False) == 7
    device.push_limits = None  # as on a device restarted since

    device.login("t1")

    assert device.outbox.parked() == {}
    assert all(app.row(f"u1-n{i}") is not None for i in range(7))


def test_parked_changes_no_unit_can_carry_are_surfaced_to_their_principal(notes_app):
    app = notes_app()
    _notes(app)
    device = app.client("t1")
    device.sync("Sync")
    device.update("LocalNote", "u1-a", {"title": "alice's edit"})
    assert device.logout(push=False) == 1
    catalog = device.store.catalog()
    units = [u for u in catalog.units if u.direction == "pull"]
    # The server now takes changes through no unit.
    device.store.apply_catalog(msgspec.structs.replace(catalog, units=units))

    device.login("t2")
    assert device.outbox.rejected() == []
    assert sum(device.outbox.parked().values()) == 1
    device.logout()
    device.login("t1")

    [kept] = device.outbox.rejected()
    assert (kept.key, kept.code) == ("u1-a", "schema-changed")
    assert kept.attempted == {"title": "alice's edit"}
    assert device.outbox.parked() == {}
    assert app.row("u1-a")["title"] == "alice's"


def test_a_parked_change_too_large_for_any_request_is_surfaced_and_blocks_nothing(notes_app):
    """As on a normal push: a parked change the server refuses alone (413) becomes a
    rejection of its session, with its values, shown to its principal; the changes
    after it are pushed, and the sessions parked after it, another principal's too."""
    from syncunit.server import Limits

    app = notes_app(limits=Limits(max_field_bytes=1024))
    _notes(app)
    device = app.client("t1")
    device.insert("LocalNote", {"id": "u1-b", "owner": "u1", "title": "pushed"})
    device.sync("Sync")  # bound to user-1
    device.insert("LocalNote", {"id": "u1-big", "owner": "u1", "title": "big", "body": "x" * 4000})
    device.insert("LocalNote", {"id": "u1-small", "owner": "u1", "title": "small"})
    device.push_limits = None  # as on a device restarted since: the server alone refuses
    assert device.logout(push=False) == 2
    device.login("t2")
    device.sync("Sync")  # bound to user-2
    device.insert("LocalNote", {"id": "u2-b", "owner": "u2", "title": "bob's offline"})
    assert device.logout(push=False) == 1

    device.login("t2")  # Bob: Alice's session is refused to him (403), his own goes out
    assert app.row("u2-b")["title"] == "bob's offline"
    assert device.outbox.rejected() == []
    assert app.row("u1-small") is None
    device.logout()
    device.login("t1-renewed")  # Alice

    [big] = device.outbox.rejected()
    assert (big.key, big.code) == ("u1-big", "field-too-large")
    assert big.attempted["body"] == "x" * 4000
    assert app.row("u1-small")["title"] == "small"  # numbered one lower: no gap
    assert app.row("u1-big") is None
    assert device.outbox.parked() == {}


def test_rows_of_parked_changes_withdrawn_as_too_large_end_as_the_server_has_them(notes_app):
    """The rows stayed as their principal wrote them (logout without clear); the
    changes, withdrawn at login as too large, come back as rejections, and the next
    sync brings the rows back as the server has them: the edit undone, the insert gone."""
    from syncunit.server import Limits

    app = notes_app(limits=Limits(max_field_bytes=1024))
    _notes(app)
    device = app.client("t1")
    device.sync("Sync")  # bound to user-1
    device.update("LocalNote", "u1-a", {"title": "big edit", "body": "y" * 4000})
    device.insert("LocalNote", {"id": "u1-big", "owner": "u1", "title": "big", "body": "x" * 4000})
    device.push_limits = None  # as on a device restarted since: the server alone refuses
    assert device.logout(clear=False, push=False) == 2

    device.login("t1")

    got = {r.key: r.code for r in device.outbox.rejected()}
    assert got == {"u1-a": "field-too-large", "u1-big": "field-too-large"}
    assert device.outbox.parked() == {}
    device.sync("Sync")
    assert local_notes(device) == app.rows("u1")
    for r in device.outbox.rejected():
        device.outbox.discard(r.id)
    device.sync("Sync")
    assert local_notes(device) == app.rows("u1")
    assert app.row("u1-big") is None


def test_a_parked_change_after_one_withdrawn_as_too_large_is_pushed_against_the_server_s_row(
    notes_app,
):
    """A small edit made over a large one still in flight carries the large value in
    its base; the large one withdrawn at login, the small one is checked against the
    row the server has and applied, not refused for a value it does not carry."""
    from syncunit.server import Limits

    app = notes_app(limits=Limits(max_field_bytes=1024))
    _notes(app)
    device = app.client("t1")
    device.sync("Sync")  # bound to user-1
    device.update("LocalNote", "u1-a", {"body": "y" * 4000})
    assert [m.seq for m in device.outbox.number(device.catalog().streams, 10)] == [1]
    device.update("LocalNote", "u1-a", {"title": "a small edit"})
    device.push_limits = None  # as on a device restarted since: the server alone refuses
    assert device.logout(push=False) == 2

    device.login("t1")

    [big] = device.outbox.rejected()
    assert (big.key, big.code) == ("u1-a", "field-too-large")
    assert device.outbox.parked() == {}
    assert app.row("u1-a")["title"] == "a small edit"
    assert app.row("u1-a")["body"] != "y" * 4000


def test_a_session_renewed_by_the_catalog_keeps_its_principal(notes_app):
    """The catalog left no unit that pushes: the device surfaced its in-flight change and
    took a new client id. The session is still its principal's: parked at logout, the
    rejection comes back to it."""
    from syncunit import SyncSchema, SyncUnit
    from syncunit.server import SyncServer, TokenAuth
    from tests.test_push_support import TOKENS

    app = notes_app()
    _notes(app)
    lossy = FaultTransport()
    device = app.client("t1", transport=lossy)
    device.sync("Sync")
    device.update("LocalNote", "u1-a", {"title": "edit whose answer was lost"})
    lossy.lose_next()
    with pytest.raises(SyncError):
        device.sync("Sync")
    pull_only = SyncSchema([SyncUnit("Pull", [app.stream])])
    server = SyncServer(pull_only, app.database, authenticate=TokenAuth(TOKENS), install=False)
    app.live.app = server.app
    try:
        old_id = device.client_id
        device.sync("Pull")  # the one answer after the renewal
        assert device.client_id != old_id
        assert device.logout() == 1

        device.login("t1-renewed")

        [back] = device.outbox.rejected()
        assert (back.key, back.code) == ("u1-a", "schema-changed")
        assert device.outbox.parked() == {}
    finally:
        server.store.engine.dispose()


def test_an_unbound_session_goes_to_the_same_token_after_the_servers_key_changed(notes_app):
    """A tag that no longer matches (the server's key changed) only loses its match: the
    same token still pushes the session it made."""
    from syncunit.server import SyncServer, TokenAuth
    from tests.test_push_support import TOKENS

    app = notes_app()
    _notes(app)
    device = app.client("t1")
    device.sync("Pull")  # answered as user-1, pushed nothing: bound to no one
    device.insert("LocalNote", {"id": "u1-b", "owner": "u1", "title": "offline"})
    assert device.logout(push=False) == 1
    server = SyncServer(
        app.schema, app.database, authenticate=TokenAuth(TOKENS), install=False,
        cursor_secret=b"k" * 32,
    )  # fmt: skip
    app.live.app = server.app
    try:
        device.login("t2")
        assert app.row("u1-b") is None
        device.logout()

        device.login("t1")

        assert app.row("u1-b")["title"] == "offline"
        assert device.outbox.parked() == {}
    finally:
        server.store.engine.dispose()


def test_a_session_answered_as_two_principals_is_matched_by_no_tag(notes_app):
    """A token provider whose user changed mid-session (the first one's token revoked):
    the server named two principals for one client id, so the session's tag says
    nobody; its conflict is never shown to the second principal (with the first one's
    server row)."""
    from syncunit.server import Principal, SyncServer, TokenAuth
    from tests.test_push_support import TOKENS

    app = notes_app(policy=Detect())
    _notes(app)
    valid = dict(TOKENS)
    server = SyncServer(
        app.schema, app.database, authenticate=TokenAuth(lambda t: valid.get(t)), install=False
    )
    app.live.app = server.app
    current = ["t1"]
    device = app.client(token=lambda: current[0])
    try:
        device.sync("Sync")  # bound to user-1
        device.update("LocalNote", "u1-a", {"title": "alice's edit"})
        app.backoffice("UPDATE note SET title = 'office edit' WHERE id = 'u1-a'")
        device.sync("Sync")
        assert len(device.outbox.rejected()) == 1
        del valid["t1"]  # the app's auth signs Alice out and Bob in
        current[0] = "t2"
        device.sync("Pull")  # 401, the provider asked again: answered as user-2
        assert device.logout() == 1

        device.login("t2")

        assert device.outbox.rejected() == []
        assert sum(device.outbox.parked().values()) == 1
        device.logout()
        valid["t1-again"] = Principal("user-1", {"owner": "u1"})
        device.login("t1-again")  # bound: the server decides, and no push is needed
        assert sum(device.outbox.parked().values()) == 1
    finally:
        server.store.engine.dispose()


@pytest.mark.parametrize("push_unit", [True, False], ids=["schema-changed", "unit-gone"])
def test_parked_changes_made_under_an_old_catalog_are_pushed_at_login(notes_app, push_unit):
    """The server was deployed again without the ``tag`` column (and maybe without the
    unit the device pushes through) since the session was parked: login migrates to
    its catalog and sends them again, and the server judges each (the one that wrote
    the dropped column is surfaced, not left parked)."""
    import sqlalchemy as sa

    from syncunit import Stream, SyncSchema, SyncUnit
    from syncunit.server import SyncServer, TokenAuth
    from tests.test_push_support import NOTE_COLUMNS, TOKENS

    app = notes_app()
    _notes(app)
    device = app.client("t1")
    device.sync("Sync")
    device.update("LocalNote", "u1-a", {"title": "edited before the redeploy"})
    device.insert("LocalNote", {"id": "u1-t", "owner": "u1", "title": "t", "tag": "x"})
    assert device.logout(push=False) == 2
    note = app.note
    stream = Stream(
        "notes",
        note,
        {c: note.c[c] for c in NOTE_COLUMNS if c != "tag"},
        where=note.c.owner == sa.bindparam("owner"),
        local_table="LocalNote",
    )
    units = [SyncUnit("Sync", [stream], direction="both")]
    if push_unit:
        units.append(SyncUnit("Push", [stream], direction="push"))
    untagged = SyncSchema(units)
    server = SyncServer(untagged, app.database, authenticate=TokenAuth(TOKENS), install=False)
    assert server.catalog.schema_hash != device.store.catalog().schema_hash
    app.live.app = server.app
    try:
        device.login("t1")

        assert device.outbox.parked() == {}
        assert device.store.catalog() == server.catalog
        assert app.row("u1-a")["title"] == "edited before the redeploy"
        [refused] = device.outbox.rejected()
        assert (refused.key, refused.code) == ("u1-t", "unknown-column")
    finally:
        server.store.engine.dispose()
