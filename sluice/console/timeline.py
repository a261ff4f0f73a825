"""A task's stage timeline as bar segments: received → queued → started → finished →
delivered, on one time axis from the task's first moment.

Rules:

1. A segment spans two stage times the task record holds; a stage not reached yet ends its
   segment at ``now`` while the task is still on its way there (it waits, or runs), and has
   no segment once the task is final without it (a task cancelled while queued never started).
2. The task record keeps the first attempt's start and the last attempt's end, so the
   running segment spans every attempt, retry waits included; its label says how many.
3. Each result destination has its own delivery segment, from the end to its delivery (or to
   ``now`` while it is pending).
4. Positions are percentages of the whole span; a segment is at least :data:`MIN_WIDTH_PCT`
   wide so that an instant one stays visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sluice.tasks.state import TaskState
from sluice.tasks.store import TaskRecord

MIN_WIDTH_PCT = 0.6
WAITING = frozenset({TaskState.QUEUED, TaskState.RETRYING, TaskState.PAUSED})


@dataclass(frozen=True, slots=True)
class Segment:
    label: str
    kind: str  # intake | wait | run | deliver (the bar's colour)
    start: float
    end: float
    open: bool  # still going on (ends at now)
    left_pct: float = 0.0
    width_pct: float = 0.0

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
    if started is not None:
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
                              round(width, 3)))
    return placed, span_s
