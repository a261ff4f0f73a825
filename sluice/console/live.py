"""The console's live figures: a sampler that reads every pipeline's numbers once a second,
keeps the last few minutes of them for the charts, and hands each tick to the Server-Sent
Events subscribers (``GET /ui/live``).

Rules:

1. The pipelines are read afresh from the gateway on every tick (``gateway.pipelines`` and
   ``gateway.loops``: pipelines come and go at runtime); a pipeline that has gone loses its
   history, one that appears starts a new one.
2. Throughput is tasks finished (succeeded + failed) per second since the previous tick, as
   ``sluice run``'s live status counts them; in flight and the concurrency limit are the
   loop's limiter's; the error share is the share of attempt ends that were errors (a retry or
   a failure) over the last :data:`ERROR_WINDOW_S`.
3. Latency p50/p99 is of the handler attempts that ended in the last
   :data:`LATENCY_WINDOW_S`, from the handler-duration histogram this process records
   (``sluice_handler_duration_seconds``), interpolated within its buckets as Prometheus's
   ``histogram_quantile`` does: approximate, never finer than the buckets. No attempt ended
   in the window: no figure (None).
4. The backlog is the source's own count, asked with a timeout of :data:`BACKLOG_TIMEOUT_S`;
   a source that cannot answer gives None, and the sampler goes on. It and the pause flag (a
   store read) are asked only while someone watches: an event stream is open, or a page was
   shown in the last :data:`WATCHED_S`; otherwise the backlog is None and the pause flag the
   last one read, so an unwatched console costs the sources and the store nothing. A
   pipeline with no loop in this process (``sluice serve --no-workers``) has only its pause
   flag; its other figures are None.
5. A subscriber that does not keep up misses ticks (its queue holds :data:`QUEUE_TICKS`);
   it never holds up the sampler or the other subscribers. Stopping the sampler ends every
   subscription (a server that stops is not held by open event streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sluice import metrics

if TYPE_CHECKING:
    from sluice.gateway.app import Gateway

log = logging.getLogger(__name__)

TICK_S = 1.0
HISTORY_POINTS = 300  # five minutes of ticks, per pipeline
ERROR_WINDOW_S = 10.0
LATENCY_WINDOW_S = 30.0
BACKLOG_TIMEOUT_S = 0.8
QUEUE_TICKS = 8
WATCHED_S = 60.0  # after a page was shown, the backlog is read this long (rule 4)

Buckets = list[tuple[float, float]]  # (upper bound in seconds, cumulative count), ascending


@dataclass(frozen=True, slots=True)
class Point:
    """One pipeline's figures at one tick (None: not known, rules 3 and 4)."""

    t: float  # unix time, seconds
    rate_per_s: float | None
    in_flight: int | None
    limit: float | None
    backlog: int | None
    error_share: float | None
    p50_ms: float | None
    p99_ms: float | None
    paused: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Counters:
    at: float  # monotonic
    succeeded: int
    retried: int
    failed: int
    buckets: Buckets


def quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q`` quantile of a histogram's cumulative buckets, interpolated linearly within the
    bucket it falls in (``histogram_quantile``); in the +Inf bucket: the largest finite bound.
    None when the histogram is empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def difference(now: Buckets, before: Buckets) -> Buckets:
    """Buckets of what was observed between two readings of one histogram."""
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in now]


def handler_buckets() -> dict[str, Buckets]:
    """Each pipeline's handler-duration histogram, every outcome together (rule 3)."""
    found: dict[str, dict[float, float]] = {}
    for family in metrics.HANDLER_SECONDS.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bounds = found.setdefault(sample.labels["pipeline"], {})
                bound = float(sample.labels["le"])
                bounds[bound] = bounds.get(bound, 0.0) + sample.value
    return {name: sorted(bounds.items()) for name, bounds in found.items()}


