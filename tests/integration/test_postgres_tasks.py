"""The PostgreSQL task store on the real server, beyond the TaskStore contract
(tests/conformance/test_task_store.py runs that on it with the caller's clock).

- With the database's clock, leases and stage times are the server's, whatever ``now`` a worker
  passes: a claim at now=0 and another at now=1e12 agree on whose lease is live.
- Two stores on one URL (two machines) racing to claim the same tasks, in batches of shuffled
  order, created at submit or first seen at the consumer: each task runs for exactly one of
  them, and no claim fails (no deadlock); two submitting the same ids create each once.
- A cancel, a pause and a resume are announced on the control channel with their JSON; a
  refused change and a task-level pause announce nothing.
- A batch of 1,000 claims, starts, extensions and completions (with outbox entries and dead
  letters) is one transaction of a few statements per call; the outbox entries, pending
  statuses and dead letters carry the completion's time; a delivery status is merged into
  the task's map.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sluice.connectors.base import SinkRecord
from sluice.errors import IllegalTransition
from sluice.stores.postgres_db import PgDatabase
from sluice.stores.postgres_schema import CONTROL_CHANNEL
from sluice.stores.postgres_tasks import PostgresTaskStore, record_deliveries_in
from sluice.tasks.sqlite import outbox_queue
from sluice.tasks.state import TaskState
from sluice.tasks.store import Claim, ClaimStatus, Completion, DeadLetter, NewTask, OutboxEntry
from tests.helpers.postgres import pg_url  # noqa: F401
from tests.helpers.waiting import wait_until

P = "pipe"
T = "tenant"
LEASE_S = 30.0
BATCHES = 4  # concurrent claims per machine


class CountingDb(PgDatabase):
    """A :class:`PgDatabase` that counts the transactions (a ``transaction()`` block, or a
    ``connection()`` block, whose statements each commit by themselves) and statements."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.transactions = 0
        self.statements = 0

    def counted(self, conn: Any) -> Any:
        db = self

        class Counted:
            def __getattr__(self, name: str) -> Any:
                found = getattr(conn, name)
                if name not in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
                    return found

                async def call(*args: Any, **kwargs: Any) -> Any:
                    db.statements += 1
                    return await found(*args, **kwargs)

                return call

        return Counted()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        self.transactions += 1
        async with super().transaction() as conn:
            yield self.counted(conn)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        self.transactions += 1
        async with super().connection() as conn:
            yield self.counted(conn)

    def reset(self) -> None:
        self.transactions = self.statements = 0


MakeDb = Callable[[], CountingDb]


@pytest.fixture
async def machines(pg_url: str) -> AsyncIterator[MakeDb]:  # noqa: F811
    """Each call: one more database handle on the test's schema (one more machine)."""
    opened: list[CountingDb] = []

    def make() -> CountingDb:
        opened.append(CountingDb(pg_url))
        return opened[-1]

    yield make
    for db in opened:
        await db.close()


async def db_now(db: PgDatabase) -> float:
    async with db.connection() as conn:
        return float(await conn.fetchval("SELECT extract(epoch FROM now())::float8"))


async def row(db: PgDatabase, task_id: str) -> Any:
    async with db.connection() as conn:
        return await conn.fetchrow("SELECT * FROM tasks WHERE pipeline = $1 AND task_id = $2",
                                   P, task_id)


async def test_leases_and_times_are_the_database_clock(machines: MakeDb) -> None:
    db = machines()
    w1, w2 = PostgresTaskStore(db), PostgresTaskStore(machines())
    (made,) = await w1.create(P, T, [NewTask("a")], now=0.0)
    assert made is not None and made.queued_at is not None and made.queued_at > 1e9
    before = await db_now(db)
    (res,) = await w1.claim(P, T, [Claim("a")], "w1", LEASE_S, now=0.0)  # a clock in 1970
    after = await db_now(db)
    assert res.status == ClaimStatus.RUN
    assert res.started_at is not None and before <= res.started_at <= after
    stored = await row(db, "a")
    assert before + LEASE_S <= stored["lease_until"] <= after + LEASE_S
    assert stored["started_at"] == res.started_at
    for wrong in (1e12, 0.0):  # far ahead (its own lease would lapse at once) and behind
        (busy,) = await w2.claim(P, T, [Claim("a")], "w2", LEASE_S, now=wrong)
        assert (busy.status, busy.lease_until) == (ClaimStatus.BUSY, stored["lease_until"])
    assert await w1.extend(P, ["a"], "w1", 100.0, now=1e12) == []
    extended = (await row(db, "a"))["lease_until"]
    assert extended - 100.0 <= await db_now(db) < extended
    assert await w1.complete(P, [Completion("a", TaskState.SUCCEEDED)], "w1", now=5.0) == [
        TaskState.SUCCEEDED]
    done = await w1.get("a", P)
    assert done.finished_at is not None and before <= done.finished_at <= await db_now(db)


