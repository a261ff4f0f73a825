"""A task's stage timeline as bar segments: received → queued → started → finished →
delivered, per attempt, on one time axis from the task's first moment.

Rules:

1. A segment spans two stage times the task record holds; a stage not reached yet ends its
   segment at ``now`` while the task is still on its way there (it waits, or runs), and has
   no segment once the task is final without it (a task cancelled while queued never started).
2. A task with an attempt history (one that took more than one attempt: sluice.tasks.store
   rule 1) has one segment per attempt, from its start to its end, labelled with its outcome
   and error; the retry wait between two attempts is the gap between their segments. While
   the task waits for its next attempt, or runs one not ended yet, that attempt's segment runs
   from the previous one's end to ``now`` (its own start is not recorded until it ends). A
   task without a history (one attempt; or recorded before the history existed) has one
   running segment from the first attempt's start to the end, labelled with how many.
3. Each result destination has its own delivery segment, from the end to its delivery (or to
   ``now`` while it is pending).
4. Positions are percentages of the whole span; a segment is at least :data:`MIN_WIDTH_PCT`
   wide so that an instant one stays visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sluice.tasks.state import TaskState
from sluice.tasks.store import AttemptEntry, TaskRecord

MIN_WIDTH_PCT = 0.6
WAITING = frozenset({TaskState.QUEUED, TaskState.RETRYING, TaskState.PAUSED})


@dataclass(frozen=True, slots=True)
class Segment:
    label: str
    kind: str  # intake | wait | run | retry (an attempt that failed) | deliver (its colour)
    start: float
    end: float
    open: bool  # still going on (ends at now)
    left_pct: float = 0.0
    width_pct: float = 0.0
    attempt: int = 0  # an attempt's segment (rule 2): its number

    @property
    def seconds(self) -> float:
        return self.end - self.start


def segments(record: TaskRecord, now: float) -> tuple[list[Segment], float]:
    """The record's segments placed on its span, and the span in seconds."""
    out: list[Segment] = []
    received, queued = record.received_at, record.queued_at
    started, finished = record.started_at, record.finished_at
    if received is not None and queued is not None:
        out.append(Segment("received → queued", "intake", received, queued, False))
    if queued is not None:
        if started is not None:
            out.append(Segment("queued → started (waiting)", "wait", queued, started, False))
        elif record.state in WAITING or record.state == TaskState.RUNNING:
            out.append(Segment(f"queued, {str(record.state).lower()}", "wait", queued, now,
                               True))
    if record.attempt_log:
        out.extend(_attempts(record, record.attempt_log, now))
    elif started is not None:
        attempts = f"{record.attempts} attempt{'s' if record.attempts != 1 else ''}"
        if finished is not None:
            out.append(Segment(f"started → finished ({attempts})", "run", started, finished,
                               False))
        elif not record.state.final:
            out.append(Segment(f"running ({attempts})", "run", started, now, True))
    if finished is not None:
        for destination, delivery in sorted((record.delivered or {}).items()):
            out.append(_delivery(destination, delivery, finished, now))
    return _placed(out)


OUTCOMES = {"SUCCEEDED": "succeeded", "RETRYING": "failed, retried",
            "FAILED": "failed for good"}


def _attempts(record: TaskRecord, log: list[AttemptEntry], now: float) -> list[Segment]:
    """Rule 2: a segment per attempt of the history, then the one on its way, if any."""
    out: list[Segment] = []
    for entry in log:
        end = entry.ended_at if entry.ended_at is not None else now
        start = entry.started_at if entry.started_at is not None else end
        error = f": {entry.error_type}" if entry.error_type else ""
        outcome = OUTCOMES.get(entry.outcome, entry.outcome.lower())
        out.append(Segment(f"attempt {entry.attempt}: {outcome}{error}",
                           "run" if entry.outcome == "SUCCEEDED" else "retry",
                           min(start, end), end, False, attempt=entry.attempt))
    last = log[-1]
    if not record.state.final and last.ended_at is not None and (
            record.attempts > last.attempt or record.state == TaskState.RETRYING):
        waiting = record.state != TaskState.RUNNING
        label = (f"attempt {last.attempt + 1}: waiting for its retry" if waiting
                 else f"attempt {record.attempts}: retry wait, then running")
        out.append(Segment(label, "wait" if waiting else "run", last.ended_at,
                           max(now, last.ended_at), True,
                           attempt=last.attempt + 1 if waiting else record.attempts))
    return out


def _delivery(destination: str, delivery: dict[str, Any], finished: float,
              now: float) -> Segment:
    state = str(delivery.get("state") or "pending")
    at = delivery.get("at")
    done = state != "pending" and isinstance(at, int | float)
    end = float(at) if done and isinstance(at, int | float) else now
    return Segment(f"finished → {state} to {destination}", "deliver", finished, max(end, finished),
                   not done)


def _placed(found: list[Segment]) -> tuple[list[Segment], float]:
    if not found:
        return [], 0.0
    first = min(s.start for s in found)
    span_s = max(s.end for s in found) - first
    placed = []
    for s in found:
        left = 0.0 if span_s <= 0 else (s.start - first) / span_s * 100.0
        width = 100.0 if span_s <= 0 else (s.end - s.start) / span_s * 100.0
        width = max(MIN_WIDTH_PCT, width)
        left = min(left, 100.0 - width)
        placed.append(Segment(s.label, s.kind, s.start, s.end, s.open, round(left, 3),
                              round(width, 3), s.attempt))
    return placed, span_s
