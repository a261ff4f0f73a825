"""The SQLite task store: unique client ids, compare-and-set claims and completions."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.datadir import Database
from sluice.errors import IllegalTransition, TaskNotFound
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState
from sluice.tasks.store import Claim, ClaimStatus, Completion, NewTask

P = "pipe"


@pytest.fixture
def store(data_dir: Path) -> SqliteTaskStore:
    return SqliteTaskStore(Database.open(data_dir))


async def test_client_task_id_is_unique_per_pipeline(store: SqliteTaskStore) -> None:
    (rec,) = await store.create(P, "t", [NewTask("id-1")], now=100.0)
    assert rec is not None and rec.state == TaskState.QUEUED
    assert await store.create(P, "t", [NewTask("id-1")], now=101.0) == [None]
    assert (await store.get("id-1", P)).queued_at == 100.0  # the first one is untouched
    (other,) = await store.create("other-pipe", "t", [NewTask("id-1")], now=102.0)
    assert other is not None  # unique per pipeline, not across pipelines


async def test_claim_runs_queued_and_counts_attempts(store: SqliteTaskStore) -> None:
    await store.create(P, "t", [NewTask("a", received_at=90.0)], now=100.0)
    (res,) = await store.claim(P, "t", [Claim("a")], "w1", lease_s=30, now=101.0)
    assert (res.status, res.attempts, res.received_at) == (ClaimStatus.RUN, 1, 90.0)
    rec = await store.get("a", P)
    assert (rec.state, rec.attempts, rec.started_at) == (TaskState.RUNNING, 1, 101.0)


async def test_claim_under_a_live_lease_elsewhere_is_busy_and_lapsed_is_taken(
        store: SqliteTaskStore) -> None:
    await store.create(P, "t", [NewTask("a")], now=100.0)
    await store.claim(P, "t", [Claim("a")], "w1", lease_s=30, now=100.0)
    (busy,) = await store.claim(P, "t", [Claim("a")], "w2", lease_s=30, now=110.0)
    assert (busy.status, busy.lease_until) == (ClaimStatus.BUSY, 130.0)
    (took,) = await store.claim(P, "t", [Claim("a")], "w2", lease_s=30, now=131.0)
    assert (took.status, took.attempts) == (ClaimStatus.RUN, 2)
    # w1 comes back from the dead: its completion is refused (it no longer owns the task).
    assert await store.complete(P, [Completion("a", TaskState.SUCCEEDED)], "w1", 132.0) == [None]
    assert await store.complete(P, [Completion("a", TaskState.SUCCEEDED, b"1",
                                               "application/json")], "w2", 133.0) == [
        TaskState.SUCCEEDED]
    rec = await store.get("a", P)
    assert (rec.state, rec.result, rec.finished_at) == (TaskState.SUCCEEDED, b"1", 133.0)


async def test_final_task_is_done_and_never_claimed_again(store: SqliteTaskStore) -> None:
    await store.create(P, "t", [NewTask("a")], now=100.0)
    await store.claim(P, "t", [Claim("a")], "w1", lease_s=30, now=100.0)
    await store.complete(P, [Completion("a", TaskState.SUCCEEDED)], "w1", 101.0)
    (res,) = await store.claim(P, "t", [Claim("a")], "w2", lease_s=30, now=500.0)
    assert res.status == ClaimStatus.DONE
    assert (await store.get("a", P)).attempts == 1


async def test_task_first_seen_at_consumer_is_created_running(store: SqliteTaskStore) -> None:
    (res,) = await store.claim(P, "t", [Claim("k/0/5", key="k", received_at=99.0)], "w1",
                               lease_s=30, now=100.0)
    assert (res.status, res.attempts) == (ClaimStatus.RUN, 1)
    rec = await store.get("k/0/5", P)
    assert (rec.state, rec.key, rec.received_at) == (TaskState.RUNNING, "k", 99.0)


async def test_retrying_then_claim_again(store: SqliteTaskStore) -> None:
    await store.create(P, "t", [NewTask("a")], now=100.0)
    await store.claim(P, "t", [Claim("a")], "w1", lease_s=30, now=100.0)
    assert await store.complete(P, [Completion("a", TaskState.RETRYING, error_type="E",
                                               error_message="m")], "w1", 101.0) == [
        TaskState.RETRYING]
    rec = await store.get("a", P)
    assert (rec.state, rec.error_type, rec.finished_at) == (TaskState.RETRYING, "E", None)
    (res,) = await store.claim(P, "t", [Claim("a")], "w2", lease_s=30, now=102.0)
    assert (res.status, res.attempts) == (ClaimStatus.RUN, 2)


async def test_cancel_while_running_wins_over_completion(store: SqliteTaskStore) -> None:
    await store.create(P, "t", [NewTask("a")], now=100.0)
    await store.claim(P, "t", [Claim("a")], "w1", lease_s=30, now=100.0)
    await store.transition(P, "a", TaskState.CANCELLED, 101.0)
    # The completion is not written, and the final state is reported so the message is settled.
    assert await store.complete(P, [Completion("a", TaskState.SUCCEEDED)], "w1", 102.0) == [
        TaskState.CANCELLED]
    assert (await store.get("a", P)).state == TaskState.CANCELLED


async def test_illegal_transitions_are_refused(store: SqliteTaskStore) -> None:
    await store.create(P, "t", [NewTask("a")], now=100.0)
    with pytest.raises(IllegalTransition, match="is QUEUED; it cannot become SUCCEEDED"):
        await store.transition(P, "a", TaskState.SUCCEEDED, 101.0)
    paused = await store.transition(P, "a", TaskState.PAUSED, 101.0)
    assert paused.state == TaskState.PAUSED
    (held,) = await store.claim(P, "t", [Claim("a")], "w1", lease_s=30, now=102.0)
    assert held.status == ClaimStatus.HELD
    await store.transition(P, "a", TaskState.QUEUED, 103.0)
    await store.transition(P, "a", TaskState.CANCELLED, 104.0)
    with pytest.raises(IllegalTransition):
        await store.transition(P, "a", TaskState.QUEUED, 105.0)
    with pytest.raises(TaskNotFound):
        await store.transition(P, "nope", TaskState.CANCELLED, 105.0)


async def test_list_newest_first_with_filters(store: SqliteTaskStore) -> None:
    await store.create(P, "t", [NewTask(f"t{i}") for i in range(5)], now=100.0)
    await store.create("other", "t", [NewTask("x")], now=100.0)
    await store.transition(P, "t1", TaskState.CANCELLED, 101.0)
    assert [r.task_id for r in await store.list(P)] == ["t4", "t3", "t2", "t1", "t0"]
    assert [r.task_id for r in await store.list(P, TaskState.CANCELLED)] == ["t1"]
    page = await store.list(P, limit=2)
    assert [r.task_id for r in page] == ["t4", "t3"]
    nxt = await store.list(P, limit=2, before_seq=page[-1].seq)
    assert [r.task_id for r in nxt] == ["t2", "t1"]
    assert len(await store.list()) == 6


async def test_a_batch_with_one_completion_not_ours_writes_the_others(
        store: SqliteTaskStore) -> None:
    """A batch is written in one statement; when a row of it is not ours any more, the batch
    is undone and written one by one, so each completion gets its own answer."""
    claims = [Claim(t) for t in ("a", "b", "c")]
    await store.claim(P, "t", claims, "w1", lease_s=30, now=100.0)
    await store.claim(P, "t", [Claim("b")], "w2", lease_s=30, now=140.0)  # w1's lease lapsed
    got = await store.complete(P, [Completion(t, TaskState.SUCCEEDED, b"1", "application/json")
                                   for t in ("a", "b", "c")], "w1", 141.0)
    assert got == [TaskState.SUCCEEDED, None, TaskState.SUCCEEDED]
    states = {t: (await store.get(t, P)).state for t in ("a", "b", "c")}
    assert states == {"a": TaskState.SUCCEEDED, "b": TaskState.RUNNING, "c": TaskState.SUCCEEDED}
    assert (await store.get("b", P)).attempts == 2
