"""``sluice tasks summary``'s numbers: no NaN when a stage has no tasks."""

from __future__ import annotations

import json

from sluice.tasks.summary import percentile, summarize


def test_percentile_of_nothing_is_none() -> None:
    assert percentile([], 50) is None
    assert percentile([0.5], 99) == 0.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0


def test_summary_of_no_tasks_is_valid_json_without_nan() -> None:
    summary = summarize([])
    assert summary.counts["total"] == 0
    text = json.dumps(summary.to_json(), allow_nan=False)
    stages = json.loads(text)["stages"]
    assert stages and all(s == {"p50_s": None, "p99_s": None, "n": 0} for s in stages.values())
