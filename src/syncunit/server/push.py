"""Applying pushed mutations: exactly once, validated, authorized, under a policy.

All mutations of a request are applied in one write transaction together with
the client's last applied sequence number and a log of each result, so a
request retried after a lost response replays the logged results instead of
applying anything twice. (On a store whose batches change the schema, SQLite,
the first refusal after a batch, the batch's own or a mutation's, commits what
came before it with its log, and the request goes on in a second transaction:
see ``_apply``.) A request that skips sequence numbers waits a moment for the
requests before it (a client may send its next batch, on another connection,
before the answer to the one before has come) and is refused as a whole if they
do not come (an earlier one was lost).

Write authorization is checked here, where every entry point of a push passes
(the HTTP app today, other front ends later): the principal must be allowed the
unit, the unit must push the mutation's table, the stream must be writable, and
the ``authorize`` hook of each stream the unit pushes must allow the principal.

Each mutation runs in a savepoint (``mutation.py``, whose methods
``PushApplier`` takes in as a mixin), and its result is ``applied``,
``conflict`` (with the server's row) or ``rejected`` (with a reason); runs of
new rows into one table are first tried as one set-based batch (``batch.py``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from syncunit.protocol import Answered, Mutation, MutationResult, PushResults, SyncRequest
from syncunit.server.auth import Principal, authorize_unit, check_hook
from syncunit.server.batch import (
    BATCH_MAX,
    BATCH_MIN,
    batchable,
    prepare_batch,
    write_batch,
)
from syncunit.server.limits import Limits, check_mutations
from syncunit.server.mutation import MutationWrites, Strikes, _Statements
from syncunit.server.problems import ProblemException
from syncunit.server.store import ServerStore, clients, mutation_log
from syncunit.units import Stream, SyncSchema, SyncUnit

LOG_RETENTION = 100_000
log = logging.getLogger("syncunit.server")
_result_enc = msgspec.msgpack.Encoder()
_result_dec = msgspec.msgpack.Decoder(MutationResult)


_LOG_COLUMNS = ("client_id", "seq", "mutation_id", "result")
_log_sql: dict[str, tuple[str, bool]] = {}  # per dialect: the log's INSERT, positional?


def _last_seq(conn: Connection, client_id: str) -> int:
    """The last seq applied of ``client_id``'s mutations (0: none yet)."""
    query = sa.select(clients.c.last_seq).where(clients.c.client_id == client_id)
    return int(conn.execute(query).scalar() or 0)


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


def _restart(req: SyncRequest) -> int:
    """The seq the client's sequence continues after, after ``renew_epoch`` forgot it.

    A client's lowest unanswered seq (``unanswered_from``) is where it continues:
    every change below it has its answer. A request that starts above it (a
    batch sent before the one before it was applied, which is still on its way)
    then waits for that one as after any gap, instead of being taken as the new
    start and letting the earlier one be answered from a log that never held
    it. A client that does not say starts where its request does.
    """
    first = req.mutations[0].seq
    return min(first, req.unanswered_from if req.unanswered_from > 0 else first) - 1


#: Attempts of a push whose transaction lost a serialization race (PostgreSQL), and the
#: attempt from which it waits for its turn among the pushes retried as often.
ATTEMPTS = 30
TAKE_TURNS = 4
#: How long a push that starts past the client's last applied seq waits for the
#: requests before it (sent at once, on other connections) before ``sequence-gap``.
PREDECESSOR_WAIT_S = 2.0


