"""What is particular to the SQLite task store and to the untracked store over it. The contract
every store keeps (dedup, claims, completions, transitions, lists, dead letters) is tested once,
over every implementation, in ``tests/conformance/test_task_store.py``."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sluice.datadir import Database
from sluice.errors import TaskNotFound, Unavailable, Unsupported
from sluice.stores.sqlite import SqliteStore
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState
from sluice.tasks.store import Claim, ClaimStatus, Completion, NewTask
from sluice.tasks.untracked import UntrackedStore

P = "pipe"


@pytest.fixture
def store(data_dir: Path) -> SqliteTaskStore:
    return SqliteTaskStore(Database.open(data_dir))


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


async def test_a_locked_database_is_unavailable_and_nothing_is_half_written(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_SQLITE_BUSY_TIMEOUT_MS", "50")
    store = SqliteTaskStore(Database.open(data_dir))
    await store.create(P, "t", [NewTask("a")], now=100.0)
    locker = sqlite3.connect(store.db.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Unavailable):
            await store.claim(P, "t", [Claim("a"), Claim("new")], "w1", lease_s=30, now=101.0)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert (await store.get("a", P)).state == TaskState.QUEUED
    assert not await store.exists(P, "new")
    await store.ping()


async def test_the_untracked_store_records_no_task(store: SqliteTaskStore) -> None:
    untracked = UntrackedStore(store, SqliteStore(store.db).put_outbox)
    with pytest.raises(Unsupported, match="does not track its tasks"):
        await untracked.create(P, "t", [NewTask("a")], now=100.0)
    (res,) = await untracked.claim(P, "t", [Claim("a", deliveries=3, received_at=90.0)], "w1",
                                   lease_s=30, now=100.0)
    assert (res.status, res.attempts) == (ClaimStatus.RUN, 3)
    assert await untracked.complete(P, [Completion("a", TaskState.SUCCEEDED)], "w1", 101.0) == [
        TaskState.SUCCEEDED]
    assert await untracked.find("a") == [] and not await untracked.exists(P, "a")
    with pytest.raises(TaskNotFound):
        await untracked.get("a", P)
    assert await store.find("a") == []
    await untracked.set_paused(P, True, 102.0)  # pausing a whole pipeline works
    assert await store.is_paused(P) and await untracked.is_paused(P)
    assert (await untracked.pipelines())[P].paused
    await untracked.ping()
