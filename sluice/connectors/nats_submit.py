"""Submitting tasks to a pipeline whose source is a NATS JetStream stream (``sluice submit``,
the HTTP trigger), by the rules of :mod:`sluice.connectors.publishing`:

1. The task is created in the store (``QUEUED``); a task id already used in the pipeline is
   refused before anything is published.
2. Its message is published to the source's subject (``<subject>.<key>`` with a key) with the
   task id in ``sluice-task-id`` and ``Nats-Msg-Id``; a submit succeeds once JetStream
   acknowledged it (a 202 means the task is in the stream).
3. If the publish fails, the tasks it created are removed again, so the same task id may be
   submitted again.
4. JetStream has no delayed publish: a delay is refused (the registry's capability).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sluice import registry
from sluice.config.model import PipelineConfig
from sluice.connectors import nats_client as nc
from sluice.connectors.base import SinkRecord
from sluice.connectors.nats import SPEC
from sluice.connectors.publishing import check_submittable, create_then_publish
from sluice.tasks.store import TaskRecord, TaskStore

log = logging.getLogger("sluice.connectors.nats")


class NatsSubmitter:
    """Submits to one NATS-sourced pipeline (see the module rules)."""

    def __init__(self, store: TaskStore, config: PipelineConfig) -> None:
        source = SPEC.typed(config.source.config)
        check_submittable(config, "task_id_header", source.task_id_header,
                          "publish to its stream")
        self.store = store
        self.config = config
        self.source = source
        self.conn = nc.Connection(source.url, f"nats submitter of stream {source.stream!r}",
                                  connect_timeout_s=source.connect_timeout_s, logger=log)
        self._ready = False

    async def submit(self, items: Sequence[registry.Submission]) -> list[TaskRecord | None]:
        await self._start()

        async def publish(fresh: Sequence[tuple[registry.Submission, SinkRecord]]) -> None:
            await nc.publish(self.conn, self.source.stream, self.source.base_subject,
                             [r for _, r in fresh], nc.API_TIMEOUT_S)

        return await create_then_publish(self.store, self.config, items, publish,
                                         f"nats stream {self.source.stream!r}")

    async def _start(self) -> None:
        if self._ready:
            return
        await self.conn.connect()
        await nc.ensure_stream(self.conn, self.source.stream, self.source.base_subject, None,
                               "create it first: a submit never creates streams (a worker "
                               "whose source sets create_stream creates it when it starts)")
        self._ready = True

    async def close(self) -> None:
        await self.conn.close()
