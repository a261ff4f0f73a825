"""The SQLite task store (embedded default), in the data directory's database.

Every method is one transaction over a batch; the ``*_in`` functions take a connection already
inside a transaction, so a submit can create its tasks and enqueue their messages atomically
(see :func:`sluice.connectors.embedded.submit`). A task's attempt history and kept payload
follow the rules of :mod:`sluice.tasks.store`: the payload in the task row's own INSERT, an
attempt's entry in its completion's transaction, both read only by :meth:`SqliteTaskStore.get`
and :meth:`SqliteTaskStore.find`.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import sqlite3
from collections.abc import Sequence

from sluice.datadir import Database, QueuedMessage, put_in
from sluice.errors import IllegalTransition, TaskNotFound
from sluice.tasks import sqlbatch
from sluice.tasks.claims import decide
from sluice.tasks.sqlite_catalog import stored_pipelines_in
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

_COLUMNS = (
    "pipeline, task_id, tenant, state, attempts, key, result, result_type, error_type, "
    "error_message, received_at, queued_at, started_at, finished_at, updated_at, seq, delivered,"
    " error_traceback"
)


# The single-task reads' columns: _COLUMNS, then the kept payload (sluice.tasks.store rule 3).
_DETAIL_COLUMNS = _COLUMNS + ", payload, payload_type, payload_size"

_ATTEMPTS = ("SELECT attempt, started_at, ended_at, outcome, error_type, error_message"
             " FROM task_attempts WHERE pipeline = ? AND task_id = ? ORDER BY attempt")

# An attempt's entry (sluice.tasks.store rule 1), written with its completion (sqlbatch).
_PUT_ATTEMPTS = (
    "INSERT OR REPLACE INTO task_attempts (pipeline, task_id, attempt, started_at, ended_at,"
    " outcome, error_type, error_message)")


def _record(row: sqlite3.Row | tuple[object, ...]) -> TaskRecord:
    values = list(row)
    values[3] = TaskState(values[3])
    values[16] = json.loads(values[16]) if values[16] else None  # delivered
    return TaskRecord(*values)


def _detailed(conn: sqlite3.Connection, row: sqlite3.Row | tuple[object, ...]) -> TaskRecord:
    """A row of _DETAIL_COLUMNS as a record with its attempt history (one more SELECT)."""
    values = list(row)
    payload, payload_type, payload_size = values[18:21]
    base = _record(tuple(values[:18]))
    log = [AttemptEntry(*a) for a in conn.execute(_ATTEMPTS, (base.pipeline, base.task_id))]
    return dataclasses.replace(base, attempt_log=log, payload=payload,
                               payload_type=payload_type, payload_size=payload_size)


def put_attempts_in(conn: sqlite3.Connection, pipeline: str, done: Sequence[Completion],
                    now: float) -> None:
    """Write the attempt entries of written completions (those :func:`logs_attempt` picks)."""
    sqlbatch.insert(conn, _PUT_ATTEMPTS, [
        (pipeline, d.task_id, d.attempt, d.started_at, now, str(d.state), d.error_type,
         d.error_message) for d in done])


def create_in(conn: sqlite3.Connection, pipeline: str, tenant: str, tasks: Sequence[NewTask],
              now: float) -> list[TaskRecord | None]:
    out: list[TaskRecord | None] = []
    for task in tasks:
        received = task.received_at if task.received_at is not None else now
        cur = conn.execute(
            "INSERT INTO tasks (pipeline, task_id, tenant, state, key, received_at, queued_at,"
            " updated_at, payload, payload_type, payload_size)"
            " VALUES (?, ?, ?, 'QUEUED', ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (pipeline, task_id) DO NOTHING",
            (pipeline, task.task_id, tenant, task.key, received, now, now, task.payload,
             task.payload_type, task.payload_size),
        )
        out.append(
            TaskRecord(pipeline, task.task_id, tenant, TaskState.QUEUED, 0, task.key,
                       received_at=received, queued_at=now, updated_at=now)
            if cur.rowcount == 1 else None
        )
    return out


OUTBOX_PREFIX = "sluice.outbox."


def outbox_queue(pipeline: str, destination: str) -> str:
    """The embedded queue that holds the outbox of one destination (by its label)."""
    return f"{OUTBOX_PREFIX}{pipeline}.{destination}"


def put_outbox(conn: sqlite3.Connection, entries: Sequence[OutboxEntry], now: float) -> None:
    """Enqueue a completion's outbox entries in ``conn``'s transaction: each on the embedded
    queue of its destination (:func:`outbox_queue`)."""
    for e in entries:
        r = e.record
        put_in(conn, outbox_queue(e.pipeline, e.destination),
               [QueuedMessage(r.task_id, r.body, r.content_type, r.key, dict(r.headers) or None)],
               now)


_COMPLETE = (
    "UPDATE tasks SET state = ?, result = ?, result_type = ?, error_type = ?,"
    " error_message = ?, error_traceback = ?, finished_at = ?, updated_at = ?,"
    " lease_owner = CASE WHEN ? THEN NULL ELSE lease_owner END, lease_until = NULL"
    " WHERE pipeline = ? AND task_id = ? AND state = 'RUNNING' AND lease_owner = ?")


# _COMPLETE for many rows in one statement (sqlbatch): each row is _complete_values.
_COMPLETE_BATCH = (
    "UPDATE tasks SET state = v.column1, result = v.column2, result_type = v.column3,"
    " error_type = v.column4, error_message = v.column5, error_traceback = v.column6,"
    " finished_at = v.column7, updated_at = v.column8,"
    " lease_owner = CASE WHEN v.column9 THEN NULL ELSE tasks.lease_owner END, lease_until = NULL"
    " FROM ({values}) AS v WHERE tasks.pipeline = ? AND tasks.task_id = v.column10"
    " AND tasks.state = 'RUNNING' AND tasks.lease_owner = ?")


def _complete_values(done: Completion, now: float) -> tuple[object, ...]:
    final = done.state in FINAL
    return (str(done.state), done.result, done.result_type, done.error_type, done.error_message,
            done.error_traceback, now if final else None, now, final, done.task_id)


def _complete_row(done: Completion, pipeline: str, owner: str,
                  now: float) -> tuple[object, ...]:
    final = done.state in FINAL
    return (str(done.state), done.result, done.result_type, done.error_type, done.error_message,
            done.error_traceback, now if final else None, now, final, pipeline, done.task_id, owner)


def put_dead_letter_in(conn: sqlite3.Connection, pipeline: str, task_id: str,
                       letter: DeadLetter, now: float) -> None:
    """Keep a FAILED task's message (for ``sluice dead-letters replay``)."""
    conn.execute(
        "INSERT INTO dead_letters (pipeline, task_id, body, content_type, key, headers,"
        " failed_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (pipeline, task_id) DO UPDATE"
        " SET body = excluded.body, content_type = excluded.content_type, key = excluded.key,"
        " headers = excluded.headers, failed_at = excluded.failed_at",
        (pipeline, task_id, letter.body, letter.content_type, letter.key,
         json.dumps(letter.headers) if letter.headers else None, now))


