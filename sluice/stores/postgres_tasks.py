"""The PostgreSQL task store: :class:`~sluice.tasks.store.TaskStore` on asyncpg, with the
compare-and-set rules of the SQLite store (:mod:`sluice.tasks.sqlite`), shared by every worker
and gateway of a deployment.

Invariants:

1. Every method is one transaction over its whole batch, a statement (or a few) for all its
   rows, never one per row; the ``*_in`` functions take a connection already inside a
   transaction, so the store's submit creates tasks and enqueues their messages atomically and
   a completion puts its outbox entries and dead letter with it.
2. Times are the database's clock (postgres_schema invariant 2): every time written or
   compared (leases, stage times, lapse checks) is read once per transaction from the server,
   whatever ``now`` a caller passes, so workers with wrong clocks still agree on whose lease
   is live. Only a store made with ``caller_clock`` uses the given ``now`` (the conformance
   suite drives time).
3. A claim is safe between workers racing for the same tasks: tasks first seen at the consumer
   are inserted with ``ON CONFLICT DO NOTHING`` (the unique key decides who creates one), then
   every claimed row is locked (``FOR UPDATE``, in task id order) and decided from its locked
   state as SQLite decides (RUN, DONE, BUSY with the owner's lease end, HELD). A task id
   given twice in a batch is answered twice, the second from the state the first left.
4. A task's kept payload is written by the INSERT that creates its row (the submit's, or the
   claim's), an attempt's history entry by one more statement in its completion's
   transaction, only for the completions :func:`~sluice.tasks.store.logs_attempt` picks;
   the single-task reads (``get``, ``find``) read both (:mod:`sluice.tasks.store` rules 1-3).
5. A cancel and a pause or resume are announced on
   :data:`~sluice.stores.postgres_schema.CONTROL_CHANNEL` in their own transaction (JSON
   ``{pipeline, action, task_id}``), so every process hears them at the commit.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sluice.datadir import QueuedMessage
from sluice.errors import IllegalTransition, TaskNotFound
from sluice.stores import postgres_tasks_sql as sql
from sluice.stores.postgres_messages import put_in
from sluice.stores.postgres_schema import CONTROL_CHANNEL, notify_sql
from sluice.tasks.claims import decide
from sluice.tasks.sqlite import outbox_queue
from sluice.tasks.state import FINAL, TaskState, allowed
from sluice.tasks.store import (
    AttemptEntry,
    Claim,
    ClaimResult,
    ClaimStatus,
    Completion,
    DeadLetter,
    DeadLetterRecord,
    NewTask,
    OutboxEntry,
    StoredPipeline,
    TaskRecord,
    kept,
    logs_attempt,
)

if TYPE_CHECKING:
    import asyncpg

    from sluice.stores.postgres_db import PgDatabase

    Conn = asyncpg.Connection
else:
    Conn = Any


def _firsts(task_ids: Sequence[str]) -> dict[str, int]:
    """Each id → the index of its first occurrence."""
    out: dict[str, int] = {}
    for i, task_id in enumerate(task_ids):
        out.setdefault(task_id, i)
    return out


async def create_in(conn: Conn, pipeline: str, tenant: str, tasks: Sequence[NewTask],
                    now: float | None) -> list[TaskRecord | None]:
    """Create QUEUED tasks in ``conn``'s transaction (one statement); ``None`` for an id used
    before, or earlier in ``tasks``."""
    if not tasks:
        return []
    firsts = _firsts([t.task_id for t in tasks])
    new = [tasks[i] for i in firsts.values()]
    rows = await conn.fetch(sql.CREATE, pipeline, tenant, [t.task_id for t in new],
                            [t.key for t in new], [t.received_at for t in new], now,
                            [t.payload for t in new], [t.payload_type for t in new],
                            [t.payload_size for t in new])
    made = {r[0]: r for r in rows}
    out: list[TaskRecord | None] = []
    for i, task in enumerate(tasks):
        row = made.get(task.task_id) if firsts[task.task_id] == i else None
        out.append(None if row is None else TaskRecord(
            pipeline, task.task_id, tenant, TaskState.QUEUED, 0, task.key, received_at=row[1],
            queued_at=row[2], updated_at=row[3]))
    return out


def _grouped(entries: Sequence[OutboxEntry]) -> dict[str, list[QueuedMessage]]:
    by_queue: dict[str, list[QueuedMessage]] = {}
    for e in entries:
        r = e.record
        by_queue.setdefault(outbox_queue(e.pipeline, e.destination), []).append(
            QueuedMessage(r.task_id, r.body, r.content_type, r.key, dict(r.headers) or None))
    return by_queue


async def put_outbox_in(conn: Conn, entries: Sequence[OutboxEntry], now: float | None) -> None:
    """Enqueue outbox entries in ``conn``'s transaction, each on the queue of its destination
    (:func:`~sluice.tasks.sqlite.outbox_queue`), in order. Only the messages, as SQLite's
    ``put_outbox``: a completion writes its task's ``pending`` statuses itself."""
    for queue, messages in _grouped(entries).items():
        await put_in(conn, queue, messages, now)


