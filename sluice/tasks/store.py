"""The task store seam: :class:`TaskStore` and the values it trades in.

A store records every task of every pipeline: its state (see :mod:`sluice.tasks.state`),
attempts, result or error and stage timestamps. The consumer layer talks to it in batches
(:meth:`TaskStore.claim`, :meth:`TaskStore.start`, :meth:`TaskStore.complete`): this path is
hot.

Everything the gateway, the CLI and the submitters do with stored tasks is a method here, so
callers are typed against :class:`TaskStore` and the SQL stays in the implementations
(:mod:`sluice.tasks.sqlite`). ``tests/conformance/test_task_store.py`` is the contract every
implementation passes. A store that cannot be reached raises
:class:`~sluice.errors.Unavailable`; one that cannot be used until its settings change,
:class:`~sluice.errors.Misconfigured`.

Rules of the per-task detail (issue 17: the console's task page):

1. Attempt history (:class:`AttemptEntry`) is written only for tasks that take more than one
   attempt: a completion in state RETRYING writes its attempt's entry, and so does the final
   completion of an attempt numbered above 1, each in the completion's own transaction and only
   if the completion is written. A task that succeeds at its first attempt writes none (the
   common path costs nothing more). A completion with :attr:`Completion.attempt` 0 (not an
   attempt's end: a filtered or cancelled one) writes none.
2. A task's kept payload (the first ``consumer.keep_payload_bytes`` of its message body, its
   content type and full size) is written with the task row when the row is created (the
   submit's insert, or the claim's for a task first seen at the consumer), in the same
   statement: never a write of its own.
3. Both are read only by the single-task reads (:meth:`TaskStore.get`, :meth:`TaskStore.find`:
   one extra SELECT for the attempts); lists leave :attr:`TaskRecord.attempt_log` ``None``
   and no payload, and their JSON has neither key.
"""

from __future__ import annotations

import base64
import builtins
import codecs
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from sluice.connectors.base import SinkRecord
from sluice.tasks.state import FINAL, TaskState


@dataclass(frozen=True, slots=True)
class AttemptEntry:
    """One attempt of a task that took more than one (rule 1 of the module)."""

    attempt: int  # its number, from 1
    started_at: float | None
    ended_at: float | None
    outcome: str  # the state its completion wrote: RETRYING, SUCCEEDED or FAILED
    error_type: str | None = None
    error_message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "started_at": self.started_at,
                "ended_at": self.ended_at, "outcome": self.outcome,
                "error": ({"type": self.error_type, "message": self.error_message}
                          if self.error_type else None)}


def payload_json(body: bytes, content_type: str, size_bytes: int) -> dict[str, Any]:
    """A kept payload as the task API shows it: ``encoding`` ``json`` (``value`` is the decoded
    document: a JSON content type, not truncated), ``text`` (UTF-8; a character cut by the
    truncation is left out) or ``base64``."""
    truncated = size_bytes > len(body)
    out: dict[str, Any] = {"content_type": content_type, "size_bytes": size_bytes,
                           "kept_bytes": len(body), "truncated": truncated}
    if not truncated and is_json_type(content_type):
        try:
            return {**out, "encoding": "json", "value": json.loads(body)}
        except ValueError:
            pass
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(body, final=not truncated)
    except UnicodeDecodeError:
        return {**out, "encoding": "base64", "value": base64.b64encode(body).decode("ascii")}
    return {**out, "encoding": "text", "value": text}


def is_json_type(content_type: str) -> bool:
    """``application/json``, ``application/x+json`` (parameters aside)."""
    base = content_type.split(";", 1)[0].strip().lower()
    return base == "application/json" or base.endswith("+json")