def record_deliveries_in(conn: sqlite3.Connection, pipeline: str, destination: str,
                         statuses: Sequence[tuple[str, dict[str, object]]]) -> None:
    """Set one destination's delivery status in each task's ``delivered`` map."""
    conn.executemany(
        "UPDATE tasks SET delivered = json_set(COALESCE(delivered, '{}'), ?, json(?))"
        " WHERE pipeline = ? AND task_id = ?",
        [(f'$."{destination}"', json.dumps(status), pipeline, task_id)
         for task_id, status in statuses])


def get_in(conn: sqlite3.Connection, task_id: str, pipeline: str | None, *,
           detail: bool = False) -> list[TaskRecord]:
    """The tasks with this id (in ``pipeline``); ``detail``: with their attempt history and
    kept payload (sluice.tasks.store rule 3)."""
    columns = _DETAIL_COLUMNS if detail else _COLUMNS
    if pipeline is None:
        rows = conn.execute(f"SELECT {columns} FROM tasks WHERE task_id = ? ORDER BY seq",
                            (task_id,))
    else:
        rows = conn.execute(
            f"SELECT {columns} FROM tasks WHERE pipeline = ? AND task_id = ?",
            (pipeline, task_id),
        )
    if detail:
        return [_detailed(conn, r) for r in rows.fetchall()]
    return [_record(r) for r in rows.fetchall()]


