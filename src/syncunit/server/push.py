"""Applying pushed mutations: exactly once, validated, authorized, under a policy.

All mutations of a request are applied in one write transaction together with
the client's last applied sequence number and a log of each result, so a
request retried after a lost response replays the logged results instead of
applying anything twice. A request that skips sequence numbers waits a moment
for the requests before it (a client may send its next batch, on another
connection, before the answer to the one before has come) and is refused as a
whole if they do not come (an earlier one was lost).

Write authorization is checked here, where every entry point of a push passes
(the HTTP app today, other front ends later): the principal must be allowed the
unit, the unit must push the mutation's table, and the stream must be writable.

Each mutation runs in a savepoint: it is mapped from local to base-table
columns (denormalized columns are read-only), its values are validated and
coerced, the row must be in the principal's write scope before and after the
change (checked before any business rule runs, so a rule's answer never
describes rows outside the scope), the stream's conflict policy and business
rules decide, and the result is ``applied``, ``conflict`` (with the server's
row) or ``rejected`` (with a reason).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from syncunit.policies import Conflict, MutationContext, Reject, Resolve
from syncunit.protocol import Answered, Mutation, MutationResult, PushResults, SyncRequest
from syncunit.server.auth import Principal, authorize_unit
from syncunit.server.batch import BATCH_MAX, BATCH_MIN, batchable, write_batch
from syncunit.server.changes import StreamReader, to_wire
from syncunit.server.limits import Limits, check_mutations
from syncunit.server.problems import ProblemException
from syncunit.server.store import ServerStore, clients, mutation_log
from syncunit.server.values import Rejected, coerce
from syncunit.units import Stream, SyncSchema, SyncUnit

LOG_RETENTION = 100_000
#: A mutation whose write fails for a transient reason (a lock, a deadlock, a
#: serialization failure) is tried this many times before it is rejected.
TRANSIENT_ATTEMPTS = 3
TRANSIENT_PAUSE = 0.05  # seconds, times the attempt number
_TRANSIENT = ("locked", "busy", "deadlock", "could not serialize", "lock timeout", "timeout")
log = logging.getLogger("syncunit.server")
_result_enc = msgspec.msgpack.Encoder()
_result_dec = msgspec.msgpack.Decoder(MutationResult)


def _transient(exc: sa.exc.SQLAlchemyError) -> bool:
    """A failure that may pass if the same write is tried again."""
    if not isinstance(exc, sa.exc.OperationalError):
        return False
    text = str(exc.orig).lower()
    return any(t in text for t in _TRANSIENT)


def _first_line(exc: sa.exc.SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return (str(orig) if orig is not None else str(exc)).splitlines()[0]


_LOG_COLUMNS = ("client_id", "seq", "mutation_id", "result")
_log_sql: dict[str, tuple[str, bool]] = {}  # per dialect: the log's INSERT, positional?


def _log_results(conn: Connection, rows: list[tuple[str, int, str, bytes]]) -> None:
    """Insert mutation log rows ``(client_id, seq, mutation_id, result)`` through the
    driver: thousands a push, with nothing for SQLAlchemy to process."""
    found = _log_sql.get(conn.dialect.name)
    if found is None:
        compiled = mutation_log.insert().compile(dialect=conn.dialect)
        positional = bool(compiled.positional)
        if positional:
            assert tuple(compiled.positiontup or ()) == _LOG_COLUMNS
        found = _log_sql[conn.dialect.name] = (compiled.string, positional)
    sql, positional = found
    params = rows if positional else [dict(zip(_LOG_COLUMNS, r, strict=True)) for r in rows]
    conn.exec_driver_sql(sql, params)


class ConflictFound(Exception):
    """A mutation conflicts; becomes a ``conflict`` result."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: Attempts of a push whose transaction lost a serialization race (PostgreSQL), and the
