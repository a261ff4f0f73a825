"""Workers that wait out an outage of a shared store instead of stopping.

A PostgreSQL server restarts (an upgrade, a failover); its workers should pause, not exit. The
wrappers here retry a store's :class:`~sluice.errors.Unavailable` errors with capped exponential
backoff, for up to the store's ``patience_s``; past that the error goes up as before (the loop
stops and the process exits non-zero, for its supervisor to restart).

Rules:

1. Only :class:`~sluice.errors.Unavailable` is retried: anything else is a defect or a refusal
   that retrying cannot change.
2. A write retried after its commit's answer was lost may find its own first try committed:
   every write the consumer loop makes is a compare-and-set under its owner id, so the retry
   either does the same again (a claim, an extension: the attempt may be counted twice) or
   finds the task not RUNNING under it any more (a completion: reported lost, its message
   settled), never a second run of a finished task.
3. A fetch that meets an outage returns no deliveries after one backoff step, so the loop goes
   on (and its other tasks too) instead of blocking in it.
4. One warning when an outage starts and one line when it ends, per wrapper.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from sluice.connectors.base import Delivery, Source
from sluice.errors import Unavailable
from sluice.tasks.state import TaskState
from sluice.tasks.store import (
    Claim,
    ClaimResult,
    Completion,
    DeadLetterRecord,
    NewTask,
    Outbox,
    OutboxItem,
    StoredPipeline,
    TaskRecord,
    TaskStore,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0


class Patience:
    """Retries of one component's calls through an outage (rules 1, 4)."""

    def __init__(self, what: str, patience_s: float) -> None:
        self.what = what
        self.patience_s = patience_s
        self._down_since: float | None = None

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        backoff_s = FIRST_BACKOFF_S
        while True:
            try:
                result = await fn()
            except Unavailable as exc:
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = now
                    log.warning("%s unavailable; retrying for up to %gs: %s", self.what,
                                self.patience_s, exc)
                if now - self._down_since >= self.patience_s:
                    raise
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
                continue
            self.recovered()
            return result

    async def or_nothing(self, fn: Callable[[], Awaitable[list[T]]],
                         wait_s: float) -> list[T]:
        """``fn``'s items; during an outage none, after one backoff step (rule 3), until the
        outage has lasted ``patience_s``."""
        try:
            got = await fn()
        except Unavailable as exc:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("%s unavailable; waiting for it: %s", self.what, exc)
            elif time.monotonic() - self._down_since >= self.patience_s:
                raise
            await asyncio.sleep(min(MAX_BACKOFF_S, max(wait_s, FIRST_BACKOFF_S)))
            return []
        self.recovered()
        return got

    def recovered(self) -> None:
        if self._down_since is not None:
            log.warning("%s available again after %.1fs", self.what,
                        time.monotonic() - self._down_since)
            self._down_since = None


