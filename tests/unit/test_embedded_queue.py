"""The embedded queue's visibility-timeout semantics."""

from __future__ import annotations

import time
from pathlib import Path

from sluice.connectors.embedded import EmbeddedQueue, QueuedMessage, put_in
from sluice.datadir import Database


def put(db: Database, queue: str, *ids: str, delay_s: float = 0.0) -> None:
    msgs = [QueuedMessage(i, b"{}", key=f"k{i}", headers={"h": i}) for i in ids]
    db.run_sync(lambda c: put_in(c, queue, msgs, time.time(), delay_s))


def lease(q: EmbeddedQueue, n: int, now: float | None = None) -> list[str]:
    got = q.db.run_sync(lambda c: q.lease_in(c, n, now or time.time()))
    return [d.task_id for d in got]


def test_leased_message_is_invisible_until_lease_lapses(data_dir: Path) -> None:
    db = Database.open(data_dir)
    q = EmbeddedQueue(db, "jobs", lease_s=30)
    put(db, "jobs", "a", "b")
    now = time.time()
    assert lease(q, 1, now) == ["a"]
    assert lease(q, 10, now) == ["b"]
    assert lease(q, 10, now + 29) == []
    # Both leases lapse (their worker died): visible again, to anyone.
    other = EmbeddedQueue(db, "jobs", lease_s=30)
    assert sorted(lease(other, 10, now + 31)) == ["a", "b"]


def test_delivery_carries_fields_and_counts_deliveries(data_dir: Path) -> None:
    db = Database.open(data_dir)
    q = EmbeddedQueue(db, "jobs", lease_s=1)
    put(db, "jobs", "a")
    now = time.time()
    (d,) = db.run_sync(lambda c: q.lease_in(c, 1, now))
    assert (d.task_id, d.body, d.key, dict(d.headers), d.deliveries) == ("a", b"{}", "ka",
                                                                          {"h": "a"}, 1)
    (d2,) = db.run_sync(lambda c: q.lease_in(c, 1, now + 2))
    assert d2.deliveries == 2


def test_extend_keeps_it_invisible_and_a_stale_token_cannot_touch_it(data_dir: Path) -> None:
    db = Database.open(data_dir)
    q = EmbeddedQueue(db, "jobs", lease_s=10)
    put(db, "jobs", "a")
    t0 = time.time()
    (d,) = db.run_sync(lambda c: q.lease_in(c, 1, t0))
    db.run_sync(lambda c: q.extend_in(c, [d], t0 + 8))  # now invisible until t0 + 18
    assert lease(q, 1, t0 + 15) == []
    (d2,) = db.run_sync(lambda c: q.lease_in(c, 1, t0 + 19))  # lapsed: another lease
    db.run_sync(lambda c: q.delete_in(c, [d]))  # the first holder's token is stale: no effect
    assert db.run_sync(q.count_in) == 1
    db.run_sync(lambda c: q.delete_in(c, [d2]))
    assert db.run_sync(q.count_in) == 0


def test_requeue_with_delay_and_delayed_put(data_dir: Path) -> None:
    db = Database.open(data_dir)
    q = EmbeddedQueue(db, "jobs", lease_s=30)
    put(db, "jobs", "later", delay_s=60)
    put(db, "jobs", "now")
    t0 = time.time()
    (d,) = db.run_sync(lambda c: q.lease_in(c, 10, t0))
    assert d.task_id == "now"
    db.run_sync(lambda c: q.requeue_in(c, [(d, 5.0)], t0))
    assert lease(q, 10, t0 + 4) == []
    assert lease(q, 10, t0 + 6) == ["now"]
    assert lease(q, 10, t0 + 35) == []  # "now" is leased again, until t0 + 36
    assert sorted(lease(q, 10, t0 + 61)) == ["later", "now"]


def test_named_queues_are_separate(data_dir: Path) -> None:
    db = Database.open(data_dir)
    put(db, "a", "1")
    put(db, "b", "2")
    assert lease(EmbeddedQueue(db, "a"), 10) == ["1"]
    assert lease(EmbeddedQueue(db, "b"), 10) == ["2"]


def test_messages_survive_reopening(data_dir: Path) -> None:
    db = Database.open(data_dir)
    put(db, "jobs", "a")
    db.close()
    db = Database.open(data_dir)
    assert lease(EmbeddedQueue(db, "jobs"), 10) == ["a"]