#: attempt from which it waits for its turn among the pushes retried as often.
ATTEMPTS = 30
TAKE_TURNS = 4
#: How long a push that starts past the client's last applied seq waits for the
#: requests before it (sent at once, on other connections) before ``sequence-gap``.
PREDECESSOR_WAIT_S = 2.0

KEY = "syncunit_key"  # the bind parameter naming the row a statement works on


@dataclass(frozen=True)
class _Statements:
    current: sa.Select[Any]
    in_scope: sa.Select[Any]  # the row is in the stream's write scope
    scope_count: sa.Select[Any]  # how many rows of ``keys`` are in the stream's write scope
    insert: sa.Insert
    insert_new: sa.Insert
    update: sa.Update
    delete: sa.Delete


class _Savepoint:
    """SAVEPOINT / RELEASE / ROLLBACK TO on a DBAPI connection in a transaction."""

    def __init__(self, dbapi: Any) -> None:
        self.cursor = dbapi.cursor()
        self.cursor.execute("SAVEPOINT syncunit_mutation")

    def commit(self) -> None:
        self.cursor.execute("RELEASE SAVEPOINT syncunit_mutation")
        self.cursor.close()

    def rollback(self) -> None:
        self.cursor.execute("ROLLBACK TO SAVEPOINT syncunit_mutation")
        self.cursor.execute("RELEASE SAVEPOINT syncunit_mutation")
        self.cursor.close()