@pytest.mark.parametrize("submitted_every", [1, 2, 0], ids=["submitted", "half", "unseen"])
async def test_two_machines_racing_for_the_same_tasks_run_each_once(
        machines: MakeDb, submitted_every: int) -> None:
    ids = [f"t{i:03d}" for i in range(200)]
    stores = {"m1": PostgresTaskStore(machines()), "m2": PostgresTaskStore(machines())}
    for store in stores.values():  # pools made and grown first, so the claims overlap
        await asyncio.gather(*(store.ping() for _ in range(BATCHES)))
    # Created at submit (every one, every other one, none), or first seen at the consumer.
    if submitted_every:
        await stores["m1"].create(P, T, [NewTask(t) for t in ids[::submitted_every]], now=0.0)
    rng = random.Random(7)

    async def worker(owner: str) -> list[tuple[str, ClaimStatus]]:
        order = ids[:]
        rng.shuffle(order)
        size = len(order) // BATCHES
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        answers = await asyncio.gather(*(
            stores[owner].claim(P, T, [Claim(t) for t in b], owner, LEASE_S, now=0.0)
            for b in batches))
        return [(c, r.status) for b, got in zip(batches, answers, strict=True)
                for c, r in zip(b, got, strict=True)]

    results = await asyncio.gather(worker("m1"), worker("m2"))
    runs: dict[str, list[str]] = {t: [] for t in ids}
    for owner, answers in zip(("m1", "m2"), results, strict=True):
        assert len(answers) == len(ids)
        for task_id, status in answers:
            assert status in (ClaimStatus.RUN, ClaimStatus.BUSY)
            if status == ClaimStatus.RUN:
                runs[task_id].append(owner)
    assert all(len(owners) == 1 for owners in runs.values()), runs
    db = machines()
    async with db.connection() as conn:
        stored = {r["task_id"]: r for r in await conn.fetch(
            "SELECT task_id, state, attempts, lease_owner FROM tasks WHERE pipeline = $1", P)}
    assert sorted(stored) == ids
    for task_id, owners in runs.items():
        got = stored[task_id]
        assert (got["state"], got["attempts"], got["lease_owner"]) == (
            "RUNNING", 1, owners[0])


async def test_two_machines_submitting_the_same_ids_create_each_once(machines: MakeDb) -> None:
    ids = [f"t{i:03d}" for i in range(200)]
    stores = [PostgresTaskStore(machines()), PostgresTaskStore(machines())]
    for store in stores:
        await asyncio.gather(*(store.ping() for _ in range(BATCHES)))
    rng = random.Random(11)

    async def submitter(store: PostgresTaskStore) -> list[str]:
        order = ids[:]
        rng.shuffle(order)
        size = len(order) // BATCHES
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        answers = await asyncio.gather(*(store.create(P, T, [NewTask(t) for t in b], now=0.0)
                                         for b in batches))
        return [r.task_id for got in answers for r in got if r is not None]

    made = await asyncio.gather(*(submitter(s) for s in stores))
    assert sorted(made[0] + made[1]) == ids