@dataclass(frozen=True, slots=True)
class TaskRecord:
    pipeline: str
    task_id: str
    tenant: str
    state: TaskState
    attempts: int
    key: str | None = None
    result: bytes | None = None
    result_type: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    received_at: float | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    seq: int | None = None  # store order: newer tasks have larger values (list cursors)
    # Result deliveries, by destination: {"state": pending|delivered|failed, "at", "attempts",
    # "error"}; see sluice.sinks.delivery.
    delivered: dict[str, dict[str, Any]] | None = None
    error_traceback: str | None = None  # of the last attempt, when the handler raised
    # Read only by the single-task reads (rule 3 of the module); None from lists.
    attempt_log: list[AttemptEntry] | None = None  # [] when the task took one attempt
    payload: bytes | None = None  # the kept head of its message body (rule 2)
    payload_type: str | None = None
    payload_size: int | None = None  # the whole body's, in bytes

    @property
    def payload_truncated(self) -> bool:
        """Whether the kept payload is only the head of the body."""
        return (self.payload is not None and self.payload_size is not None
                and self.payload_size > len(self.payload))

    def timeline(self) -> list[tuple[str, float | None, float | None]]:
        """(stage, timestamp, seconds since the previous stage) for each stage."""
        out: list[tuple[str, float | None, float | None]] = []
        previous: float | None = None
        for stage in ("received", "queued", "started", "finished"):
            at: float | None = getattr(self, f"{stage}_at")
            since = at - previous if at is not None and previous is not None else None
            out.append((stage, at, since))
            previous = at if at is not None else previous
        return out

    def to_json(self) -> dict[str, Any]:
        result: Any = None
        if self.result is not None:
            if self.result_type == "application/json":
                result = json.loads(self.result)
            else:
                result = self.result.decode("utf-8", errors="replace")
        return {
            "task_id": self.task_id,
            "pipeline": self.pipeline,
            "tenant": self.tenant,
            "state": str(self.state),
            "attempts": self.attempts,
            "key": self.key,
            "result": result,
            "error": (
                {"type": self.error_type, "message": self.error_message,
                 "traceback": self.error_traceback}
                if self.error_type else None
            ),
            "timeline": [
                {"stage": stage, "at": at, "since_previous_s": since}
                for stage, at, since in self.timeline()
            ],
            "deliveries": self.delivered or {},
            **self._detail_json(),
        }

    def _detail_json(self) -> dict[str, Any]:
        """The single-task read's keys (rule 3 of the module): none from a list."""
        if self.attempt_log is None:
            return {}
        payload = (payload_json(self.payload, self.payload_type or "application/octet-stream",
                                self.payload_size or len(self.payload))
                   if self.payload is not None else None)
        return {"attempt_log": [a.to_json() for a in self.attempt_log], "payload": payload}


def kept(body: bytes | None, keep_bytes: int) -> bytes | None:
    """The head of ``body`` a task keeps (rule 2 of the module); None with ``keep_bytes`` 0."""
    if body is None or keep_bytes <= 0:
        return None
    return body[:keep_bytes]  # the body itself (no copy) when it is not longer


@dataclass(frozen=True, slots=True)
class NewTask:
    """A task to create (at submit)."""

    task_id: str
    key: str | None = None
    received_at: float | None = None
    # Its message body's kept head (:func:`kept`), content type and full size (rule 2).
    payload: bytes | None = None
    payload_type: str | None = None
    payload_size: int | None = None

    @classmethod
    def of(cls, task_id: str, key: str | None, received_at: float | None, body: bytes,
           content_type: str, keep_bytes: int) -> NewTask:
        """A task whose record keeps the first ``keep_bytes`` of ``body`` (0: none)."""
        head = kept(body, keep_bytes)
        if head is None:
            return cls(task_id, key, received_at)
        return cls(task_id, key, received_at, head, content_type, len(body))


class ClaimStatus(StrEnum):
    RUN = "run"  # claimed: run it (once started, :attr:`ClaimResult.started`)
    DONE = "done"  # final already: acknowledge the message, do not run
    BUSY = "busy"  # RUNNING under another live lease: leave it to its owner
    HELD = "held"  # PAUSED: keep the message, do not run


@dataclass(slots=True)  # never changed once made (frozen: a 5x slower init, per message)
class Claim:
    task_id: str
    key: str | None = None
    received_at: float | None = None  # used when the task is first seen at the consumer
    deliveries: int = 1  # times the source handed the message out (an untracked attempt count)
    # Start the attempt now (its ordering lane is free): count it and set the start time.
    # False: only reserve the task (RUNNING under the claimer's lease, attempts and start
    # unchanged) until :meth:`TaskStore.start` (rule 3 of :mod:`sluice.tasks.state`).
    start: bool = True
    # The tenant of a task first seen at the consumer (a hosting pipeline's message names
    # it); None: the tenant the claim is made for.
    tenant: str | None = None
    # A task first seen at the consumer keeps the first ``keep_payload_bytes`` of this body
    # (rule 2 of the module); the store cuts it only when it creates the task.
    body: bytes | None = None
    content_type: str | None = None
    keep_payload_bytes: int = 0


@dataclass(slots=True)  # never changed once made (frozen: a 5x slower init, per message)
class ClaimResult:
    status: ClaimStatus
    attempts: int = 0
    received_at: float | None = None
    lease_until: float | None = None  # for BUSY: when the other owner's lease ends
    queued_at: float | None = None
    started_at: float | None = None  # of the first attempt
    started: bool = True  # RUN: the attempt is counted; False: reserved, to start later


