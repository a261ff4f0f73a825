"""The adaptive limiter's control law against a simulated backend, deterministically (a fake
clock, a seeded random source): the scenario of bench/flow.py's aimd phase, a function of
capacity C that answers 429 at once above C, with C stepping 64 → 32 → 128.

The default adaptive limiter (``consumer.concurrency: {}``) must reach the bench's targets here:
goodput >= 95% of what C allows, 429s <= 3% of requests, the limit within 10% of the new C
<= 10 s after each step. Plain AIMD at its default backoff_ratio 0.5 does not (it saws between
C/2 and C: about 75%)."""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field

import pytest

from sluice.config.load import parse_pipeline
from sluice.consumer.limiter import (
    AimdLimiter,
    Limiter,
    Permit,
    ProportionalLimiter,
    Signal,
    make_limiter,
)


@dataclass
class SimResult:
    served: int
    rejected: int
    ideal: float
    settle_s: list[float]
    per_phase: list[float] = field(default_factory=list)  # goodput share per phase

    @property
    def goodput_share(self) -> float:
        return self.served / self.ideal

    @property
    def rejected_share(self) -> float:
        return self.rejected / (self.served + self.rejected)


class Sim:
    """A discrete-event simulation of the consumer loop and an HTTP function.

    The loop starts an attempt in every free slot at once (the bench's queue is never empty);
    an attempt reaches the function a while after it starts and its answer comes back a while
    after the function gives it (each 0.5 ms plus an exponential delay of mean ``overhead_s``
    / 2: the HTTP stacks and event loops of both sides, as measured around bench/flow.py's
    runs). The function serves at most ``capacity`` requests at once, each for ``service_s``
    (± ``jitter`` / 2); above that it refuses at once.
    """

    def __init__(self, limiter: Limiter, phases: list[tuple[int, float]], service_s: float = 0.1,
                 overhead_s: float = 0.005, jitter: float = 0.02, seed: int = 13,
                 oracle: bool = False) -> None:
        self.lim = limiter
        self.oracle = oracle  # the limit is set to C, whatever the signals (a ceiling)
        self.phases = phases
        self.service_s = service_s
        self.overhead_s = overhead_s
        self.jitter = jitter
        self.rng = random.Random(seed)
        self.now = 0.0
        self.events: list[tuple[float, int, str, Permit | None]] = []
        self.seq = 0
        self.serving = 0

    def at(self, t: float, kind: str, permit: Permit | None = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, permit))

    def capacity(self) -> int:
        end = 0.0
        for cap, length in self.phases:
            end += length
            if self.now < end:
                return cap
        return self.phases[-1][0]

    def delay(self) -> float:
        return 0.0005 + self.rng.expovariate(2 / self.overhead_s)

    def fill(self) -> None:
        if self.oracle:
            self.lim.limit = float(self.capacity())
        for _ in range(self.lim.available()):
            self.at(self.now + self.delay(), "arrive", self.lim.take())

    def run(self, monkeypatch: pytest.MonkeyPatch) -> SimResult:
        monkeypatch.setattr(time, "monotonic", lambda: self.now)
        total = sum(length for _, length in self.phases)
        served, rejected = [0] * len(self.phases), 0
        settle: list[float | None] = [None] * len(self.phases)
        bounds = [sum(length for _, length in self.phases[:i]) for i in range(len(self.phases))]
        self.at(0.0, "sample")
        self.fill()
        while self.events:
            self.now, _, kind, permit = heapq.heappop(self.events)
            if self.now >= total:
                break
            phase = sum(1 for b in bounds if b <= self.now) - 1
            if kind == "sample":  # the bench samples the limit every 0.1 s
                cap = self.phases[phase][0]
                if settle[phase] is None and abs(self.lim.limit - cap) <= 0.1 * cap:
                    settle[phase] = self.now - bounds[phase]
                self.at(self.now + 0.1, "sample")
                continue
            assert permit is not None
            if kind == "arrive":
                if self.serving >= self.capacity():
                    rejected += 1
                    self.at(self.now + self.delay(), "refused", permit)
                else:
                    self.serving += 1
                    spread = 1 + self.jitter * (self.rng.random() - 0.5)
                    self.at(self.now + self.service_s * spread, "served", permit)
            elif kind == "served":
                self.serving -= 1
                served[phase] += 1
                self.at(self.now + self.delay(), "answered", permit)
            else:
                self.lim.give_back(permit, Signal.OVERLOAD if kind == "refused" else
                                   Signal.SUCCESS, latency_s=self.now - permit.started_at)
                self.fill()
        ideals = [cap * length / self.service_s for cap, length in self.phases]
        return SimResult(sum(served), rejected, sum(ideals),
                         [length if s is None else s
                          for s, (_, length) in zip(settle[1:], self.phases[1:], strict=True)],
                         [s / i for s, i in zip(served, ideals, strict=True)])


