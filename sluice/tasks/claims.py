"""The claim rule, one place for every store: what a claim does to a task that exists.

A store reads the task's row (under its own lock: SQLite's write transaction, PostgreSQL's
``FOR UPDATE``), asks :func:`decide`, and writes the row it returns. The states and their
transitions are in :mod:`sluice.tasks.state`; ``tests/conformance/test_task_store.py`` checks
the outcome on every store.
"""

from __future__ import annotations

from sluice.tasks.state import FINAL, TaskState
from sluice.tasks.store import Claim, ClaimResult, ClaimStatus

# A task's row as a claim reads it: state, attempts, lease_until, lease_owner, received_at,
# queued_at, started_at.
Row = tuple[str, int, float | None, str | None, float | None, float | None, float | None]


def decide(claim: Claim, row: Row, owner: str, lease_until: float,
           now: float) -> tuple[ClaimResult, Row | None]:
    """The claim's result and, when it runs (RUN), the task's row to write: RUNNING under
    ``owner`` until ``lease_until``, the attempt counted and the first start set if the claim
    starts it (else only reserved). A final task is DONE, a paused one HELD, one RUNNING under
    another owner's live lease BUSY (with that lease's end); nothing is written for those."""
    state, attempts, their_lease, their_owner, received, queued, started = row
    if state in FINAL:
        return ClaimResult(ClaimStatus.DONE, attempts, received), None
    if state == TaskState.PAUSED:
        return ClaimResult(ClaimStatus.HELD, attempts, received), None
    if (state == TaskState.RUNNING and their_owner != owner
            and their_lease is not None and their_lease > now):
        return ClaimResult(ClaimStatus.BUSY, attempts, received, their_lease), None
    if claim.start:  # else only reserved: counted by start() (rule 3 of the states)
        attempts += 1
        started = started if started is not None else now
    return (ClaimResult(ClaimStatus.RUN, attempts, received, None, queued, started, claim.start),
            ("RUNNING", attempts, lease_until, owner, received, queued, started))
