"""The console's task timeline with an attempt history (sluice.console.timeline rule 2): one
bar per attempt with its outcome, the retry waits as gaps, the attempt on its way to now."""

from __future__ import annotations

from sluice.console.timeline import segments
from sluice.tasks.state import TaskState
from sluice.tasks.store import AttemptEntry, TaskRecord


def record(**fields: object) -> TaskRecord:
    base: dict[str, object] = {"pipeline": "p", "task_id": "t", "tenant": "a",
                               "state": TaskState.SUCCEEDED, "attempts": 3,
                               "received_at": 100.0, "queued_at": 100.0, "started_at": 101.0}
    return TaskRecord(**{**base, **fields})  # type: ignore[arg-type]


LOG = [AttemptEntry(1, 101.0, 102.0, "RETRYING", "RuntimeError", "boom"),
       AttemptEntry(2, 104.0, 105.0, "RETRYING", "RuntimeError", "boom"),
       AttemptEntry(3, 108.0, 110.0, "SUCCEEDED")]


def test_a_retried_task_has_a_bar_per_attempt_with_gaps_between() -> None:
    bars, span_s = segments(record(finished_at=110.0, attempt_log=LOG,
                                   delivered={"hook": {"state": "delivered", "at": 110.0}}),
                            now=200.0)
    assert [b.kind for b in bars] == ["intake", "wait", "retry", "retry", "run", "deliver"]
    assert span_s == 10.0
    one, two, three = bars[2:5]
    assert [b.attempt for b in (one, two, three)] == [1, 2, 3]
    assert one.label == "attempt 1: failed, retried: RuntimeError"
    assert three.label == "attempt 3: succeeded"
    assert (one.left_pct, one.width_pct) == (10.0, 10.0)
    assert (two.left_pct, two.width_pct) == (40.0, 10.0)  # a 20% gap: the retry wait
    assert (three.left_pct, three.width_pct) == (80.0, 20.0)
    assert not any(b.open for b in bars)


def test_a_task_waiting_for_its_retry_shows_the_wait_to_now() -> None:
    bars, _ = segments(record(state=TaskState.RETRYING, attempts=2, attempt_log=LOG[:2]),
                       now=107.0)
    last = bars[-1]
    assert last.open and last.kind == "wait" and last.attempt == 3
    assert (last.start, last.end) == (105.0, 107.0)
    assert last.label == "attempt 3: waiting for its retry"


def test_a_running_retry_runs_to_now_and_a_failed_task_ends_with_its_last_attempt() -> None:
    bars, _ = segments(record(state=TaskState.RUNNING, attempts=3, attempt_log=LOG[:2]),
                       now=109.0)
    assert bars[-1].open and bars[-1].kind == "run" and bars[-1].attempt == 3
    failed = [*LOG[:2], AttemptEntry(3, 108.0, 110.0, "FAILED", "RuntimeError", "boom")]
    bars, _ = segments(record(state=TaskState.FAILED, finished_at=110.0, attempt_log=failed),
                       now=300.0)
    assert bars[-1].label == "attempt 3: failed for good: RuntimeError"
    assert not bars[-1].open