class PatientTaskStore:
    """:class:`~sluice.tasks.store.TaskStore` whose calls wait out an outage of ``inner``."""

    def __init__(self, inner: TaskStore, patience_s: float, what: str = "task store") -> None:
        self.inner = inner
        self.patience = Patience(what, patience_s)

    async def ping(self) -> None:
        await self.inner.ping()

    async def create(self, pipeline: str, tenant: str, tasks: Sequence[NewTask],
                     now: float) -> builtins.list[TaskRecord | None]:
        return await self.inner.create(pipeline, tenant, tasks, now)

    async def forget_queued(self, pipeline: str, task_ids: Sequence[str]) -> None:
        await self.patience.call(lambda: self.inner.forget_queued(pipeline, task_ids))

    async def exists(self, pipeline: str, task_id: str) -> bool:
        return await self.inner.exists(pipeline, task_id)

    async def find(self, task_id: str) -> builtins.list[TaskRecord]:
        return await self.inner.find(task_id)

    async def claim(self, pipeline: str, tenant: str, claims: Sequence[Claim], owner: str,
                    lease_s: float, now: float) -> builtins.list[ClaimResult]:
        return await self.patience.call(
            lambda: self.inner.claim(pipeline, tenant, claims, owner, lease_s, now))

    async def start(self, pipeline: str, task_ids: Sequence[str], owner: str,
                    now: float) -> builtins.list[ClaimResult]:
        return await self.patience.call(lambda: self.inner.start(pipeline, task_ids, owner, now))

    async def extend(self, pipeline: str, task_ids: Sequence[str], owner: str,
                     lease_s: float, now: float) -> builtins.list[str]:
        return await self.patience.call(
            lambda: self.inner.extend(pipeline, task_ids, owner, lease_s, now))

    async def set_paused(self, pipeline: str, paused: bool, now: float) -> None:
        await self.inner.set_paused(pipeline, paused, now)

    async def is_paused(self, pipeline: str) -> bool:
        return await self.patience.call(lambda: self.inner.is_paused(pipeline))

    async def pipelines(self) -> dict[str, StoredPipeline]:
        return await self.inner.pipelines()

    async def counts(self) -> dict[tuple[str, str], int]:
        return await self.inner.counts()

    async def complete(self, pipeline: str, completions: Sequence[Completion], owner: str,
                       now: float) -> builtins.list[TaskState | None]:
        return await self.patience.call(
            lambda: self.inner.complete(pipeline, completions, owner, now))

    async def release(self, pipeline: str, task_ids: Sequence[str], owner: str) -> None:
        await self.patience.call(lambda: self.inner.release(pipeline, task_ids, owner))

    async def unclaim(self, pipeline: str, task_ids: Sequence[str], owner: str, *,
                      started: bool = True) -> None:
        await self.patience.call(
            lambda: self.inner.unclaim(pipeline, task_ids, owner, started=started))

    async def get(self, task_id: str, pipeline: str | None = None) -> TaskRecord:
        return await self.inner.get(task_id, pipeline)

    async def list(self, pipeline: str | None = None, state: TaskState | None = None,
                   limit: int = 50, before_seq: int | None = None,
                   pipelines: Sequence[str] | None = None) -> builtins.list[TaskRecord]:
        return await self.inner.list(pipeline, state, limit, before_seq, pipelines)

    async def stats(self, pipeline: str | None = None) -> builtins.list[TaskRecord]:
        return await self.inner.stats(pipeline)

    async def transition(self, pipeline: str, task_id: str, wanted: TaskState,
                         now: float) -> TaskRecord:
        return await self.inner.transition(pipeline, task_id, wanted, now)

    async def dead_letters(self, pipeline: str, task_ids: Sequence[str] | None = None,
                           limit: int = 100, replayed: bool = True,
                           ) -> builtins.list[DeadLetterRecord]:
        return await self.inner.dead_letters(pipeline, task_ids, limit, replayed)

    async def mark_replayed(self, pipeline: str, replays: Sequence[tuple[str, str]],
                            now: float) -> None:
        await self.inner.mark_replayed(pipeline, replays, now)


class PatientSource:
    """:class:`~sluice.connectors.base.Source` that waits out an outage of ``inner``'s store:
    a fetch returns nothing for the while (rule 3), settlements are retried."""

    def __init__(self, inner: Source, patience_s: float, what: str = "queue") -> None:
        self.inner = inner
        self.lease_s = inner.lease_s
        self.orders_keys = bool(getattr(inner, "orders_keys", False))
        self.shares_backlog = bool(getattr(inner, "shares_backlog", False))
        self.patience = Patience(what, patience_s)

    async def start(self) -> None:
        await self.patience.call(self.inner.start)

    async def fetch(self, max_n: int, wait_s: float) -> list[Delivery]:
        return await self.patience.or_nothing(lambda: self.inner.fetch(max_n, wait_s), wait_s)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        await self.patience.call(lambda: self.inner.ack(deliveries))

    async def retry_later(self, deliveries: Sequence[tuple[Delivery, float]]) -> None:
        await self.patience.call(lambda: self.inner.retry_later(deliveries))

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        await self.patience.call(lambda: self.inner.extend(deliveries))

    async def pending(self) -> int:
        return await self.patience.call(self.inner.pending)

    async def close(self) -> None:
        await self.inner.close()


class PatientOutbox:
    """:class:`~sluice.tasks.store.Outbox` that waits out an outage of ``inner``'s store: a
    take returns nothing for the while (rule 3), settlements are retried."""

    def __init__(self, inner: Outbox, patience_s: float, what: str = "outbox") -> None:
        self.inner = inner
        self.patience = Patience(what, patience_s)

    async def take(self, max_n: int, wait_s: float) -> list[OutboxItem]:
        return await self.patience.or_nothing(lambda: self.inner.take(max_n, wait_s), wait_s)

    async def delivered(self, items: Sequence[OutboxItem]) -> None:
        await self.patience.call(lambda: self.inner.delivered(items))

    async def retry_later(self, item: OutboxItem, delay_s: float, error: str | None) -> None:
        await self.patience.call(lambda: self.inner.retry_later(item, delay_s, error))

    async def failed(self, item: OutboxItem, error: str) -> None:
        await self.patience.call(lambda: self.inner.failed(item, error))

    async def pending(self) -> int:
        return await self.patience.call(self.inner.pending)
