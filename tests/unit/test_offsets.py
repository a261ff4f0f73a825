"""The offset tracker: contiguous commit points, epochs, out-of-order completion."""

from __future__ import annotations

import random

from sluice.consumer.offsets import OffsetTracker

P = ("jobs", 0)


def tracker(*offsets: int, epoch: int = 1) -> OffsetTracker:
    t = OffsetTracker()
    t.assign(P, epoch)
    for o in offsets:
        assert t.add(P, epoch, o)
    return t


def test_nothing_added_nothing_to_commit() -> None:
    t = tracker()
    assert t.commit_point(P) is None
    assert t.to_commit() == {}


def test_commit_point_stops_at_the_lowest_unfinished() -> None:
    t = tracker(10, 11, 12, 13)
    assert t.commit_point(P) == 10
    t.finish(P, 1, 12)
    t.finish(P, 1, 13)
    assert t.commit_point(P) == 10  # 10 and 11 still run: nothing past them is committed
    t.finish(P, 1, 10)
    assert t.commit_point(P) == 11
    t.finish(P, 1, 11)
    assert t.commit_point(P) == 14  # all done: the next offset to read
    assert t.uncommitted(P) == 0


def test_gaps_in_offsets_are_fine() -> None:
    t = tracker(3, 7, 20)  # compacted topic, transaction markers
    t.finish(P, 1, 7)
    t.finish(P, 1, 3)
    assert t.commit_point(P) == 20
    t.finish(P, 1, 20)
    assert t.commit_point(P) == 21


def test_a_repeated_or_older_offset_is_refused() -> None:
    t = tracker(5, 6)
    assert not t.add(P, 1, 6)
    assert not t.add(P, 1, 2)
    assert t.add(P, 1, 7)
    assert t.unfinished(P) == 3


def test_finishing_twice_or_unknown_changes_nothing() -> None:
    t = tracker(1, 2)
    assert t.finish(P, 1, 1)
    assert not t.finish(P, 1, 1)
    assert not t.finish(P, 1, 0)
    assert t.commit_point(P) == 2


def test_an_earlier_epoch_cannot_move_the_commit_point() -> None:
    t = tracker(0, 1, 2, epoch=1)
    t.revoke(P)
    t.assign(P, 2)  # the partition came back: a new assignment
    t.add(P, 2, 1)
    assert not t.finish(P, 1, 1)  # old work finishing late
    assert t.commit_point(P) == 1
    assert t.finish(P, 2, 1)
    assert t.commit_point(P) == 2


def test_to_commit_only_what_moved_since_confirmed() -> None:
    t = tracker(0, 1)
    t.finish(P, 1, 0)
    assert t.to_commit() == {P: 1}
    t.confirm(P, 1)
    assert t.to_commit() == {}
    t.finish(P, 1, 1)
    assert t.to_commit() == {P: 2}
    t.confirm(P, 0)  # a late confirmation of an older commit does not go backwards
    t.confirm(P, 2)
    assert t.to_commit() == {}


def test_revoked_partition_is_forgotten() -> None:
    t = tracker(0)
    t.revoke(P)
    assert t.commit_point(P) is None
    assert not t.add(P, 1, 1)
    assert t.partitions() == []


def test_random_completion_order_matches_a_simple_model() -> None:
    rng = random.Random(7)
    offsets = sorted(rng.sample(range(10_000), 2_000))
    t = tracker(*offsets)
    done: set[int] = set()
    order = offsets[:]
    rng.shuffle(order)
    for o in order:
        t.finish(P, 1, o)
        done.add(o)
        unfinished = [x for x in offsets if x not in done]
        expected = unfinished[0] if unfinished else offsets[-1] + 1
        assert t.commit_point(P) == expected
    assert t.unfinished() == 0
