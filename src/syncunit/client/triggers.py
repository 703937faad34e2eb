"""How the app's writes reach the outbox: its tables, and a trigger per write.

Each pushed local table gets four triggers (before insert; after insert, update,
delete) that record the change in ``syncunit_outbox`` in the app's own transaction,
coalescing changes to one row while they are unsent: the changed columns are
merged, an insert then a delete cancels out, a row deleted and written again
is sent whole against the base the device saw. They stay quiet while the
engine applies the server's changes (``syncunit_state.applying``, or dropped
inside a large chunk's transaction: ``applying.py``). ``outbox.py`` reads and
numbers what they record.

An ``INSERT OR REPLACE`` of a key the table holds deletes that row first, but
SQLite fires the delete trigger for it only on a connection with
``PRAGMA recursive_triggers = ON`` (the engine's; not the default of the app's
own). So the before-insert trigger stages the row the key holds (in
``syncunit_replacing``), the delete trigger unstages it, and the after-insert
trigger records the delete of a row still staged: the same outbox entry, whatever
the connection. Rows an app's own UNIQUE index makes REPLACE delete cannot be
found that way (the triggers do not know the app's indexes): only a connection
with recursive triggers on records them (``docs/guide.md``).
"""

from __future__ import annotations

from syncunit.protocol import StreamInfo
from syncunit.protocol import quote_name as _q

__all__ = ["DDL", "NOW", "REPLACING_DDL", "trigger_ddl", "trigger_names"]

DDL = [
    "CREATE TABLE IF NOT EXISTS syncunit_outbox ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, mutation_id TEXT NOT NULL,"
    " table_name TEXT NOT NULL, row_key NOT NULL, op TEXT NOT NULL,"
    " changed TEXT NOT NULL DEFAULT '[]', base TEXT NOT NULL DEFAULT '{}',"
    " seq INTEGER UNIQUE, payload BLOB, created_at TEXT NOT NULL)",
    # (table, key, seq): the triggers look up a row's unsent entry (seq IS NULL) by it;
    # without seq in it SQLite picks the UNIQUE index on seq and scans every unsent entry.
    "DROP INDEX IF EXISTS ix_syncunit_outbox_row",
    "CREATE INDEX IF NOT EXISTS ix_syncunit_outbox_row_seq"
    " ON syncunit_outbox (table_name, row_key, seq)",
    "CREATE TABLE IF NOT EXISTS syncunit_state ("
    " id INTEGER PRIMARY KEY CHECK (id = 1), applying INTEGER NOT NULL DEFAULT 0,"
    " next_seq INTEGER NOT NULL DEFAULT 1)",
    "INSERT OR IGNORE INTO syncunit_state (id, applying, next_seq) VALUES (1, 0, 1)",
    "CREATE TABLE IF NOT EXISTS syncunit_rejected ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, mutation_id TEXT NOT NULL, seq INTEGER,"
    " table_name TEXT NOT NULL, row_key NOT NULL, op TEXT NOT NULL, status TEXT NOT NULL,"
    " code TEXT NOT NULL, reason TEXT NOT NULL, attempted TEXT NOT NULL,"
    " server_row TEXT, created_at TEXT NOT NULL)",
]

#: The row an INSERT (OR REPLACE) is about to replace, per table and key, as its base
#: (staged by the before-insert trigger, taken by the after-insert or delete one).
REPLACING_DDL = [
    "CREATE TABLE IF NOT EXISTS syncunit_replacing (table_name TEXT NOT NULL,"
    " row_key NOT NULL, old TEXT NOT NULL, PRIMARY KEY (table_name, row_key))",
]

#: The time, as SQL: what the outbox's ``created_at`` columns hold.
NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_ID = "lower(hex(randomblob(16)))"
_ACTIVE = "(SELECT applying FROM syncunit_state WHERE id = 1) = 0"


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _json_value(value: str, kind: str) -> str:
    """SQL giving ``value`` (of a column of logical type ``kind``) as ``json_object()``
    takes it, read back by ``rowjson.loads``: json_object() refuses BLOBs (bytes go
    in as ``{"$bytes": hex}``), and writes a REAL with 15 digits (0.1 + 0.2 as 0.3,
    which no longer equals the value: a base the server would find changed) and
    infinity as ``Inf``, which is not JSON: a real goes in as ``{"$real": text}``,
    its 17 significant digits telling it exactly."""
    if kind == "blob":
        return f"CASE WHEN {value} IS NULL THEN NULL ELSE json_object('$bytes', hex({value})) END"
    if kind == "real":
        return (
            f"CASE WHEN typeof({value}) = 'real'"
            f" THEN json_object('$real', printf('%!.17g', {value})) ELSE {value} END"
        )
    return value


def trigger_names(local_table: str) -> list[str]:
    """The outbox triggers of ``local_table``: after insert, update and delete, and
    before insert (``trigger_ddl`` drops them in this order, then creates them)."""
    return [f"syncunit_{local_table}{end}" for end in ("_ai", "_au", "_ad", "_bi")]


