"""Submitting to a broker's source: the one rule every broker's submitter follows.

1. The tasks are created ``QUEUED`` in the task store first (a task id already used in the
   pipeline is refused there: its slot in the answer is ``None`` and nothing is published).
2. Then their messages are published, each with its task id, and the submit returns once the
   broker confirmed every one (a 202 means the task is on the broker).
3. If the publish fails, the tasks it created are removed again (they are still ``QUEUED``), so
   the same ids may be submitted again; the error is :class:`~sluice.errors.Misconfigured` when
   retrying cannot help, else :class:`~sluice.errors.Unavailable` (the gateway's 503).
4. A crash between 1 and 2 leaves a ``QUEUED`` task without a message (``sluice tasks`` shows
   it; submitting it again is refused as a duplicate): the cost of not holding a transaction
   across two systems.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from sluice.connectors.base import SinkRecord
from sluice.errors import DeliveryError, Misconfigured, Unavailable, Unsupported
from sluice.tasks.store import TaskRecord, TaskStore

if TYPE_CHECKING:
    from sluice.config.model import PipelineConfig
    from sluice.registry import Submission

TASK_ID = "sluice-task-id"  # the header (property, field) a submitted message carries its id in

# Publishes the new tasks' messages (each submission with its record), confirmed, or raises
# DeliveryError.
Publish = Callable[[Sequence[tuple["Submission", SinkRecord]]], Awaitable[None]]


def check_submittable(config: PipelineConfig, id_key: str, id_value: str,
                      publish_instead: str) -> None:
    """Refuse submitting to a pipeline whose worker would not find the task: one that does not
    track tasks, or whose source reads the task id from elsewhere than :data:`TASK_ID`
    (``id_key`` names that setting of the source, ``id_value`` its value)."""
    if not config.consumer.track_tasks:
        raise Unsupported(f"pipeline {config.name!r} does not track its tasks "
                          f"(consumer.track_tasks: false): {publish_instead} instead")
    if id_value != TASK_ID:
        raise Misconfigured(f"pipeline {config.name!r}: submitting needs the source's "
                            f"{id_key} to be {TASK_ID!r}, it is {id_value!r}")


def record_of(item: Submission) -> SinkRecord:
    """A submission's message as the record a sink writes."""
    m = item.message
    return SinkRecord(m.task_id, m.body, m.content_type, m.key, dict(m.headers or {}))


async def create_then_publish(store: TaskStore, config: PipelineConfig,
                              items: Sequence[Submission], publish: Publish,
                              where: str) -> list[TaskRecord | None]:
    """Rules 1-3; ``where`` names the broker's queue or topic in an error."""
    created: list[TaskRecord | None] = [None] * len(items)
    for tenant in dict.fromkeys(i.tenant for i in items):  # a hosting pipeline's: several
        idx = [n for n, i in enumerate(items) if i.tenant == tenant]
        made = await store.create(
            config.name, tenant, [items[n].new_task() for n in idx], time.time())
        for n, record in zip(idx, made, strict=True):
            created[n] = record
    fresh = [(item, record_of(item)) for item, rec in zip(items, created, strict=True)
             if rec is not None]
    if not fresh:
        return created
    try:
        await publish(fresh)
    except DeliveryError as exc:
        await store.forget_queued(config.name, [r.task_id for _, r in fresh])
        refused = Misconfigured if exc.permanent else Unavailable
        raise refused(f"{where}: {exc}") from None
    return created
