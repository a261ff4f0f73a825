"""The PostgreSQL embedded queue, outbox and store on the real server (tests/helpers/postgres).

Two :class:`PgDatabase` objects on one URL stand for two machines: pools, listeners and lease
tokens of their own, one database clock.

- A leased message is invisible to the other machine until its lease lapses, then handed out
  again (deliveries 2); a stale delivery changes nothing; a retry delay is honoured.
- Ordered keys hold across machines; 2,000 messages fetched concurrently by two machines are
  each leased exactly once (SKIP LOCKED).
- An idle fetch wakes on the NOTIFY of another machine's put, and an idle source looks at its
  queue about once a second, not every fetch.
- A held message is woken, a scheduled one is not.
- The outbox removes an entry and writes its delivery status in one transaction; stranded
  outboxes are reported.
- The store: a duplicate task id at submit puts nothing; control notifications reach
  ``watch_control``; a source survives its connections being terminated.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from sluice.connectors.base import Delivery, SinkRecord
from sluice.datadir import QueuedMessage
from sluice.errors import Unavailable
from sluice.registry import Submission
from sluice.stores.base import ControlEvent
from sluice.stores.postgres_db import PgDatabase
from sluice.stores.postgres_messages import put_in
from sluice.stores.postgres_queue import IDLE_LOOK_S, PgQueueSource, wake
from sluice.stores.postgres_schema import CONTROL_CHANNEL, notify_sql
from tests.helpers.postgres import pg_url  # noqa: F401
from tests.helpers.waiting import wait_until

# Notifications are per database, not per schema: a name of its own keeps other tests' puts
# (other schemas, other processes) from waking these sources.
Q = f"jobs-{uuid.uuid4().hex[:8]}"
MakeDb = Callable[[], PgDatabase]


@pytest.fixture
async def machines(pg_url: str) -> AsyncIterator[MakeDb]:  # noqa: F811
    """Each call: one more :class:`PgDatabase` on the test's schema (one more machine), with an
    application name of its own (so a test can terminate exactly its connections)."""
    opened: list[PgDatabase] = []

    def make() -> PgDatabase:
        db = PgDatabase(pg_url)
        name = f"sluice-test-{uuid.uuid4().hex[:8]}"
        plain = db._connect_kwargs

        async def kwargs() -> dict[str, Any]:
            out = await plain()
            out["server_settings"] = {**out["server_settings"], "application_name": name}
            return out

        db._connect_kwargs = kwargs  # type: ignore[method-assign]
        db.application_name = name  # type: ignore[attr-defined]
        opened.append(db)
        return db

    yield make
    for db in opened:
        await db.close()


async def put(db: PgDatabase, *task_ids: str, key: str | None = None, queue: str = Q,
              delay_s: float = 0.0) -> None:
    async with db.transaction() as conn:
        await put_in(conn, queue, [QueuedMessage(t, b"{}", key=key) for t in task_ids], None,
                     delay_s)


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.task_id for d in deliveries]


async def test_lease_hides_a_message_from_another_machine_until_it_lapses(
        machines: MakeDb) -> None:
    a, b = machines(), machines()
    src_a, src_b = PgQueueSource(a, Q, 0.5, 0.01), PgQueueSource(b, Q, 0.5, 0.01)
    await put(a, "t1")
    (first,) = await src_a.fetch(10, 0.0)
    assert (first.task_id, first.deliveries) == ("t1", 1)
    assert await src_b.fetch(10, 0.2) == []
    again = await src_b.fetch(10, 2.0)
    assert [(d.task_id, d.deliveries) for d in again] == [("t1", 2)]
    assert await src_a.pending() == 1


async def test_a_stale_delivery_changes_nothing(machines: MakeDb) -> None:
    a, b = machines(), machines()
    src_a, src_b = PgQueueSource(a, Q, 0.3, 0.01), PgQueueSource(b, Q, 30.0, 0.01)
    await put(a, "t1")
    (stale,) = await src_a.fetch(1, 0.0)
    (held,) = await src_b.fetch(1, 2.0)
    assert held.deliveries == 2
    await src_a.ack([stale])
    await src_a.retry_later([(stale, 0.0)])
    await src_a.extend([stale])
    assert await src_a.pending() == 1
    assert await src_a.fetch(1, 0.5) == []  # still leased by b, for 30 s
    await src_b.ack([held])
    assert await src_b.pending() == 0


async def test_retry_delay_is_honoured(machines: MakeDb) -> None:
    db = machines()
    src = PgQueueSource(db, Q, 30.0, 0.01)
    await put(db, "t1")
    (d,) = await src.fetch(1, 0.0)
    await src.retry_later([(d, 0.6)])
    requeued = time.monotonic()
    assert await src.fetch(1, 0.3) == []
    (again,) = await src.fetch(1, 3.0)
    waited_s = time.monotonic() - requeued
    assert again.deliveries == 2
    assert 0.55 <= waited_s < 0.9, waited_s


async def test_ordered_keys_hold_across_machines(machines: MakeDb) -> None:
    a, b = machines(), machines()
    src_a = PgQueueSource(a, Q, 30.0, 0.01, ordered_keys=True)
    src_b = PgQueueSource(b, Q, 30.0, 0.01, ordered_keys=True)
    await put(a, "k1", "k2", key="k")
    await put(a, "j1", key="j")
    await put(a, "n1", "n2")
    got = await src_a.fetch(10, 0.0)
    assert ids(got) == ["k1", "j1", "n1", "n2"]
    assert await src_b.fetch(10, 0.2) == []  # k2 waits while k1 is leased
    await src_a.retry_later([(got[0], 0.3)])  # k1 waits for a retry: k2 still waits
    assert await src_b.fetch(10, 0.1) == []
    (k1,) = await src_b.fetch(10, 2.0)
    assert (k1.task_id, k1.deliveries) == ("k1", 2)
    await src_b.ack([k1])
    assert ids(await src_a.fetch(10, 1.0)) == ["k2"]


async def test_concurrent_fetches_lease_each_message_once(machines: MakeDb) -> None:
    a, b = machines(), machines()
    n = 2_000
    await put(a, *(f"t{i:04d}" for i in range(n)))

    async def unleased() -> int:
        async with a.connection() as conn:
            return int(await conn.fetchval(
                "SELECT count(*) FROM messages WHERE lease_token IS NULL"))

    async def drain(src: PgQueueSource) -> list[Delivery]:
        got: list[Delivery] = []
        while True:
            batch = await src.fetch(50, 0.05)
            if batch:
                got.extend(batch)
            elif await unleased() == 0:
                return got

    sources = [PgQueueSource(db, Q, 60.0, 0.01) for db in (a, a, b, b)]
    results = await asyncio.gather(*(drain(s) for s in sources))
    leased = [d.task_id for got in results for d in got]
    assert len(leased) == n
    assert len(set(leased)) == n
    assert all(d.deliveries == 1 for got in results for d in got)
    assert all(len(got) > 0 for got in results)  # both machines took part


def counting(db: PgDatabase) -> list[int]:
    """Count the connections ``db`` hands out (each source statement takes one)."""
    count = [0]
    for name in ("connection", "transaction"):
        plain: Callable[[], AbstractAsyncContextManager[Any]] = getattr(db, name)

        def counted(plain: Callable[[], AbstractAsyncContextManager[Any]] = plain,
                    ) -> AbstractAsyncContextManager[Any]:
            count[0] += 1
            return plain()

        setattr(db, name, counted)
    return count


async def test_an_idle_fetch_wakes_on_another_machines_put(machines: MakeDb) -> None:
    worker, gateway = machines(), machines()
    src = PgQueueSource(worker, Q, 30.0, 0.01)
    assert await src.fetch(1, 0.3) == []  # listening from here on
    fetching = asyncio.create_task(src.fetch(1, 5.0))
    await asyncio.sleep(0.5)
    put_at = time.monotonic()
    await put(gateway, "t1")
    got = await fetching
    latency_s = time.monotonic() - put_at
    assert ids(got) == ["t1"]
    assert latency_s < 0.1, latency_s


async def test_an_idle_source_looks_about_once_a_second(machines: MakeDb) -> None:
    db = machines()
    src = PgQueueSource(db, Q, 30.0, 0.01)
    assert await src.fetch(1, 0.3) == []
    await asyncio.sleep(0.1)
    statements = counting(db)
    idle_s = 3.0
    started = time.monotonic()
    while time.monotonic() - started < idle_s:
        assert await src.fetch(10, 0.25) == []  # as the consumer loop fetches
    assert statements[0] <= idle_s / IDLE_LOOK_S + 2, statements[0]  # 12 if every fetch asked


async def test_a_delayed_message_is_fetched_when_due(machines: MakeDb) -> None:
    db = machines()
    src = PgQueueSource(db, Q, 30.0, 0.01)
    await put(db, "later", delay_s=0.4)
    put_at = time.monotonic()
    (d,) = await src.fetch(1, 3.0)
    assert d.task_id == "later"
    assert 0.35 <= time.monotonic() - put_at < 0.6


async def test_wake_makes_a_held_message_visible_not_a_scheduled_one(machines: MakeDb) -> None:
    worker, other = machines(), machines()
    src = PgQueueSource(worker, Q, 30.0, 0.01)
    await put(worker, "held")
    await put(worker, "scheduled", delay_s=60.0)
    (d,) = await src.fetch(10, 0.0)
    await src.retry_later([(d, 60.0)])  # held while its task is paused
    assert await src.fetch(10, 0.1) == []
    waiting = asyncio.create_task(src.fetch(10, 5.0))
    await asyncio.sleep(0.2)
    woken_at = time.monotonic()
    await wake(other, Q, "held")
    await wake(other, Q, "scheduled")
    got = await waiting
    assert ids(got) == ["held"]
    assert time.monotonic() - woken_at < 0.1
    assert await src.pending() == 2


async def test_a_source_recovers_after_its_connections_are_terminated(
        machines: MakeDb) -> None:
    db, admin = machines(), machines()
    src = PgQueueSource(db, Q, 30.0, 0.01)
    assert await src.fetch(1, 0.3) == []  # a pooled connection and the listener
    async with admin.connection() as conn:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1", db.application_name)  # type: ignore[attr-defined]
    assert killed >= 2
    failures = 0
    for _ in range(3):
        try:  # a source of its own each: its first fetch always asks
            assert await PgQueueSource(db, Q, 30.0, 0.01).fetch(1, 0.0) == []
        except Unavailable:
            failures += 1
    assert failures <= 1
    fetching = asyncio.create_task(src.fetch(1, 5.0))
    await asyncio.sleep(1.5)  # the listener reconnects within RELISTEN_EVERY_S
    put_at = time.monotonic()
    await put(admin, "t1")
    assert ids(await fetching) == ["t1"]
    assert time.monotonic() - put_at < 0.1


# --- the outbox and the store (with the task store of postgres_tasks) ---


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[Any]:  # noqa: F811
    from sluice.stores.postgres import PostgresStore

    opened = PostgresStore(pg_url)
    yield opened
    await opened.close()


def submission(task_id: str, pipeline: str = "p", delay_s: float = 0.0) -> Submission:
    return Submission(pipeline, "acme", QueuedMessage(task_id, b"{}"), delay_s, None)


async def test_submit_of_a_used_task_id_puts_no_message(store: Any) -> None:
    first = await store.submit(Q, [submission("a"), submission("b")])
    assert [r.task_id for r in first] == ["a", "b"]
    again = await store.submit(Q, [submission("a"), submission("c"), submission("c")])
    assert again[0] is None and again[1] is not None and again[2] is None
    src = store.source(Q, 30.0, 0.01)
    assert sorted(ids(await src.fetch(10, 0.0))) == ["a", "b", "c"]


async def test_submit_honours_each_items_delay(store: Any) -> None:
    await store.submit(Q, [submission("now"), submission("later", delay_s=30.0)])
    src = store.source(Q, 30.0, 0.01)
    assert ids(await src.fetch(10, 0.0)) == ["now"]
    assert await src.pending() == 2


async def outbox_entry(store: Any, task_id: str) -> None:
    from sluice.tasks.store import OutboxEntry

    await store.submit(Q, [submission(task_id)])
    await store.put_outbox([OutboxEntry("p", "on_success", SinkRecord(task_id, b"r",
                                                                      "application/json"))])


async def test_outbox_delivered_writes_the_status_in_the_same_transaction(
        store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from sluice.stores import postgres_outbox

    await outbox_entry(store, "t1")
    await outbox_entry(store, "t2")
    outbox = store.outbox("p", "on_success", 30.0)
    items = await outbox.take(10, 1.0)
    assert [i.record.task_id for i in items] == ["t1", "t2"]

    async def broken(*_: Any) -> None:
        raise RuntimeError("status write failed")

    with monkeypatch.context() as patch:
        patch.setattr(postgres_outbox, "record_deliveries_in", broken)
        with pytest.raises(RuntimeError):
            await outbox.delivered(items[:1])
    assert await outbox.pending() == 2  # the removal was rolled back with it
    await outbox.delivered(items[:1])
    assert await outbox.pending() == 1
    record = await store.tasks.get("t1", "p")
    assert record.delivered["on_success"]["state"] == "delivered"
    assert record.delivered["on_success"]["attempts"] == 1
    await outbox.failed(items[1], "gone")
    assert (await store.tasks.get("t2", "p")).delivered["on_success"]["state"] == "failed"
    assert await outbox.pending() == 0


async def test_outbox_retry_later_writes_pending_and_hands_it_out_again(store: Any) -> None:
    await outbox_entry(store, "t1")
    outbox = store.outbox("p", "on_success", 30.0)
    (item,) = await outbox.take(10, 1.0)
    await outbox.retry_later(item, 0.2, "503")
    status = (await store.tasks.get("t1", "p")).delivered["on_success"]
    assert (status["state"], status["error"]) == ("pending", "503")
    (again,) = await outbox.take(10, 2.0)
    assert again.attempts == 2


async def test_stranded_outboxes_are_reported(store: Any) -> None:
    await outbox_entry(store, "t1")
    assert await store.stranded("p", ["on_success"]) == {}
    assert await store.stranded("p", ["on_failure"]) == {"on_success": 1}
    assert await store.stranded("p2", []) == {}


async def test_watch_control_receives_notified_changes(store: Any, machines: MakeDb) -> None:
    got: list[ControlEvent] = []
    stop = await store.watch_control(got.append)
    other = machines()
    await asyncio.sleep(0.5)  # the listening connection is made
    async with other.connection() as conn:
        for payload in ("not json", json.dumps({"action": "cancel"}),
                        json.dumps({"pipeline": "p", "action": "cancel", "task_id": "t1"}),
                        json.dumps({"pipeline": "p", "action": "pause"})):
            await conn.execute(f"SELECT {notify_sql('$1', '$2')}", CONTROL_CHANNEL, payload)
    await wait_until(lambda: len(got) >= 3, 5.0)
    assert got == [ControlEvent("", "listening"),  # announced from now on
                   ControlEvent("p", "cancel", "t1"), ControlEvent("p", "pause", None)]
    stop()