async def record_deliveries_in(conn: Conn, pipeline: str, destination: str,
                               statuses: Sequence[tuple[str, dict[str, object]]]) -> None:
    """Set one destination's delivery status in each task's ``delivered`` map (of a task
    given twice, the last status holds)."""
    last = {task_id: json.dumps(status) for task_id, status in statuses}
    if last:
        await conn.execute(sql.RECORD_DELIVERY, pipeline, destination, list(last),
                           list(last.values()))


async def put_dead_letter_in(conn: Conn, pipeline: str, task_id: str, letter: DeadLetter,
                             now: float | None) -> None:
    """Keep a FAILED task's message (for ``sluice dead-letters replay``)."""
    await _put_dead_letters_in(conn, pipeline, [(task_id, letter)], now)


async def _put_dead_letters_in(conn: Conn, pipeline: str,
                               letters: Sequence[tuple[str, DeadLetter]],
                               now: float | None) -> None:
    """:func:`put_dead_letter_in` for many tasks (each id once) in one statement."""
    if letters:
        await conn.execute(
            sql.PUT_DEAD_LETTERS, pipeline, [t for t, _ in letters],
            [d.body for _, d in letters], [d.content_type for _, d in letters],
            [d.key for _, d in letters],
            [json.dumps(d.headers) if d.headers else None for _, d in letters], now)


async def get_in(conn: Conn, task_id: str, pipeline: str | None, *,
                 detail: bool = False) -> list[TaskRecord]:
    """The tasks with this id (in ``pipeline``); ``detail``: with their attempt history and
    kept payload (invariant 4), one more statement."""
    columns = sql.DETAIL_COLUMNS if detail else sql.COLUMNS
    if pipeline is None:
        rows = await conn.fetch(
            f"SELECT {columns} FROM tasks WHERE task_id = $1 ORDER BY seq", task_id)
    else:
        rows = await conn.fetch(
            f"SELECT {columns} FROM tasks WHERE pipeline = $1 AND task_id = $2",
            pipeline, task_id)
    if not detail:
        return [sql.record(r) for r in rows]
    logs: dict[str, list[AttemptEntry]] = {r[0]: [] for r in rows}
    if rows:
        for a in await conn.fetch(sql.ATTEMPTS, list(logs), task_id):
            logs[a[0]].append(AttemptEntry(*tuple(a)[2:]))
    return [dataclasses.replace(sql.record(tuple(r)[:18]), attempt_log=logs[r[0]],
                                payload=r[18], payload_type=r[19], payload_size=r[20])
            for r in rows]


async def _announce(conn: Conn, pipeline: str, action: str, task_id: str | None) -> None:
    payload = json.dumps({"pipeline": pipeline, "action": action, "task_id": task_id})
    await conn.execute(f"SELECT {notify_sql('$1', '$2')}", CONTROL_CHANNEL, payload)


async def _claim(conn: Conn, pipeline: str, tenant: str, claims: Sequence[Claim], owner: str,
                 lease_s: float, now: float | None) -> list[ClaimResult]:
    firsts = _firsts([c.task_id for c in claims])
    new = [claims[i] for i in firsts.values()]
    ids = [c.task_id for c in new]
    heads = [kept(c.body, c.keep_payload_bytes) for c in new]
    head = await conn.fetchrow(sql.CLAIM_INSERT, pipeline, tenant, owner, lease_s, ids,
                               [c.key for c in new], [c.received_at for c in new],
                               [c.start for c in new], now, [c.tenant for c in new], heads,
                               [None if h is None else c.content_type
                                for c, h in zip(new, heads, strict=True)],
                               [None if h is None or c.body is None else len(c.body)
                                for c, h in zip(new, heads, strict=True)])
    assert head is not None  # one row, always
    at: float = head[0]
    inserted: set[str] = set(head[1])
    lease_until = at + lease_s
    current = {r[0]: tuple(r[1:]) for r in await conn.fetch(sql.CLAIM_LOCK, pipeline, ids)}
    out: list[ClaimResult] = []
    updates: dict[str, tuple[int, float | None]] = {}
    for claim in claims:
        if claim.task_id in inserted:
            inserted.discard(claim.task_id)
            received = claim.received_at if claim.received_at is not None else at
            first, first_start = (1, at) if claim.start else (0, None)
            out.append(ClaimResult(ClaimStatus.RUN, first, received, None, received,
                                   first_start, claim.start))
            continue
        found = current.get(claim.task_id)
        if found is None:  # deleted since the insert found it (a forgotten submit)
            out.append(ClaimResult(ClaimStatus.BUSY))
            continue
        result, row = decide(claim, found, owner, lease_until, at)
        out.append(result)
        if row is not None:
            current[claim.task_id] = row
            updates[claim.task_id] = (row[1], row[6])
    if updates:
        await conn.execute(sql.CLAIM_UPDATE, pipeline, list(updates), at, owner, lease_until,
                           [u[0] for u in updates.values()], [u[1] for u in updates.values()])
    return out


