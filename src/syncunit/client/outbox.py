"""The outbox: local changes waiting to be accepted by the server.

The app writes its local tables with plain SQL (or ``SyncClient.insert`` and
friends). SQLite triggers (``triggers.py``) record each change in
``syncunit_outbox`` in the same transaction, coalescing several changes to one
row (the changed columns are kept, an insert then delete cancels out). The
triggers do not fire while the engine applies server changes.

A push takes the unsent entries, gives each the next sequence number and
freezes its payload, in one ``synchronous=FULL`` transaction, so a number is
never handed out twice even across a power loss. Entries stay in the outbox,
"in flight", until the server answers; a retry re-sends the same payloads
with the same numbers, and the server answers from its log.

Conflicts and rejections move to ``syncunit_rejected``, where the app lists
them and decides: ``retry`` (with changes), or ``discard`` (keep the server's
row). Nothing is dropped silently. The local row of a rejected change is made
the server's when the change is rejected: from the server's answer, or, for a
change the device refused itself, from what it saw before the change and a
fresh copy of the streams that bring the row (``recopy.py``).

A push request carries at most what the server takes (``Budget``, from the
bounds it says in ``protocol.PUSH_LIMITS``): batches are sized by their encoded
bytes too, and a change that alone cannot pass those bounds (a value over the
per-value limit, or a change over the body limit) is never sent: it becomes a
rejection (``field-too-large`` or ``body-too-large``) with its values kept, before
it is numbered, so the changes after it go on. One numbered before the device
knew the bounds is taken out of flight the same way (``withdraw``). A base value
over the per-value limit (the server wrote it) goes as its digest (``Budget.sent``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from syncunit.client import holds, recopy
from syncunit.client.blobtext import row_bytes
from syncunit.client.rowjson import bad_value as _bad_value
from syncunit.client.rowjson import dumps as _dumps
from syncunit.client.rowjson import loads as _loads
from syncunit.client.triggers import NOW as _NOW
from syncunit.errors import LocalStoreError
from syncunit.protocol import (
    Mutation,
    MutationResult,
    PushLimits,
    PushResults,
    StreamInfo,
    base_digest,
)
from syncunit.protocol import quote_name as _q

if TYPE_CHECKING:
    import sqlite3

    from syncunit.client.store import LocalStore

__all__ = ["Budget", "Outbox", "PendingChange", "RejectedChange"]

log = logging.getLogger("syncunit.outbox")

#: A column name no catalog has: an in-flight change whose table's key changed carries it
#: in ``changed``, so a server that has not applied it yet refuses it (``hold_in_flight``).
UNSENDABLE = "syncunit:key-changed"
_KEYS_PER_QUERY = 500  # keys bound in one IN (...) (SQLite allows 32,766 parameters)
_mut_enc = msgspec.msgpack.Encoder()
_mut_dec = msgspec.msgpack.Decoder(Mutation)
_json_enc = msgspec.json.Encoder()
#: Bytes of a push request besides its mutations (client id, cursors, parameters) that
#: a batch leaves room for: an eighth of the body limit, at most this much.
ENVELOPE_BYTES = 512 * 1024
#: Room a change sent alone leaves for the rest of its request; one over the body
#: limit by less is sent, and withdrawn if the server refuses it (``withdraw``).
ALONE_ENVELOPE_BYTES = 1024


@dataclass(frozen=True)
class Budget:
    """What one push request may carry, from the server's bounds (``PushLimits``).

    ``limits`` None: the server has not said them yet; batches are sized under the
    defaults and no change is refused on the device (the server's answer says them).
    """

    limits: PushLimits | None
    json: bool = False  # the requests are JSON (else MessagePack)

    @property
    def max_bytes(self) -> int:
        """Encoded bytes of mutations in one request."""
        body = (self.limits or PushLimits()).body
        return max(1, body - min(ENVELOPE_BYTES, body // 8))

    @property
    def mutations(self) -> int:
        return (self.limits or PushLimits()).mutations

    def size(self, m: Mutation, packed: bytes) -> int:
        """``m``'s bytes in a request (``packed``: its MessagePack)."""
        return len(_json_enc.encode(m)) + 1 if self.json else len(packed)

    def sent(self, m: Mutation, packed: bytes) -> tuple[Mutation, int]:
        """``m`` as a request carries it (``packed``: its MessagePack), and its bytes there.

        A base value over the field limit (the default one while the server has not
        said its own) goes as its digest (``protocol.base_digest``): a base is only
        compared, and the server compares the digest of its value, so a change to
        another column of a row holding a large value, or its delete, is not refused
        for it. The change is frozen with its values; this is done as it is sent."""
        size = self.size(m, packed)
        field = (self.limits or PushLimits()).field
        if size <= field or not m.base:  # no value is longer than the whole change
            return m, size
        big = [c for c, v in m.base.items() if _size(v, field // 4, self.json) > field]
        if not big:
            return m, size
        base = {**m.base, **{c: base_digest(m.base[c]) for c in big}}
        slim = msgspec.structs.replace(m, base=base, digested=big)
        return slim, self.size(slim, _mut_enc.encode(slim))

    def refusal(self, m: Mutation, size: int) -> tuple[str, str] | None:
        """Why the server would refuse any request holding ``m`` (a problem code and
        a reason), or None: it passes, or the bounds are not known."""
        if self.limits is None:
            return None
        # No value is longer than the whole change as it travels (``size``): most
        # changes are below the field limit whole, and need no walk over their values.
        found = None if size <= self.limits.field else _value_over(m, self.limits.field, self.json)
        if found is not None:
            where, big = found
            return "field-too-large", (
                f"{where} holds {big} bytes; the server takes at most {self.limits.field}"
                " bytes in one value: keep large content out of synced columns (a file,"
                " object storage) or split it, then retry the change with a smaller value"
            )
        if size > self.limits.body - ALONE_ENVELOPE_BYTES:
            return "body-too-large", (
                f"this change alone is {size} bytes encoded; the server takes at most"
                f" {self.limits.body} bytes in one request: split the row's content over"
                " several rows, then retry the change with smaller values"
            )
        return None


def _check_columns(s: StreamInfo, have: Sequence[str]) -> None:
    """Refuse to send ``s``'s changes from a local table that lacks some of its
    columns (renamed or dropped by the app): they would go out without those
    values."""
    missing = [c.name for c in s.columns if c.name not in have]
    if missing:
        raise LocalStoreError(
            f"the local table {s.local_table} has no column {', '.join(map(repr, missing))}"
            " of its stream (renamed or dropped outside syncunit): give the table back"
            " its columns (ALTER TABLE ... RENAME COLUMN ... TO ...) and sync again;"
            " nothing was sent, its changes wait in the outbox"
        )


def _reject(
    conn: sqlite3.Connection,
    mutation_id: str,
    seq: int | None,
    table: str,
    key: Any,
    op: str,
    code: str,
    reason: str,
    attempted: Mapping[str, Any],
) -> int:
    """Record a change the device will not send as a rejection the app sees (with the
    values it ``attempted``); its id."""
    cur = conn.execute(
        "INSERT INTO syncunit_rejected (mutation_id, seq, table_name, row_key, op, status,"
        " code, reason, attempted, server_row, created_at)"
        f" VALUES (?, ?, ?, ?, ?, 'rejected', ?, ?, ?, NULL, {_NOW})",
        (mutation_id, seq, table, key, op, code, reason, _dumps(dict(attempted))),
    )
    return int(cur.lastrowid or 0)


def _value_over(m: Mutation, limit: int, json: bool = False) -> tuple[str, int] | None:
    """The first value of ``m`` (key, values, base) holding a string or bytes over
    ``limit`` bytes, as the server measures them: where it is, and its size. In a JSON
    request (``json``), bytes travel as base64 text, a third longer."""
    short = limit // 4  # a string of at most this many characters fits, whatever it holds
    places: list[tuple[str, Any]] = [("key", m.key)]
    places += [(f"values[{c!r}]", v) for c, v in m.values.items()]
    places += [(f"base[{c!r}]", v) for c, v in m.base.items()]
    for where, value in places:
        todo = [value]
        while todo:
            v = todo.pop()
            if isinstance(v, dict):
                todo += [*v.keys(), *v.values()]
            elif isinstance(v, list | tuple):
                todo += v
            elif (size := _size(v, short, json)) > limit:
                return where, size
    return None


def _size(v: Any, short: int, json: bool) -> int:
    """The bytes of a string or bytes value as the server measures them (0 for any
    other): a string of at most ``short`` characters is not encoded to count them."""
    if isinstance(v, str):
        return len(v) if len(v) <= short else len(v.encode())
    if isinstance(v, bytes | bytearray | memoryview):
        return 4 * ((len(v) + 2) // 3) if json else len(v)
    return 0


def _fill(payloads: Sequence[bytes], budget: Budget | None) -> tuple[list[Mutation], int, bool]:
    """The frozen changes ``payloads`` (numbered, in order) that one request takes under
    ``budget``: the first ones; their bytes; whether the request is full.

    A change that looks past the server's bounds goes alone (the server tells)."""
    taken: list[Mutation] = []
    used = 0
    for payload in payloads:
        m = _mut_dec.decode(payload)
        if budget is None:
            taken.append(m)
            continue
        m, size = budget.sent(m, payload)
        refused = budget.refusal(m, size)
        if refused is not None and not taken:
            return [m], size, True
        if taken and (refused is not None or used + size > budget.max_bytes):
            return taken, used, True  # it goes first in the next request
        taken.append(m)
        used += size
    return taken, used, False


@dataclass(frozen=True)
class PendingChange:
    """A local change not yet accepted by the server."""

    id: int
    table: str
    key: Any
    op: str
    changed: list[str]
    seq: int | None  # set once sent (in flight)


@dataclass(frozen=True)
class RejectedChange:
    """A change the server did not apply: a conflict or a rejection, with its reason."""

    id: int
    table: str
    key: Any
    op: str
    status: str  # "conflict" or "rejected"
    code: str
    reason: str
    attempted: dict[str, Any]  # the values the change wanted to write
    server_row: dict[str, Any] | None  # the server's row now (None: not on the server)

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "key": self.key,
            "op": self.op,
            "status": self.status,
            "code": self.code,
            "reason": self.reason,
        }


class Outbox:
    """The queue of local changes of one local database."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        #: Changes made rejections on the device since ``take_refused`` last ran.
        self._refused: list[RejectedChange] = []

    def take_refused(self) -> list[RejectedChange]:
        """The changes made rejections on the device (never sent: too large) since the
        last call; each stays in ``rejected()`` until the app decides."""
        taken, self._refused = self._refused, []
        return taken

    # -- reading -------------------------------------------------------------------------

    def pending(self, tables: str | Sequence[str] | None = None) -> list[PendingChange]:
        """Changes not yet accepted, oldest first (``seq`` set on those in flight).

        ``tables`` narrows them to those tables (a string names one table)."""
        tables = _names(tables)
        rows = self.store.query(
            "SELECT id, table_name, row_key, op, changed, seq FROM syncunit_outbox ORDER BY id"
        )
        return [
            PendingChange(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5])
            for r in rows
            if tables is None or r[1] in tables
        ]

    def count(self, tables: str | Sequence[str] | None = None) -> int:
        """How many changes are not yet accepted (in ``tables``, a string naming one)."""
        tables = _names(tables)
        if tables is None:
            return int(self.store.query("SELECT count(*) FROM syncunit_outbox")[0][0])
        marks = ",".join("?" * len(tables))
        rows = self.store.query(
            f"SELECT count(*) FROM syncunit_outbox WHERE table_name IN ({marks})", list(tables)
        )
        return int(rows[0][0])

    def rejected(self) -> list[RejectedChange]:
        """Conflicts and rejections waiting for the app's decision, oldest first."""
        rows = self.store.query(
            "SELECT id, table_name, row_key, op, status, code, reason, attempted, server_row"
            " FROM syncunit_rejected ORDER BY id"
        )
        return [
            RejectedChange(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                _loads(r[7]),
                None if r[8] is None else _loads(r[8]),
            )
            for r in rows
        ]

    # -- pushing ---------------------------------------------------------------------------

    def in_flight_from(self) -> int:
        """The lowest seq numbered (sent, or to be sent) and not answered yet; 0: none."""
        row = self.store.query("SELECT min(seq) FROM syncunit_outbox WHERE seq IS NOT NULL")
        return int(row[0][0]) if row and row[0][0] is not None else 0

    def prepare(
        self, streams: Sequence[StreamInfo], limit: int, budget: Budget | None = None
    ) -> list[Mutation]:
        """Mutations to send: those in flight first, then new ones, numbered; ``limit`` in all,
        and within ``budget`` (at least one).

        In flight are changes numbered and sent (or numbered ahead, see ``number``)
        whose answer has not been recorded; they go again first, in order, the
        oldest ``limit`` of them if there are more (one that looks past the
        server's bounds alone: see ``_in_flight``).
        """
        if budget is not None:
            limit = min(limit, budget.mutations)
        with self.store.atomic():
            in_flight, used, full = self._in_flight(limit, budget)
            if full:
                return in_flight  # the rest go in the next requests
            return in_flight + self.number(streams, limit - len(in_flight), budget, used)

    def _in_flight(self, limit: int, budget: Budget | None) -> tuple[list[Mutation], int, bool]:
        """The oldest changes in flight, up to ``limit`` and within ``budget``; their
        bytes; whether the request is full.

        A change in flight that looks past the server's bounds (numbered before they
        were known, or they were lowered since) goes alone: it may have been applied
        already (its answer lost), which only the server can tell; if the server
        refuses it as too large, ``UnitRun.too_large`` withdraws it."""
        rows = self.store.conn.execute(
            "SELECT payload FROM syncunit_outbox WHERE seq IS NOT NULL ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return _fill([r[0] for r in rows], budget)

    def number(
        self,
        streams: Sequence[StreamInfo],
        limit: int,
        budget: Budget | None = None,
        used: int = 0,
    ) -> list[Mutation]:
        """Number and freeze up to ``limit`` unsent changes of ``streams``; return them.

        They are in flight from then on: a push sends them after those numbered
        before, and a run that stops first sends them with the next one. A client
        numbers the next batch while the server applies the current one.

        With a ``budget``, the batch stops before the change that would take its
        bytes (``used`` so far by the changes it follows) past the budget's; a
        change that alone cannot pass the server's bounds is not numbered (no
        sequence number is spent on it): it becomes a rejection.
        """
        by_table = {s.local_table: s for s in streams}
        if limit <= 0 or not by_table:
            return []
        conn = self.store.conn
        # The store's transactions commit with synchronous=FULL at least (the engine
        # lowers it only inside its own ``relaxed`` ones): a number handed out here is
        # on disk before it goes out.
        with self.store.atomic():
            marks = ",".join("?" * len(by_table))
            rows = conn.execute(
                "SELECT id, mutation_id, table_name, row_key, op, changed, base"
                f" FROM syncunit_outbox WHERE seq IS NULL AND table_name IN ({marks})"
                " ORDER BY id LIMIT ?",
                [*by_table, limit],
            ).fetchall()
            if not rows:
                return []
            next_seq = int(
                conn.execute("SELECT next_seq FROM syncunit_state WHERE id = 1").fetchone()[0]
            )
            fresh: list[Mutation] = []
            numbered: list[tuple[int, bytes, int]] = []
            refused: list[tuple[int, Mutation, str, str]] = []
            names: dict[str, list[str]] = {}
            writable: dict[str, set[str]] = {}
            current = self._current_rows(rows, by_table, names)
            for table, have in names.items():
                _check_columns(by_table[table], have)
            for oid, mid, table, key, op, changed, base in rows:
                s = by_table[table]
                if table not in writable:
                    writable[table] = {c.name for c in s.columns if c.writable}
                row = current[table].get(key)
                if row is None and op != "delete":  # a key stored in another type: one look
                    row = conn.execute(
                        f"SELECT * FROM {_q(table)} WHERE {_q(s.key)} = ?", (key,)
                    ).fetchone()
                if row is None and op != "delete":
                    # Removed without its delete recorded (a REPLACE on a connection
                    # without recursive triggers): a row new on this device is nothing
                    # to send; one the server has is deleted, against its base.
                    if op == "insert" and base == "{}":
                        conn.execute("DELETE FROM syncunit_outbox WHERE id = ?", (oid,))
                        continue
                    op = "delete"
                    conn.execute("UPDATE syncunit_outbox SET op = ? WHERE id = ?", (op, oid))
                m = self._mutation(
                    s, names[table], writable[table], row, next_seq, mid, key, op, changed, base
                )
                packed = _mut_enc.encode(m)  # frozen with its base as it is
                if budget is not None:
                    m, size = budget.sent(m, packed)
                    why = budget.refusal(m, size)
                    if why is not None and self._row_in_flight(table, key):
                        # Its base holds that change's values, which the server may
                        # never take: decided once that change is answered.
                        break
                    if why is not None:
                        refused.append((oid, m, *why))
                        continue
                    if (fresh or used) and used + size > budget.max_bytes:
                        break  # the next batch starts here
                    used += size
                numbered.append((next_seq, packed, oid))
                fresh.append(m)
                next_seq += 1
            conn.executemany(
                "UPDATE syncunit_outbox SET seq = ?, payload = ? WHERE id = ?", numbered
            )
            conn.execute("UPDATE syncunit_state SET next_seq = ? WHERE id = 1", (next_seq,))
            for oid, m, code, reason in refused:
                self._refuse(oid, None, m, code, reason, by_table[m.table])
        return fresh

    def freeze(
        self, streams: Sequence[StreamInfo], dropped: Mapping[str, set[str]]
    ) -> list[Mutation]:
        """Number and freeze the unsent changes up to the last one of the tables of
        ``dropped`` (table -> the columns the next catalog drops); return them.

        Before a catalog change drops those columns, their unsent changes
        take their values from the rows while the columns still exist (an entry
        keeps only column names until it is numbered). The changes of other
        tables written before them are numbered too, so the order of the changes
        is kept. An insert leaves out a dropped column it holds no value in: that
        column would only get it refused.
        """
        conn = self.store.conn
        names = [s.local_table for s in streams]
        marks = ",".join("?" * len(dropped))
        last = conn.execute(
            f"SELECT max(id) FROM syncunit_outbox WHERE seq IS NULL AND table_name IN ({marks})",
            list(dropped),
        ).fetchone()[0]
        if last is None or not names:
            return []
        marks = ",".join("?" * len(names))
        limit = int(
            conn.execute(
                "SELECT count(*) FROM syncunit_outbox WHERE seq IS NULL AND id <= ?"
                f" AND table_name IN ({marks})",
                [last, *names],
            ).fetchone()[0]
        )
        fresh = self.number(streams, limit)
        for i, m in enumerate(fresh):
            gone = dropped.get(m.table, set())
            if m.op == "insert" and any(c in gone and v is None for c, v in m.values.items()):
                values = {c: v for c, v in m.values.items() if not (c in gone and v is None)}
                fresh[i] = msgspec.structs.replace(m, values=values)
                conn.execute(
                    "UPDATE syncunit_outbox SET payload = ? WHERE seq = ?",
                    (_mut_enc.encode(fresh[i]), m.seq),
                )
        return fresh

    def unsent(self, s: StreamInfo) -> list[tuple[int, str, Any, str, dict[str, Any]]]:
        """``s``'s unsent changes with the values they would send now: (outbox id,
        mutation id, key, op, values), oldest first (the table has ``s``'s columns)."""
        rows = self.store.conn.execute(
            "SELECT id, mutation_id, table_name, row_key, op, changed, base"
            " FROM syncunit_outbox WHERE seq IS NULL AND table_name = ? ORDER BY id",
            (s.local_table,),
        ).fetchall()
        if not rows:
            return []
        names: dict[str, list[str]] = {}
        current = self._current_rows(rows, {s.local_table: s}, names)[s.local_table]
        writable = {c.name for c in s.columns if c.writable}
        out: list[tuple[int, str, Any, str, dict[str, Any]]] = []
        for oid, mid, _, key, op, changed, base in rows:
            row = current.get(key)
            if row is None and op != "delete":  # the row is gone: nothing to carry
                values: dict[str, Any] = {}
            else:
                m = self._mutation(
                    s, names[s.local_table], writable, row, 0, mid, key, op, changed, base
                )
                values = dict(m.values)
            out.append((oid, mid, key, op, values))
        return out

    def surface_unsent(self, s: StreamInfo, reason: str, streams: Sequence[StreamInfo] = ()) -> int:
        """Move ``s``'s unsent changes to the rejections, with the values the user wrote.

        For a change that can no longer be sent (its table is no longer pushed, its
        key changed): the app sees it with ``reason`` (``{key}`` is filled in) and
        what it wrote. Runs in the caller's transaction, before the table changes.

        If the next catalog's ``streams`` still fill the table, its row goes back at
        once to what the device saw before the change (an insert's goes), and those
        streams copy it afresh on their next sync (the server may have changed it
        since): the row ends as the server has it (``_refuse``).
        """
        conn = self.store.conn
        found = self.unsent(s)
        kept = any(n.local_table == s.local_table for n in streams)
        bases = dict(
            conn.execute(
                "SELECT id, base FROM syncunit_outbox WHERE seq IS NULL AND table_name = ?",
                (s.local_table,),
            ).fetchall()
        )
        for oid, mid, key, op, values in found:
            why = reason.replace("{key}", repr(key))
            _reject(conn, mid, None, s.local_table, key, op, "schema-changed", why, values)
            conn.execute("DELETE FROM syncunit_outbox WHERE id = ?", (oid,))
            if kept:
                base = bases[oid]
                self._put_back(s, key, None if base == "{}" else _loads(base))
                self._recopy(s.local_table, key, streams)
        return len(found)

    def surface_in_flight(self, streams: Sequence[StreamInfo] = ()) -> int:
        """Move every numbered change to the rejections, with the values it carried.

        For changes no unit can carry any more (the server takes changes through
        none): each was numbered to be sent and no answer recorded, so the server
        may have applied it; the reason says so. Runs in the caller's transaction;
        the caller gives the device a new client id (``LocalStore.renew_client_id``),
        so the numbers after these are not waited for by the server.

        Only the server knows whether the row is the change's or what it was: the
        next catalog's ``streams`` that fill its table copy it afresh on their next
        sync (``recopy.py``), and the row ends as the server has it.
        """
        conn = self.store.conn
        rows = conn.execute(
            "SELECT id, mutation_id, seq, table_name, row_key, op, payload FROM syncunit_outbox"
            " WHERE seq IS NOT NULL ORDER BY seq"
        ).fetchall()
        for oid, mid, seq, table, key, op, payload in rows:
            why = (
                f"table {table!r} is no longer synced to the server (it takes no changes"
                " through any unit now); this change was numbered to be sent before that"
                " and no answer came: the server may have applied it. Compare with the"
                " server's row before making it again, then discard this one"
            )
            values = _mut_dec.decode(payload).values
            _reject(conn, mid, seq, table, key, op, "schema-changed", why, values)
            conn.execute("DELETE FROM syncunit_outbox WHERE id = ?", (oid,))
            self._recopy(table, key, streams)
        return len(rows)

    def hold_in_flight(self, table: str) -> int:
        """Make ``table``'s in-flight changes unappliable: its key changed, and they name
        rows by the old one.

        They keep their numbers (the server refuses a gap): one the server applied
        before the change is answered from its log, as applied; one it has not is
        refused (``UNSENDABLE`` is no column of any table), and ``complete`` records
        it as a rejection with the values it carried.
        """
        conn = self.store.conn
        rows = conn.execute(
            "SELECT id, payload FROM syncunit_outbox WHERE table_name = ? AND seq IS NOT NULL",
            (table,),
        ).fetchall()
        for oid, payload in rows:
            m = _mut_dec.decode(payload)
            held = msgspec.structs.replace(m, op="update", changed=[UNSENDABLE])
            conn.execute(
                "UPDATE syncunit_outbox SET payload = ? WHERE id = ?", (_mut_enc.encode(held), oid)
            )
        return len(rows)

    def withdraw(self, seq: int, code: str, reason: str, streams: Sequence[StreamInfo]) -> bool:
        """Take the change numbered ``seq``, the first in flight, out of flight: it becomes
        a rejection (``code``, ``reason``) with its values kept, and the changes numbered
        after it move down one number, so the server sees no gap.

        For a change no request can carry (the server refuses every request holding
        it, before applying anything): the server has applied none of its number or
        after. False (nothing done) if ``seq`` is not the first in flight.
        """
        conn = self.store.conn
        with self.store.atomic():
            if self.in_flight_from() != seq:
                return False
            oid, payload = conn.execute(
                "SELECT id, payload FROM syncunit_outbox WHERE seq = ?", (seq,)
            ).fetchone()
            m = _mut_dec.decode(payload)
            stream = next((s for s in streams if s.local_table == m.table), None)
            self._refuse(oid, seq, m, code, reason, stream)
            later = conn.execute(
                "SELECT id, payload FROM syncunit_outbox WHERE seq > ? ORDER BY seq", (seq,)
            ).fetchall()
            for later_id, later_payload in later:  # in order: each number is free when taken
                old = _mut_dec.decode(later_payload)
                moved = msgspec.structs.replace(old, seq=old.seq - 1)
                conn.execute(
                    "UPDATE syncunit_outbox SET seq = ?, payload = ? WHERE id = ?",
                    (moved.seq, _mut_enc.encode(moved), later_id),
                )
            conn.execute("UPDATE syncunit_state SET next_seq = next_seq - 1 WHERE id = 1")
        return True

    def _refuse(
        self,
        oid: int,
        seq: int | None,
        m: Mutation,
        code: str,
        reason: str,
        stream: StreamInfo | None,
    ) -> None:
        """Make outbox entry ``oid`` (change ``m``, never applied) a rejection the app sees,
        and its local row what the server holds: at once the row as the device saw it
        before the change (none, for a row new on the device), then, the server having
        maybe changed it since, as the streams that bring it copy it afresh on their
        next sync (``recopy.py``). A newer change to the row keeps it as it is. Runs in
        the caller's transaction."""
        conn = self.store.conn
        table, key = m.table, m.key
        (base,) = conn.execute("SELECT base FROM syncunit_outbox WHERE id = ?", (oid,)).fetchone()
        server_row = None if base == "{}" else _loads(base)
        rid = _reject(conn, m.id, seq, table, key, m.op, code, reason, m.values)
        self._refused.append(
            RejectedChange(rid, table, key, m.op, "rejected", code, reason, dict(m.values), None)
        )
        conn.execute("DELETE FROM syncunit_outbox WHERE id = ?", (oid,))
        # One numbered before it (in flight) is in the base already: only a newer one stays.
        newer = conn.execute(
            "SELECT id, payload FROM syncunit_outbox WHERE table_name = ? AND row_key = ?"
            " AND id > ?",
            (table, key, oid),
        ).fetchall()
        if stream is not None and not newer:
            self._put_back(stream, key, server_row)
        if server_row is not None:
            self._rebase(newer, base, server_row)
        self._recopy(table, key)
        log.warning("change to %s %s not pushed: %s", table, shorten_key(key), reason)

    def _row_in_flight(self, table: str, key: Any) -> bool:
        """Whether a change to row ``key`` of ``table`` is in flight."""
        return (
            self.store.conn.execute(
                "SELECT 1 FROM syncunit_outbox WHERE table_name = ? AND row_key = ?"
                " AND seq IS NOT NULL",
                (table, key),
            ).fetchone()
            is not None
        )

    def _rebase(
        self, newer: Sequence[tuple[int, bytes | None]], base: str, row: dict[str, Any]
    ) -> None:
        """The changes ``newer`` to a row were made over a change that never reached the
        server: their base becomes the one it had (``base``, the row ``row``), so the
        server checks them against what it holds, not against values it never saw. A
        numbered one was not applied either (the server applies in order)."""
        conn = self.store.conn
        for oid, payload in newer:
            conn.execute("UPDATE syncunit_outbox SET base = ? WHERE id = ?", (base, oid))
            if payload is not None:
                m = _mut_dec.decode(payload)
                rebased = msgspec.structs.replace(m, base={c: row[c] for c in m.base if c in row})
                conn.execute(
                    "UPDATE syncunit_outbox SET payload = ? WHERE id = ?",
                    (_mut_enc.encode(rebased), oid),
                )

    def _current_rows(
        self,
        rows: Sequence[tuple[Any, ...]],
        by_table: Mapping[str, StreamInfo],
        names: dict[str, list[str]],
    ) -> dict[str, dict[Any, tuple[Any, ...]]]:
        """Per table, the local rows of the outbox entries ``rows``, by key, read in a
        few queries (fills ``names`` with each table's column names)."""
        conn = self.store.conn
        keys: dict[str, list[Any]] = {}
        for _, _, table, key, op, _, _ in rows:
            keys.setdefault(table, [])
            if op != "delete":
                keys[table].append(key)
        out: dict[str, dict[Any, tuple[Any, ...]]] = {}
        for table, wanted in keys.items():
            s = by_table[table]
            cur = conn.execute(f"SELECT * FROM {_q(table)} LIMIT 0")
            names[table] = [d[0] for d in cur.description]
            at = names[table].index(s.key)
            found: dict[Any, tuple[Any, ...]] = {}
            for i in range(0, len(wanted), _KEYS_PER_QUERY):
                part = wanted[i : i + _KEYS_PER_QUERY]
                marks = ",".join("?" * len(part))
                for row in conn.execute(
                    f"SELECT * FROM {_q(table)} WHERE {_q(s.key)} IN ({marks})", part
                ):
                    found[row[at]] = row
            out[table] = found
        return out

    def _mutation(
        self,
        s: StreamInfo,
        names: list[str],
        writable: set[str],
        row: tuple[Any, ...] | None,
        seq: int,
        mid: str,
        key: Any,
        op: str,
        changed: str,
        base: str,
    ) -> Mutation:
        base_all = _loads(base) if base != "{}" else {}  # an insert has no base
        base_vals = {c: v for c, v in base_all.items() if c in writable}
        if op == "delete":
            return Mutation(
                seq=seq, id=mid, table=s.local_table, key=key, op="delete", base=base_vals
            )
        if row is None:  # cannot happen with the triggers in place; keep the change visible
            raise LocalStoreError(f"outbox entry for {s.local_table} {key!r} has no local row")
        current = dict(zip(names, row, strict=True))
        if op == "insert":
            values = {c: current[c] for c in names if c in writable or c == s.key}
            return Mutation(
                seq=seq,
                id=mid,
                table=s.local_table,
                key=key,
                op="insert",
                values=values,
                base=base_vals,
            )
        cols = [c for c in json.loads(changed) if c is not None]
        return Mutation(
            seq=seq,
            id=mid,
            table=s.local_table,
            key=key,
            op="update",
            values={c: current.get(c) for c in cols},
            changed=cols,
            base=base_vals,
        )

    def complete(
        self, pushed: PushResults, streams: Sequence[StreamInfo], *, json_answer: bool = False
    ) -> tuple[int, list[RejectedChange]]:
        """Record the server's verdicts: applied ones leave, the others are kept for the app.

        ``json_answer``: the verdicts came in a JSON answer, whose server rows hold bytes as
        base64 text (``blobtext.row_bytes``).

        Committed without an fsync (``LocalStore.relaxed``): if a power cut loses
        it, the changes are still in flight, go out again first, and the server
        answers them from its log with the same verdicts. The loss is bounded by
        the next numbering, which commits with an fsync, and so far below the
        log's retention.
        """
        try:
            return self._complete(pushed, streams, json_answer)
        except self.store.errors as exc:
            raise LocalStoreError(f"cannot record the server's verdicts: {exc}") from exc

    def _complete(
        self, pushed: PushResults, streams: Sequence[StreamInfo], json_answer: bool
    ) -> tuple[int, list[RejectedChange]]:
        by_table = {s.local_table: s for s in streams}
        conn = self.store.conn
        applied = 0
        kept: list[RejectedChange] = []
        with self.store.relaxed():
            conn.execute("UPDATE syncunit_state SET applying = 1 WHERE id = 1")
            try:
                conn.execute(
                    "UPDATE syncunit_state SET next_seq = max(next_seq, ?) WHERE id = 1",
                    (pushed.last_seq + 1,),
                )
                done: list[tuple[int, str]] = []  # applied: removed in one statement, in order

                def remove_done() -> int:
                    if not done:
                        return 0
                    cur = conn.executemany(
                        "DELETE FROM syncunit_outbox WHERE seq = ? AND mutation_id = ?", done
                    )
                    done.clear()
                    return max(cur.rowcount, 0)

                for r in pushed.results:
                    if r.status == "applied":
                        done.append((r.seq, r.id))
                        continue
                    applied += remove_done()
                    row = conn.execute(
                        "SELECT id, table_name, row_key, op, payload FROM syncunit_outbox"
                        " WHERE seq = ? AND mutation_id = ?",
                        (r.seq, r.id),
                    ).fetchone()
                    if row is None:
                        continue  # already recorded by an earlier answer to the same request
                    conn.execute("DELETE FROM syncunit_outbox WHERE id = ?", (row[0],))
                    kept.append(self._keep(r, row, by_table.get(row[1]), json_answer))
                applied += remove_done()
                # Removals put off while these rows had changes in flight (holds.py).
                holds.carry_out(conn, streams)
            finally:
                conn.execute("UPDATE syncunit_state SET applying = 0 WHERE id = 1")
        return applied, kept

    def _keep(
        self, r: MutationResult, row: Any, stream: StreamInfo | None, json_answer: bool = False
    ) -> RejectedChange:
        conn = self.store.conn
        _, table, key, op, payload = row
        m = _mut_dec.decode(payload)
        if json_answer and stream is not None and r.server_row is not None:
            r = msgspec.structs.replace(r, server_row=row_bytes(r.server_row, stream))
        if UNSENDABLE in m.changed:  # its table's key changed before it was applied
            r = msgspec.structs.replace(
                r,
                status="rejected",
                code="schema-changed",
                reason=f"the key of {table!r} changed on the server before this change was"
                f" applied; it was not applied (key {key!r} names the row by its old key):"
                " make it again on the row under its new key, then discard this one",
                server_row=None,
            )
            stream = None  # the key names no row of the table now: nothing to restore
            self._recopy(table, key)  # the server's rows come back under their new keys
        cur = conn.execute(
            "INSERT INTO syncunit_rejected (mutation_id, seq, table_name, row_key, op, status,"
            " code, reason, attempted, server_row, created_at)"
            f" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {_NOW})",
            (
                r.id, r.seq, table, key, op, r.status, r.code or r.status, r.reason,
                _dumps(m.values), None if r.server_row is None else _dumps(r.server_row),
            ),
        )  # fmt: skip
        newer = conn.execute(
            "SELECT 1 FROM syncunit_outbox WHERE table_name = ? AND row_key = ?", (table, key)
        ).fetchone()
        if stream is not None and newer is None:
            self._restore(stream, key, r.server_row)
        return RejectedChange(
            int(cur.lastrowid or 0), table, key, op, r.status, r.code or r.status, r.reason,
            dict(m.values), r.server_row,
        )  # fmt: skip

    def _put_back(self, s: StreamInfo, key: Any, row: dict[str, Any] | None) -> None:
        """Make the local row ``row`` (None: remove it), without recording a change."""
        conn = self.store.conn
        conn.execute("UPDATE syncunit_state SET applying = 1 WHERE id = 1")
        try:
            self._restore(s, key, row, reread=False)
        finally:
            conn.execute("UPDATE syncunit_state SET applying = 0 WHERE id = 1")

    def _recopy(self, table: str, key: Any, streams: Sequence[StreamInfo] | None = None) -> None:
        """The local row ``key`` of ``table`` may differ from the server's, which the device
        cannot tell: the streams that bring it copy afresh on their next sync, once the
        row has no unpushed change (``recopy.py``). ``streams``: the catalog's (default:
        the one stored)."""
        if streams is None:
            catalog = self.store.catalog()
            streams = [] if catalog is None else catalog.streams
        recopy.mark(self.store.conn, streams, table, key)

    def _restore(
        self, s: StreamInfo, key: Any, server_row: dict[str, Any] | None, *, reread: bool = True
    ) -> None:
        """Make the local row what the server holds (or remove it), without recording a change.

        ``reread``: a row removed (no server row) is brought back by the subscriptions
        still holding it (``holds.reread``)."""
        t = _q(s.local_table)
        self.store.conn.execute(f"DELETE FROM {t} WHERE {_q(s.key)} = ?", (key,))
        if server_row is None and not reread:
            return
        if server_row is None:
            # Out of the push's scope, yet a subscription may still show the row.
            catalog = self.store.catalog()
            streams = [s] if catalog is None else catalog.streams
            self.store.rereading.update(holds.reread(self.store.conn, streams, s.local_table, key))
        else:
            held = server_row.get(s.key, key)
            if (
                held != key
                and self.store.conn.execute(
                    f"SELECT 1 FROM {t} WHERE {_q(s.key)} = ?", (held,)
                ).fetchone()
            ):
                # The server's row under a key its column takes as equal to this one
                # ('ABC' for 'abc'): the device holds it already, maybe with changes of
                # its own not pushed yet, and its pulls keep it as the server has it.
                return
            names = [c for c in server_row if c in {c.name for c in s.columns}]
            self.store.conn.execute(
                f"INSERT INTO {t} ({', '.join(map(_q, names))})"
                f" VALUES ({', '.join('?' * len(names))})",
                [server_row[c] for c in names],
            )

    # -- the app's decisions -----------------------------------------------------------------

    def discard(self, rejected_id: int) -> None:
        """Drop a conflicting or rejected change; the local row already is the server's.

        For a change the server answered, the row was restored from its answer (the
        server's row, or removed). For one the device refused itself (too large,
        ``schema-changed``: no server row came), the row was put back to what the
        device saw before the change, and the streams that bring it copy afresh in
        the sync that made the rejection or the next one (``recopy.py``), whether
        the change is discarded or not: the row ends as the server has it.
        """
        with self.store.atomic():
            gone = self.store.conn.execute(
                "DELETE FROM syncunit_rejected WHERE id = ?", (rejected_id,)
            ).rowcount
            if gone == 0:
                raise LocalStoreError(
                    f"no rejected change with id {rejected_id!r} (already discarded or"
                    " retried?): outbox.rejected() lists those waiting"
                )

    accept_server = discard

    def retry(
        self,
        rejected_id: int,
        changes: dict[str, Any] | None = None,
        *,
        without: str | Sequence[str] = (),
    ) -> None:
        """Write the change again (optionally altered); it goes out with the next push.

        ``changes`` maps columns to new values. ``without`` names columns of the
        attempted values to leave out (a string names one): those the table no
        longer has after a change of the server's schema (a renamed column's value
        goes in ``changes`` under its new name).
        """
        if changes is not None and not isinstance(changes, Mapping):
            raise LocalStoreError(
                f"retry({rejected_id!r}, changes) takes a dict of column names to values,"
                f" not {type(changes).__name__}: retry({rejected_id!r}, {{'column': value}})"
            )
        without = _names(without) or []
        caught: tuple[type[Exception], ...] = (*self.store.errors, OverflowError)
        conn = self.store.conn
        with self.store.atomic():
            row = conn.execute(
                "SELECT table_name, row_key, op, attempted, code FROM syncunit_rejected"
                " WHERE id = ?",
                (rejected_id,),
            ).fetchone()
            if row is None:
                raise LocalStoreError(f"no rejected change with id {rejected_id}")
            table, key, op, attempted, code = row
            self.store.reload_catalog()  # another client may have applied a new one
            catalog = self.store.catalog()
            stream = None if catalog is None else next(
                (s for s in catalog.streams if s.local_table == table), None
            )  # fmt: skip
            if stream is None or table not in self.store.pushed:
                raise LocalStoreError(
                    f"table {table!r} is no longer synced to the server: the change cannot"
                    f" be sent; read its values from the rejection, then discard({rejected_id})"
                )
            values = {**_loads(attempted), **(changes or {})}
            for name in without:
                values.pop(name, None)
            values.pop(stream.key, None)
            known = {c.name for c in stream.columns}
            missing = {c: v for c, v in values.items() if c not in known}
            if missing and not self._local_only(table, missing):
                listed = ", ".join(map(repr, missing))
                raise LocalStoreError(
                    f"cannot retry the change to {table} {key!r}: the table has no column"
                    f" {listed} any more (the server's schema changed; the change wrote"
                    f" {missing!r}). Put each value under a current column and leave the old"
                    f" name out: retry({rejected_id}, {{'new_column': value}},"
                    f" without={list(missing)!r}), or discard({rejected_id})"
                )
            t, k = _q(table), _q(stream.key)
            if (
                op == "delete"
                and code == "schema-changed"
                and conn.execute(f"SELECT 1 FROM {t} WHERE {k} = ?", (key,)).fetchone() is None
            ):
                raise LocalStoreError(
                    f"cannot retry the delete of {table} {key!r}: no row has that key"
                    f" ({stream.key!r}) now; delete the row under its current key, then"
                    f" discard({rejected_id})"
                )
            try:
                if op == "delete":
                    conn.execute(f"DELETE FROM {t} WHERE {k} = ?", (key,))
                elif conn.execute(f"SELECT 1 FROM {t} WHERE {k} = ?", (key,)).fetchone():
                    sets = ", ".join(f"{_q(c)} = ?" for c in values)
                    if sets:
                        conn.execute(
                            f"UPDATE {t} SET {sets} WHERE {k} = ?", [*values.values(), key]
                        )
                else:
                    names = [stream.key, *values]
                    conn.execute(
                        f"INSERT INTO {t} ({', '.join(map(_q, names))})"
                        f" VALUES ({', '.join('?' * len(names))})",
                        [key, *values.values()],
                    )
            except caught as exc:
                raise LocalStoreError(
                    f"cannot retry the change to {table}: {_bad_value(exc, values)}"
                ) from exc
            conn.execute("DELETE FROM syncunit_rejected WHERE id = ?", (rejected_id,))

    def _local_only(self, table: str, names: Mapping[str, Any]) -> bool:
        """Whether the local table has all of ``names`` (columns the app added itself)."""
        have = {r[1] for r in self.store.conn.execute(f"PRAGMA table_info({_q(table)})")}
        return all(n in have for n in names)

    # -- sessions: what a principal leaves behind at logout ----------------------------------

    def park(self, streams: Sequence[StreamInfo], client_id: str) -> int:
        """Keep every change of the session ``client_id`` aside; return how many.

        The pending changes are numbered and frozen first (their local rows may be
        cleared next), then moved with the unresolved conflicts and rejections to
        ``syncunit_parked``, out of the next principal's sight. Runs in the
        caller's transaction.
        """
        conn = self.store.conn
        self.prepare(streams, self.count() + 1)
        now = _utc()
        cur = conn.execute(
            "INSERT INTO syncunit_parked (client_id, kind, seq, body, parked_at)"
            " SELECT ?, 'mutation', seq, payload, ? FROM syncunit_outbox"
            " WHERE seq IS NOT NULL ORDER BY seq",
            (client_id, now),
        )
        parked = max(cur.rowcount, 0)
        conn.execute("DELETE FROM syncunit_outbox WHERE seq IS NOT NULL")
        kept = conn.execute(
            "SELECT mutation_id, seq, table_name, row_key, op, status, code, reason, attempted,"
            " server_row, created_at FROM syncunit_rejected ORDER BY id"
        ).fetchall()
        conn.executemany(
            "INSERT INTO syncunit_parked (client_id, kind, seq, body, parked_at)"
            " VALUES (?, 'rejected', NULL, ?, ?)",
            [(client_id, json.dumps(list(r)), now) for r in kept],
        )
        conn.execute("DELETE FROM syncunit_rejected")
        return parked + len(kept)

    def parked(self) -> dict[str, int]:
        """Ended sessions with changes kept for their principal: client id -> count."""
        rows = self.store.query(
            "SELECT client_id, count(*) FROM syncunit_parked GROUP BY client_id ORDER BY min(id)"
        )
        return {r[0]: int(r[1]) for r in rows}

    def parked_mutations(self, client_id: str) -> list[Mutation]:
        rows = self.store.query(
            "SELECT body FROM syncunit_parked WHERE client_id = ? AND kind = 'mutation'"
            " ORDER BY seq",
            (client_id,),
        )
        return [_mut_dec.decode(r[0]) for r in rows]

    def parked_batch(self, client_id: str, limit: int, budget: Budget | None) -> list[Mutation]:
        """The oldest parked changes of session ``client_id`` that one push request takes:
        ``limit`` at most (and the budget's), sized as a push of the outbox's."""
        if budget is not None:
            limit = min(limit, budget.mutations)
        rows = self.store.query(
            "SELECT body FROM syncunit_parked WHERE client_id = ? AND kind = 'mutation'"
            " ORDER BY seq LIMIT ?",
            (client_id, max(1, limit)),
        )
        return _fill([r[0] for r in rows], budget)[0]

    def withdraw_parked(self, client_id: str, seq: int, code: str, reason: str) -> bool:
        """Make the parked change ``seq`` of session ``client_id``, its first, a parked
        rejection (``code``, ``reason``, its values kept), and move the parked changes
        numbered after it down one number, so the server sees no gap.

        As ``withdraw``, for a change no request can carry: the server has applied
        none of its number or after. The rejection stays with the session and comes
        back into sight with it, to its principal (``unpark``); no local row is
        touched now (the rows in sight may be another principal's): when it comes
        back, the streams that bring its row copy it afresh (``recopy.py``), so the
        row ends as the server has it. False (nothing done) if ``seq`` is not the
        session's first parked change.
        """
        conn = self.store.conn
        with self.store.atomic():
            rows = conn.execute(
                "SELECT id, seq, body FROM syncunit_parked WHERE client_id = ?"
                " AND kind = 'mutation' ORDER BY seq",
                (client_id,),
            ).fetchall()
            if not rows or rows[0][1] != seq:
                return False
            pid, _, body = rows[0]
            m = _mut_dec.decode(body)
            conn.execute(
                "INSERT INTO syncunit_parked (client_id, kind, seq, body, parked_at)"
                " VALUES (?, 'rejected', NULL, json_array(?, ?, ?, ?, ?, 'rejected', ?, ?, ?,"
                f" NULL, {_NOW}), ?)",
                (client_id, m.id, seq, m.table, m.key, m.op, code, reason, _dumps(m.values),
                 _utc()),
            )  # fmt: skip
            conn.execute("DELETE FROM syncunit_parked WHERE id = ?", (pid,))
            recopy.mark_parked(conn, client_id, m.table, m.key)
            for later_id, later_seq, later_body in rows[1:]:  # in order: each number is free
                moved = msgspec.structs.replace(_mut_dec.decode(later_body), seq=later_seq - 1)
                if m.base and (moved.table, moved.key) == (m.table, m.key):
                    # Made over it: checked against the row the server has (``_rebase``).
                    base = {c: m.base.get(c, v) for c, v in moved.base.items()}
                    moved = msgspec.structs.replace(moved, base=base)
                conn.execute(
                    "UPDATE syncunit_parked SET seq = ?, body = ? WHERE id = ?",
                    (moved.seq, _mut_enc.encode(moved), later_id),
                )
        log.warning("parked change to %s %s not pushed: %s", m.table, shorten_key(m.key), reason)
        return True

    def unpark(
        self,
        client_id: str,
        pushed: PushResults,
        streams: Sequence[StreamInfo] = (),
        *,
        json_answer: bool = False,
    ) -> tuple[int, list[RejectedChange]]:
        """The server accepted a parked session's push (it is this principal's): record
        the verdicts of the changes it answered (those it did not stay parked, to be
        sent again), and bring the session's conflicts and rejections back into sight.

        A change not applied leaves its local row what the server holds, as for a
        normal push (``streams``: the tables pushed now; the rows are this principal's,
        whose session the server accepted; ``json_answer``: as for ``complete``)."""
        conn = self.store.conn
        by_table = {s.local_table: s for s in streams}
        applied = 0
        kept: list[RejectedChange] = []
        with self.store.atomic():
            bodies = {
                r[0]: r[1]
                for r in conn.execute(
                    "SELECT seq, body FROM syncunit_parked WHERE client_id = ?"
                    " AND kind = 'mutation'",
                    (client_id,),
                )
            }
            answered: list[tuple[str, int]] = []
            conn.execute("UPDATE syncunit_state SET applying = 1 WHERE id = 1")
            try:
                for r in pushed.results:
                    body = bodies.pop(r.seq, None)
                    if body is None:
                        continue
                    answered.append((client_id, r.seq))
                    if r.status == "applied":
                        applied += 1
                        continue
                    m = _mut_dec.decode(body)
                    row = (0, m.table, m.key, m.op, body)
                    kept.append(self._keep(r, row, by_table.get(m.table), json_answer))
            finally:
                conn.execute("UPDATE syncunit_state SET applying = 0 WHERE id = 1")
            conn.executemany(
                "DELETE FROM syncunit_parked WHERE client_id = ? AND kind = 'mutation' AND seq = ?",
                answered,
            )
            conn.execute(
                "INSERT INTO syncunit_rejected (mutation_id, seq, table_name, row_key, op,"
                " status, code, reason, attempted, server_row, created_at)"
                " SELECT "
                + ", ".join(f"json_extract(body, '$[{i}]')" for i in range(11))
                + " FROM syncunit_parked WHERE client_id = ? AND kind = 'rejected' ORDER BY id",
                (client_id,),
            )
            conn.execute(
                "DELETE FROM syncunit_parked WHERE client_id = ? AND kind = 'rejected'",
                (client_id,),
            )
            # Its changes withdrawn as too large: their rows copy afresh (recopy.py).
            catalog = self.store.catalog()
            recopy.unpark(conn, client_id, [] if catalog is None else catalog.streams)
        return applied, kept


def shorten_key(key: Any) -> str:
    """A row key for a log line, cut short."""
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


def _utc() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def retype_in_flight(conn: sqlite3.Connection, table: str, types: dict[str, str]) -> int:
    """Give the frozen payloads of ``table``'s in-flight changes the new column types.

    After a local table is rebuilt on a new schema, its rows hold values converted
    by SQLite's type affinity; a change numbered before the rebuild must carry the
    same values (same number, same id: the server still answers it exactly once).
    The conversion is SQLite's own, through a scratch table. Returns how many changed.
    """
    rows = conn.execute(
        "SELECT id, payload FROM syncunit_outbox WHERE table_name = ? AND seq IS NOT NULL",
        (table,),
    ).fetchall()
    if not rows or not types:
        return 0
    cols = list(types)
    conn.execute("DROP TABLE IF EXISTS temp.syncunit_retype")
    conn.execute(
        "CREATE TEMP TABLE syncunit_retype (" + ", ".join(f"{_q(c)} {types[c]}" for c in cols) + ")"
    )

    def convert(values: dict[str, Any]) -> dict[str, Any]:
        names = [c for c in cols if c in values]
        if not names:
            return values
        conn.execute("DELETE FROM temp.syncunit_retype")
        conn.execute(
            f"INSERT INTO temp.syncunit_retype ({', '.join(map(_q, names))})"
            f" VALUES ({', '.join('?' * len(names))})",
            [values[c] for c in names],
        )
        row = conn.execute(
            f"SELECT {', '.join(map(_q, names))} FROM temp.syncunit_retype"
        ).fetchone()
        return {**values, **dict(zip(names, row, strict=True))}

    changed = 0
    for oid, payload in rows:
        m = _mut_dec.decode(payload)
        new = msgspec.structs.replace(m, values=convert(m.values), base=convert(m.base))
        if new != m:
            conn.execute(
                "UPDATE syncunit_outbox SET payload = ? WHERE id = ?", (_mut_enc.encode(new), oid)
            )
            changed += 1
    conn.execute("DROP TABLE temp.syncunit_retype")
    return changed


def _names(names: str | Sequence[str] | None) -> list[str] | None:
    """Table or column names as a list: a string is one name, not its letters."""
    if names is None:
        return None
    return [names] if isinstance(names, str) else list(names)
