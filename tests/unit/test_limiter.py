"""The concurrency limiters: AIMD's increase per used round and decrease once per round on
overload, the Retry-After hold, the min/max bounds, the gradient's reaction to latency."""

from __future__ import annotations

import time

import pytest

from sluice.consumer.limiter import (
    AimdLimiter,
    GradientLimiter,
    Limiter,
    Permit,
    Signal,
    make_limiter,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(time, "monotonic", fake)  # the module the limiter reads the clock from
    return fake


def rounds(lim: Limiter, n: int, latency_s: float = 0.02) -> None:
    """``n`` rounds of successes at a full pool: each attempt starts as another ends (so it
    starts with the limit in use); a round is ``limit`` completions."""
    pool = [lim.take() for _ in range(lim.available())]
    for _ in range(n):
        for _ in range(int(lim.limit)):
            lim.give_back(pool.pop(0), Signal.SUCCESS, latency_s=latency_s)
            pool.extend(lim.take() for _ in range(lim.available()))
    for p in pool:
        lim.give_back(p, Signal.SUCCESS, latency_s=latency_s)


def burst(lim: Limiter, signal: Signal) -> None:
    """Fill the pool, then every attempt of it ends with ``signal``."""
    for p in [lim.take() for _ in range(lim.available())]:
        lim.give_back(p, signal)


def test_aimd_doubles_per_round_in_slow_start_then_grows_by_one(clock: Clock) -> None:
    lim = AimdLimiter("grow", initial=10, minimum=1, maximum=1000)
    rounds(lim, 3)  # slow start: no overload seen yet
    assert lim.limit >= 25  # +1 per used success: far more than +1 per round
    burst(lim, Signal.OVERLOAD)  # the first overload ends slow start
    assert not lim.slow_start
    cut = lim.limit
    rounds(lim, 5)  # below the limit of the cut: one per round (and the pool's drain: a 6th)
    assert cut + 5 <= lim.limit <= cut + 6.5


def test_aimd_probes_faster_past_the_limit_of_its_last_cut(clock: Clock) -> None:
    lim = AimdLimiter("probe", initial=40, minimum=1, maximum=1000, backoff_ratio=0.5)
    lim.slow_start = False
    burst(lim, Signal.OVERLOAD)  # cut at 40: the backend took 40 then
    assert (lim.last_max, lim.limit) == (40, 20)
    rounds(lim, 20)  # 20 → 40, one per round
    assert lim.limit == pytest.approx(40, abs=1)
    rounds(lim, 6)  # past 40: the backend may have grown; the increase doubles per round
    assert lim.limit > 40 + 6 * 3


def test_slow_start_doubles_a_burst_that_filled_the_pool(clock: Clock) -> None:
    # The first attempts of a burst start with the pool nearly empty, but it is full while
    # they run: each of their successes counts as used (the limit doubles per round).
    lim = AimdLimiter("burst", initial=8, minimum=1, maximum=1000)
    burst_ = [lim.take() for _ in range(lim.available())]  # in_flight_at_start 0, 1, ..., 7
    refills = []
    for p in burst_:
        lim.give_back(p, Signal.SUCCESS, latency_s=0.02)
        refills += [lim.take() for _ in range(lim.available())]  # as the loop refills
    assert lim.limit == 16


def test_aimd_does_not_grow_while_idle(clock: Clock) -> None:
    lim = AimdLimiter("idle", initial=10, minimum=1, maximum=100)
    for _ in range(50):  # one attempt at a time: the limit of 10 is never used
        lim.give_back(lim.take(), Signal.SUCCESS, latency_s=0.02)
    assert lim.limit == 10


@pytest.mark.parametrize("cause", ["HTTP 429", "HTTP 503", "timeout", "Overloaded"])
def test_aimd_decreases_once_per_round_on_an_overload_signal(clock: Clock, cause: str) -> None:
    # Each of these reaches the limiter as an OVERLOAD signal (the handlers map them, see
    # tests/integration/test_http_handler.py); a burst of them from one round cuts once.
    lim = AimdLimiter("cut", initial=64, minimum=1, maximum=100, backoff_ratio=0.5)
    burst(lim, Signal.OVERLOAD)
    assert lim.limit == 32 and lim.decreases == 1
    burst(lim, Signal.OVERLOAD)  # a new round, started after the cut: cut again
    assert lim.limit == 16 and lim.decreases == 2


def test_a_plain_error_does_not_change_the_limit(clock: Clock) -> None:
    lim = AimdLimiter("err", initial=20, minimum=1, maximum=100)
    burst(lim, Signal.ERROR)
    assert lim.limit == 20


def test_bounds_hold(clock: Clock) -> None:
    lim = AimdLimiter("bounds", initial=4, minimum=3, maximum=5, backoff_ratio=0.1)
    lim.slow_start = False
    burst(lim, Signal.OVERLOAD)
    assert lim.limit == 3
    rounds(lim, 50)
    assert lim.limit == 5


def test_retry_after_holds_new_attempts_until_it_passes(clock: Clock) -> None:
    lim = AimdLimiter("hold", initial=8, minimum=1, maximum=100)
    permits = [lim.take() for _ in range(3)]
    lim.give_back(permits[0], Signal.OVERLOAD, retry_after_s=2.0)
    assert lim.available() == 0 and lim.held_for_s() == pytest.approx(2.0)
    clock.now += 1.9
    assert lim.available() == 0
    clock.now += 0.2
    assert lim.available() == 4 - 2  # cut to 4; two still in flight
    assert lim.held_for_s() == 0


def test_static_never_moves(clock: Clock) -> None:
    lim = make_limiter("static", 16)
    assert type(lim) is Limiter
    burst(lim, Signal.OVERLOAD)
    rounds(lim, 10)
    assert lim.limit == 16


def test_gradient_settles_as_latency_rises_without_errors(clock: Clock) -> None:
    lim = GradientLimiter("grad", initial=20, minimum=1, maximum=1000)
    lim.slow_start = False
    rounds(lim, 30, latency_s=0.02)  # the no-load baseline: 20 ms; the limit grows while used
    grown = lim.limit
    assert grown > 40
    rounds(lim, 1, latency_s=0.06)  # the backend queues: latency triples, no 429 at all
    assert lim.limit < grown * 0.5
    assert lim.decreases == 0


def test_make_limiter_reads_the_concurrency_mapping() -> None:
    lim = make_limiter("cfg", {"initial": 8, "min": 2, "max": 50, "backoff_ratio": 0.7,
                               "algorithm": "aimd"})
    assert isinstance(lim, AimdLimiter) and not isinstance(lim, GradientLimiter)
    assert (lim.limit, lim.min, lim.max, lim.backoff_ratio) == (8, 2, 50, 0.7)


def test_permit_records_the_round() -> None:
    lim = AimdLimiter("gen", initial=4)
    p = lim.take()
    assert p == Permit(0, 0, p.started_at)
