"""The console's figures: quantiles of a histogram's buckets (as histogram_quantile), the
difference of two readings, and the handler-duration histogram read per pipeline."""

from __future__ import annotations

import math

import pytest

from sluice import metrics
from sluice.console.live import difference, handler_buckets, quantile
from sluice.console.timeline import MIN_WIDTH_PCT, segments
from sluice.tasks.state import TaskState
from sluice.tasks.store import TaskRecord

INF = math.inf


def test_a_quantile_is_interpolated_within_its_bucket() -> None:
    buckets = [(0.1, 0.0), (0.25, 50.0), (0.5, 100.0), (INF, 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.25)
    assert quantile(0.25, buckets) == pytest.approx(0.175)  # halfway into (0.1, 0.25]
    assert quantile(0.99, buckets) == pytest.approx(0.495)


def test_a_quantile_in_the_last_bucket_is_its_lower_bound_and_none_without_data() -> None:
    assert quantile(0.99, [(0.1, 1.0), (1.0, 1.0), (INF, 100.0)]) == 1.0
    assert quantile(0.5, [(0.1, 0.0), (INF, 0.0)]) is None
    assert quantile(0.5, []) is None


def test_the_difference_of_two_readings_is_what_was_observed_between_them() -> None:
    before = [(0.1, 5.0), (1.0, 10.0), (INF, 10.0)]
    now = [(0.1, 5.0), (1.0, 30.0), (INF, 31.0)]
    assert difference(now, before) == [(0.1, 0.0), (1.0, 20.0), (INF, 21.0)]
    assert quantile(0.5, difference(now, before)) == pytest.approx(0.1 + 0.9 * 10.5 / 20)


def test_handler_durations_are_read_per_pipeline_over_every_outcome() -> None:
    for seconds in (0.02, 0.03, 0.04):
        metrics.HANDLER_SECONDS.labels("console-unit", "success").observe(seconds)
    metrics.HANDLER_SECONDS.labels("console-unit", "retry").observe(3.0)
    buckets = dict(handler_buckets()["console-unit"])
    assert buckets[0.025] == 1 and buckets[0.05] == 3 and buckets[5.0] == 4
    assert buckets[INF] == 4
    p50 = quantile(0.5, sorted(buckets.items()))
    assert p50 is not None and 0.025 < p50 <= 0.05


def record(**fields: object) -> TaskRecord:
    base: dict[str, object] = {"pipeline": "p", "task_id": "t", "tenant": "a",
                               "state": TaskState.SUCCEEDED, "attempts": 1}
    return TaskRecord(**{**base, **fields})  # type: ignore[arg-type]


def test_a_finished_task_s_timeline_spans_its_stages_and_deliveries() -> None:
    bars, span_s = segments(record(received_at=100.0, queued_at=100.0, started_at=101.0,
                                   finished_at=103.0, attempts=2,
                                   delivered={"hook": {"state": "delivered", "at": 104.0}}),
                            now=200.0)
    assert [b.kind for b in bars] == ["intake", "wait", "run", "deliver"]
    assert span_s == 4.0
    run = bars[2]
    assert (run.left_pct, run.width_pct) == (25.0, 50.0) and "2 attempts" in run.label
    assert bars[0].width_pct == MIN_WIDTH_PCT  # an instant stays visible
    assert not any(b.open for b in bars)


def test_a_waiting_task_s_bar_runs_to_now_and_a_cancelled_one_has_no_run() -> None:
    (_intake, wait), span_s = segments(record(state=TaskState.QUEUED, attempts=0,
                                             received_at=10.0, queued_at=10.0), now=15.0)
    assert wait.open and wait.end == 15.0 and span_s == 5.0
    bars, _ = segments(record(state=TaskState.CANCELLED, attempts=0, received_at=10.0,
                              queued_at=10.0, finished_at=12.0), now=15.0)
    assert [b.kind for b in bars] == ["intake"]
