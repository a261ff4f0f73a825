"""The TaskStore contract, run over every store implementation.

A store joins by adding a factory to ``STORES`` (a data directory in, a fresh store out), as
the connector suite takes its connectors: the PostgreSQL store is one entry (a schema of its
own per test, dropped after) and passes every test here unchanged. The tests speak only
through :class:`~sluice.tasks.store.TaskStore`, with explicit ``now`` values, so they hold for
any backend and never wait on a clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path

import pytest

from sluice.datadir import Database
from sluice.errors import IllegalTransition, TaskNotFound
from sluice.stores.postgres_db import PgDatabase
from sluice.stores.postgres_tasks import PostgresTaskStore
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState
from sluice.tasks.store import (
    Claim,
    ClaimStatus,
    Completion,
    DeadLetter,
    NewTask,
    TaskStore,
)
from tests.helpers.postgres import fresh_url

Factory = Callable[[Path, ExitStack, AsyncExitStack], TaskStore]
"""(the test's data directory, cleanups run after the test outside its event loop, cleanups
run in it) → a fresh store."""


def postgres_store(data_dir: Path, cleanup: ExitStack, in_loop: AsyncExitStack) -> TaskStore:
    db = PgDatabase(cleanup.enter_context(fresh_url()))
    in_loop.push_async_callback(db.close)  # the pool belongs to the test's event loop
    return PostgresTaskStore(db, caller_clock=True)


STORES: dict[str, Factory] = {
    "sqlite": lambda data_dir, _cleanup, _in_loop: SqliteTaskStore(Database.open(data_dir)),
    "postgresql": postgres_store,
}

P = "pipe"
T = "tenant"
LEASE_S = 30.0


@pytest.fixture(params=sorted(STORES))
def made_store(request: pytest.FixtureRequest,
               data_dir: Path) -> Iterator[tuple[TaskStore, AsyncExitStack]]:
    with ExitStack() as cleanup:
        in_loop = AsyncExitStack()
        yield STORES[request.param](data_dir, cleanup, in_loop), in_loop


@pytest.fixture
async def store(made_store: tuple[TaskStore, AsyncExitStack]) -> AsyncIterator[TaskStore]:
    made, in_loop = made_store
    async with in_loop:
        yield made


async def queued(store: TaskStore, *task_ids: str, now: float = 100.0,
                 pipeline: str = P) -> None:
    created = await store.create(pipeline, T, [NewTask(t) for t in task_ids], now)
    assert all(r is not None for r in created)


async def running(store: TaskStore, task_id: str, owner: str = "w1",
                  now: float = 100.0) -> None:
    await queued(store, task_id, now=now)
    (res,) = await store.claim(P, T, [Claim(task_id)], owner, LEASE_S, now)
    assert res.status == ClaimStatus.RUN


# -- reachability ---------------------------------------------------------------------------

async def test_ping_answers(store: TaskStore) -> None:
    await store.ping()


# -- create ---------------------------------------------------------------------------------

async def test_create_makes_queued_tasks(store: TaskStore) -> None:
    (rec,) = await store.create(P, T, [NewTask("a", key="k", received_at=90.0)], now=100.0)
    assert rec is not None
    assert (rec.pipeline, rec.task_id, rec.tenant, rec.state, rec.attempts, rec.key) == (
        P, "a", T, TaskState.QUEUED, 0, "k")
    assert (rec.received_at, rec.queued_at, rec.started_at) == (90.0, 100.0, None)
    got = await store.get("a", P)
    assert (got.state, got.key, got.received_at, got.queued_at) == (
        TaskState.QUEUED, "k", 90.0, 100.0)


async def test_a_task_id_is_used_once_per_pipeline(store: TaskStore) -> None:
    await queued(store, "id-1", now=100.0)
    assert await store.create(P, T, [NewTask("id-1")], now=101.0) == [None]
    assert (await store.get("id-1", P)).queued_at == 100.0  # the first one is untouched
    (other,) = await store.create("other-pipe", T, [NewTask("id-1")], now=102.0)
    assert other is not None  # unique per pipeline, not across pipelines
    assert sorted(r.pipeline for r in await store.find("id-1")) == ["other-pipe", P]


async def test_a_batch_answers_each_task_and_dedups_within_itself(store: TaskStore) -> None:
    await queued(store, "old")
    got = await store.create(P, T, [NewTask("new"), NewTask("old"), NewTask("new")], now=101.0)
    assert [r is not None for r in got] == [True, False, False]


async def test_exists_find_and_get(store: TaskStore) -> None:
    await queued(store, "a")
    assert await store.exists(P, "a")
    assert not await store.exists(P, "b")
    assert not await store.exists("other-pipe", "a")
    assert [r.task_id for r in await store.find("a")] == ["a"]
    assert await store.find("b") == []
    assert (await store.get("a")).pipeline == P  # without a pipeline: the one there is
    with pytest.raises(TaskNotFound):
        await store.get("b", P)
    with pytest.raises(TaskNotFound):
        await store.get("a", "other-pipe")


async def test_forget_queued_removes_only_tasks_still_queued(store: TaskStore) -> None:
    await queued(store, "q1", "q2")
    await running(store, "r")
    await store.forget_queued(P, ["q1", "r", "missing"])
    assert not await store.exists(P, "q1")
    assert await store.exists(P, "q2")
    assert (await store.get("r", P)).state == TaskState.RUNNING
    (again,) = await store.create(P, T, [NewTask("q1")], now=200.0)
    assert again is not None  # a forgotten id may be submitted again


# -- claim ----------------------------------------------------------------------------------

async def test_claim_runs_a_queued_task_and_counts_the_attempt(store: TaskStore) -> None:
    await store.create(P, T, [NewTask("a", received_at=90.0)], now=95.0)
    (res,) = await store.claim(P, T, [Claim("a")], "w1", LEASE_S, now=101.0)
    assert (res.status, res.attempts, res.received_at, res.queued_at, res.started_at) == (
        ClaimStatus.RUN, 1, 90.0, 95.0, 101.0)
    rec = await store.get("a", P)
    assert (rec.state, rec.attempts, rec.started_at) == (TaskState.RUNNING, 1, 101.0)


async def test_a_task_first_seen_at_the_consumer_is_created_running(store: TaskStore) -> None:
    (res,) = await store.claim(P, T, [Claim("k/0/5", key="k", received_at=99.0)], "w1",
                               LEASE_S, now=100.0)
    assert (res.status, res.attempts) == (ClaimStatus.RUN, 1)
    rec = await store.get("k/0/5", P)
    assert (rec.state, rec.key, rec.received_at, rec.tenant) == (
        TaskState.RUNNING, "k", 99.0, T)


async def test_claim_under_a_live_lease_elsewhere_is_busy_and_a_lapsed_one_is_taken(
        store: TaskStore) -> None:
    await running(store, "a", "w1", now=100.0)
    (busy,) = await store.claim(P, T, [Claim("a")], "w2", LEASE_S, now=110.0)
    assert (busy.status, busy.lease_until) == (ClaimStatus.BUSY, 130.0)
    (took,) = await store.claim(P, T, [Claim("a")], "w2", LEASE_S, now=131.0)
    assert (took.status, took.attempts, took.started_at) == (ClaimStatus.RUN, 2, 100.0)


async def test_a_final_task_is_done_and_never_claimed_again(store: TaskStore) -> None:
    await running(store, "a")
    await store.complete(P, [Completion("a", TaskState.SUCCEEDED)], "w1", 101.0)
    (res,) = await store.claim(P, T, [Claim("a")], "w2", LEASE_S, now=500.0)
    assert (res.status, res.attempts) == (ClaimStatus.DONE, 1)
    assert (await store.get("a", P)).attempts == 1


async def test_a_paused_task_is_held(store: TaskStore) -> None:
    await queued(store, "a")
    await store.transition(P, "a", TaskState.PAUSED, 101.0)
    (res,) = await store.claim(P, T, [Claim("a")], "w1", LEASE_S, now=102.0)
    assert (res.status, res.attempts) == (ClaimStatus.HELD, 0)
    assert (await store.get("a", P)).state == TaskState.PAUSED


async def test_a_claim_batch_answers_in_order(store: TaskStore) -> None:
    await queued(store, "q", "p", "d")
    await store.transition(P, "p", TaskState.PAUSED, 101.0)
    await store.transition(P, "d", TaskState.CANCELLED, 101.0)
    got = await store.claim(P, T, [Claim("q"), Claim("p"), Claim("d"), Claim("new")], "w1",
                            LEASE_S, now=102.0)
    assert [r.status for r in got] == [ClaimStatus.RUN, ClaimStatus.HELD, ClaimStatus.DONE,
                                       ClaimStatus.RUN]


# -- reserve and start ----------------------------------------------------------------------

async def test_a_claim_without_start_reserves_the_task_uncounted(store: TaskStore) -> None:
    await store.create(P, T, [NewTask("a", received_at=90.0)], now=95.0)
    (res,) = await store.claim(P, T, [Claim("a", start=False)], "w1", LEASE_S, now=101.0)
    assert (res.status, res.started, res.attempts, res.started_at) == (
        ClaimStatus.RUN, False, 0, None)
    rec = await store.get("a", P)
    assert (rec.state, rec.attempts, rec.started_at) == (TaskState.RUNNING, 0, None)
    # Held under w1's lease like a started task: nobody else claims it while it waits.
    (busy,) = await store.claim(P, T, [Claim("a")], "w2", LEASE_S, now=110.0)
    assert (busy.status, busy.lease_until) == (ClaimStatus.BUSY, 131.0)
    assert await store.extend(P, ["a"], "w1", LEASE_S, now=120.0) == []
    (first,) = await store.claim(P, T, [Claim("k/0/1", start=False)], "w1", LEASE_S, now=121.0)
    assert (first.status, first.started, first.attempts) == (ClaimStatus.RUN, False, 0)
    assert (await store.get("k/0/1", P)).started_at is None


async def test_start_counts_a_reserved_attempt(store: TaskStore) -> None:
    await store.create(P, T, [NewTask("a", received_at=90.0)], now=95.0)
    await store.claim(P, T, [Claim("a", start=False)], "w1", LEASE_S, now=101.0)
    (res,) = await store.start(P, ["a"], "w1", now=105.0)
    assert (res.status, res.started, res.attempts, res.received_at, res.queued_at,
            res.started_at) == (ClaimStatus.RUN, True, 1, 90.0, 95.0, 105.0)
    rec = await store.get("a", P)
    assert (rec.state, rec.attempts, rec.started_at) == (TaskState.RUNNING, 1, 105.0)
    assert await store.complete(P, [Completion("a", TaskState.SUCCEEDED)], "w1", 106.0) == [
        TaskState.SUCCEEDED]


async def test_a_retried_task_reserved_then_started_keeps_its_first_start(
        store: TaskStore) -> None:
    await running(store, "a", "w1", now=100.0)
    await store.complete(P, [Completion("a", TaskState.RETRYING, error_type="E")], "w1", 101.0)
    (res,) = await store.claim(P, T, [Claim("a", start=False)], "w2", LEASE_S, now=102.0)
    assert (res.status, res.started, res.attempts) == (ClaimStatus.RUN, False, 1)
    (res,) = await store.start(P, ["a"], "w2", now=103.0)
    assert (res.status, res.attempts, res.started_at) == (ClaimStatus.RUN, 2, 100.0)


async def test_a_reservation_lost_with_its_worker_counts_nothing(store: TaskStore) -> None:
    await queued(store, "a")
    await store.claim(P, T, [Claim("a", start=False)], "w1", LEASE_S, now=100.0)
    (took,) = await store.claim(P, T, [Claim("a")], "w2", LEASE_S, now=131.0)  # w1 died
    assert (took.status, took.attempts, took.started_at) == (ClaimStatus.RUN, 1, 131.0)


async def test_start_answers_for_tasks_not_reserved_here_any_more(store: TaskStore) -> None:
    await queued(store, "mine", "cancelled", "taken")
    await store.claim(P, T, [Claim(t, start=False) for t in ("mine", "cancelled", "taken")],
                      "w1", LEASE_S, now=100.0)
    await store.transition(P, "cancelled", TaskState.CANCELLED, 101.0)
    await store.claim(P, T, [Claim("taken")], "w2", LEASE_S, now=131.0)  # w1's lease lapsed
    got = await store.start(P, ["mine", "cancelled", "taken"], "w1", now=132.0)
    assert [(r.status, r.attempts) for r in got] == [
        (ClaimStatus.RUN, 1), (ClaimStatus.DONE, 0), (ClaimStatus.BUSY, 1)]
    assert got[2].lease_until == 161.0
    assert (await store.get("taken", P)).attempts == 1  # w2's start only


# -- extend ---------------------------------------------------------------------------------

async def test_extend_keeps_the_lease_and_reports_lost_ids(store: TaskStore) -> None:
    await running(store, "taken", "w1", now=100.0)
    await running(store, "cancelled", "w1", now=120.0)
    await running(store, "mine", "w1", now=120.0)  # leased until 150
    await store.transition(P, "cancelled", TaskState.CANCELLED, 125.0)
    await store.claim(P, T, [Claim("taken")], "w2", LEASE_S, now=131.0)  # w1's lease lapsed
    lost = await store.extend(P, ["mine", "cancelled", "taken", "never"], "w1", LEASE_S, 132.0)
    assert sorted(lost) == ["cancelled", "never", "taken"]
    # The extended lease holds past the first one's end.
    (busy,) = await store.claim(P, T, [Claim("mine")], "w2", LEASE_S, now=155.0)
    assert (busy.status, busy.lease_until) == (ClaimStatus.BUSY, 162.0)


# -- complete -------------------------------------------------------------------------------

async def test_complete_records_the_result_under_the_owner(store: TaskStore) -> None:
    await running(store, "a")
    got = await store.complete(P, [Completion("a", TaskState.SUCCEEDED, b'{"n": 1}',
                                              "application/json")], "w1", 110.0)
    assert got == [TaskState.SUCCEEDED]
    rec = await store.get("a", P)
    assert (rec.state, rec.result, rec.result_type, rec.finished_at) == (
        TaskState.SUCCEEDED, b'{"n": 1}', "application/json", 110.0)
    assert rec.to_json()["result"] == {"n": 1}


async def test_filtered_is_recorded_final_and_never_claimed_again(store: TaskStore) -> None:
    """RUNNING → FILTERED (the pipeline's filter dropped the message): final, with its finish
    time, no result and no error; its message is acknowledged and skipped from then on."""
    await running(store, "a")
    assert await store.complete(P, [Completion("a", TaskState.FILTERED)], "w1", 105.0) == [
        TaskState.FILTERED]
    rec = await store.get("a", P)
    assert (rec.state, rec.finished_at, rec.result, rec.error_type) == (
        TaskState.FILTERED, 105.0, None, None)
    (res,) = await store.claim(P, T, [Claim("a")], "w2", LEASE_S, now=500.0)
    assert res.status == ClaimStatus.DONE
    assert await store.complete(P, [Completion("a", TaskState.SUCCEEDED)], "w1", 501.0) == [
        TaskState.FILTERED]  # nothing leaves it
    with pytest.raises(IllegalTransition):
        await store.transition(P, "a", TaskState.CANCELLED, 502.0)
    assert [r.task_id for r in await store.list(P, TaskState.FILTERED)] == ["a"]
    assert await store.counts() == {(P, "FILTERED"): 1}
    assert await store.dead_letters(P) == []


async def test_a_batch_mixing_filtered_and_other_ends_records_each(store: TaskStore) -> None:
    await store.claim(P, T, [Claim(t) for t in ("a", "b", "c")], "w1", LEASE_S, now=100.0)
    got = await store.complete(P, [Completion("a", TaskState.FILTERED),
                                   Completion("b", TaskState.SUCCEEDED, b"1", "application/json"),
                                   Completion("c", TaskState.FILTERED)], "w1", 101.0)
    assert got == [TaskState.FILTERED, TaskState.SUCCEEDED, TaskState.FILTERED]
    assert {t: (await store.get(t, P)).state for t in ("a", "b", "c")} == {
        "a": TaskState.FILTERED, "b": TaskState.SUCCEEDED, "c": TaskState.FILTERED}


async def test_complete_is_refused_when_not_running_under_the_owner(store: TaskStore) -> None:
    await running(store, "a", "w1", now=100.0)
    await store.claim(P, T, [Claim("a")], "w2", LEASE_S, now=131.0)  # w1 lost it
    assert await store.complete(P, [Completion("a", TaskState.SUCCEEDED)], "w1", 132.0) == [
        None]
    rec = await store.get("a", P)
    assert (rec.state, rec.attempts, rec.finished_at) == (TaskState.RUNNING, 2, None)
    await queued(store, "q")  # never claimed: nobody owns it
    assert await store.complete(P, [Completion("q", TaskState.SUCCEEDED)], "w1", 133.0) == [
        None]
    assert (await store.get("q", P)).state == TaskState.QUEUED


async def test_a_final_state_reached_meanwhile_is_reported(store: TaskStore) -> None:
    await running(store, "a")
    await store.transition(P, "a", TaskState.CANCELLED, 101.0)
    assert await store.complete(P, [Completion("a", TaskState.SUCCEEDED)], "w1", 102.0) == [
        TaskState.CANCELLED]
    assert (await store.get("a", P)).state == TaskState.CANCELLED


async def test_a_batch_with_one_completion_not_ours_writes_the_others(
        store: TaskStore) -> None:
    await store.claim(P, T, [Claim(t) for t in ("a", "b", "c")], "w1", LEASE_S, now=100.0)
    await store.claim(P, T, [Claim("b")], "w2", LEASE_S, now=140.0)  # w1's lease lapsed
    got = await store.complete(P, [Completion(t, TaskState.SUCCEEDED) for t in ("a", "b", "c")],
                               "w1", 141.0)
    assert got == [TaskState.SUCCEEDED, None, TaskState.SUCCEEDED]
    assert (await store.get("b", P)).state == TaskState.RUNNING


async def test_retrying_keeps_the_error_and_no_finish_then_runs_again(store: TaskStore) -> None:
    await running(store, "a")
    assert await store.complete(P, [Completion("a", TaskState.RETRYING, error_type="E",
                                               error_message="m")], "w1", 101.0) == [
        TaskState.RETRYING]
    rec = await store.get("a", P)
    assert (rec.state, rec.error_type, rec.error_message, rec.finished_at) == (
        TaskState.RETRYING, "E", "m", None)
    (res,) = await store.claim(P, T, [Claim("a")], "w2", LEASE_S, now=102.0)
    assert (res.status, res.attempts) == (ClaimStatus.RUN, 2)


async def test_the_error_traceback_is_kept_and_cleared_by_a_success(store: TaskStore) -> None:
    await running(store, "a")
    await store.complete(P, [Completion("a", TaskState.RETRYING, error_type="ValueError",
                                        error_message="bad", error_traceback="Traceback ...")],
                         "w1", 101.0)
    rec = await store.get("a", P)
    assert rec.error_traceback == "Traceback ..."
    assert rec.to_json()["error"]["traceback"] == "Traceback ..."
    await store.claim(P, T, [Claim("a")], "w1", LEASE_S, now=102.0)
    await store.complete(P, [Completion("a", TaskState.SUCCEEDED, b"1", "application/json")],
                         "w1", 103.0)
    rec = await store.get("a", P)
    assert (rec.error_type, rec.error_message, rec.error_traceback) == (None, None, None)


# -- release and unclaim --------------------------------------------------------------------

async def test_release_ends_the_lease_now(store: TaskStore) -> None:
    await running(store, "a", "w1", now=100.0)
    await store.release(P, ["a"], "w2")  # not w2's: nothing happens
    (busy,) = await store.claim(P, T, [Claim("a")], "w3", LEASE_S, now=101.0)
    assert busy.status == ClaimStatus.BUSY
    await store.release(P, ["a"], "w1")
    (took,) = await store.claim(P, T, [Claim("a")], "w2", LEASE_S, now=102.0)
    assert (took.status, took.attempts) == (ClaimStatus.RUN, 2)


async def test_unclaim_hands_a_task_back_unstarted(store: TaskStore) -> None:
    await running(store, "a", "w1", now=100.0)
    await store.unclaim(P, ["a"], "w1")
    rec = await store.get("a", P)
    assert (rec.state, rec.attempts, rec.started_at) == (TaskState.QUEUED, 0, None)
    (again,) = await store.claim(P, T, [Claim("a")], "w2", LEASE_S, now=105.0)
    assert (again.status, again.attempts, again.started_at) == (ClaimStatus.RUN, 1, 105.0)


async def test_unclaim_after_an_attempt_keeps_that_attempt_and_its_start(
        store: TaskStore) -> None:
    await running(store, "a", "w1", now=100.0)
    await store.complete(P, [Completion("a", TaskState.RETRYING, error_type="E")], "w1", 101.0)
    await store.claim(P, T, [Claim("a")], "w1", LEASE_S, now=102.0)
    await store.unclaim(P, ["a"], "w1")
    rec = await store.get("a", P)
    assert (rec.state, rec.attempts, rec.started_at) == (TaskState.QUEUED, 1, 100.0)


async def test_unclaim_of_a_reservation_keeps_the_count_and_start(store: TaskStore) -> None:
    await running(store, "a", "w1", now=100.0)
    await store.complete(P, [Completion("a", TaskState.RETRYING, error_type="E")], "w1", 101.0)
    await store.claim(P, T, [Claim("a", start=False)], "w1", LEASE_S, now=102.0)
    await queued(store, "b")
    await store.claim(P, T, [Claim("b", start=False)], "w1", LEASE_S, now=102.0)
    await store.unclaim(P, ["a", "b"], "w1", started=False)
    got = [await store.get(t, P) for t in ("a", "b")]
    assert [(r.state, r.attempts, r.started_at) for r in got] == [
        (TaskState.QUEUED, 1, 100.0), (TaskState.QUEUED, 0, None)]
    (again,) = await store.claim(P, T, [Claim("b")], "w2", LEASE_S, now=105.0)
    assert (again.status, again.attempts) == (ClaimStatus.RUN, 1)


async def test_unclaim_leaves_what_is_not_the_owners(store: TaskStore) -> None:
    await running(store, "a", "w1")
    await store.unclaim(P, ["a"], "w2")
    rec = await store.get("a", P)
    assert (rec.state, rec.attempts) == (TaskState.RUNNING, 1)


# -- transition -----------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "refused"), [
    ((TaskState.PAUSED, TaskState.QUEUED, TaskState.CANCELLED), TaskState.QUEUED),
    ((TaskState.CANCELLED,), TaskState.PAUSED),
    ((), TaskState.SUCCEEDED),
    ((), TaskState.RUNNING),  # only a claim starts a task
    ((TaskState.PAUSED,), TaskState.RUNNING),
])
async def test_transitions_allowed_and_refused(store: TaskStore, path: tuple[TaskState, ...],
                                               refused: TaskState) -> None:
    await queued(store, "a")
    now = 101.0
    for wanted in path:
        rec = await store.transition(P, "a", wanted, now)
        assert (rec.state, rec.updated_at) == (wanted, now)
        now += 1
    before = await store.get("a", P)
    with pytest.raises(IllegalTransition) as info:
        await store.transition(P, "a", refused, now)
    assert (info.value.current, info.value.wanted) == (str(before.state), str(refused))
    assert (await store.get("a", P)).state == before.state


async def test_cancel_sets_the_finish_time_and_a_running_task_can_be_cancelled(
        store: TaskStore) -> None:
    await running(store, "a")
    rec = await store.transition(P, "a", TaskState.CANCELLED, 105.0)
    assert (rec.state, rec.finished_at) == (TaskState.CANCELLED, 105.0)


async def test_transition_of_a_missing_task(store: TaskStore) -> None:
    with pytest.raises(TaskNotFound):
        await store.transition(P, "nope", TaskState.CANCELLED, 105.0)


# -- list, stats, counts --------------------------------------------------------------------

async def test_list_newest_first_with_filters_and_cursor(store: TaskStore) -> None:
    for i in range(5):
        await queued(store, f"t{i}", now=100.0 + i)
    await queued(store, "x", now=106.0, pipeline="other")
    await store.transition(P, "t1", TaskState.CANCELLED, 110.0)
    assert [r.task_id for r in await store.list(P)] == ["t4", "t3", "t2", "t1", "t0"]
    assert [r.task_id for r in await store.list(P, TaskState.CANCELLED)] == ["t1"]
    page = await store.list(P, limit=2)
    assert [r.task_id for r in page] == ["t4", "t3"]
    assert page[-1].seq is not None
    nxt = await store.list(P, limit=2, before_seq=page[-1].seq)
    assert [r.task_id for r in nxt] == ["t2", "t1"]
    assert [r.task_id for r in await store.list()][:2] == ["x", "t4"]
    assert len(await store.list()) == 6
    assert [r.task_id for r in await store.list(pipelines=["other"])] == ["x"]
    assert await store.list(pipelines=[]) == []
    assert await store.list("nope") == []


async def test_stats_are_every_task_oldest_first(store: TaskStore) -> None:
    await queued(store, "b", "a")
    await queued(store, "x", pipeline="other")
    assert [r.task_id for r in await store.stats(P)] == ["b", "a"]
    assert [r.task_id for r in await store.stats()] == ["b", "a", "x"]


async def test_counts_per_pipeline_and_state(store: TaskStore) -> None:
    assert await store.counts() == {}
    await queued(store, "a", "b", "c")
    await running(store, "r")
    await queued(store, "x", pipeline="other")
    await store.transition(P, "c", TaskState.CANCELLED, 101.0)
    assert await store.counts() == {(P, "QUEUED"): 2, (P, "RUNNING"): 1, (P, "CANCELLED"): 1,
                                    ("other", "QUEUED"): 1}


# -- pause ----------------------------------------------------------------------------------

async def test_pause_flags_per_pipeline(store: TaskStore) -> None:
    assert not await store.is_paused(P)
    await store.set_paused(P, True, 100.0)
    assert await store.is_paused(P)
    assert not await store.is_paused("other")
    await store.set_paused(P, False, 101.0)
    assert not await store.is_paused(P)


async def test_pipelines_are_those_with_tasks_or_a_pause_setting(store: TaskStore) -> None:
    assert await store.pipelines() == {}
    await queued(store, "a", "b")
    await store.transition(P, "b", TaskState.CANCELLED, 101.0)
    await store.set_paused("idle", True, 102.0)
    found = await store.pipelines()
    assert sorted(found) == ["idle", P]
    assert (found[P].tenants, found[P].paused, found[P].counts) == (
        [T], False, {"QUEUED": 1, "CANCELLED": 1})
    assert (found["idle"].tenants, found["idle"].paused, found["idle"].counts) == ([], True, {})


# -- dead letters ---------------------------------------------------------------------------

LETTER = DeadLetter(b'{"n": 1}', "application/json", "k", {"sluice-reason": "failed"})


async def failed(store: TaskStore, task_id: str, now: float) -> None:
    await running(store, task_id, now=now)
    got = await store.complete(P, [Completion(task_id, TaskState.FAILED, error_type="E",
                                              error_message="boom", dead_letter=LETTER)],
                               "w1", now + 1)
    assert got == [TaskState.FAILED]


async def test_a_failed_task_keeps_its_message(store: TaskStore) -> None:
    await failed(store, "a", now=100.0)
    (letter,) = await store.dead_letters(P)
    assert (letter.pipeline, letter.task_id, letter.message, letter.failed_at) == (
        P, "a", LETTER, 101.0)
    assert (letter.error_type, letter.error_message, letter.attempts) == ("E", "boom", 1)
    assert (letter.replayed_as, letter.replayed_at) == (None, None)
    assert await store.dead_letters("other") == []


async def test_dead_letters_newest_first_by_id_and_limit(store: TaskStore) -> None:
    await failed(store, "old", now=100.0)
    await failed(store, "new", now=200.0)
    assert [d.task_id for d in await store.dead_letters(P)] == ["new", "old"]
    assert [d.task_id for d in await store.dead_letters(P, limit=1)] == ["new"]
    assert [d.task_id for d in await store.dead_letters(P, ["old", "nope"])] == ["old"]


async def test_a_replay_is_linked_and_can_be_left_out(store: TaskStore) -> None:
    await failed(store, "a", now=100.0)
    await failed(store, "b", now=110.0)
    await store.mark_replayed(P, [("a", "a.replay-1")], 120.0)
    by_id = {d.task_id: d for d in await store.dead_letters(P)}
    assert (by_id["a"].replayed_as, by_id["a"].replayed_at) == ("a.replay-1", 120.0)
    assert by_id["b"].replayed_as is None
    assert [d.task_id for d in await store.dead_letters(P, replayed=False)] == ["b"]
    assert (await store.get("a", P)).state == TaskState.FAILED  # the old task stays FAILED
