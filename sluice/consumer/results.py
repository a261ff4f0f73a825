"""Where a finished task's result record goes: :class:`ResultRouter`, built once per pipeline.

Rules:

1. A task that ends SUCCEEDED or FAILED gets one result record (:mod:`sluice.sinks.record`),
   made only if a destination of that state takes it, and shared by all of them.
2. Each destination takes it one of two ways, decided once when the pipeline is built: through
   the outbox (an :class:`~sluice.tasks.store.OutboxEntry` under the destination's label,
   written with the task's completion: :mod:`sluice.sinks.delivery`), or written by the source
   with its acknowledgement (an :class:`~sluice.connectors.base.Output` to a topic: rule 9 of
   the consumer loop).
3. A task already final when its message is read again gets its record made again from the
   task store, for the destinations written with the acknowledgement only (its outbox entries
   were written with its completion).
4. A dead letter is the message as it was, with the headers of
   :func:`~sluice.sinks.record.dead_letter_headers` (the same names as the dead letter of a
   result record whose delivery failed: :mod:`sluice.sinks.delivery`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from sluice import tracing
from sluice.config.destinations import Destination
from sluice.config.model import PipelineConfig
from sluice.connectors.base import Delivery, Output, SinkRecord
from sluice.message import Outcome
from sluice.sinks import record
from sluice.tasks.state import TaskState
from sluice.tasks.store import ClaimResult, OutboxEntry, TaskRecord

SLOT_STATES = {"on_success": TaskState.SUCCEEDED, "on_failure": TaskState.FAILED}
NOTHING: tuple[tuple[OutboxEntry, ...], tuple[Output, ...]] = ((), ())
NO_HEADERS: Mapping[str, str] = MappingProxyType({})  # shared: a record's headers are read only


class ResultRouter:
    """The result records of one pipeline (see the rules)."""

    def __init__(self, config: PipelineConfig, outboxed: Sequence[Destination] = (),
                 with_ack: Sequence[tuple[Destination, str]] = ()) -> None:
        """``outboxed``: destinations that go through the outbox; ``with_ack``: those the
        source writes with its acknowledgement, each with its topic."""
        self.pipeline = config.name
        self.tenant = config.tenant
        states = (TaskState.SUCCEEDED, TaskState.FAILED)
        self._labels = {s: tuple(d.label for d in outboxed if SLOT_STATES[d.slot] == s)
                        for s in states}
        self._topics = {s: tuple(t for d, t in with_ack if SLOT_STATES[d.slot] == s)
                        for s in states}
        self._takes = frozenset(s for s in states if self._labels[s] or self._topics[s])
        self.writes_with_ack = bool(with_ack)

    def route(self, delivery: Delivery, claim: ClaimResult, state: TaskState,
              outcome: Outcome, error_message: str | None = None,
              ) -> tuple[tuple[OutboxEntry, ...], tuple[Output, ...]]:
        """Rules 1-2: the outbox entries and the outputs of a task that ends in ``state`` now."""
        if state not in self._takes:
            return NOTHING
        body = record.encode(record.TaskOutcome(
            self.pipeline, self.tenant, delivery.task_id, str(state), claim.attempts,
            delivery.key, delivery.body, delivery.content_type, outcome.result,
            outcome.result_type, outcome.error_type, error_message or outcome.error_message,
            claim.received_at, claim.queued_at, claim.started_at, time.time()))
        # Tracing (issue 17 item 3): the record's headers carry the attempt span's context
        # (tracing off: the message's traceparent/tracestate copied; none: no headers).
        sink_record = SinkRecord(delivery.task_id, body, record.CONTENT_TYPE, delivery.key,
                                 tracing.record_headers(delivery.headers))
        labels, topics = self._labels[state], self._topics[state]
        return (tuple([OutboxEntry(self.pipeline, label, sink_record) for label in labels])
                if labels else (),
                tuple([Output(topic, sink_record) for topic in topics]) if topics else ())

    def stored(self, delivery: Delivery, task: TaskRecord) -> tuple[Output, ...]:
        """Rule 3: the outputs of a task already final, its record made from the store."""
        state = task.state
        if not self._topics.get(state):
            return ()
        body = record.encode(record.TaskOutcome(
            self.pipeline, self.tenant, delivery.task_id, str(state), task.attempts,
            delivery.key, delivery.body, delivery.content_type, task.result, task.result_type,
            task.error_type, task.error_message, task.received_at, task.queued_at,
            task.started_at, task.finished_at or task.updated_at or time.time()))
        # Tracing (issue 17 item 3): no attempt here: the message's trace context, if any.
        sink_record = SinkRecord(delivery.task_id, body, record.CONTENT_TYPE, delivery.key,
                                 tracing.record_headers(delivery.headers))
        return tuple([Output(topic, sink_record) for topic in self._topics[state]])

    def dead_letter(self, delivery: Delivery, outcome: Outcome, attempts: int,
                    reason: str) -> SinkRecord:
        """Rule 4: the dead letter of a task that failed for good."""
        headers = record.dead_letter_headers(
            delivery.headers, pipeline=self.pipeline, task_id=delivery.task_id,
            attempts=attempts, reason=reason, error_type=outcome.error_type,
            error_message=outcome.error_message)
        return SinkRecord(delivery.task_id, delivery.body, delivery.content_type, delivery.key,
                          headers)