class PushApplier:
    """Applies the mutations of sync requests for one schema and store."""

    def __init__(
        self, store: ServerStore, schema: SyncSchema, limits: Limits | None = None
    ) -> None:
        self.store = store
        self.schema = schema
        self.limits = limits or Limits()
        #: Per pushing unit, the local tables it may push.
        self.pushable = {
            unit.name: frozenset(schema.unit_push_tables(unit))
            for unit in schema.units.values()
            if unit.pushes
        }
        self._cache: dict[str, _Statements] = {}
        self._pushed = threading.Condition()  # notified when a push of this process commits
        self._pushes = 0  # pushes of this process committed so far

    def authorize(self, principal: Principal, unit: SyncUnit) -> None:
        """Refuse (``ProblemException``) a push the principal may not make through ``unit``."""
        authorize_unit(principal, unit)
        if not unit.pushes or self.schema.units.get(unit.name) is not unit:
            raise ProblemException(
                "invalid-request", f"unit {unit.name!r} does not push; send no mutations"
            )
        for table in sorted(self.pushable[unit.name]):
            stream = self.schema.by_local_table[table]
            missing = [p for p in stream.write_parameters if p not in principal.params]
            if missing:
                raise ProblemException(
                    "missing-parameter",
                    f"stream {stream.name!r} checks writes on {', '.join(missing)}, which"
                    f" principal {principal.id!r} does not have",
                )

    def apply(
        self, principal: Principal, req: SyncRequest, unit: SyncUnit, *, checked: bool = False
    ) -> PushResults:
        """Apply ``req.mutations`` pushed through ``unit`` in one transaction.

        Returns one result per mutation. The principal must be allowed ``unit``;
        a mutation of a table the unit does not push is rejected.

        A transaction that lost a race the database cannot serialize (another
        server process pushed for the same client, or wrote what a rule read) is
        run again from the start, after a growing random pause; from the
        ``TAKE_TURNS``-th attempt on it first waits for its turn among the pushes
        that were retried as often (``ServerStore.take_turns``), so a busy moment
        cannot starve one push. After ``ATTEMPTS`` the error goes to the client,
        which retries the request later.

        ``checked``: the caller has already run ``check_mutations`` on
        ``req.mutations`` with this applier's limits (the sync endpoint does, before
        it answers anything), so the walk over every value is not done twice.
        """
        self.authorize(principal, unit)
        if not checked:
            check_mutations(req.mutations, self.limits)
        deadline = time.monotonic() + PREDECESSOR_WAIT_S
        while True:
            seen = self._pushes
            try:
                pushed = self._attempts(principal, req, unit)
            except ProblemException as exc:
                # Its predecessor may be on its way on another connection: wait for it.
                if exc.code != "sequence-gap" or not self._wait_for_push(seen, deadline):
                    raise
                continue
            with self._pushed:
                self._pushes += 1
                self._pushed.notify_all()
            return pushed

    def _wait_for_push(self, seen: int, deadline: float) -> bool:
        """Wait until a push of this process commits after the ``seen``-th (or, for one
        of another process, a short while); False once ``deadline`` has passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        with self._pushed:
            self._pushed.wait_for(lambda: self._pushes != seen, min(left, 0.02))
        return True

    def _attempts(self, principal: Principal, req: SyncRequest, unit: SyncUnit) -> PushResults:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return self._apply(principal, req, unit, take_turns=attempt >= TAKE_TURNS)
            except sa.exc.DBAPIError as exc:
                if attempt == ATTEMPTS or not self.store.retryable(exc):
                    raise
                log.info("push of %s lost a race (attempt %d); retrying", req.client_id, attempt)
                time.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))
        raise AssertionError("unreachable")  # pragma: no cover

    def _apply(
        self, principal: Principal, req: SyncRequest, unit: SyncUnit, *, take_turns: bool
    ) -> PushResults:
        writable = self.pushable[unit.name]
        with self.store.write(serializable=True) as conn:
            if take_turns:
                self.store.take_turns(conn)
            # Read with a row lock: a retry of this request on another server process
            # waits here, then sees this one's last_seq and replays from the log.
            row = conn.execute(
                sa.select(clients.c.principal, clients.c.last_seq)
                .where(clients.c.client_id == req.client_id)
                .with_for_update()
            ).first()
            now = dt.datetime.now(dt.UTC).isoformat()
            if row is None:
                # After renew_epoch (a restored database) a client it does not know may
                # be an old one: continue from what it sends.
                last = -1 if "sequence-reset" in self.store.facts(conn) else 0
                conn.execute(
                    clients.insert().values(
                        client_id=req.client_id, principal=principal.id, last_seq=0, last_seen=now
                    )
                )
            elif row.principal != principal.id:
                raise ProblemException(
                    "forbidden", "this client id is registered to another principal"
                )
            else:
                last = int(row.last_seq)
            if last < 0 and req.mutations:  # after renew_epoch: continue from what comes
                last = req.mutations[0].seq - 1
            self._check_sequence(req.mutations, last)
            results: list[MutationResult] = []
            logged: list[tuple[str, int, str, bytes]] = []
            mutations = req.mutations
            tried = 0  # index below which a batch was tried (and failed: one by one)
            i = 0
            while i < len(mutations):
                m = mutations[i]
                if m.seq <= last:
                    results.append(self._replay(conn, req.client_id, m))
                    i += 1
                    continue
                if i >= tried:
                    run = self._insert_run(mutations, i, writable)
                    tried = i + max(1, len(run[1]) if run else 1)
                    if run is not None and write_batch(self, conn, principal, *run):
                        # The whole run applied: its results and log rows in one go.
                        done = [
                            MutationResult(seq=x.seq, id=x.id, status="applied") for x in run[1]
                        ]
                        results += done
                        cid = req.client_id
                        logged += [(cid, r.seq, r.id, _result_enc.encode(r)) for r in done]
                        last = done[-1].seq
                        i = tried
                        continue
                result = self._apply_one(conn, principal, m, unit.name, writable)
                logged.append((req.client_id, m.seq, m.id, _result_enc.encode(result)))
                results.append(result)
                last = m.seq
                i += 1
            if logged:
                _log_results(conn, logged)
            conn.execute(
                clients.update()
                .where(clients.c.client_id == req.client_id)
                .values(last_seq=last, last_seen=now)
            )
            conn.execute(
                mutation_log.delete().where(
                    mutation_log.c.client_id == req.client_id,
                    mutation_log.c.seq <= last - LOG_RETENTION,
                )
            )
        return PushResults(results=results, last_seq=last)

    def _insert_run(
        self, mutations: list[Mutation], start: int, writable: frozenset[str]
    ) -> tuple[Stream, list[Mutation]] | None:
        """The inserts into one table from ``start`` on, if they are worth a batch."""
        first = mutations[start]
        stream = self.schema.by_local_table.get(first.table)
        if first.op != "insert" or first.table not in writable:
            return None
        if stream is None or not batchable(self, stream):
            return None
        end = start
        while (
            end < len(mutations)
            and end - start < BATCH_MAX
            and mutations[end].op == "insert"
            and mutations[end].table == first.table
        ):
            end += 1
        if end - start < BATCH_MIN:
            return None
        return stream, mutations[start:end]

    @staticmethod
    def _check_sequence(mutations: list[Mutation], last: int) -> None:
        expected = None
        for m in mutations:
            if m.seq < 1:  # would be "answered from the log" as applied, and never applied
                raise ProblemException("invalid-request", f"mutation seqs start at 1, got {m.seq}")
            if expected is None:
                if m.seq > last + 1:
                    raise ProblemException(
                        "sequence-gap",
                        f"the server has applied up to seq {last}; this request starts at"
                        f" {m.seq}: send the missing mutations first (if the server database"
                        " was restored from a backup, run 'syncunit renew-epoch' on it)",
                    )
            elif m.seq != expected:
                raise ProblemException(
                    "invalid-request",
                    f"mutation seqs must be consecutive: expected {expected}, got {m.seq}",
                )
            expected = m.seq + 1

    def _replay(self, conn: Connection, client_id: str, m: Mutation) -> MutationResult:
        row = conn.execute(
            sa.select(mutation_log.c.mutation_id, mutation_log.c.result).where(
                mutation_log.c.client_id == client_id, mutation_log.c.seq == m.seq
            )
        ).first()
        if row is None:  # older than the log's retention: it was applied long ago
            return MutationResult(seq=m.seq, id=m.id, status="applied")
        if row.mutation_id != m.id:
            reason = f"seq {m.seq} was already used by another mutation of this client"
            return MutationResult(m.seq, m.id, "rejected", reason, "sequence-reused")
        return _result_dec.decode(row.result)

    def answered(self, conn: Connection, principal: Principal, req: SyncRequest) -> Answered | None:
        """The logged verdicts on ``req.client_id``'s mutations from
        ``req.unanswered_from`` on, past those ``req`` carries (see ``Answered``);
        None when there are none (or the client id is another principal's)."""
        if req.unanswered_from < 1:
            return None
        start = max(req.unanswered_from, req.mutations[-1].seq + 1 if req.mutations else 0)
        last = conn.execute(
            sa.select(clients.c.last_seq).where(
                clients.c.client_id == req.client_id, clients.c.principal == principal.id
            )
        ).scalar_one_or_none()
        if last is None or int(last) < start:
            return None
        rows = conn.execute(
            sa.select(mutation_log.c.result)
            .where(
                mutation_log.c.client_id == req.client_id,
                mutation_log.c.seq >= start,
                mutation_log.c.seq <= last,
            )
            .order_by(mutation_log.c.seq)
        )
        results = [_result_dec.decode(r.result) for r in rows]
        return Answered(results=results, last_seq=int(last)) if results else None

    # -- one mutation -------------------------------------------------------------------

    def _apply_one(
        self,
        conn: Connection,
        principal: Principal,
        m: Mutation,
        unit: str,
        writable: frozenset[str],
    ) -> MutationResult:
        stream = self.schema.by_local_table.get(m.table)
        if stream is None:
            reason = f"table {m.table!r} does not accept changes"
            return MutationResult(m.seq, m.id, "rejected", reason, "unknown-table")
        if m.table not in writable:
            reason = f"unit {unit!r} does not push table {m.table!r}; it is read-only here"
            return MutationResult(m.seq, m.id, "rejected", reason, "read-only-table")
        # A savepoint per mutation, on the DBAPI connection: it is the hottest statement
        # pair of a push, and needs none of SQLAlchemy's bookkeeping.
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
            savepoint = _Savepoint(dbapi)
            try:
                self._write(conn, stream, principal, m)
            except (Rejected, ConflictFound, sa.exc.SQLAlchemyError) as exc:
                if isinstance(exc, sa.exc.DBAPIError) and (
                    exc.connection_invalidated or self.store.retryable(exc)
                ):
                    # The transaction is gone (or, a serialization failure on PostgreSQL,
                    # doomed): the whole request fails here, and ``apply`` runs it again.
                    raise
                savepoint.rollback()
                status: Literal["rejected", "conflict"]
                if isinstance(exc, Rejected):
                    status, code, reason = "rejected", exc.code, exc.reason
                elif isinstance(exc, ConflictFound):
                    status, code, reason = "conflict", "conflict", exc.reason
                elif isinstance(exc, sa.exc.IntegrityError):
                    status, code = "rejected", "constraint"
                    reason = f"the database refused the change: {_first_line(exc)}"
                elif _transient(exc) and attempt < TRANSIENT_ATTEMPTS:
                    log.warning("transient failure on %s %r, again: %s", m.table, m.key, exc)
                    time.sleep(TRANSIENT_PAUSE * attempt)
                    continue
                else:
                    # A poison mutation (a rule's query fails, a value the database
                    # cannot store) or a transient failure past its retries: this one
                    # is rejected with its reason, the ones behind it go ahead.
                    log.error("mutation %s %r failed: %s", m.table, m.key, exc)
                    status = "rejected"
                    code = "unavailable" if _transient(exc) else "server-error"
                    reason = f"the server's database failed on this change: {_first_line(exc)}"
                    if code == "unavailable":
                        reason += f" (tried {attempt} times; retry later)"
                row = self._server_row(conn, stream, principal, m.key)
                return MutationResult(m.seq, m.id, status, reason, code, row)
            savepoint.commit()
            break
        return MutationResult(seq=m.seq, id=m.id, status="applied")

    def _write(self, conn: Connection, s: Stream, principal: Principal, m: Mutation) -> None:
        base, pk = s.base, s.key_column
        st = self._statements(s)
        if m.op == "insert" and self._insert_new(conn, s, principal, m):
            return
        key = coerce(m.key, pk, s.key)
        if key is None:
            raise Rejected("invalid-value", "the row key cannot be empty")
        if m.op not in ("insert", "update", "delete"):
            raise Rejected("invalid-request", f"unknown operation {m.op!r}")
        names = list(m.values) if m.op == "insert" else list(m.changed)
        changes = self._map(s, m, names)
        found = conn.execute(st.current, {KEY: key}).mappings().first()
        current: dict[str, Any] | None = None if found is None else dict(found)
        if current is not None and not self._in_scope(conn, s, principal, key):
            raise Rejected("out-of-scope", "the row is outside your scope")
        policy = s.policy
        if m.op == "delete":
            if current is None:
                return  # already gone: deleting is idempotent
            if policy.detects:
                base_vals = self._map(s, m, [n for n in m.base if n != s.key], values=m.base)
                differ = tuple(c for c, v in base_vals.items() if current[c] != v)
                if differ:
                    self._on_conflict(s, m, current, {}, base_vals, differ, key)
            self._check_rules(conn, s, principal, m, key, current)
            conn.execute(st.delete, {KEY: key})
            return
        if current is None and m.op == "update":
            raise ConflictFound("the row was deleted on the server")
        if current is not None:
            base_vals = self._map(s, m, [n for n in m.base if n != s.key], values=m.base)
            if policy.detects:
                merge = getattr(policy, "merge", True)
                watched = list(changes) if merge else list(base_vals)
                differ = tuple(c for c in watched if c in base_vals and current[c] != base_vals[c])
                if m.op == "insert" and not base_vals:
                    differ = tuple(c for c in changes if current[c] != changes[c])
                if differ:
                    changes = self._on_conflict(s, m, current, changes, base_vals, differ, key)
            row = {**current, **changes}
            if changes:
                conn.execute(st.update, {**changes, KEY: key})
        else:
            row = {c.name: None for c in base.columns} | changes | {pk.name: key}
            conn.execute(st.insert, {**changes, pk.name: key})
        # The scope comes first: a rule's answer may describe other rows (a clash with
        # another booking), which a principal may only learn about inside its scope.
        if not self._in_scope(conn, s, principal, key):
            raise Rejected("out-of-scope", "the change would move the row outside your scope")
        self._check_rules(conn, s, principal, m, key, row)

    def _map(
        self, s: Stream, m: Mutation, names: list[str], values: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Local column names and values to base-table column names and coerced values.

        ``values`` given means base values: columns that are not writable are skipped.
        """
        source = m.values if values is None else values
        out: dict[str, Any] = {}
        for name in names:
            if values is not None and (name == s.key or s.writable(name) is None):
                continue
            if name == s.key:
                if source.get(name, m.key) != m.key:
                    raise Rejected("read-only-column", "the row key cannot change")
                continue
            if name not in s.columns:
                raise Rejected("unknown-column", f"table {m.table!r} has no column {name!r}")
            column = s.writable(name)
            if column is None:
                raise Rejected(
                    "read-only-column",
                    f"column {name!r} is copied from another table and is read-only;"
                    " change the row it comes from instead",
                )
            if name not in source:
                raise Rejected("invalid-request", f"column {name!r} is changed but has no value")
            if source[name] is None and m.op == "insert" and values is None:
                # A local row has NULL where the app left a column out: a NOT NULL column
                # with a default gets its default (visible to the rules when it is a value).
                default = column.default
                if not column.nullable and default is not None and default.is_scalar:
                    out[column.name] = default.arg  # type: ignore[attr-defined]
                    continue
                if not column.nullable and (default is not None or column.server_default):
                    continue  # the insert leaves it out: the database fills it
            if values is not None and source[name] is None:
                # A base value: what the device saw. A row it created itself holds NULL
                # where the server filled a default; that is a fact, not a value to check.
                out[column.name] = None
                continue
            out[column.name] = coerce(source[name], column, name)
        return out

    def _on_conflict(
        self,
        s: Stream,
        m: Mutation,
        current: Mapping[str, Any],
        changes: dict[str, Any],
        base_vals: dict[str, Any],
        differ: tuple[str, ...],
        key: Any,
    ) -> dict[str, Any]:
        conflict = Conflict(
            table=m.table,
            key=key,
            op=m.op,
            server=dict(current),
            client=changes,
            base=base_vals,
            columns=differ,
        )
        try:
            resolution = s.policy.resolve(conflict) if isinstance(s.policy, Resolve) else None
        except sa.exc.SQLAlchemyError:
            raise
        except Exception:  # the app's code: reject this mutation, do not fail the whole push
            log.exception("conflict resolver failed on %s %r", m.table, key)
            raise Rejected(
                "resolver", "the server's conflict resolver failed on this change"
            ) from None
        if isinstance(resolution, Reject):
            raise Rejected("resolver", resolution.reason)
        if resolution is None:
            raise ConflictFound(f"changed on the server since you saw it: {', '.join(differ)}")
        # The resolver answers for the conflicting columns; the client's other changes stand
        # (replacing them would drop them silently while the result says "applied").
        resolved = {k: v for k, v in resolution.items() if k in s.base.c and k != s.key_column.name}
        return {**changes, **resolved}

    def _check_rules(
        self,
        conn: Connection,
        s: Stream,
        principal: Principal,
        m: Mutation,
        key: Any,
        row: Mapping[str, Any],
    ) -> None:
        for rule in s.rules:
            ctx = MutationContext(
                conn=conn,
                table=m.table,
                op=m.op,
                key=key,
                row=row,
                principal_id=principal.id,
                params=principal.params,
            )
            try:
                reason = rule(ctx)
            except sa.exc.SQLAlchemyError:
                raise
            except Exception:  # the app's code: reject this mutation, do not fail the whole push
                log.exception("rule %r failed on %s %r", rule, m.table, key)
                name = getattr(rule, "__name__", "a business rule")
                raise Rejected(
                    "rule", f"the server could not check this change: rule {name!r} failed"
                ) from None
            if reason:
                raise Rejected("rule", reason)

    def _insert_new(self, conn: Connection, s: Stream, principal: Principal, m: Mutation) -> bool:
        """Insert a row whose key is new, in one statement; False if the key exists.

        The common case of a push (a booking made on a device) skips reading the
        current row. The rules run after the row is written, inside the mutation's
        savepoint, so a rejection (or a scope check failing) undoes it.
        """
        pk = s.key_column
        key = coerce(m.key, pk, s.key)
        if key is None:
            raise Rejected("invalid-value", "the row key cannot be empty")
        changes = self._map(s, m, list(m.values))
        done = conn.execute(self._statements(s).insert_new, {**changes, pk.name: key})
        if done.rowcount == 0:
            return False
        if not self._in_scope(conn, s, principal, key):
            raise Rejected("out-of-scope", "the change would move the row outside your scope")
        row = {c.name: None for c in s.base.columns} | changes | {pk.name: key}
        self._check_rules(conn, s, principal, m, key, row)
        return True

    def _in_scope(self, conn: Connection, s: Stream, principal: Principal, key: Any) -> bool:
        """Whether the row ``key`` is in the stream's write scope for ``principal``."""
        params = self._scope_params(s, principal)
        return conn.execute(self._statements(s).in_scope, {**params, KEY: key}).first() is not None

    def _scope_params(self, s: Stream, principal: Principal) -> dict[str, Any]:
        """The principal's values of the parameters the stream's write scope binds."""
        return {p: principal.params[p] for p in s.write_parameters}

    def _statements(self, s: Stream) -> _Statements:
        """The stream's statements, built once: SQLAlchemy then reuses their compiled form."""
        st = self._cache.get(s.name)
        if st is None:
            base, pk = s.base, s.key_column
            key: sa.BindParameter[Any] = sa.bindparam(KEY)
            keys: sa.BindParameter[Any] = sa.bindparam("keys", expanding=True)
            assert s.write_where is not None  # only writable streams get here
            from_: Any = base
            for j in s.joins:
                from_ = from_.outerjoin(j.table, j.on)
            # coalesce: an outer join's missing row makes the rule NULL, which is "no"
            scoped = (
                sa.select(sa.literal(1))
                .select_from(from_)
                .where(sa.func.coalesce(s.write_where, sa.false()))
            )
            st = _Statements(
                current=sa.select(base).where(pk == key),
                in_scope=scoped.where(pk == key),
                scope_count=scoped.with_only_columns(sa.func.count()).where(pk.in_(keys)),
                insert=base.insert(),
                insert_new=self.store.insert_new(base),
                update=base.update().where(pk == key),
                delete=base.delete().where(pk == key),
            )
            self._cache[s.name] = st
        return st

    def _server_row(
        self, conn: Connection, s: Stream, principal: Principal, key: Any
    ) -> dict[str, Any] | None:
        """The row as the client should hold it now, or None if it should not hold it."""
        reader = StreamReader(self.store, s, principal.params, chunk_size=1)
        try:
            k = coerce(key, s.key_column, s.key)
        except Rejected:
            return None
        row = conn.execute(reader.rows_select().where(s.key_column == k), reader.params).first()
        if row is None:
            return None
        return {name: to_wire(v) for name, v in zip(s.columns, row, strict=True)}
