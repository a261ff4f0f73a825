"""The task state machine.

::

      submit ──► QUEUED ──── claim ────► RUNNING ──── handler result ────► SUCCEEDED
                  │  ▲                    │  │  ▲
            pause │  │ resume             │  │  └──── claim ──── RETRYING ◄─┐
                  ▼  │                    │  │                               │
                 PAUSED                   │  └── error, attempts left ───────┘
                                          └───── error, none left / Reject ──► FAILED

      QUEUED, RETRYING, PAUSED, RUNNING ── cancel ──► CANCELLED
      RUNNING ── claim after the owner's lease lapsed (it died) ──► RUNNING   (failover)
      RUNNING ── handed back unstarted by its owner (a stop) ──► QUEUED    (un-claim)
      (no record) ── first seen at a consumer (a Kafka message, no submit) ──► RUNNING

Invariants:

1. Every change is compare-and-set on the current state (and, from RUNNING, on the lease
   owner): a change the table below does not list is refused with ``IllegalTransition``.
2. SUCCEEDED, FAILED and CANCELLED are final: nothing leaves them. A message whose task is final
   is acknowledged and skipped, never run again.
3. ``attempts`` counts claims, so an attempt lost with its worker counts too: a message that
   kills every worker that takes it still ends, FAILED, after ``max_attempts``. A claim its
   owner hands back without having started the attempt (a stop while the task waited in its
   ordering lane) is undone: QUEUED again, ``attempts`` as before. This move belongs to the
   worker's lease, not to the control table below (no user command reaches it).
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

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})

TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.QUEUED: frozenset({TaskState.RUNNING, TaskState.PAUSED, TaskState.CANCELLED}),
    TaskState.RETRYING: frozenset({TaskState.RUNNING, TaskState.PAUSED, TaskState.CANCELLED}),
    TaskState.PAUSED: frozenset({TaskState.QUEUED, TaskState.CANCELLED}),
    TaskState.RUNNING: frozenset({
        TaskState.RUNNING, TaskState.SUCCEEDED, TaskState.RETRYING, TaskState.FAILED,
        TaskState.CANCELLED,
    }),
    TaskState.SUCCEEDED: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.CANCELLED: frozenset(),
}


def allowed(current: TaskState, wanted: TaskState) -> bool:
    return wanted in TRANSITIONS[current]
