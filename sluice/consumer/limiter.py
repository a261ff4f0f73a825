"""Concurrency limits, one per handler: static, or adaptive: proportional (the default), AIMD,
or gradient (latency-aware AIMD).

The consumer loop asks :meth:`Limiter.available` before it fetches (so a full limiter stops
the source: backpressure), takes a permit per attempt, and gives each permit back with the
attempt's signal.

AIMD (``algorithm: aimd``), as TCP congestion control:

1. Additive increase: each success adds ``1 / limit``, so the limit grows by one per round of
   ``limit`` successes, and only while the limit is actually used (the limit was full, or
   nearly, when the attempt started or when it ended: the first attempts of a burst start with
   the pool nearly empty and fill it): an idle pool does not inflate its limit. Until the first
   overload signal the limiter is in slow start, as TCP is: each used success adds one, so
   the limit doubles per round while it looks for the backend's capacity. Past the limit of
   the last cut (the capacity the backend had then) the increase per round doubles each round
   (at most a quarter of the limit), as CUBIC probes: capacity that grew is found in a few
   rounds, while below that point growth stays one per round.
2. Multiplicative decrease: an overload signal (HTTP 429/503, a timeout, ``Overloaded``)
   multiplies the limit by ``backoff_ratio``, at most once per round: a signal from an attempt
   that started before the last decrease is already accounted for (the burst of 429s that one
   overload causes halves the limit once, not ten times).
3. A ``Retry-After`` holds every new attempt until it has passed.
4. The limit stays within ``[min, max]``.

Proportional (``algorithm: proportional``, the default of an adaptive limit): AIMD's increase
(rule 1) and rules 3 and 4, but

2'. Proportional decrease: each overload signal takes one slot off the limit, so the slot of
    the refused attempt is not refilled, and a round's decrease is its overloads in slots (its
    overload share times the limit) instead of a fixed ratio. The first signal of a round (from
    an attempt that started after the last decrease) opens it; the round's signals take the
    limit no lower than ``backoff_ratio`` times the limit it opened at: when everything in flight
    times out at once, the cut is plain AIMD's.
5. Hold: after a decrease the limit does not grow for ``HOLD_ROUNDS`` (3) used rounds, then
   probes one slot higher; so it settles at what the backend took, with one refused attempt per
   4 rounds.
6. Search again: after ``RESTART_ROUNDS`` (2) used rounds above the limit of the last cut with
   no overload, the backend's capacity has grown by an amount nothing tells: slow start again
   (doubling per round) until the next overload.

Why proportional is the default (bench/flow.py's aimd phase: an HTTP function of capacity C,
64 then 32 then 128, 100 ms per request, that answers 429 at once above C; and
tests/unit/test_limiter_control.py, which simulates it deterministically):

- A fixed ratio saws between ``backoff_ratio x L`` and L against a function with no queue:
  plain AIMD got 65-71% of the ideal goodput (C / service time) at its default 0.5 (simulated:
  72%) and 85-90% at a tuned 0.9 (simulated: 89%), with 0.1-0.6% 429s (six bench runs).
- A latency target (gradient) has nothing to act on: this function's latency does not rise
  before it refuses, so gradient behaves as AIMD at 0.5 (66-72%; simulated 72%).
- A decrease in proportion to the round's share of 429s counted per attempt over-reacts, and
  measured once per round it reacts late: a refused attempt's slot, refilled at once, is refused
  again within a millisecond or two, so an excess of k slots makes ~k x 50 429s per 100 ms
  round (in the bench a static limit of 66 against C = 64 drew 49% 429s, 200 drew 75-79%).
  Taking a slot per refusal, at once, answers each excess slot with one 429 and never refills
  it.
- Proportional keeps the limit at C (64, 32, 128 in the bench's timeline) with 0.5% 429s and
  settles within 0.2 s of a step down and 0.5-0.8 s of a step up. Simulated: 97% of the ideal
  with 1 ms per request outside the function, 99-100% of an oracle (a limit that is always C)
  with 5-8 ms. In the bench (bench/results/flow.json, three runs alternating with the oracle
  row): 93.2% of the ideal, 98.6% of the oracle (94.5%); on a busier machine both fall (87-93%
  and 84-96% across runs). What an oracle misses of the ideal is the time each request spends
  outside the function (both sides' HTTP stacks and event loops) while its slot there is free:
  on the bench's 2-core machine, shared with test runs, 4-16%; so there the issue's 95% is at
  or above the ceiling of any limiter that does not overrun C, and overrunning C costs 429s in
  the tens of percent (above). What proportional misses of the oracle is mostly its slow start
  from the default initial limit of 8 and the probes.

Gradient (``algorithm: gradient``), in the manner of Netflix concurrency-limits' Gradient2:
additionally, each success compares a short-term latency average with the long-term (no-load)
baseline and scales the limit by ``clamp(tolerance * long / short, 0.5, 1)`` plus a queue
allowance of ``sqrt(limit)``, smoothed, so the limit settles as latency rises, before errors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sluice import metrics


class Signal(StrEnum):
    SUCCESS = "success"
    OVERLOAD = "overload"  # 429/503, a timeout, Overloaded: decrease
    ERROR = "error"  # a failure that says nothing about load: no change


@dataclass(slots=True)  # never changed once made (frozen: a 5x slower init, per message)
class Permit:
    generation: int
    in_flight_at_start: int
    started_at: float


class Limiter:
    """A static limit: ``initial`` in flight, whatever happens."""

    algorithm = "static"

    def __init__(self, name: str, initial: int, minimum: int = 1, maximum: int = 10000,
                 backoff_ratio: float = 0.5, *, exported: bool = True) -> None:
        self.name = name
        self.min = max(1, minimum)
        self.max = max(self.min, maximum)
        self.limit = float(min(max(initial, self.min), self.max))
        self.backoff_ratio = backoff_ratio
        self.in_flight = 0
        self.hold_until = 0.0  # time.monotonic(): no new attempt before this
        self.generation = 0
        self.decreases = 0
        # Gauges read when scraped, not set per attempt (two metric writes fewer per task).
        # A hosted function's limiter is not exported under its own name (sluice.tenancy
        # exports per-function series with bounded labels).
        self._signals: dict[Signal, Any] = {}
        if exported:
            metrics.LIMIT.labels(name).set_function(lambda: self.limit)
            metrics.IN_FLIGHT.labels(name).set_function(lambda: self.in_flight)
            self._signals = {s: metrics.LIMIT_SIGNALS.labels(name, str(s)) for s in Signal}
        self.signal_counts = dict.fromkeys(Signal, 0)

    def available(self) -> int:
        if time.monotonic() < self.hold_until:
            return 0
        return max(math.floor(self.limit) - self.in_flight, 0)

    def status(self) -> str:
        """One line for ``sluice run``'s status: limit, in flight, signals, hold."""
        line = (f"limit {self.limit:.1f} ({self.algorithm}), in flight {self.in_flight}, "
                f"overloads {self.signal_counts[Signal.OVERLOAD]}, "
                f"cuts {self.decreases}")
        held = self.held_for_s()
        return line + (f", held {held:.1f}s (Retry-After)" if held else "")

    def held_for_s(self) -> float:
        return max(self.hold_until - time.monotonic(), 0.0)

    def take(self) -> Permit:
        permit = Permit(self.generation, self.in_flight, time.monotonic())
        self.in_flight += 1
        return permit

    def give_back(self, permit: Permit, signal: Signal, retry_after_s: float | None = None,
                  latency_s: float | None = None) -> None:
        self.in_flight -= 1
        counter = self._signals.get(signal)
        if counter is not None:
            counter.inc()
        self.signal_counts[signal] += 1
        if retry_after_s:
            self.hold_until = max(self.hold_until, time.monotonic() + retry_after_s)
        self._adjust(permit, signal, latency_s)

    def _adjust(self, permit: Permit, signal: Signal, latency_s: float | None) -> None:
        return None