def trigger_ddl(stream: StreamInfo) -> list[str]:
    """Triggers that record changes of ``stream``'s local table in the outbox.

    Only the catalog's columns are recorded (the local tables are the engine's: a
    column the app adds is never pushed, and is dropped by the next migration).
    """
    t, name, k = _q(stream.local_table), _lit(stream.local_table), _q(stream.key)
    cols = [c.name for c in stream.columns]
    changed = (
        " UNION ALL ".join(
            f"SELECT {_lit(c)} AS c WHERE OLD.{_q(c)} IS NOT NEW.{_q(c)}"
            for c in cols
            if c != stream.key
        )
        or "SELECT NULL AS c WHERE 0"
    )

    def image(row: str) -> str:  # the row's catalog columns, as an entry's base
        vals = {c.name: _json_value(f"{row}.{_q(c.name)}", c.type) for c in stream.columns}
        return "json_object(" + ", ".join(f"{_lit(c)}, {vals[c]}" for c in cols) + ")"

    unsent = f"table_name = {name} AND row_key = {{r}}.{k} AND seq IS NULL"
    staged = f"syncunit_replacing WHERE table_name = {name} AND row_key = {{r}}.{k}"
    insert_cols = "(mutation_id, table_name, row_key, op, changed, base, created_at)"

    def deleted(r: str, base: str, when: str) -> str:
        """Record the delete of the row of key ``{r}.key`` (``base``: its image)."""
        return (
            f" INSERT INTO syncunit_outbox {insert_cols}"
            f" SELECT {_ID}, {name}, {r}.{k}, 'delete', '[]', {base}, {NOW}"
            f" WHERE NOT EXISTS (SELECT 1 FROM syncunit_outbox WHERE {unsent.format(r=r)}){when};"
            # An insert with a base wrote a row the server has (deleted and written again):
            # deleting it is a delete; only a row new on this device cancels out.
            f" UPDATE syncunit_outbox SET op = 'delete' WHERE {unsent.format(r=r)}"
            f" AND (op = 'update' OR (op = 'insert' AND base <> '{{}}')){when};"
            f" DELETE FROM syncunit_outbox WHERE {unsent.format(r=r)} AND op = 'insert'{when};"
        )

    was_staged = f" AND EXISTS (SELECT 1 FROM {staged.format(r='NEW')})"
    ai, au, ad, bi = trigger_names(stream.local_table)
    return [
        *(f"DROP TRIGGER IF EXISTS {_q(n)}" for n in (ai, au, ad, bi)),
        f"CREATE TRIGGER {_q(ai)} AFTER INSERT ON {t} WHEN {_ACTIVE} BEGIN"
        # The row this insert replaced, when no delete trigger recorded its delete.
        + deleted("NEW", f"(SELECT old FROM {staged.format(r='NEW')})", was_staged)
        + f" DELETE FROM {staged.format(r='NEW')};"
        # A row deleted (or changed) and written again is sent whole, against the base
        # the device saw before: the server detects conflicts as for an update.
        f" UPDATE syncunit_outbox SET op = 'insert' WHERE {unsent.format(r='NEW')};"
        f" INSERT INTO syncunit_outbox {insert_cols}"
        f" SELECT {_ID}, {name}, NEW.{k}, 'insert', '[]', '{{}}', {NOW}"
        f" WHERE NOT EXISTS (SELECT 1 FROM syncunit_outbox WHERE {unsent.format(r='NEW')});"
        " END",
        f"CREATE TRIGGER {_q(au)} AFTER UPDATE ON {t} WHEN {_ACTIVE} BEGIN"
        f" SELECT RAISE(ABORT, 'the key of a synced row cannot change')"
        f" WHERE OLD.{k} IS NOT NEW.{k};"
        f" UPDATE syncunit_outbox SET changed = (SELECT json_group_array(c) FROM"
        f" (SELECT value AS c FROM json_each(syncunit_outbox.changed)"
        f" UNION SELECT c FROM ({changed})))"
        f" WHERE {unsent.format(r='NEW')};"
        f" INSERT INTO syncunit_outbox {insert_cols}"
        f" SELECT {_ID}, {name}, NEW.{k}, 'update', (SELECT json_group_array(c) FROM ({changed})),"
        f" {image('OLD')}, {NOW}"
        f" WHERE NOT EXISTS (SELECT 1 FROM syncunit_outbox WHERE {unsent.format(r='NEW')})"
        f" AND EXISTS ({changed}); END",
        f"CREATE TRIGGER {_q(ad)} AFTER DELETE ON {t} WHEN {_ACTIVE} BEGIN"
        + deleted("OLD", image("OLD"), "")
        # Recorded here (an INSERT OR REPLACE on a connection with recursive triggers):
        # the insert's trigger must not record it again.
        + f" DELETE FROM {staged.format(r='OLD')}; END",
        # Stages the row of the key being inserted (an INSERT OR REPLACE replaces it);
        # a plain INSERT that fails takes its staging back with it.
        f"CREATE TRIGGER {_q(bi)} BEFORE INSERT ON {t} WHEN {_ACTIVE} BEGIN"
        f" DELETE FROM {staged.format(r='NEW')};"
        f" INSERT INTO syncunit_replacing (table_name, row_key, old)"
        f" SELECT {name}, NEW.{k}, {image(t)} FROM {t} WHERE {t}.{k} = NEW.{k}; END",
    ]