class SqliteTaskStore:
    """:class:`~sluice.tasks.store.TaskStore` on the data directory's SQLite database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def ping(self) -> None:
        await self.db.read(lambda c: c.execute("SELECT 1").fetchone())

    async def create(self, pipeline: str, tenant: str, tasks: Sequence[NewTask],
                     now: float) -> list[TaskRecord | None]:
        return await self.db.run(lambda c: create_in(c, pipeline, tenant, tasks, now))

    async def forget_queued(self, pipeline: str, task_ids: Sequence[str]) -> None:
        rows = [(pipeline, t) for t in task_ids]
        await self.db.run(lambda c: c.executemany(
            "DELETE FROM tasks WHERE pipeline = ? AND task_id = ? AND state = 'QUEUED'", rows))

    async def claim(self, pipeline: str, tenant: str, claims: Sequence[Claim], owner: str,
                    lease_s: float, now: float) -> list[ClaimResult]:
        return await self.db.run(
            lambda c: self._claim(c, pipeline, tenant, claims, owner, now + lease_s, now)
        )

    @staticmethod
    def _claim(conn: sqlite3.Connection, pipeline: str, tenant: str, claims: Sequence[Claim],
               owner: str, lease_until: float, now: float) -> list[ClaimResult]:
        ids = [c.task_id for c in claims]
        current: dict[str, tuple[str, int, float | None, str | None, float | None,
                                 float | None, float | None]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in conn.execute(
                "SELECT task_id, state, attempts, lease_until, lease_owner, received_at,"
                f" queued_at, started_at FROM tasks WHERE pipeline = ? AND task_id IN ({marks})",
                (pipeline, *chunk),
            ):
                current[row[0]] = (row[1], row[2], row[3], row[4], row[5], row[6], row[7])
        out: list[ClaimResult] = []
        updates: list[tuple[object, ...]] = []
        inserts: list[tuple[object, ...]] = []
        for claim in claims:
            found = current.get(claim.task_id)
            if found is None:
                received: float | None = (
                    claim.received_at if claim.received_at is not None else now)
                first, first_start = (1, now) if claim.start else (0, None)
                head = kept(claim.body, claim.keep_payload_bytes)
                inserts.append((pipeline, claim.task_id, claim.tenant or tenant, "RUNNING",
                                first, claim.key,
                                received, received, first_start, now, owner, lease_until,
                                head, claim.content_type if head is not None else None,
                                None if head is None or claim.body is None
                                else len(claim.body)))
                current[claim.task_id] = ("RUNNING", first, lease_until, owner, received,
                                          received, first_start)
                out.append(ClaimResult(ClaimStatus.RUN, first, received, None, received,
                                       first_start, claim.start))
                continue
            result, row = decide(claim, found, owner, lease_until, now)
            out.append(result)
            if row is not None:
                current[claim.task_id] = row
                updates.append((row[1], row[6], now, owner, lease_until, claim.task_id))
        # A statement per chunk, not per row (sqlbatch); a repeated id is inserted once above,
        # and of its updates the last one (made from the state the earlier ones left) holds.
        sqlbatch.insert(conn, "INSERT INTO tasks (pipeline, task_id, tenant, state, attempts,"
                        " key, received_at, queued_at, started_at, updated_at, lease_owner,"
                        " lease_until, payload, payload_type, payload_size)", inserts)
        sqlbatch.update_from(
            conn, "UPDATE tasks SET state = 'RUNNING', attempts = v.column1, started_at ="
            " v.column2, updated_at = v.column3, lease_owner = v.column4, lease_until ="
            " v.column5 FROM ({values}) AS v WHERE tasks.pipeline = ? AND tasks.task_id ="
            " v.column6", list({row[-1]: row for row in updates}.values()), (pipeline,))
        return out

    async def start(self, pipeline: str, task_ids: Sequence[str], owner: str,
                    now: float) -> builtins.list[ClaimResult]:
        return await self.db.run(lambda c: self._start(c, pipeline, task_ids, owner, now))

    @staticmethod
    def _start(conn: sqlite3.Connection, pipeline: str, task_ids: Sequence[str], owner: str,
               now: float) -> builtins.list[ClaimResult]:
        out: builtins.list[ClaimResult] = []
        for task_id in task_ids:
            row = conn.execute(
                "UPDATE tasks SET attempts = attempts + 1, started_at = COALESCE(started_at, ?),"
                " updated_at = ? WHERE pipeline = ? AND task_id = ? AND state = 'RUNNING'"
                " AND lease_owner = ? RETURNING attempts, received_at, queued_at, started_at",
                (now, now, pipeline, task_id, owner)).fetchone()
            if row is not None:
                out.append(ClaimResult(ClaimStatus.RUN, row[0], row[1], None, row[2], row[3]))
                continue
            row = conn.execute(
                "SELECT state, attempts, received_at, lease_until FROM tasks"
                " WHERE pipeline = ? AND task_id = ?", (pipeline, task_id)).fetchone()
            if row is None:  # gone (not a state a reserved task reaches): not ours to run
                out.append(ClaimResult(ClaimStatus.BUSY))
            elif row[0] in FINAL:
                out.append(ClaimResult(ClaimStatus.DONE, row[1], row[2]))
            elif row[0] == TaskState.PAUSED:
                out.append(ClaimResult(ClaimStatus.HELD, row[1], row[2]))
            else:
                out.append(ClaimResult(ClaimStatus.BUSY, row[1], row[2], row[3]))
        return out

    async def extend(self, pipeline: str, task_ids: Sequence[str], owner: str,
                     lease_s: float, now: float) -> builtins.list[str]:
        def write(conn: sqlite3.Connection) -> builtins.list[str]:
            lost = []
            for task_id in task_ids:
                cur = conn.execute(
                    "UPDATE tasks SET lease_until = ? WHERE pipeline = ? AND task_id = ?"
                    " AND lease_owner = ? AND state = 'RUNNING'",
                    (now + lease_s, pipeline, task_id, owner))
                if cur.rowcount == 0:
                    lost.append(task_id)
            return lost

        return await self.db.run(write)

    async def set_paused(self, pipeline: str, paused: bool, now: float) -> None:
        await self.db.run(lambda c: c.execute(
            "INSERT INTO pipelines (name, paused, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET paused = excluded.paused,"
            " updated_at = excluded.updated_at", (pipeline, int(paused), now)))

    async def is_paused(self, pipeline: str) -> bool:
        row = await self.db.read(lambda c: c.execute(
            "SELECT paused FROM pipelines WHERE name = ?", (pipeline,)).fetchone())
        return bool(row and row[0])

    async def pipelines(self) -> dict[str, StoredPipeline]:
        return await self.db.read(stored_pipelines_in)

    async def counts(self) -> dict[tuple[str, str], int]:
        """(pipeline, state) → number of tasks; for metrics."""
        rows = await self.db.read(lambda c: c.execute(
            "SELECT pipeline, state, COUNT(*) FROM tasks GROUP BY pipeline, state").fetchall())
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def release(self, pipeline: str, task_ids: Sequence[str], owner: str) -> None:
        rows = [(pipeline, t, owner) for t in task_ids]
        await self.db.run(lambda c: c.executemany(
            "UPDATE tasks SET lease_until = 0 WHERE pipeline = ? AND task_id = ?"
            " AND lease_owner = ? AND state = 'RUNNING'", rows))

    async def unclaim(self, pipeline: str, task_ids: Sequence[str], owner: str, *,
                      started: bool = True) -> None:
        rows = [(pipeline, t, owner) for t in task_ids]
        undo = ("attempts = MAX(attempts - 1, 0),"
                " started_at = CASE WHEN attempts <= 1 THEN NULL ELSE started_at END,"
                if started else "")
        await self.db.run(lambda c: c.executemany(
            f"UPDATE tasks SET state = 'QUEUED', {undo} lease_owner = NULL, lease_until = NULL"
            " WHERE pipeline = ? AND task_id = ? AND lease_owner = ? AND state = 'RUNNING'",
            rows))

    async def complete(self, pipeline: str, completions: Sequence[Completion], owner: str,
                       now: float) -> list[TaskState | None]:
        return await self.db.run(lambda c: self._complete(c, pipeline, completions, owner, now))

    @staticmethod
    def _complete(conn: sqlite3.Connection, pipeline: str, completions: Sequence[Completion],
                  owner: str, now: float) -> list[TaskState | None]:
        out: list[TaskState | None] = []
        if not any(done.outbox or done.dead_letter for done in completions):
            # The common batch in one statement: if every row was written, that is all.
            conn.execute("SAVEPOINT batch")
            changed = sqlbatch.update_from(
                conn, _COMPLETE_BATCH, [_complete_values(d, now) for d in completions],
                (pipeline, owner))
            if changed == len(completions):
                # Rule 1 of sluice.tasks.store (logs_attempt), inlined: this path is hot.
                logged = [d for d in completions
                          if d.attempt > 1 or (d.attempt and d.state is TaskState.RETRYING)]
                if logged:
                    put_attempts_in(conn, pipeline, logged, now)
                conn.execute("RELEASE batch")
                return [done.state for done in completions]
            conn.execute("ROLLBACK TO batch")  # some were not ours: one by one, below
            conn.execute("RELEASE batch")
        for done in completions:
            cur = conn.execute(_COMPLETE, _complete_row(done, pipeline, owner, now))
            if cur.rowcount == 1:
                if logs_attempt(done):
                    put_attempts_in(conn, pipeline, [done], now)
                if done.dead_letter is not None:
                    put_dead_letter_in(conn, pipeline, done.task_id, done.dead_letter, now)
                if done.outbox:
                    put_outbox(conn, done.outbox, now)
                    pending = {e.destination: {"state": "pending", "at": now, "attempts": 0}
                               for e in done.outbox}
                    conn.execute("UPDATE tasks SET delivered = ? WHERE pipeline = ? AND"
                                 " task_id = ?", (json.dumps(pending), pipeline, done.task_id))
                out.append(done.state)
                continue
            row = conn.execute("SELECT state FROM tasks WHERE pipeline = ? AND task_id = ?",
                               (pipeline, done.task_id)).fetchone()
            state = TaskState(row[0]) if row else None
            # A final state (e.g. cancelled meanwhile) is reported so the message is finished.
            out.append(state if state in FINAL else None)
        return out

    async def get(self, task_id: str, pipeline: str | None = None) -> TaskRecord:
        found = await self.db.read(lambda c: get_in(c, task_id, pipeline, detail=True))
        if not found:
            raise TaskNotFound(task_id)
        return found[0]

    async def exists(self, pipeline: str, task_id: str) -> bool:
        """Whether ``task_id`` is used in ``pipeline``."""
        row = await self.db.read(lambda c: c.execute(
            "SELECT 1 FROM tasks WHERE pipeline = ? AND task_id = ?",
            (pipeline, task_id)).fetchone())
        return row is not None

    async def find(self, task_id: str) -> builtins.list[TaskRecord]:
        """Every task with this id, across pipelines (with their detail, as :meth:`get`)."""
        return await self.db.read(lambda c: get_in(c, task_id, None, detail=True))

    async def list(self, pipeline: str | None = None, state: TaskState | None = None,
                   limit: int = 50, before_seq: int | None = None,
                   pipelines: Sequence[str] | None = None) -> builtins.list[TaskRecord]:
        """Newest first; ``pipelines`` restricts to a set (a tenant's pipelines)."""
        where: builtins.list[str] = []
        args: builtins.list[object] = []
        if pipeline is not None:
            where.append("pipeline = ?")
            args.append(pipeline)
        if pipelines is not None:
            where.append(f"pipeline IN ({','.join('?' * len(pipelines))})")
            args.extend(pipelines)
        if state is not None:
            where.append("state = ?")
            args.append(str(state))
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        sql = f"SELECT {_COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        rows = await self.db.read(lambda c: c.execute(sql, (*args, limit)).fetchall())
        return [_record(r) for r in rows]

    async def transition(self, pipeline: str, task_id: str, wanted: TaskState,
                         now: float) -> TaskRecord:
        def change(conn: sqlite3.Connection) -> TaskRecord:
            found = get_in(conn, task_id, pipeline)
            if not found:
                raise TaskNotFound(task_id)
            current = found[0].state
            if not allowed(current, wanted) or wanted == TaskState.RUNNING:
                raise IllegalTransition(task_id, str(current), str(wanted))
            conn.execute(
                "UPDATE tasks SET state = ?, updated_at = ?,"
                " finished_at = CASE WHEN ? THEN ? ELSE finished_at END"
                " WHERE pipeline = ? AND task_id = ? AND state = ?",
                (str(wanted), now, wanted in FINAL, now, pipeline, task_id, str(current)),
            )
            return get_in(conn, task_id, pipeline)[0]

        return await self.db.run(change)

    async def dead_letters(self, pipeline: str, task_ids: Sequence[str] | None = None,
                           limit: int = 100, replayed: bool = True,
                           ) -> builtins.list[DeadLetterRecord]:
        """A pipeline's dead-lettered tasks, newest first (only ``task_ids`` if given; without
        those already replayed unless ``replayed``)."""
        sql = ("SELECT d.pipeline, d.task_id, d.body, d.content_type, d.key, d.headers,"
               " d.failed_at, t.error_type, t.error_message, t.attempts, d.replayed_as,"
               " d.replayed_at FROM dead_letters d LEFT JOIN tasks t"
               " ON t.pipeline = d.pipeline AND t.task_id = d.task_id WHERE d.pipeline = ?")
        args: builtins.list[object] = [pipeline]
        if task_ids is not None:
            sql += f" AND d.task_id IN ({','.join('?' * len(task_ids))})"
            args.extend(task_ids)
        if not replayed:
            sql += " AND d.replayed_as IS NULL"
        sql += " ORDER BY d.failed_at DESC LIMIT ?"
        rows = await self.db.read(lambda c: c.execute(sql, (*args, limit)).fetchall())
        return [DeadLetterRecord(
            r[0], r[1], DeadLetter(r[2], r[3], r[4], json.loads(r[5]) if r[5] else None),
            r[6], r[7], r[8], r[9] or 0, r[10], r[11]) for r in rows]

    async def mark_replayed(self, pipeline: str, replays: Sequence[tuple[str, str]],
                            now: float) -> None:
        """Link each dead-lettered task to its replay: (task id, the replay's task id)."""
        await self.db.run(lambda c: c.executemany(
            "UPDATE dead_letters SET replayed_as = ?, replayed_at = ?"
            " WHERE pipeline = ? AND task_id = ?",
            [(new, now, pipeline, old) for old, new in replays]))

    async def stats(self, pipeline: str | None = None) -> builtins.list[TaskRecord]:
        """Every task (of a pipeline), oldest first: the input of ``sluice tasks summary``."""
        sql = f"SELECT {_COLUMNS} FROM tasks"
        args: tuple[str, ...] = ()
        if pipeline is not None:
            sql += " WHERE pipeline = ?"
            args = (pipeline,)
        rows = await self.db.read(lambda c: c.execute(sql + " ORDER BY seq", args).fetchall())
        return [_record(r) for r in rows]