class AimdLimiter(Limiter):
    algorithm = "aimd"
    USED = 0.8  # "actually used": the attempt started with the limit at least this full
    PROBE = 0.25  # past the last cut, a round adds at most this share of the limit

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.slow_start = True  # until the first overload signal (rule 1)
        self.last_max = 0.0  # the limit when it was last cut
        self._per_round = 1.0  # the increase per round in congestion avoidance
        self._round_successes = 0

    def _used(self, permit: Permit) -> bool:
        """Rule 1's "actually used": the limit was (nearly) full when the attempt started or
        when it ended (``in_flight`` still counts the others of a burst that started with it:
        the first attempts of a burst started with the pool nearly empty, and filled it)."""
        return (max(permit.in_flight_at_start, self.in_flight) + 1
                >= self.USED * math.floor(self.limit))

    def _adjust(self, permit: Permit, signal: Signal, latency_s: float | None) -> None:
        if signal == Signal.OVERLOAD:
            if permit.generation == self.generation:  # rule 2: once per round
                self.last_max = self.limit
                self.limit = max(self.min, self.limit * self.backoff_ratio)
                self.generation += 1
                self.decreases += 1
                self.slow_start = False
                self._per_round, self._round_successes = 1.0, 0
        elif signal == Signal.SUCCESS and self._used(permit):
            if self.slow_start:
                self.limit = min(self.max, self.limit + 1.0)
                return
            self.limit = min(self.max, self.limit + self._per_round / self.limit)
            self._round_successes += 1
            if self._round_successes >= math.floor(self.limit):  # a round ended
                self._round_successes = 0
                self._per_round = (min(self._per_round * 2, max(1.0, self.limit * self.PROBE))
                                   if self.limit > self.last_max else 1.0)
                self._round_ended()

    def _round_ended(self) -> None:
        """A used round of successes ended in congestion avoidance (after its increase)."""
        return None


