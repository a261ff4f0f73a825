from __future__ import annotations

import random

import pytest

from sluice.config.model import RetryConfig
from sluice.consumer.retry import RetryPolicy
from sluice.tasks.state import FINAL, TRANSITIONS, TaskState, allowed


def test_final_states_have_no_way_out() -> None:
    assert TaskState.FILTERED in FINAL and TaskState.FILTERED.final
    for state in FINAL:
        assert TRANSITIONS[state] == frozenset()
        for other in TaskState:
            assert not allowed(state, other)


@pytest.mark.parametrize(("current", "wanted", "ok"), [
    (TaskState.QUEUED, TaskState.RUNNING, True),
    (TaskState.QUEUED, TaskState.SUCCEEDED, False),
    (TaskState.QUEUED, TaskState.CANCELLED, True),
    (TaskState.RUNNING, TaskState.RETRYING, True),
    (TaskState.RETRYING, TaskState.RUNNING, True),
    (TaskState.RETRYING, TaskState.SUCCEEDED, False),
    (TaskState.PAUSED, TaskState.QUEUED, True),
    (TaskState.PAUSED, TaskState.RUNNING, False),
    (TaskState.RUNNING, TaskState.QUEUED, False),
    (TaskState.RUNNING, TaskState.FILTERED, True),  # the pipeline's filter dropped it
    (TaskState.QUEUED, TaskState.FILTERED, False),  # only a claimed message is filtered
    (TaskState.RETRYING, TaskState.FILTERED, False),
    (TaskState.FILTERED, TaskState.RUNNING, False),
])
def test_transition_table(current: TaskState, wanted: TaskState, ok: bool) -> None:
    assert allowed(current, wanted) is ok


def test_full_jitter_stays_within_the_exponential_bound() -> None:
    policy = RetryPolicy(RetryConfig(max_attempts=100, initial_backoff_s=1, max_backoff_s=30,
                                     backoff_multiplier=2), random.Random(7))
    for attempts, bound in [(1, 1), (2, 2), (3, 4), (5, 16), (6, 30), (50, 30)]:
        assert policy.backoff_bound_s(attempts) == bound
        delays = [policy.decide(attempts, None, 0.0).delay_s for _ in range(300)]
        assert all(0 <= d <= bound for d in delays)
        assert max(delays) > bound * 0.8  # spread over the whole range: jitter, not a constant
        assert min(delays) < bound * 0.2


def test_gives_up_after_max_attempts() -> None:
    policy = RetryPolicy(RetryConfig(max_attempts=3))
    assert policy.decide(2, None, 0.0).retry
    decision = policy.decide(3, None, 0.0)
    assert not decision.retry
    assert "max_attempts=3" in decision.reason


def test_gives_up_past_max_age() -> None:
    policy = RetryPolicy(RetryConfig(max_attempts=10, max_age_s=60))
    assert policy.decide(1, received_at=1000.0, now=1010.0, requested_delay_s=5).retry
    decision = policy.decide(1, received_at=1000.0, now=1058.0, requested_delay_s=5)
    assert not decision.retry
    assert "max_age_s=60" in decision.reason


def test_requested_delay_replaces_the_draw() -> None:
    policy = RetryPolicy(RetryConfig(max_attempts=5))
    assert policy.decide(1, None, 0.0, requested_delay_s=7.5).delay_s == 7.5
