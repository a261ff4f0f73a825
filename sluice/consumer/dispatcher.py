"""Ordering lanes: which claimed task may run now (``consumer.ordering``).

- ``key`` (default): tasks with one key run one at a time, in the order they arrived; tasks
  with different keys (or no key) run in parallel, up to the concurrency limit.
- ``partition``: one at a time per partition (an unpartitioned queue is one partition).
- ``unordered``: everything in parallel.

Invariants:

1. A lane has at most one task running; the others wait in arrival order (offset order for a
   partitioned source, queue order for the embedded queue).
2. A task that will be retried keeps its lane until it comes back and finishes (the retry runs
   before anything behind it), unless the source itself already keeps keys in order (the
   embedded queue in key mode hands out only each key's oldest message). A lane held for a
   retry that does not come back here (its partition moved to another worker) is let go after
   ``hold_s``.
3. Waiting tasks hold no concurrency permit, but count against the fetch budget with the
   running ones, so memory stays bounded.
4. A retry that holds its lane is due back from the source at a known time; from then on the
   loop may fetch for it even when waiting tasks fill the budget (``due_retries``), else the
   tasks behind it would wait for it while it waits for room to be fetched.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

ORDERINGS = ("key", "partition", "unordered")

T = TypeVar("T")


@dataclass
class _Lane(Generic[T]):
    waiting: deque[T] = field(default_factory=deque)
    held_by: str | None = None  # the task id running, or retrying, in this lane


class Dispatcher(Generic[T]):
    def __init__(self, ordering: str, *, source_orders_keys: bool = False,
                 hold_s: float = 60.0) -> None:
        if ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {ORDERINGS}, got {ordering!r}")
        self.ordering = ordering
        self.hold_retries = not (source_orders_keys and ordering == "key")
        self.hold_s = hold_s
        self._lanes: dict[Hashable, _Lane[T]] = {}
        # Lanes held by a retry → when it is due back (time.monotonic()); the hold lapses
        # hold_s later. Kept apart so the loop's per-fetch checks see only these few lanes.
        self._retry_due: dict[Hashable, float] = {}
        self.waiting = 0

    def lane_of(self, key: str | None, partition: int | None) -> Hashable | None:
        if self.ordering == "key":
            return None if key is None else ("k", key)
        if self.ordering == "partition":
            return ("p", partition)
        return None

    def offer(self, lane_id: Hashable | None, task_id: str, item: T) -> bool:
        """True: run ``item`` now (its lane is now held by it). False: it waits in its lane."""
        if lane_id is None:
            return True
        lane = self._lanes.get(lane_id)
        if lane is None:
            self._lanes[lane_id] = _Lane(held_by=task_id)
            return True
        if lane.held_by is None or lane.held_by == task_id or self._hold_lapsed(
                lane_id, time.monotonic()):
            lane.held_by = task_id
            self._retry_due.pop(lane_id, None)
            return True
        lane.waiting.append(item)
        self.waiting += 1
        return False

    def would_run(self, offers: Sequence[tuple[Hashable | None, str]]) -> list[bool]:
        """For (lane, task id) offers made in this order: whether each would run at once
        (:meth:`offer` true), changing nothing (the loop starts those attempts with their
        claim, and only reserves the others)."""
        now = time.monotonic()
        taken: dict[Hashable, str] = {}  # lanes an earlier offer of these would take
        out: list[bool] = []
        for lane_id, task_id in offers:
            if lane_id is None:
                out.append(True)
                continue
            holder = taken.get(lane_id)
            if holder is None:
                lane = self._lanes.get(lane_id)
                holder = task_id
                if (lane is not None and lane.held_by is not None
                        and not self._hold_lapsed(lane_id, now)):
                    holder = lane.held_by
                taken[lane_id] = holder
            out.append(holder == task_id)
        return out

    def finished(self, lane_id: Hashable | None, task_id: str, *,
                 retrying: bool = False, retry_in_s: float = 0.0) -> list[T]:
        """``task_id`` ended an attempt; return the items now free to run (at most one)."""
        if lane_id is None:
            return []
        lane = self._lanes.get(lane_id)
        if lane is None or lane.held_by != task_id:
            return []
        if retrying and self.hold_retries:
            self._retry_due[lane_id] = time.monotonic() + retry_in_s
            return []
        return self._advance(lane_id, lane)

    def _hold_lapsed(self, lane_id: Hashable, now: float) -> bool:
        due = self._retry_due.get(lane_id)
        return due is not None and now > due + self.hold_s

    def due_retries(self) -> int:
        """How many lanes wait for a retry that is due back from the source now (rule 4)."""
        now = time.monotonic()
        return sum(1 for due in self._retry_due.values() if now >= due)

    def _advance(self, lane_id: Hashable, lane: _Lane[T]) -> list[T]:
        lane.held_by = None
        self._retry_due.pop(lane_id, None)
        if not lane.waiting:
            del self._lanes[lane_id]
            return []
        self.waiting -= 1
        return [lane.waiting.popleft()]  # the caller offers it again (it takes the lane)

    def expired(self) -> list[T]:
        """Items freed by lanes whose retry hold lapsed (invariant 2)."""
        now = time.monotonic()
        out: list[T] = []
        for lane_id in [lid for lid in self._retry_due if self._hold_lapsed(lid, now)]:
            out.extend(self._advance(lane_id, self._lanes[lane_id]))
        return out

    def waiting_items(self) -> list[T]:
        return [item for lane in self._lanes.values() for item in lane.waiting]

    def remove_waiting(self, keep: Callable[[T], bool]) -> list[T]:
        """Take out every waiting item for which ``keep`` is false; return them."""
        out: list[T] = []
        for lane in self._lanes.values():
            gone = [item for item in lane.waiting if not keep(item)]
            if gone:
                lane.waiting = deque(item for item in lane.waiting if keep(item))
                out.extend(gone)
        self.waiting -= len(out)
        return out

    def drop_waiting(self) -> list[T]:
        """Every waiting item (at stop: they are handed back unrun)."""
        return self.remove_waiting(lambda _item: False)