class ProportionalLimiter(AimdLimiter):
    """AIMD's increase; a decrease of one slot per overload signal, at most ``backoff_ratio``
    per round, then a hold of ``HOLD_ROUNDS`` used rounds; slow start again after
    ``RESTART_ROUNDS`` rounds past the last cut (module docstring, rules 2', 5 and 6)."""

    algorithm = "proportional"
    HOLD_ROUNDS = 3
    RESTART_ROUNDS = 2  # rounds past the last cut without an overload: slow start again

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._floor = float(self.min)  # the lowest this round's decreases may take the limit
        self._hold_rounds = 0
        self._hold_successes = 0
        self._rounds_past = 0  # used rounds ended above last_max since the last decrease

    def _round_ended(self) -> None:
        # The backend took more than at its last cut, round after round: its capacity grew
        # by an amount nothing tells; search it as at the start, doubling per round.
        self._rounds_past = self._rounds_past + 1 if self.limit > self.last_max else 0
        if self._rounds_past >= self.RESTART_ROUNDS:
            self.slow_start = True

    def _adjust(self, permit: Permit, signal: Signal, latency_s: float | None) -> None:
        if signal == Signal.OVERLOAD:
            if permit.generation == self.generation:  # the first signal of a new round
                self.last_max = self.limit
                self._floor = max(self.min, self.limit * self.backoff_ratio)
                self.generation += 1
                self.decreases += 1
                self.slow_start = False
                self._per_round, self._round_successes, self._rounds_past = 1.0, 0, 0
            # Each refused attempt gives its slot up: the round's decrease is its share of
            # overloads (in slots), not a fixed ratio; and the slot is not refilled at once,
            # so an overload is not answered by another attempt that the backend refuses too.
            self.limit = max(self._floor, self.limit - 1.0)
            self._hold_rounds, self._hold_successes = self.HOLD_ROUNDS, 0
        elif self._hold_rounds:
            if signal == Signal.SUCCESS and self._used(permit):
                self._hold_successes += 1  # held at the limit the backend took: no growth
                if self._hold_successes >= math.floor(self.limit):
                    self._hold_rounds -= 1
                    self._hold_successes = 0
        else:
            super()._adjust(permit, signal, latency_s)


class GradientLimiter(AimdLimiter):
    algorithm = "gradient"
    TOLERANCE = 1.5  # latency may rise to 1.5x the baseline before the limit is cut
    SMOOTHING = 0.2
    LONG_WINDOW = 600  # samples in the baseline's exponential average
    SHORT_WINDOW = 10

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._long_s: float | None = None
        self._short_s: float | None = None

    def _adjust(self, permit: Permit, signal: Signal, latency_s: float | None) -> None:
        super()._adjust(permit, signal, latency_s)
        if signal != Signal.SUCCESS or latency_s is None or latency_s <= 0:
            return
        self._short_s = _ema(self._short_s, latency_s, self.SHORT_WINDOW)
        self._long_s = _ema(self._long_s, latency_s, self.LONG_WINDOW)
        if self._long_s > self._short_s * 2:  # latency fell a lot: forget the old baseline
            self._long_s = self._short_s
        gradient = max(0.5, min(1.0, self.TOLERANCE * self._long_s / self._short_s))
        if gradient < 1.0:
            self.slow_start = False  # latency rising is the signal slow start looks for
        target = self.limit * gradient + math.sqrt(self.limit)
        smoothed = self.limit * (1 - self.SMOOTHING) + target * self.SMOOTHING
        self.limit = min(self.max, max(self.min, min(smoothed, self.limit + 1.0 / self.limit)))


def _ema(current: float | None, sample: float, window: int) -> float:
    if current is None:
        return sample
    return current + (sample - current) * (2.0 / (window + 1))


def make_limiter(name: str, config: int | dict[str, object], *,
                 exported: bool = True) -> Limiter:
    """``consumer.concurrency``: an integer is a static limit; a mapping is adaptive."""
    if isinstance(config, int):
        return Limiter(name, config, config, config, exported=exported)
    algorithm = str(config.get("algorithm", "proportional"))
    cls = {"aimd": AimdLimiter, "proportional": ProportionalLimiter,
           "gradient": GradientLimiter}[algorithm]
    return cls(name, int(str(config["initial"])), int(str(config["min"])),
               int(str(config["max"])), float(str(config["backoff_ratio"])), exported=exported)
