"""The handover between a log client's thread and the event loop, for partitioned logs (Kafka).

The client thread puts consumed records in; the event loop takes deliveries out, and settles
them. Everything here is guarded by one lock, so the two sides never race.

Invariants:

1. A record is tracked by the :class:`~sluice.consumer.offsets.OffsetTracker` from the moment
   it is accepted until it is acknowledged; the commit point never passes unfinished work.
2. Every delivery is in exactly one place: buffered (accepted, not yet handed out), in flight
   (handed out, not settled), delayed (``retry_later``: handed out again when due), or finished.
3. Delayed deliveries that are due go out before buffered ones.
4. Revoking a partition drops its buffered and delayed deliveries at once (the next owner reads
   them again from the committed offset) and hands out nothing more of it; the client thread may
   then wait for its in-flight count to reach zero.
5. Each assignment of a partition is a new epoch. A settlement carries the epoch of its delivery;
   one of another epoch (the partition was revoked meanwhile) changes nothing.
6. Outputs (exactly-once) are kept with their finished offset until a transaction commits the
   partition's position past it (:meth:`outputs_below`, then :meth:`drop_outputs`); those
   of a revoked partition are dropped with it (the next owner makes them again).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sluice.connectors.base import Delivery, Output
from sluice.consumer.offsets import OffsetTracker, Partition


@dataclass(slots=True)  # never changed once made (frozen: a 5x slower init, per message)
class PartitionRef:
    """A delivery's place in the log: partition, offset, and the assignment's epoch."""

    partition: Partition
    offset: int
    epoch: int


class PartitionedBuffer:
    """Deliveries of the partitions assigned to one consumer (see the invariants)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._tracker = OffsetTracker()
        self._ready: deque[Delivery] = deque()
        self._delayed: list[tuple[float, int, Delivery]] = []
        self._in_flight: dict[Partition, int] = {}
        self._revoking: set[Partition] = set()
        self._paused: set[Partition] = set()
        self._epochs = itertools.count(1)
        self._seq = itertools.count()
        self._outputs: dict[Partition, dict[int, Sequence[Output]]] = {}  # rule 6
        self.assigned_once = False

    # -- the client thread ------------------------------------------------------------------

    def assign(self, parts: Iterable[Partition]) -> None:
        with self._lock:
            for part in parts:
                self._tracker.assign(part, next(self._epochs))
                self._in_flight[part] = 0
                self._paused.discard(part)
            self.assigned_once = True

    def accept(self, records: Sequence[tuple[Partition, int, Delivery]]) -> int:
        """Buffer consumed records (each gets its :class:`PartitionRef`); how many were new."""
        added = 0
        with self._lock:
            for part, offset, delivery in records:
                epoch = self._tracker.epoch(part)
                if epoch is None or part in self._revoking:
                    continue
                if self._tracker.add(part, epoch, offset):
                    delivery.ref = PartitionRef(part, offset, epoch)
                    self._ready.append(delivery)
                    added += 1
        return added

    def begin_revoke(self, parts: Iterable[Partition]) -> None:
        gone = set(parts)
        with self._lock:
            self._revoking.update(gone)
            self._ready = deque(d for d in self._ready if d.ref.partition not in gone)
            self._delayed = [e for e in self._delayed if e[2].ref.partition not in gone]
            heapq.heapify(self._delayed)

    def wait_settled(self, parts: Iterable[Partition], timeout_s: float) -> dict[Partition, int]:
        """Wait up to ``timeout_s`` for the in-flight work of ``parts``; what is left."""
        gone = set(parts)
        with self._lock:
            self._settled.wait_for(lambda: not any(self._in_flight.get(p) for p in gone),
                                   timeout_s)
            return {p: n for p in gone if (n := self._in_flight.get(p, 0))}

    def end_revoke(self, parts: Iterable[Partition]) -> None:
        with self._lock:
            for part in parts:
                self._tracker.revoke(part)
                self._in_flight.pop(part, None)
                self._outputs.pop(part, None)
                self._paused.discard(part)
                self._revoking.discard(part)

    def to_commit(self, parts: Iterable[Partition] | None = None) -> dict[Partition, int]:
        with self._lock:
            return self._tracker.to_commit(parts)

    def confirm(self, part: Partition, offset: int) -> None:
        with self._lock:
            self._tracker.confirm(part, offset)

    def outputs_below(self, points: dict[Partition, int]) -> list[Output]:
        """The outputs of finished offsets below each partition's new commit point, in offset
        order per partition (rule 6); they stay here until :meth:`drop_outputs`."""
        out: list[Output] = []
        with self._lock:
            for part, point in points.items():
                kept = self._outputs.get(part)
                if kept:
                    for offset in sorted(o for o in kept if o < point):
                        out.extend(kept[offset])
        return out

    def drop_outputs(self, points: dict[Partition, int]) -> None:
        """The outputs below these points are written: forget them."""
        with self._lock:
            for part, point in points.items():
                kept = self._outputs.get(part)
                if kept:
                    for offset in [o for o in kept if o < point]:
                        del kept[offset]

    def backpressure(self, limit: int) -> tuple[list[Partition], list[Partition]]:
        """Partitions to pause (``limit`` offsets tracked) and to resume (down to half)."""
        with self._lock:
            pause = [p for p in self._tracker.partitions()
                     if p not in self._paused and self._tracker.uncommitted(p) >= limit]
            resume = [p for p in self._paused if self._tracker.uncommitted(p) <= limit // 2]
            self._paused.update(pause)
            self._paused.difference_update(resume)
            return pause, resume

    def paused(self) -> list[Partition]:
        with self._lock:
            return sorted(self._paused)

    def revoking(self) -> list[Partition]:
        with self._lock:
            return sorted(self._revoking)

    def unfinished(self) -> tuple[int, list[Partition]]:
        """Offsets not finished, and the partitions assigned."""
        with self._lock:
            return self._tracker.unfinished(), self._tracker.partitions()

    # -- the event loop ---------------------------------------------------------------------

    def take(self, max_n: int) -> tuple[list[Delivery], float | None]:
        """Up to ``max_n`` deliveries (due delayed ones first), and when the next delayed one
        is due (``time.monotonic``), if any."""
        out: list[Delivery] = []
        now = time.monotonic()
        with self._lock:
            while self._delayed and len(out) < max_n and self._delayed[0][0] <= now:
                out.append(heapq.heappop(self._delayed)[2])
            while self._ready and len(out) < max_n:
                out.append(self._ready.popleft())
            for d in out:
                part = d.ref.partition
                self._in_flight[part] = self._in_flight.get(part, 0) + 1
            return out, (self._delayed[0][0] if self._delayed else None)

    def _settle(self, ref: PartitionRef) -> bool:
        if self._tracker.epoch(ref.partition) != ref.epoch:
            return False
        self._in_flight[ref.partition] = self._in_flight.get(ref.partition, 1) - 1
        return True

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        with self._lock:
            for d in deliveries:
                ref: PartitionRef = d.ref
                if self._settle(ref):
                    self._tracker.finish(ref.partition, ref.epoch, ref.offset)
            self._settled.notify_all()

    def ack_producing(self, items: Sequence[tuple[Delivery, Sequence[Output]]]) -> None:
        """Acknowledge, keeping each delivery's outputs until its offset is committed."""
        with self._lock:
            for d, outputs in items:
                ref: PartitionRef = d.ref
                if self._settle(ref) and self._tracker.finish(ref.partition, ref.epoch,
                                                              ref.offset) and outputs:
                    self._outputs.setdefault(ref.partition, {})[ref.offset] = outputs
            self._settled.notify_all()

    def retry_later(self, deliveries: Sequence[tuple[Delivery, float]]) -> None:
        now = time.monotonic()
        with self._lock:
            for d, delay in deliveries:
                ref: PartitionRef = d.ref
                if not self._settle(ref) or ref.partition in self._revoking:
                    continue  # the next owner reads it again from the committed offset
                d.deliveries += 1
                heapq.heappush(self._delayed, (now + delay, next(self._seq), d))
            self._settled.notify_all()