STEPS = [(64, 20.0), (32, 20.0), (128, 20.0)]  # bench/flow.py's aimd phase
QUIET_S = 0.001  # time outside the function per request on a quiet machine (each way: half)
LOADED_S = 0.008  # as measured on the 2-core bench machine shared with test runs


def default_adaptive() -> Limiter:
    """``consumer.concurrency`` as a mapping with nothing set: the spec's defaults."""
    config = parse_pipeline("name: sim\nsource: {embedded: {queue: q}}\n"
                            "handler: {http: {url: 'http://fn.example/run'}}\n"
                            "consumer: {concurrency: {}}\n")
    return make_limiter("sim-default", config.consumer.limit_config)


def oracle(overhead_s: float, monkeypatch: pytest.MonkeyPatch) -> SimResult:
    """A limit always at C: the most a limiter that never sees a 429 gets."""
    return Sim(Limiter("sim-oracle", 64, 1, 10000), STEPS, overhead_s=overhead_s,
               oracle=True).run(monkeypatch)


def test_the_default_adaptive_limit_meets_the_flow_targets(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    lim = default_adaptive()
    assert isinstance(lim, ProportionalLimiter)
    result = Sim(lim, STEPS, overhead_s=QUIET_S).run(monkeypatch)
    assert result.goodput_share >= 0.95, result
    assert result.rejected_share <= 0.03, result
    assert max(result.settle_s) <= 10, result
    assert min(result.per_phase) >= 0.93, result  # each capacity, not just on average


def test_the_default_adaptive_limit_is_near_a_limit_that_knows_c(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # With more time outside the function per request, neither reaches 95% of C / service
    # time (the function's slot is free meanwhile); the default gets near the ceiling.
    ceiling = oracle(LOADED_S, monkeypatch)
    result = Sim(default_adaptive(), STEPS, overhead_s=LOADED_S).run(monkeypatch)
    assert result.goodput_share >= 0.97 * ceiling.goodput_share, (result, ceiling)
    assert result.rejected_share <= 0.03, result


def test_plain_aimd_at_its_default_ratio_falls_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """The earlier default: a fixed halving per overload saws between C/2 and C (about 3/4)."""
    lim = make_limiter("sim-aimd", {"initial": 8, "min": 1, "max": 256, "backoff_ratio": 0.5,
                                    "algorithm": "aimd"})
    assert type(lim) is AimdLimiter
    result = Sim(lim, STEPS, overhead_s=QUIET_S).run(monkeypatch)
    assert 0.6 < result.goodput_share < 0.85, result


@pytest.mark.parametrize(("capacity", "max_rejected"), [(4, 0.08), (16, 0.03), (200, 0.01)])
def test_proportional_holds_near_any_capacity(monkeypatch: pytest.MonkeyPatch, capacity: int,
                                              max_rejected: float) -> None:
    # One probe (one refused attempt) per HOLD_ROUNDS + 1 rounds: a larger share at a small C.
    lim = ProportionalLimiter("sim-cap", 8, 1, 1000)
    result = Sim(lim, [(capacity, 30.0)], overhead_s=QUIET_S).run(monkeypatch)
    assert result.goodput_share >= 0.9, result
    assert result.rejected_share <= max_rejected, result


# -- the law itself, on synthetic signals -----------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(time, "monotonic", fake)
    return fake


def full_round(lim: Limiter, pool: list[Permit]) -> None:
    """One round at a full pool: ``limit`` successes, each slot refilled as it ends."""
    for _ in range(int(lim.limit)):
        lim.give_back(pool.pop(0), Signal.SUCCESS, latency_s=0.1)
        pool.extend(lim.take() for _ in range(lim.available()))


def test_each_overload_takes_one_slot_and_the_limit_holds(clock: Clock) -> None:
    lim = ProportionalLimiter("one", initial=64, minimum=1, maximum=1000)
    lim.slow_start = False
    pool = [lim.take() for _ in range(lim.available())]
    lim.give_back(pool.pop(), Signal.OVERLOAD)  # refused: that slot is given up, not refilled
    assert lim.limit == 63 and lim.available() == 0
    for _ in range(ProportionalLimiter.HOLD_ROUNDS):  # held where the backend took it
        full_round(lim, pool)
        assert lim.limit == 63
    full_round(lim, pool)  # then additive increase again: one per round
    assert lim.limit == pytest.approx(64, abs=0.05)


def test_a_round_of_overloads_cuts_no_deeper_than_backoff_ratio(clock: Clock) -> None:
    # Every attempt in flight times out (an overload each): one slot per signal, down to
    # backoff_ratio x the limit, as plain AIMD's one cut; the next round may cut again.
    lim = ProportionalLimiter("deep", initial=64, minimum=1, maximum=1000, backoff_ratio=0.5)
    for p in [lim.take() for _ in range(lim.available())]:
        lim.give_back(p, Signal.OVERLOAD)
    assert lim.limit == 32 and lim.decreases == 1 and not lim.slow_start
    pool = [lim.take() for _ in range(lim.available())]
    for p in pool[:10]:  # 10 of the next round refused: 10 slots
        lim.give_back(p, Signal.OVERLOAD)
    assert lim.limit == 22 and lim.decreases == 2


def test_the_limit_follows_a_backend_that_drains_to_a_lower_capacity(clock: Clock) -> None:
    # C falls from 64 to 32: each success frees a slot, its next attempt is refused, and the
    # limit comes down with what the backend holds: one refusal per slot, no churn.
    lim = ProportionalLimiter("drain", initial=64, minimum=1, maximum=1000)
    lim.slow_start = False
    pool = [lim.take() for _ in range(lim.available())]
    refused = 0
    while len(pool) > 32:
        lim.give_back(pool.pop(0), Signal.SUCCESS, latency_s=0.1)
        for _ in range(lim.available()):  # the backend is full: refused
            lim.give_back(lim.take(), Signal.OVERLOAD)
            refused += 1
    assert lim.limit == pytest.approx(32, abs=0.1) and refused == 32


def test_proportional_searches_again_once_the_backend_takes_more(clock: Clock) -> None:
    lim = ProportionalLimiter("up", initial=32, minimum=1, maximum=1000)
    pool = [lim.take() for _ in range(lim.available())]
    lim.give_back(pool.pop(), Signal.OVERLOAD)  # refused at 32: the backend took 31
    pool.extend(lim.take() for _ in range(lim.available()))
    for _ in range(ProportionalLimiter.HOLD_ROUNDS):
        full_round(lim, pool)
    assert lim.limit == 31
    for _ in range(3):  # back to the refused 32, then past it: one, then two per round
        full_round(lim, pool)
    assert 32 < lim.limit < 36 and not lim.slow_start
    for _ in range(2):  # two rounds past the last cut: C grew, by how much nothing says:
        full_round(lim, pool)  # slow start again, doubling per round
    assert lim.slow_start and lim.limit > 120
    lim.give_back(pool.pop(), Signal.OVERLOAD)  # until the next overload
    assert not lim.slow_start


def test_make_limiter_defaults_to_proportional() -> None:
    lim = make_limiter("cfg", {"initial": 8, "min": 1, "max": 50, "backoff_ratio": 0.5})
    assert type(lim) is ProportionalLimiter
    assert type(default_adaptive()) is ProportionalLimiter