async def _start(conn: Conn, pipeline: str, task_ids: Sequence[str], owner: str,
                 now: float | None) -> list[ClaimResult]:
    times = Counter(task_ids)
    ran = {r[0]: r for r in await conn.fetch(sql.START, pipeline, owner, list(times),
                                             list(times.values()), now)}
    missing = [t for t in times if t not in ran]
    others = ({r[0]: r for r in await conn.fetch(sql.STATES, pipeline, missing)}
              if missing else {})
    seen: Counter[str] = Counter()
    out: list[ClaimResult] = []
    for task_id in task_ids:
        done = ran.get(task_id)
        if done is not None:
            attempts = done[1] - times[task_id] + 1 + seen[task_id]
            seen[task_id] += 1
            out.append(ClaimResult(ClaimStatus.RUN, attempts, done[2], None, done[3], done[4]))
            continue
        row = others.get(task_id)
        if row is None:  # gone (not a state a reserved task reaches): not ours to run
            out.append(ClaimResult(ClaimStatus.BUSY))
        elif row[1] in FINAL:
            out.append(ClaimResult(ClaimStatus.DONE, row[2], row[3]))
        elif row[1] == TaskState.PAUSED:
            out.append(ClaimResult(ClaimStatus.HELD, row[2], row[3]))
        else:
            out.append(ClaimResult(ClaimStatus.BUSY, row[2], row[3], row[4]))
    return out


async def _complete(conn: Conn, pipeline: str, completions: Sequence[Completion], owner: str,
                    now: float | None) -> list[TaskState | None]:
    firsts = _firsts([d.task_id for d in completions])
    batch = [completions[i] for i in firsts.values()]
    rows = await conn.fetch(
        sql.COMPLETE, pipeline, owner, [d.task_id for d in batch], [str(d.state) for d in batch],
        [d.result for d in batch], [d.result_type for d in batch],
        [d.error_type for d in batch], [d.error_message for d in batch],
        [d.error_traceback for d in batch], [d.state in FINAL for d in batch], now)
    written: dict[str, float] = {r[0]: r[1] for r in rows}
    ours = {i for i, d in enumerate(completions)
            if firsts[d.task_id] == i and d.task_id in written}
    others = [d.task_id for i, d in enumerate(completions) if i not in ours]
    states = ({r[0]: TaskState(r[1]) for r in await conn.fetch(sql.STATES, pipeline, others)}
              if others else {})
    at = next(iter(written.values()), None)  # the statement's one clock
    letters: list[tuple[str, DeadLetter]] = []
    entries: list[OutboxEntry] = []
    pending: dict[str, str] = {}
    for i in sorted(ours):
        done = completions[i]
        if done.dead_letter is not None:
            letters.append((done.task_id, done.dead_letter))
        if done.outbox:
            entries.extend(done.outbox)
            pending[done.task_id] = json.dumps(
                {e.destination: {"state": "pending", "at": at, "attempts": 0}
                 for e in done.outbox})
    await _put_dead_letters_in(conn, pipeline, letters, at)
    logged = [completions[i] for i in sorted(ours) if logs_attempt(completions[i])]
    if logged:
        await conn.execute(
            sql.PUT_ATTEMPTS, pipeline, [d.task_id for d in logged],
            [d.attempt for d in logged], [d.started_at for d in logged],
            [str(d.state) for d in logged], [d.error_type for d in logged],
            [d.error_message for d in logged], at)
    if entries:
        await put_outbox_in(conn, entries, at)
        await conn.execute(sql.SET_DELIVERED, pipeline, list(pending), list(pending.values()))
    out: list[TaskState | None] = []
    for i, done in enumerate(completions):
        if i in ours:
            out.append(done.state)
            continue
        state = states.get(done.task_id)
        # A final state (e.g. cancelled meanwhile) is reported so the message is finished.
        out.append(state if state in FINAL else None)
    return out


