"""Retry decisions: exponential backoff with full jitter, bounded by attempts and by age.

The delay before attempt ``n + 1`` is drawn uniformly from ``[0, min(max_backoff_s,
initial_backoff_s * backoff_multiplier ** (n - 1))]`` ("full jitter", which spreads a burst of
failures out instead of retrying them in lockstep). A handler's ``Retry(delay_s=...)`` replaces
the draw. No retry is scheduled past ``max_attempts`` attempts or past ``max_age_s`` since the
task was received.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sluice.config.model import RetryConfig


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    delay_s: float = 0.0
    reason: str = ""  # why not, when ``retry`` is False


class RetryPolicy:
    def __init__(self, config: RetryConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()

    def backoff_bound_s(self, attempts: int) -> float:
        c = self.config
        exponent = min(max(attempts - 1, 0), 64)  # 2**64 * any sane bound overflows nothing
        return float(min(c.max_backoff_s, c.initial_backoff_s * c.backoff_multiplier ** exponent))

    def decide(self, attempts: int, received_at: float | None, now: float,
               requested_delay_s: float | None = None) -> RetryDecision:
        c = self.config
        if attempts >= c.max_attempts:
            return RetryDecision(False, reason=f"gave up after {attempts} attempts "
                                               f"(max_attempts={c.max_attempts})")
        if requested_delay_s is not None:
            delay = requested_delay_s
        else:
            delay = self._rng.uniform(0.0, self.backoff_bound_s(attempts))
        if received_at is not None and now + delay - received_at > c.max_age_s:
            return RetryDecision(False, reason=f"gave up after {attempts} attempts: the task "
                                               f"would be older than max_age_s={c.max_age_s:g}")
        return RetryDecision(True, delay)
