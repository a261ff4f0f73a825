"""The MessageQueue contract, run over every store's queue.

A store joins by adding a factory to ``QUEUES`` (a data directory in; out, a way to open a
named queue with a lease time and a way to run one transaction), as the TaskStore suite takes
its stores. The tests speak only through :class:`~sluice.tasks.queue.MessageQueue`, with
explicit ``now`` values, so they hold for any backend and never wait on a clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sluice.connectors.base import Delivery
from sluice.connectors.embedded import EmbeddedQueue
from sluice.datadir import Database, QueuedMessage
from sluice.tasks.queue import MessageQueue

T0 = 1000.0


@dataclass(frozen=True)
class QueueHarness:
    open: Callable[[str, float], MessageQueue[Any]]  # a queue by name, with its lease time
    run: Callable[[Callable[[Any], Any]], Any]  # one transaction of the store


def _sqlite(data_dir: Path) -> QueueHarness:
    db = Database.open(data_dir)
    return QueueHarness(lambda name, lease_s: EmbeddedQueue(db, name, lease_s), db.run_sync)


QUEUES: dict[str, Callable[[Path], QueueHarness]] = {"sqlite": _sqlite}


@pytest.fixture(params=sorted(QUEUES))
def h(request: pytest.FixtureRequest, data_dir: Path) -> QueueHarness:
    return QUEUES[request.param](data_dir)


def put(h: QueueHarness, q: MessageQueue[Any], *ids: str, now: float = T0,
        delay_s: float = 0.0) -> None:
    msgs = [QueuedMessage(i, b'{"n": 1}', key=f"k{i}", headers={"h": i}) for i in ids]
    h.run(lambda tx: q.put_in(tx, msgs, now, delay_s))


def lease(h: QueueHarness, q: MessageQueue[Any], now: float, n: int = 10) -> list[Delivery]:
    got: list[Delivery] = h.run(lambda tx: q.lease_in(tx, n, now))
    return got


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.task_id for d in deliveries]


def pending(h: QueueHarness, q: MessageQueue[Any]) -> int:
    n: int = h.run(q.count_in)
    return n


def test_put_lease_ack(h: QueueHarness) -> None:
    q = h.open("jobs", 30.0)
    assert q.queue == "jobs"
    assert h.run(q.next_visible_in) is None
    put(h, q, "a", "b")
    got = lease(h, q, T0)
    assert ids(got) == ["a", "b"]  # oldest first
    a = got[0]
    assert (a.body, a.content_type, a.key, a.headers) == (b'{"n": 1}', "application/json",
                                                          "ka", {"h": "a"})
    assert (a.enqueued_at, a.deliveries) == (T0, 1)
    assert lease(h, q, T0 + 29) == []  # leased: invisible
    assert pending(h, q) == 2
    h.run(lambda tx: q.delete_in(tx, got))
    assert pending(h, q) == 0
    assert h.run(q.next_visible_in) is None


def test_lease_takes_up_to_n(h: QueueHarness) -> None:
    q = h.open("jobs", 30.0)
    put(h, q, "a", "b", "c")
    assert ids(lease(h, q, T0, n=2)) == ["a", "b"]
    assert ids(lease(h, q, T0, n=2)) == ["c"]


def test_a_lapsed_lease_hands_the_message_out_again(h: QueueHarness) -> None:
    q = h.open("jobs", 10.0)
    put(h, q, "a")
    (first,) = lease(h, q, T0)
    assert lease(h, q, T0 + 9.9) == []
    (second,) = lease(h, q, T0 + 10)
    assert (second.task_id, second.deliveries) == ("a", 2)
    h.run(lambda tx: q.delete_in(tx, [first]))  # a stale lease: no effect
    assert pending(h, q) == 1
    h.run(lambda tx: q.delete_in(tx, [second]))
    assert pending(h, q) == 0


def test_retry_later_delays_the_message(h: QueueHarness) -> None:
    q = h.open("jobs", 30.0)
    put(h, q, "a")
    (d,) = lease(h, q, T0)
    h.run(lambda tx: q.requeue_in(tx, [(d, 5.0)], T0))
    assert h.run(q.next_visible_in) == pytest.approx(T0 + 5)
    assert lease(h, q, T0 + 4.9) == []
    (again,) = lease(h, q, T0 + 5)
    assert (again.task_id, again.deliveries) == ("a", 2)
    h.run(lambda tx: q.requeue_in(tx, [(d, 0.0)], T0 + 5))  # a stale lease: no effect
    assert lease(h, q, T0 + 6) == []


def test_extend_keeps_the_lease(h: QueueHarness) -> None:
    q = h.open("jobs", 10.0)
    put(h, q, "a")
    (d,) = lease(h, q, T0)
    h.run(lambda tx: q.extend_in(tx, [d], T0 + 8))  # leased until T0 + 18
    assert lease(h, q, T0 + 17.9) == []
    (again,) = lease(h, q, T0 + 18)
    h.run(lambda tx: q.extend_in(tx, [d], T0 + 20))  # a stale lease: no effect
    assert ids(lease(h, q, T0 + 28)) == ["a"]
    assert again.deliveries == 2


def test_put_with_a_delay_and_pending_counts_every_message(h: QueueHarness) -> None:
    q = h.open("jobs", 30.0)
    put(h, q, "now")
    put(h, q, "later", delay_s=60.0)
    assert ids(lease(h, q, T0)) == ["now"]
    assert pending(h, q) == 2  # one leased, one delayed
    assert h.run(q.next_visible_in) == pytest.approx(T0 + 30)  # the lease's end comes first
    assert ids(lease(h, q, T0 + 59.9)) == ["now"]  # its lease lapsed; "later" still waits
    assert ids(lease(h, q, T0 + 60)) == ["later"]


def test_queues_are_separate(h: QueueHarness) -> None:
    a, b = h.open("a", 30.0), h.open("b", 30.0)
    put(h, a, "1")
    put(h, b, "2")
    assert ids(lease(h, a, T0)) == ["1"]
    assert ids(lease(h, b, T0)) == ["2"]
    assert (pending(h, a), pending(h, b)) == (1, 1)


def test_wake_makes_a_held_message_visible_now(h: QueueHarness) -> None:
    q = h.open("jobs", 30.0)
    put(h, q, "held", "leased")
    put(h, q, "scheduled", delay_s=600.0)
    held, _ = lease(h, q, T0)  # "leased" stays leased
    h.run(lambda tx: q.requeue_in(tx, [(held, 3600.0)], T0))  # put back while paused
    def wake_all(tx: Any) -> None:
        for task_id in ("held", "leased", "scheduled", "nobody"):
            q.wake_in(tx, task_id, T0 + 1)

    h.run(wake_all)
    # Only the held one: a leased message keeps its lease, a scheduled one its time.
    woken = lease(h, q, T0 + 1)
    assert ids(woken) == ["held"]
    h.run(lambda tx: q.delete_in(tx, woken))
    assert lease(h, q, T0 + 29.9) == []
    assert ids(lease(h, q, T0 + 30)) == ["leased"]
    assert lease(h, q, T0 + 59.9) == []
    assert ids(lease(h, q, T0 + 600)) == ["leased", "scheduled"]