async def test_control_changes_are_announced(machines: MakeDb) -> None:
    db = machines()
    store = PostgresTaskStore(db)
    heard: list[str] = []
    stop = await db.listen(CONTROL_CHANNEL, heard.append)
    try:
        await wait_until(lambda: "" in heard, timeout_s=10)  # listening (the reconnect signal)
        await store.create(P, T, [NewTask(t) for t in ("a", "b")], now=0.0)
        await store.transition(P, "b", TaskState.PAUSED, now=0.0)  # a task's pause: silent
        await store.transition(P, "a", TaskState.CANCELLED, now=0.0)
        with pytest.raises(IllegalTransition):  # refused: rolled back, nothing announced
            await store.transition(P, "a", TaskState.CANCELLED, now=0.0)
        await store.set_paused(P, True, now=0.0)
        await store.set_paused(P, False, now=0.0)
        await wait_until(lambda: len([h for h in heard if h]) >= 3, timeout_s=10)
        await asyncio.sleep(0.2)  # anything more would have come by now
    finally:
        stop()
    assert [json.loads(h) for h in heard if h] == [
        {"pipeline": P, "action": "cancel", "task_id": "a"},
        {"pipeline": P, "action": "pause", "task_id": None},
        {"pipeline": P, "action": "resume", "task_id": None},
    ]


def _ending(i: int) -> Completion:
    task_id = f"t{i:04d}"
    if i % 3 == 0:
        record = SinkRecord(task_id, b'{"ok": true}', "application/json")
        return Completion(task_id, TaskState.SUCCEEDED, b'{"ok": true}', "application/json",
                          outbox=(OutboxEntry(P, "hook", record),))
    if i % 3 == 1:
        return Completion(task_id, TaskState.FAILED, error_type="E", error_message="boom",
                          dead_letter=DeadLetter(b"in", "text/plain", None, {"h": "v"}))
    return Completion(task_id, TaskState.RETRYING, error_type="E")


async def test_a_batch_of_a_thousand_is_one_transaction(machines: MakeDb) -> None:
    db = machines()
    store = PostgresTaskStore(db)
    ids = [f"t{i:04d}" for i in range(1000)]
    await store.create(P, T, [NewTask(t) for t in ids[:500]], now=0.0)
    calls: list[tuple[str, int, int]] = []

    def counted(call: str) -> None:
        calls.append((call, db.transactions, db.statements))
        db.reset()

    db.reset()
    claims = [Claim(t, start=i % 2 == 0) for i, t in enumerate(ids)]
    got = await store.claim(P, T, claims, "w1", LEASE_S, now=0.0)
    counted("claim")
    assert [r.status for r in got] == [ClaimStatus.RUN] * 1000
    started = await store.start(P, ids[1::2], "w1", now=0.0)
    counted("start")
    assert [(r.status, r.attempts) for r in started] == [(ClaimStatus.RUN, 1)] * 500
    assert await store.extend(P, ids, "w1", LEASE_S, now=0.0) == []
    counted("extend")
    ends = [_ending(i) for i in range(1000)]
    assert await store.complete(P, ends, "w1", now=0.0) == [e.state for e in ends]
    counted("complete")
    assert calls == [("claim", 1, 3), ("start", 1, 1), ("extend", 1, 1),
                     ("complete", 1, 4)]  # complete, dead letters, outbox put, pending

    done = await store.get("t0000", P)
    assert done.delivered == {"hook": {"state": "pending", "at": done.finished_at,
                                       "attempts": 0}}
    letters = await store.dead_letters(P, limit=1000)
    assert len(letters) == 333
    failed = await store.get(letters[0].task_id, P)
    assert letters[0].failed_at == failed.finished_at
    assert letters[0].message == DeadLetter(b"in", "text/plain", None, {"h": "v"})
    async with db.connection() as conn:
        queued = await conn.fetch("SELECT task_id, enqueued_at FROM messages WHERE queue = $1"
                                  " ORDER BY id", outbox_queue(P, "hook"))
    assert [r["task_id"] for r in queued] == ids[::3]
    assert queued[0]["enqueued_at"] == done.finished_at
    assert (await store.get("t0002", P)).state == TaskState.RETRYING

    async with db.transaction() as conn:
        await record_deliveries_in(conn, P, "mail", [
            ("t0000", {"state": "pending", "at": 1.0, "attempts": 1}),
            ("t0000", {"state": "delivered", "at": 2.0, "attempts": 1})])
    assert (await store.get("t0000", P)).delivered == {
        "hook": {"state": "pending", "at": done.finished_at, "attempts": 0},
        "mail": {"state": "delivered", "at": 2.0, "attempts": 1}}