class Sampler:
    """The ticks of one gateway (see the module rules)."""

    def __init__(self, gateway: Gateway, *, tick_s: float = TICK_S,
                 history_points: int = HISTORY_POINTS) -> None:
        self.gateway = gateway
        self.tick_s = tick_s
        self.history: dict[str, deque[Point]] = {}
        self._counters: dict[str, deque[_Counters]] = {}
        self._keep = max(2, math.ceil(max(ERROR_WINDOW_S, LATENCY_WINDOW_S) / tick_s) + 1)
        self._history_points = history_points
        self._subscribers: set[asyncio.Queue[dict[str, Point] | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._watched_until = 0.0  # monotonic

    def watched(self) -> None:
        """A page was shown: read the backlog for the next :data:`WATCHED_S` (rule 4)."""
        self._watched_until = time.monotonic() + WATCHED_S

    @property
    def watching(self) -> bool:
        return bool(self._subscribers) or time.monotonic() < self._watched_until

    # -- running ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sluice-console-sampler")

    async def stop(self) -> None:
        """Stop ticking and end every subscription (rule 5)."""
        for queue in list(self._subscribers):
            _offer(queue, None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                tick = await self.sample()
            except Exception:  # the console's figures never take the gateway down
                log.exception("console sampler: a tick failed")
            else:
                for queue in list(self._subscribers):
                    _offer(queue, tick)
            await asyncio.sleep(max(0.05, self.tick_s - (time.monotonic() - started)))

    def subscribe(self) -> asyncio.Queue[dict[str, Point] | None]:
        """A queue of the coming ticks (None: the sampler stopped)."""
        queue: asyncio.Queue[dict[str, Point] | None] = asyncio.Queue(QUEUE_TICKS)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Point] | None]) -> None:
        self._subscribers.discard(queue)

    # -- one tick -----------------------------------------------------------------------------

    async def sample(self) -> dict[str, Point]:
        """Read every pipeline's figures now, add them to the history, and return them."""
        gw = self.gateway
        names = list(gw.pipelines)  # rule 1: afresh on every tick
        for gone in set(self.history) - set(names):
            del self.history[gone]
            self._counters.pop(gone, None)
        buckets = handler_buckets()
        now, at = time.time(), time.monotonic()
        tick: dict[str, Point] = {}
        watching = self.watching
        for name in names:
            history = self.history.get(name)
            paused = history[-1].paused if history else False
            if watching:
                with contextlib.suppress(Exception):  # a store outage: the last flag read
                    paused = await gw.store.is_paused(name)
            loop = gw.loops.get(name)
            if loop is None:  # rule 4
                point = Point(now, None, None, None, None, None, None, None, paused)
            else:
                s = loop.stats
                counters = _Counters(at, s.succeeded, s.retried, s.failed,
                                     buckets.get(name, []))
                ring = self._counters.setdefault(name, deque(maxlen=self._keep))
                ring.append(counters)
                p50, p99 = _latency_ms(ring, at)
                backlog = await _backlog(loop.source) if watching else None
                point = Point(now, _rate(ring), loop.limiter.in_flight, loop.limiter.limit,
                              backlog, _error_share(ring, at), p50, p99, paused)
            tick[name] = point
            self.history.setdefault(name, deque(maxlen=self._history_points)).append(point)
        return tick

    def series(self, names: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
        """The history of ``names`` as columns (the charts' data: one list per figure)."""
        out: dict[str, dict[str, list[Any]]] = {}
        for name in names:
            points = list(self.history.get(name, ()))
            out[name] = {key: [getattr(p, key) for p in points] for key in Point.__slots__}
        return out


def _offer(queue: asyncio.Queue[dict[str, Point] | None],
           tick: dict[str, Point] | None) -> None:
    if tick is None:  # the end: make room for it
        while queue.full():
            queue.get_nowait()
    with contextlib.suppress(asyncio.QueueFull):  # rule 5: a slow subscriber misses a tick
        queue.put_nowait(tick)


def _since(ring: deque[_Counters], at: float, window_s: float) -> _Counters:
    """The oldest reading of ``ring`` within ``window_s`` of ``at`` (else the oldest)."""
    for counters in ring:
        if at - counters.at <= window_s + 1e-6:
            return counters
    return ring[-1]


def _rate(ring: deque[_Counters]) -> float | None:
    if len(ring) < 2:
        return None
    before, now = ring[-2], ring[-1]
    elapsed_s = now.at - before.at
    done = (now.succeeded + now.failed) - (before.succeeded + before.failed)
    return done / elapsed_s if elapsed_s > 0 else None


def _error_share(ring: deque[_Counters], at: float) -> float | None:
    before, now = _since(ring, at, ERROR_WINDOW_S), ring[-1]
    errors = (now.retried - before.retried) + (now.failed - before.failed)
    ends = errors + (now.succeeded - before.succeeded)
    return errors / ends if ends > 0 else None


def _latency_ms(ring: deque[_Counters], at: float) -> tuple[float | None, float | None]:
    before, now = _since(ring, at, LATENCY_WINDOW_S), ring[-1]
    window = difference(now.buckets, before.buckets) if before is not now else now.buckets
    p50, p99 = quantile(0.5, window), quantile(0.99, window)
    return (None if p50 is None else p50 * 1000.0, None if p99 is None else p99 * 1000.0)


async def _backlog(source: Any) -> int | None:
    try:
        return int(await asyncio.wait_for(source.pending(), BACKLOG_TIMEOUT_S))
    except Exception:  # rule 4: a source that cannot answer
        return None


def tick_json(tick: Mapping[str, Point], names: Sequence[str]) -> dict[str, Any]:
    """One tick for a subscriber that sees ``names``."""
    return {name: tick[name].to_json() for name in names if name in tick}
