"""The offset tracker: per partition, the highest offset below which every message is finished.

Work on a partition's messages may finish out of order (concurrency beyond the partition count,
retries held back in memory); a log-based source such as Kafka can only commit one offset per
partition, "everything before this is done". The tracker keeps, for each assigned partition,
the offsets handed to the consumer layer and not yet finished, and gives the offset that is
safe to commit.

Invariants:

1. Offsets of one partition are added in increasing order (a log delivers a partition in
   order); an offset at or below the last one added is refused (``add`` returns ``False``), so a
   message fetched twice is tracked once.
2. A partition's commit point is the lowest offset added and not finished, or one past the
   highest offset added when all are finished (Kafka's "next offset to read"). It never moves
   backwards, and never past an unfinished offset: a crash redelivers all unfinished work and
   nothing else than work after the commit point.
3. Every assignment of a partition has its own epoch. Finishing an offset of an earlier epoch
   (work still running when the partition was revoked) changes nothing, so work of a previous
   owner can never move a new assignment's commit point.
4. ``uncommitted`` counts the offsets between the commit point and the last added (finished or
   not): the memory held for the partition. The source pauses a partition when it grows past a
   bound (backpressure), so one stuck message holds back at most that many.
5. The tracker is a plain data structure: the source guards it with its own lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

Partition = tuple[str, int]  # (topic, partition)


class PartitionOffsets:
    """The offsets of one assignment (epoch) of one partition."""

    __slots__ = ("committed", "epoch", "finished", "last_added", "outstanding")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.outstanding: deque[int] = deque()  # added, in order, from the commit point on
        self.finished: set[int] = set()  # finished offsets still in ``outstanding``
        self.last_added: int | None = None
        self.committed: int | None = None  # highest commit point the log confirmed

    def add(self, offset: int) -> bool:
        if self.last_added is not None and offset <= self.last_added:
            return False
        self.outstanding.append(offset)
        self.last_added = offset
        return True

    def finish(self, offset: int) -> bool:
        if offset in self.finished or not self.outstanding or offset < self.outstanding[0]:
            return False
        self.finished.add(offset)
        while self.outstanding and self.outstanding[0] in self.finished:
            self.finished.discard(self.outstanding.popleft())
        return True

    def commit_point(self) -> int | None:
        if self.outstanding:
            return self.outstanding[0]
        return None if self.last_added is None else self.last_added + 1

    def unfinished(self) -> int:
        return len(self.outstanding) - len(self.finished)


class OffsetTracker:
    """Commit points for every partition assigned to one consumer (see the invariants)."""

    def __init__(self) -> None:
        self._parts: dict[Partition, PartitionOffsets] = {}

    def assign(self, partition: Partition, epoch: int) -> None:
        self._parts[partition] = PartitionOffsets(epoch)

    def revoke(self, partition: Partition) -> None:
        self._parts.pop(partition, None)

    def epoch(self, partition: Partition) -> int | None:
        part = self._parts.get(partition)
        return None if part is None else part.epoch

    def add(self, partition: Partition, epoch: int, offset: int) -> bool:
        """Track ``offset`` as handed out; ``False`` if it is stale or seen already."""
        part = self._parts.get(partition)
        return part is not None and part.epoch == epoch and part.add(offset)

    def finish(self, partition: Partition, epoch: int, offset: int) -> bool:
        """Mark ``offset`` finished; ``False`` (and no change) if it is of another epoch."""
        part = self._parts.get(partition)
        return part is not None and part.epoch == epoch and part.finish(offset)

    def commit_point(self, partition: Partition) -> int | None:
        part = self._parts.get(partition)
        return None if part is None else part.commit_point()

    def to_commit(self, partitions: Iterable[Partition] | None = None) -> dict[Partition, int]:
        """Commit points not yet confirmed by the log, for ``partitions`` (default: all)."""
        keys = self._parts.keys() if partitions is None else partitions
        out: dict[Partition, int] = {}
        for key in keys:
            part = self._parts.get(key)
            if part is None:
                continue
            point = part.commit_point()
            if point is not None and (part.committed is None or point > part.committed):
                out[key] = point
        return out

    def confirm(self, partition: Partition, offset: int) -> None:
        """The log confirmed a commit of ``offset`` for ``partition``."""
        part = self._parts.get(partition)
        if part is not None and (part.committed is None or offset > part.committed):
            part.committed = offset

    def uncommitted(self, partition: Partition) -> int:
        part = self._parts.get(partition)
        return 0 if part is None else len(part.outstanding)

    def unfinished(self, partition: Partition | None = None) -> int:
        """Offsets added and not finished (of one partition, or of all)."""
        if partition is not None:
            part = self._parts.get(partition)
            return 0 if part is None else part.unfinished()
        return sum(p.unfinished() for p in self._parts.values())

    def partitions(self) -> list[Partition]:
        return list(self._parts)
