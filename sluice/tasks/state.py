"""The task state machine.

::

      submit ──► QUEUED ──── claim ────► RUNNING ──── handler result ────► SUCCEEDED
                  │  ▲                    │  │  ▲
            pause │  │ resume             │  │  └──── claim ──── RETRYING ◄─┐
                  ▼  │                    │  │                               │
                 PAUSED                   │  └── error, attempts left ───────┘
                                          └───── error, none left / Reject ──► FAILED

      QUEUED, RETRYING, PAUSED, RUNNING ── cancel ──► CANCELLED
      RUNNING ── the pipeline's filter dropped its message ──► FILTERED
      RUNNING ── claim after the owner's lease lapsed (it died) ──► RUNNING   (failover)
      RUNNING (reserved) ── start, when its ordering lane admits it ──► RUNNING (started)
      RUNNING ── handed back unstarted by its owner (a stop) ──► QUEUED    (un-claim)
      (no record) ── first seen at a consumer (a Kafka message, no submit) ──► RUNNING

A claim takes the task under the worker's lease (RUNNING); it *starts* the attempt at once
when the task's ordering lane is free, else it only *reserves* the task (attempts and start
time unchanged) until the lane admits it and the worker records the start.

FILTERED ends a task whose message the pipeline's ``filter`` dropped
(:mod:`sluice.consumer.gate`): the message is acknowledged, the handler never runs, no result
record is made (``on_success`` and ``on_failure`` get nothing) and nothing is dead-lettered.
(A payload that fails the pipeline's ``schema`` is not FILTERED: it ends FAILED, in the dead
letter.)

Invariants:

1. Every change is compare-and-set on the current state (and, from RUNNING, on the lease
   owner): a change the table below does not list is refused with ``IllegalTransition``.
2. SUCCEEDED, FAILED, CANCELLED and FILTERED are final: nothing leaves them. A message whose
   task is final is acknowledged and skipped, never run again.
3. ``attempts`` counts starts, and a start is recorded before the handler runs, so an attempt
   lost with its worker counts too: a message that kills every worker that takes it still
   ends, FAILED, after ``max_attempts``. A reserved task (claimed while it waits in its
   ordering lane behind its key's predecessor) has no attempt counted and no start time set
   for that wait: a worker that dies meanwhile costs it nothing, and the next claim after its
   lease lapses takes it as it was. A task its owner hands back without having run it (a
   stop) goes back to QUEUED with ``attempts`` as before its claim (a start counted for it is
   undone). These moves belong to the worker's lease, not to the control table below (no user
   command reaches them).
4. A reserved task is RUNNING under its claimer's lease like a started one, so no other
   worker claims it while it waits (failover dedup), and a cancel reaches it as it does a
   running one.
"""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    PAUSED = "PAUSED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    FILTERED = "FILTERED"  # dropped by the pipeline's filter: acknowledged, never run

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED,
                   TaskState.FILTERED})

TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.QUEUED: frozenset({TaskState.RUNNING, TaskState.PAUSED, TaskState.CANCELLED}),
    TaskState.RETRYING: frozenset({TaskState.RUNNING, TaskState.PAUSED, TaskState.CANCELLED}),
    TaskState.PAUSED: frozenset({TaskState.QUEUED, TaskState.CANCELLED}),
    TaskState.RUNNING: frozenset({
        TaskState.RUNNING, TaskState.SUCCEEDED, TaskState.RETRYING, TaskState.FAILED,
        TaskState.CANCELLED, TaskState.FILTERED,
    }),
    TaskState.SUCCEEDED: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.CANCELLED: frozenset(),
    TaskState.FILTERED: frozenset(),
}


def allowed(current: TaskState, wanted: TaskState) -> bool:
    return wanted in TRANSITIONS[current]