class PostgresTaskStore:
    """:class:`~sluice.tasks.store.TaskStore` on a PostgreSQL database (see the invariants)."""

    def __init__(self, db: PgDatabase, *, caller_clock: bool = False) -> None:
        self.db = db
        self.caller_clock = caller_clock

    def _now(self, now: float) -> float | None:
        """The ``now`` to bind: the caller's with ``caller_clock``, else ``None`` (the
        database's clock, invariant 2)."""
        return now if self.caller_clock else None

    async def ping(self) -> None:
        async with self.db.connection() as conn:
            await conn.fetchval("SELECT 1")

    async def create(self, pipeline: str, tenant: str, tasks: Sequence[NewTask],
                     now: float) -> list[TaskRecord | None]:
        async with self.db.transaction() as conn:
            return await create_in(conn, pipeline, tenant, tasks, self._now(now))

    async def forget_queued(self, pipeline: str, task_ids: Sequence[str]) -> None:
        async with self.db.connection() as conn:
            await conn.execute("DELETE FROM tasks WHERE pipeline = $1"
                               " AND task_id = ANY($2::text[]) AND state = 'QUEUED'",
                               pipeline, list(task_ids))

    async def claim(self, pipeline: str, tenant: str, claims: Sequence[Claim], owner: str,
                    lease_s: float, now: float) -> list[ClaimResult]:
        if not claims:
            return []
        async with self.db.transaction() as conn:
            return await _claim(conn, pipeline, tenant, claims, owner, float(lease_s),
                                self._now(now))

    async def start(self, pipeline: str, task_ids: Sequence[str], owner: str,
                    now: float) -> builtins.list[ClaimResult]:
        if not task_ids:
            return []
        async with self.db.transaction() as conn:
            return await _start(conn, pipeline, task_ids, owner, self._now(now))

    async def extend(self, pipeline: str, task_ids: Sequence[str], owner: str,
                     lease_s: float, now: float) -> builtins.list[str]:
        if not task_ids:
            return []
        async with self.db.connection() as conn:
            rows = await conn.fetch(sql.EXTEND, pipeline, list(task_ids), owner,
                                    self._now(now), float(lease_s))
        kept = {r[0] for r in rows}
        return [t for t in task_ids if t not in kept]

    async def set_paused(self, pipeline: str, paused: bool, now: float) -> None:
        async with self.db.transaction() as conn:
            await conn.execute(sql.SET_PAUSED, pipeline, paused, self._now(now))
            await _announce(conn, pipeline, "pause" if paused else "resume", None)

    async def is_paused(self, pipeline: str) -> bool:
        async with self.db.connection() as conn:
            paused = await conn.fetchval("SELECT paused FROM pipelines WHERE name = $1",
                                         pipeline)
        return bool(paused)

    async def pipelines(self) -> dict[str, StoredPipeline]:
        async with self.db.connection() as conn:
            rows = await conn.fetch(sql.PIPELINES)
        found: dict[str, StoredPipeline] = {}
        for name, tenant, state, n, paused in rows:
            entry = found.setdefault(name, StoredPipeline(name))
            if state is None:
                entry.paused = bool(paused)
                continue
            if tenant not in entry.tenants:
                entry.tenants.append(tenant)
            entry.counts[state] = entry.counts.get(state, 0) + int(n)
        return found

    async def counts(self) -> dict[tuple[str, str], int]:
        async with self.db.connection() as conn:
            rows = await conn.fetch(
                "SELECT pipeline, state, COUNT(*) FROM tasks GROUP BY pipeline, state")
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def complete(self, pipeline: str, completions: Sequence[Completion], owner: str,
                       now: float) -> list[TaskState | None]:
        if not completions:
            return []
        async with self.db.transaction() as conn:
            return await _complete(conn, pipeline, completions, owner, self._now(now))

    async def release(self, pipeline: str, task_ids: Sequence[str], owner: str) -> None:
        if task_ids:
            async with self.db.connection() as conn:
                await conn.execute(sql.RELEASE, pipeline, list(task_ids), owner)

    async def unclaim(self, pipeline: str, task_ids: Sequence[str], owner: str, *,
                      started: bool = True) -> None:
        if task_ids:
            statement = sql.UNCLAIM.format(undo=sql.UNCLAIM_UNDO if started else "")
            async with self.db.connection() as conn:
                await conn.execute(statement, pipeline, list(task_ids), owner)

    async def get(self, task_id: str, pipeline: str | None = None) -> TaskRecord:
        async with self.db.connection() as conn:
            found = await get_in(conn, task_id, pipeline, detail=True)
        if not found:
            raise TaskNotFound(task_id)
        return found[0]

    async def exists(self, pipeline: str, task_id: str) -> bool:
        async with self.db.connection() as conn:
            row = await conn.fetchval(
                "SELECT 1 FROM tasks WHERE pipeline = $1 AND task_id = $2", pipeline, task_id)
        return row is not None

    async def find(self, task_id: str) -> builtins.list[TaskRecord]:
        async with self.db.connection() as conn:
            return await get_in(conn, task_id, None, detail=True)

    async def list(self, pipeline: str | None = None, state: TaskState | None = None,
                   limit: int = 50, before_seq: int | None = None,
                   pipelines: Sequence[str] | None = None) -> builtins.list[TaskRecord]:
        where: builtins.list[str] = []
        args: builtins.list[object] = []
        for condition, value in (("pipeline = ${}", pipeline),
                                 ("pipeline = ANY(${}::text[])",
                                  None if pipelines is None else builtins.list(pipelines)),
                                 ("state = ${}", None if state is None else str(state)),
                                 ("seq < ${}", before_seq)):
            if value is not None:
                args.append(value)
                where.append(condition.format(len(args)))
        statement = f"SELECT {sql.COLUMNS} FROM tasks"
        if where:
            statement += " WHERE " + " AND ".join(where)
        statement += f" ORDER BY seq DESC LIMIT ${len(args) + 1}"
        async with self.db.connection() as conn:
            rows = await conn.fetch(statement, *args, limit)
        return [sql.record(r) for r in rows]

    async def stats(self, pipeline: str | None = None) -> builtins.list[TaskRecord]:
        statement = f"SELECT {sql.COLUMNS} FROM tasks"
        args: tuple[str, ...] = ()
        if pipeline is not None:
            statement += " WHERE pipeline = $1"
            args = (pipeline,)
        async with self.db.connection() as conn:
            rows = await conn.fetch(statement + " ORDER BY seq", *args)
        return [sql.record(r) for r in rows]

    async def transition(self, pipeline: str, task_id: str, wanted: TaskState,
                         now: float) -> TaskRecord:
        async with self.db.transaction() as conn:
            row = await conn.fetchrow(sql.TRANSITION_LOCK, pipeline, task_id)
            if row is None:
                raise TaskNotFound(task_id)
            current = TaskState(row[3])
            if not allowed(current, wanted) or wanted == TaskState.RUNNING:
                raise IllegalTransition(task_id, str(current), str(wanted))
            changed = await conn.fetchrow(sql.TRANSITION, pipeline, task_id, str(wanted),
                                          wanted in FINAL, self._now(now), str(current))
            assert changed is not None  # the row is locked: the compare-and-set holds
            if wanted == TaskState.CANCELLED:
                await _announce(conn, pipeline, "cancel", task_id)
            return sql.record(changed)

    async def dead_letters(self, pipeline: str, task_ids: Sequence[str] | None = None,
                           limit: int = 100, replayed: bool = True,
                           ) -> builtins.list[DeadLetterRecord]:
        statement = sql.DEAD_LETTERS
        args: builtins.list[object] = [pipeline]
        if task_ids is not None:
            args.append(builtins.list(task_ids))
            statement += f" AND d.task_id = ANY(${len(args)}::text[])"
        if not replayed:
            statement += " AND d.replayed_as IS NULL"
        statement += f" ORDER BY d.failed_at DESC LIMIT ${len(args) + 1}"
        async with self.db.connection() as conn:
            rows = await conn.fetch(statement, *args, limit)
        return [DeadLetterRecord(
            r[0], r[1], DeadLetter(r[2], r[3], r[4], json.loads(r[5]) if r[5] else None),
            r[6], r[7], r[8], r[9] or 0, r[10], r[11]) for r in rows]

    async def mark_replayed(self, pipeline: str, replays: Sequence[tuple[str, str]],
                            now: float) -> None:
        last = dict(replays)
        if last:
            async with self.db.connection() as conn:
                await conn.execute(sql.MARK_REPLAYED, pipeline, builtins.list(last),
                                   builtins.list(last.values()), self._now(now))