@dataclass(slots=True)  # never changed once made (frozen: a 5x slower init, per message)
class Completion:
    """The end of one attempt, to record with compare-and-set from RUNNING under ``owner``."""

    task_id: str
    state: TaskState  # SUCCEEDED, RETRYING, FAILED or FILTERED (the filter dropped it)
    result: bytes | None = None
    result_type: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    # Result records to put in the outbox in the same transaction as this completion, only if
    # it is written (the transactional outbox of result deliveries: :class:`Outbox`).
    outbox: tuple[OutboxEntry, ...] = ()
    error_traceback: str | None = None
    dead_letter: DeadLetter | None = None  # a FAILED task's message, kept for a replay
    # The attempt that ended (ClaimResult.attempts) and when it started (the worker's clock);
    # 0: not an attempt's end (nothing for the attempt history: rule 1 of the module).
    attempt: int = 0
    started_at: float | None = None


def logs_attempt(done: Completion) -> bool:
    """Whether writing ``done`` also writes its attempt's history entry (rule 1 of the
    module)."""
    return done.attempt > 0 and (done.state == TaskState.RETRYING
                                 or (done.attempt > 1 and done.state in FINAL))


@dataclass(slots=True)  # never changed once made (frozen: a 5x slower init, per message)
class OutboxEntry:
    """A result record for one destination of a pipeline, put in the outbox with its task's
    completion (:attr:`Completion.outbox`)."""

    pipeline: str
    destination: str  # the destination's label (sluice.config.destinations)
    record: SinkRecord


@dataclass(slots=True)
class OutboxItem:
    """An outbox entry taken for delivery: leased to its taker until settled."""

    destination: str  # the name it waited under: its key in the task's ``delivered`` map
    record: SinkRecord
    attempts: int  # delivery attempts, this one included
    enqueued_at: float | None = None
    ref: Any = None  # the store's own handle


class Outbox(Protocol):
    """The result records waiting for one destination of one pipeline (its entries come in
    with :meth:`TaskStore.complete`). Each settlement also writes the task's delivery status
    (``TaskRecord.delivered``) in the same transaction."""

    async def take(self, max_n: int, wait_s: float) -> list[OutboxItem]:
        """Up to ``max_n`` entries due now, waiting up to ``wait_s`` for the first one; each
        is leased (not handed out again) until settled or its lease ends."""
        ...

    async def delivered(self, items: Sequence[OutboxItem]) -> None:
        """Remove these, delivered (status ``delivered``)."""
        ...

    async def retry_later(self, item: OutboxItem, delay_s: float, error: str | None) -> None:
        """Hand ``item`` out again after ``delay_s``; with ``error``, status ``pending`` with
        that error (``None``: status unchanged)."""
        ...

    async def failed(self, item: OutboxItem, error: str) -> None:
        """Remove ``item``, given up (sent to the dead letter; status ``failed``)."""
        ...

    async def pending(self) -> int:
        """Entries not yet removed (due, delayed or leased)."""
        ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The message of a task that failed for good, as it was sent to the dead letter."""

    body: bytes
    content_type: str
    key: str | None = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A dead-lettered task: its message, why it failed, and whether it was replayed."""

    pipeline: str
    task_id: str
    message: DeadLetter
    failed_at: float
    error_type: str | None = None
    error_message: str | None = None
    attempts: int = 0
    replayed_as: str | None = None  # the task id of the replay
    replayed_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "pipeline": self.pipeline,
            "failed_at": self.failed_at,
            "attempts": self.attempts,
            "error": {"type": self.error_type, "message": self.error_message},
            "key": self.message.key,
            "content_type": self.message.content_type,
            "replayed_as": self.replayed_as,
            "replayed_at": self.replayed_at,
        }


@dataclass
class StoredPipeline:
    """What a store holds of one pipeline (``sluice pipelines list`` in local mode)."""

    name: str
    tenants: list[str] = field(default_factory=list)  # of its tasks (one, unless misconfigured)
    paused: bool = False
    counts: dict[str, int] = field(default_factory=dict)  # state → tasks


