"""Counts per state and percentiles per stage over a set of tasks (``sluice tasks summary``).

A stage no task has reached has no percentiles (``None``), never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sluice.tasks.state import TaskState
from sluice.tasks.store import TaskRecord

STAGES = {
    "queued → started (wait)": ("queued_at", "started_at"),
    "started → finished (run, retries included)": ("started_at", "finished_at"),
    "received → finished (total)": ("received_at", "finished_at"),
}


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100); None for none."""
    if not sorted_values:
        return None
    rank = max(math.ceil(q / 100.0 * len(sorted_values)), 1)
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class Summary:
    counts: dict[str, int]  # state → tasks, and "total"
    stages: dict[str, tuple[float | None, float | None, int]]  # stage → (p50 s, p99 s, n)

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "stages": {name: {"p50_s": p50, "p99_s": p99, "n": n}
                       for name, (p50, p99, n) in self.stages.items()},
        }


def summarize(records: Sequence[TaskRecord]) -> Summary:
    counts = {str(s): 0 for s in TaskState}
    for r in records:
        counts[str(r.state)] += 1
    counts["total"] = len(records)
    stages: dict[str, tuple[float | None, float | None, int]] = {}
    for name, (start, end) in STAGES.items():
        spans = sorted(
            getattr(r, end) - getattr(r, start) for r in records
            if getattr(r, start) is not None and getattr(r, end) is not None
        )
        stages[name] = (percentile(spans, 50), percentile(spans, 99), len(spans))
    return Summary(counts, stages)