class PushApplier(MutationWrites):
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
        self._rows: dict[str, sa.Select[Any]] = {}  # per stream: one row as it shows it
        self._pushed = threading.Condition()  # notified when a push of this process commits
        self._pushes = 0  # pushes of this process committed so far
        self._applying: dict[str, int] = {}  # per client id: its pushes being applied now
        self._strikes = Strikes()  # changes failing on transient errors, request after request

    def authorize(self, principal: Principal, unit: SyncUnit) -> None:
        """Refuse (``ProblemException``) a push the principal may not make through ``unit``:
        a unit it may not run, a write parameter it lacks, or a pushed stream whose
        ``authorize`` hook says no (403, as a pull of the stream is refused)."""
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
            # The hook that guards a pull guards a write too, whichever way the unit goes.
            check_hook(principal, stream, {}, writing=True)

    def apply(
        self, principal: Principal, req: SyncRequest, unit: SyncUnit, *, checked: bool = False
    ) -> PushResults:
        """Apply ``req.mutations`` pushed through ``unit`` in one transaction (see the
        module's text for the one exception).

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
                with self._being_applied(req.client_id):
                    pushed = self._attempts(principal, req, unit)
            except ProblemException as exc:
                # Its predecessor may be on its way on another connection: wait for it.
                if exc.code != "sequence-gap" or not self._wait_for_predecessor(
                    req, seen, deadline
                ):
                    raise
                continue
            with self._pushed:
                self._pushes += 1
                self._pushed.notify_all()
            return pushed

    @contextlib.contextmanager
    def _being_applied(self, client_id: str) -> Iterator[None]:
        """Count a push of ``client_id`` as being applied, for ``_wait_for_push``."""
        with self._pushed:
            self._applying[client_id] = self._applying.get(client_id, 0) + 1
        try:
            yield
        finally:
            with self._pushed:
                left = self._applying.pop(client_id) - 1
                if left:
                    self._applying[client_id] = left

    def _wait_for_predecessor(self, req: SyncRequest, seen: int, deadline: float) -> bool:
        """Wait until the client's last applied seq reaches the one before ``req``'s
        first: True, and the request is tried again; False once ``deadline`` has passed
        (and no push of the client is being applied in this process: a large batch
        before it may take longer than the wait). Looking is a plain read: a try is a
        write transaction, and on SQLite the write lock every other push waits for (a
        wait is woken by every push of the process, and looks every 20 ms for those of
        other processes)."""
        before = req.mutations[0].seq - 1
        while self._wait_for_push(seen, deadline, req.client_id):
            seen = self._pushes
            with self.store.engine.connect() as conn:
                if _last_seq(conn, req.client_id) >= before:
                    return True
        return False

    def _wait_for_push(self, seen: int, deadline: float, client_id: str) -> bool:
        """Wait until a push of this process commits after the ``seen``-th (or, for one
        of another process, a short while); False once ``deadline`` has passed, unless
        a push of ``client_id`` is being applied in this process."""
        left = deadline - time.monotonic()
        with self._pushed:
            if left <= 0 and not self._applying.get(client_id):
                return False
            self._pushed.wait_for(
                lambda: self._pushes != seen, min(left, 0.02) if left > 0 else 0.02
            )
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
            self.store.check_same_database(conn)  # a restored log would answer wrongly
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
            if last < 0 and req.mutations:  # after renew_epoch: continue from the device
                last = _restart(req)
            self._check_sequence(req.mutations, last)
            results: list[MutationResult] = []
            logged: list[tuple[str, int, str, bytes]] = []
            mutations = req.mutations
            tried = 0  # index below which a batch was tried (and failed: one by one)
            # A batch changed the schema in this transaction (``batch_changes_schema``),
            # and SQLite then reads the whole schema again after every savepoint
            # rollback in it, even once the change is rolled back (0.6 ms each with
            # the example's triggers). After the first such rollback (the refused batch's
            # own, or a refused mutation's), what is applied so far is committed with
            # its log and seq, and the request goes on in a transaction of its own.
            changed_schema = False

            def commit_so_far() -> int:
                """Commit, begin again; the client's last applied seq now: another server
                process may have applied this request meanwhile (sent again after a lost
                answer), and the loop then answers its mutations from the log."""
                self._record(conn, req.client_id, logged, last, now)
                logged.clear()
                self.store.continue_anew(conn)
                return _last_seq(conn, req.client_id)

            i = 0
            while i < len(mutations):
                m = mutations[i]
                if m.seq <= last:
                    results.append(self._replay(conn, req.client_id, m, last))
                    i += 1
                    continue
                if i >= tried:
                    run = self._insert_run(mutations, i, writable)
                    tried = i + max(1, len(run[1]) if run else 1)
                    prepared = None if run is None else prepare_batch(self, *run)
                    changed_schema |= prepared is not None and self.store.batch_changes_schema
                    if run is not None and write_batch(self, conn, principal, *run, prepared):
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
                    if prepared is not None and changed_schema:  # its savepoint rolled back
                        last = commit_so_far()
                        changed_schema = False
                        continue  # the run one by one (or from the log: see commit_so_far)
                result = self._apply_one(conn, principal, req.client_id, m, unit.name, writable)
                logged.append((req.client_id, m.seq, m.id, _result_enc.encode(result)))
                results.append(result)
                last = m.seq
                i += 1
                if changed_schema and result.status != "applied":  # rolled back, mostly
                    last = commit_so_far()
                    changed_schema = False
            self._record(conn, req.client_id, logged, last, now)
            conn.execute(
                mutation_log.delete().where(
                    mutation_log.c.client_id == req.client_id,
                    mutation_log.c.seq <= last - LOG_RETENTION,
                )
            )
        return PushResults(results=results, last_seq=last)

    @staticmethod
    def _record(
        conn: Connection,
        client_id: str,
        logged: list[tuple[str, int, str, bytes]],
        last: int,
        now: str,
    ) -> None:
        """Log the results in ``logged`` and move the client's last applied seq to ``last``:
        with them, a request sent again is answered from the log up to there."""
        if logged:
            _log_results(conn, logged)
        conn.execute(
            clients.update()
            .where(clients.c.client_id == client_id)
            .values(last_seq=last, last_seen=now)
        )

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

    def _replay(self, conn: Connection, client_id: str, m: Mutation, last: int) -> MutationResult:
        """The logged result of ``m``, whose seq is at or below ``last``, the client's last
        applied one."""
        row = conn.execute(
            sa.select(mutation_log.c.mutation_id, mutation_log.c.result).where(
                mutation_log.c.client_id == client_id, mutation_log.c.seq == m.seq
            )
        ).first()
        if row is None and m.seq <= last - LOG_RETENTION:
            # Older than the log's retention: it was applied long ago.
            return MutationResult(seq=m.seq, id=m.id, status="applied")
        if row is None:
            # Within the log's retention every applied seq is logged: this one never was.
            # Only after renew_epoch, whose sequence continued from a later request of
            # a client that did not say where its unanswered changes start.
            reason = (
                f"seq {m.seq} arrived after later changes of this client were applied"
                " (the server's database was restored meanwhile); it was not applied:"
                " make the change again"
            )
            return MutationResult(m.seq, m.id, "rejected", reason, "out-of-order")
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