class TaskStore(Protocol):
    async def ping(self) -> None:
        """Return once the store answers a read; raise :class:`~sluice.errors.SourceError`
        otherwise (``/readyz``)."""
        ...

    async def create(self, pipeline: str, tenant: str, tasks: Sequence[NewTask],
                     now: float) -> list[TaskRecord | None]:
        """Create QUEUED tasks; for each, the record, or ``None`` if its id was already used
        in this pipeline, before or earlier in ``tasks`` (the caller reports the existing
        task: :meth:`get`). One slot per task: a batch may hold new and used ids at once."""
        ...

    async def forget_queued(self, pipeline: str, task_ids: Sequence[str]) -> None:
        """Delete tasks that are still QUEUED (a submit whose message could not be queued:
        no worker has seen them, so their ids may be submitted again). Others are kept."""
        ...

    async def exists(self, pipeline: str, task_id: str) -> bool:
        """Whether ``task_id`` is used in ``pipeline``."""
        ...

    async def find(self, task_id: str) -> list[TaskRecord]:
        """Every task with this id, across pipelines (an id is unique per pipeline only), each
        with its attempt history and kept payload as :meth:`get` reads them."""
        ...

    async def claim(self, pipeline: str, tenant: str, claims: Sequence[Claim], owner: str,
                    lease_s: float, now: float) -> list[ClaimResult]:
        """Move each task to RUNNING under ``owner`` for ``lease_s`` (see :class:`ClaimStatus`);
        a RUN claim with :attr:`Claim.start` counts the attempt (attempts + 1, the start time
        set if unset), one without only reserves the task (``started`` False in its result)."""
        ...

    async def start(self, pipeline: str, task_ids: Sequence[str], owner: str,
                    now: float) -> list[ClaimResult]:
        """Start the attempts of tasks ``owner`` reserved (claimed without
        :attr:`Claim.start`): attempts + 1, the start time set if unset; for each, RUN (with
        the counts now), or, if the task is not RUNNING under ``owner`` any more, DONE (final
        meanwhile), HELD (paused) or BUSY (taken over by another worker)."""
        ...

    async def extend(self, pipeline: str, task_ids: Sequence[str], owner: str,
                     lease_s: float, now: float) -> list[str]:
        """Extend ``owner``'s leases; return the ids it no longer holds (cancelled meanwhile,
        or taken over), whose attempts the caller should stop."""
        ...

    async def set_paused(self, pipeline: str, paused: bool, now: float) -> None:
        """Pause (or resume) a whole pipeline: its workers take no new work while paused."""
        ...

    async def is_paused(self, pipeline: str) -> bool: ...

    async def pipelines(self) -> dict[str, StoredPipeline]:
        """Every pipeline the store holds tasks or a pause setting of, by name."""
        ...

    async def counts(self) -> dict[tuple[str, str], int]:
        """(pipeline, state) → number of tasks, for every pipeline (metrics); states without
        tasks are absent."""
        ...

    async def complete(self, pipeline: str, completions: Sequence[Completion], owner: str,
                       now: float) -> list[TaskState | None]:
        """Record each attempt's end; for each, the state now, or ``None`` if the task was not
        RUNNING under ``owner`` any more (its lease was taken over, or it was cancelled) and
        nothing was written."""
        ...

    async def release(self, pipeline: str, task_ids: Sequence[str], owner: str) -> None:
        """End ``owner``'s leases now (at shutdown) so another worker can claim at once."""
        ...

    async def unclaim(self, pipeline: str, task_ids: Sequence[str], owner: str, *,
                      started: bool = True) -> None:
        """Hand back ``owner``'s claims of tasks whose handler never ran (at a stop): each goes
        back to QUEUED. ``started``: their attempts were counted (claimed with
        :attr:`Claim.start`, or :meth:`start`), so the count goes back to what it was before,
        and the start time is unset if that leaves no attempt; else they were only reserved,
        and their count and start time stay as they are."""
        ...

    async def get(self, task_id: str, pipeline: str | None = None) -> TaskRecord:
        """The task with its attempt history and kept payload (rule 3 of the module); raise
        :class:`~sluice.errors.TaskNotFound` if absent."""
        ...

    async def list(self, pipeline: str | None = None, state: TaskState | None = None,
                   limit: int = 50, before_seq: int | None = None,
                   pipelines: Sequence[str] | None = None) -> list[TaskRecord]:
        """Newest first (``seq`` descending), at most ``limit``; ``before_seq`` continues a
        page (the ``seq`` of its last task); ``pipelines`` restricts to a set (a tenant's)."""
        ...

    async def stats(self, pipeline: str | None = None) -> builtins.list[TaskRecord]:
        """Every task (of a pipeline), oldest first: the input of ``sluice tasks summary``."""
        ...

    async def transition(self, pipeline: str, task_id: str, wanted: TaskState,
                         now: float) -> TaskRecord:
        """A control change (cancel, pause, resume), compare-and-set; raise
        :class:`~sluice.errors.IllegalTransition` if the state machine forbids it."""
        ...

    async def dead_letters(self, pipeline: str, task_ids: Sequence[str] | None = None,
                           limit: int = 100, replayed: bool = True,
                           ) -> builtins.list[DeadLetterRecord]:
        """A pipeline's dead-lettered tasks (kept by :meth:`complete` from
        :attr:`Completion.dead_letter`), newest first; only ``task_ids`` if given; without
        those already replayed unless ``replayed``."""
        ...

    async def mark_replayed(self, pipeline: str, replays: Sequence[tuple[str, str]],
                            now: float) -> None:
        """Link each dead-lettered task to its replay: (task id, the replay's task id)."""
        ...
