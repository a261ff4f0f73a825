"""The task store of a pipeline that does not track its tasks (``consumer.track_tasks: false``).

A Kafka source's committed offsets already say which messages are finished; a pipeline may
leave out the per-task records (two task-store writes per message) when it needs neither the
task API, per-task cancel/pause, nor dedup by task id across workers. What stays:

1. Every claim runs, started at once (a claim that asks only to reserve its task is started
   too: there is no count to defer); its attempt number is the source's delivery count
   (retries are held by the source, so they count as before, within one worker).
2. A completion is accepted as given. Its outbox messages (results for destinations that go
   through the outbox) are still written, in one transaction per batch: results are as
   reliable as with tracking.
3. Pausing a whole pipeline works, and so do reads of the whole store (they go to the real
   store); everything about single tasks finds nothing, and creating one is refused
   (:class:`~sluice.errors.Unsupported`: there is no task to submit).
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Sequence

from sluice.errors import TaskNotFound, Unsupported
from sluice.tasks.state import TaskState
from sluice.tasks.store import (
    Claim,
    ClaimResult,
    ClaimStatus,
    Completion,
    DeadLetterRecord,
    NewTask,
    OutboxEntry,
    StoredPipeline,
    TaskRecord,
    TaskStore,
)

PutOutbox = Callable[[Sequence[OutboxEntry]], Awaitable[None]]


class UntrackedStore:
    """:class:`~sluice.tasks.store.TaskStore` that records no task (see the rules)."""

    def __init__(self, inner: TaskStore, put_outbox: PutOutbox) -> None:
        self.inner = inner
        self.put_outbox = put_outbox  # the store's (sluice.stores.base.Store.put_outbox)

    async def ping(self) -> None:
        await self.inner.ping()

    async def create(self, pipeline: str, tenant: str, tasks: Sequence[NewTask],
                     now: float) -> builtins.list[TaskRecord | None]:
        raise Unsupported(f"pipeline {pipeline!r} does not track its tasks "
                          "(consumer.track_tasks: false): it takes no submitted tasks; "
                          "produce to its source instead")

    async def forget_queued(self, pipeline: str, task_ids: Sequence[str]) -> None:
        return None

    async def exists(self, pipeline: str, task_id: str) -> bool:
        return False

    async def find(self, task_id: str) -> builtins.list[TaskRecord]:
        return []

    async def claim(self, pipeline: str, tenant: str, claims: Sequence[Claim], owner: str,
                    lease_s: float, now: float) -> builtins.list[ClaimResult]:
        return [ClaimResult(ClaimStatus.RUN, c.deliveries, c.received_at, None, c.received_at,
                            now) for c in claims]

    async def start(self, pipeline: str, task_ids: Sequence[str], owner: str,
                    now: float) -> builtins.list[ClaimResult]:
        # Every claim here is started already (rule 1): a start only confirms it.
        return [ClaimResult(ClaimStatus.RUN, 1, None, None, None, now) for _ in task_ids]

    async def extend(self, pipeline: str, task_ids: Sequence[str], owner: str,
                     lease_s: float, now: float) -> builtins.list[str]:
        return []

    async def set_paused(self, pipeline: str, paused: bool, now: float) -> None:
        await self.inner.set_paused(pipeline, paused, now)

    async def is_paused(self, pipeline: str) -> bool:
        return await self.inner.is_paused(pipeline)

    async def pipelines(self) -> dict[str, StoredPipeline]:
        return await self.inner.pipelines()

    async def counts(self) -> dict[tuple[str, str], int]:
        return await self.inner.counts()

    async def complete(self, pipeline: str, completions: Sequence[Completion], owner: str,
                       now: float) -> builtins.list[TaskState | None]:
        outbox = [entry for done in completions for entry in done.outbox]
        if outbox:
            await self.put_outbox(outbox)
        return [done.state for done in completions]

    async def release(self, pipeline: str, task_ids: Sequence[str], owner: str) -> None:
        return None

    async def unclaim(self, pipeline: str, task_ids: Sequence[str], owner: str, *,
                      started: bool = True) -> None:
        return None

    async def get(self, task_id: str, pipeline: str | None = None) -> TaskRecord:
        raise TaskNotFound(task_id)

    async def list(self, pipeline: str | None = None, state: TaskState | None = None,
                   limit: int = 50, before_seq: int | None = None,
                   pipelines: Sequence[str] | None = None) -> builtins.list[TaskRecord]:
        return []

    async def transition(self, pipeline: str, task_id: str, wanted: TaskState,
                         now: float) -> TaskRecord:
        raise TaskNotFound(task_id)

    async def stats(self, pipeline: str | None = None) -> builtins.list[TaskRecord]:
        return []

    async def dead_letters(self, pipeline: str, task_ids: Sequence[str] | None = None,
                           limit: int = 100, replayed: bool = True,
                           ) -> builtins.list[DeadLetterRecord]:
        return []

    async def mark_replayed(self, pipeline: str, replays: Sequence[tuple[str, str]],
                            now: float) -> None:
        return None
