"""Submitting tasks to a pipeline from this process (the CLI's local submit, dead-letter
replays): the task is created QUEUED and its message put on the pipeline's source.

- embedded queue: task and message in one transaction (:func:`sluice.connectors.embedded.submit`);
- Kafka: the task, then its message produced with the task id header
  (:class:`sluice.connectors.kafka_submit.KafkaSubmitter`).

The result has one slot per message: the created task, or ``None`` where the task id was
already used in the pipeline (nothing was submitted for it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sluice.config.model import PipelineConfig
from sluice.connectors.embedded import QueuedMessage, Submission, submit_in
from sluice.datadir import Database
from sluice.errors import SourceError
from sluice.tasks.store import TaskRecord

SUBMITTABLE = ("embedded", "kafka")


def source_queue(config: PipelineConfig) -> str:
    """The embedded queue a pipeline's tasks go to."""
    return str(config.source.config.get("queue") or config.name)


async def submit(db: Database, config: PipelineConfig, messages: Sequence[QueuedMessage],
                 *, delay_s: float = 0.0) -> list[TaskRecord | None]:
    kind = config.source.type
    if kind not in SUBMITTABLE:
        raise SourceError(f"pipeline {config.name!r}: submitting to a {kind!r} source is not "
                          f"supported; only to {' and '.join(SUBMITTABLE)}")
    items = [Submission(config.name, config.tenant, source_queue(config), m, delay_s)
             for m in messages]
    if kind == "embedded":
        return await db.run(lambda conn: submit_in(conn, items, time.time()))
    from sluice.connectors.kafka_submit import KafkaSubmitter

    submitter = KafkaSubmitter(db, config)
    try:
        return await submitter.submit(items)
    finally:
        await submitter.close()
