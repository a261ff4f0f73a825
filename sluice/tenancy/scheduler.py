"""Fair shares in one worker of a hosting pipeline: which ready task runs next.

Invariants:

1. A task starts only with a permit of the worker's limiter (``consumer.concurrency``), a
   permit of its function's own limiter (``tenancy.function_concurrency``), and its tenant
   under its ``max_concurrency``.
2. Between tenants with tasks ready: deficit round robin, each tenant's quantum its
   ``weight``; a tenant whose caps hold it back keeps at most one quantum of credit; a tenant
   with nothing ready leaves the round and its credit is reset, so idle share goes to those
   with work (work-conserving).
2a. Headroom: a tenant running its weighted share of the worker's limit or more (the share
   among the active tenants: with tasks ready or running, or one that ended in the last
   ``ACTIVE_S``) takes another slot only while the slots left free cover, for every other
   active tenant, up to ``RESERVE_SLOTS`` slots of its share it is not using. Slots run for
   as long as their attempts do: without this, a slow function would take every slot as
   they free and its neighbours' next tasks would wait for its attempts to end.
3. Within a tenant: round robin over its functions with tasks ready.
4. An attempt's load signal goes to its function's limiter (so a 429-ing backend slows only
   its own function); the worker's limiter sees no overloads from hosted functions, only
   the end of the attempt. A Retry-After holds only the function that got it.
5. Every attempt's end is kept in its function's window (``isolation.window_s``): the
   isolation rules and ``GET /v1/tenants/{t}/functions`` read it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sluice import metrics
from sluice.consumer.limiter import Limiter, Permit, Signal, make_limiter
from sluice.tenancy.config import TenancyConfig

T = TypeVar("T")
OTHER = "other"  # the metric label of functions past tenancy.metrics_functions
ACTIVE_S = 5.0  # rule 2a: a tenant whose attempt ended this recently is active
RESERVE_SLOTS = 2  # rule 2a: slots kept free for each other active tenant (within its share)


@dataclass(slots=True)
class Ended:
    at: float  # time.monotonic()
    duration_s: float
    signal: Signal


@dataclass(eq=False)
class FunctionState(Generic[T]):
    """One hosted function in this worker: its limiter, its ready tasks, its window."""

    tenant: str
    name: str
    limiter: Limiter
    ready: deque[T] = field(default_factory=deque)
    window: deque[Ended] = field(default_factory=deque)
    finished: int = 0  # attempts ended since the worker started
    last_active: float = field(default_factory=time.monotonic)
    labels: tuple[str, str, str] = ("", OTHER, OTHER)

    def prune(self, window_s: float, now: float) -> None:
        while self.window and self.window[0].at < now - window_s:
            self.window.popleft()

    def error_share(self) -> float:
        """Failed, timed-out or refused attempts among those in the window."""
        if not self.window:
            return 0.0
        bad = sum(1 for e in self.window if e.signal != Signal.SUCCESS)
        return bad / len(self.window)

    def p99_s(self) -> float:
        if not self.window:
            return 0.0
        durations = sorted(e.duration_s for e in self.window)
        return durations[min(len(durations) - 1, math.ceil(0.99 * len(durations)) - 1)]


@dataclass(eq=False)
class _Tenant(Generic[T]):
    name: str
    weight: float
    cap: int | None
    ring: deque[FunctionState[T]] = field(default_factory=deque)  # with tasks ready
    in_flight: int = 0
    deficit: float = 0.0
    last_active: float = 0.0  # time.monotonic() of its last attempt's end (rule 2a)

    def runnable(self) -> FunctionState[T] | None:
        """The next of its functions that may start a task now (rule 3), at the ring's front."""
        if self.cap is not None and self.in_flight >= self.cap:
            return None
        for _ in range(len(self.ring)):
            fn = self.ring[0]
            if fn.limiter.available() > 0:
                return fn
            self.ring.rotate(-1)
        return None


@dataclass(slots=True)
class FairPermit(Permit):
    """The worker's permit (its fields) with the function's own."""

    function_permit: Permit | None = None
    function: FunctionState[object] | None = None


class FairReady(Generic[T]):
    """The ready tasks of a hosting pipeline's worker (see the module invariants); the
    consumer loop's ready queue."""

    def __init__(self, pipeline: str, tenancy: TenancyConfig, limiter: Limiter,
                 key_of: Callable[[T], tuple[str, str]]) -> None:
        self.pipeline = pipeline
        self.tenancy = tenancy
        self.limiter = limiter
        self.key_of = key_of
        self.window_s = tenancy.isolation.window_s
        self._functions: dict[tuple[str, str], FunctionState[T]] = {}
        self._tenants: dict[str, _Tenant[T]] = {}
        self._ring: deque[_Tenant[T]] = deque()  # tenants with tasks ready (rule 2)
        self._count = 0
        self._labelled = 0

    # -- the deque-like part the loop uses ------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[T]:
        for fn in self._functions.values():
            yield from fn.ready

    def append(self, item: T) -> None:
        fn = self.function(*self.key_of(item))
        tenant = self._tenant(fn.tenant)
        if not fn.ready:
            tenant.ring.append(fn)
            if len(tenant.ring) == 1:
                self._ring.append(tenant)
        fn.ready.append(item)
        self._count += 1

    def popleft(self) -> T:
        """The next task in fair order, permits aside (a batch's items)."""
        taken = self.take(permits=False)
        if taken is None:
            raise IndexError("no ready task")
        return taken[0]

    def clear(self) -> None:
        self.remove_where(lambda _item: True)

    def remove_where(self, drop: Callable[[T], bool]) -> list[T]:
        """Take out every ready task ``drop`` is true of; they are returned."""
        out: list[T] = []
        for fn in self._functions.values():
            if not fn.ready:
                continue
            kept = deque(i for i in fn.ready if not drop(i))
            out.extend(i for i in fn.ready if drop(i))
            fn.ready = kept
            if not kept:
                tenant = self._tenants[fn.tenant]
                tenant.ring = deque(f for f in tenant.ring if f is not fn)
                if not tenant.ring:
                    self._leave(tenant)
        self._count -= len(out)
        return out

    # -- starting and ending attempts ------------------------------------------------------

    def take(self, *, permits: bool = True) -> tuple[T, FairPermit] | None:
        """The next task that may start now and its permits (rules 1-3); None if none may."""
        if not self._ring or (permits and self.limiter.available() <= 0):
            return None
        for _ in range(len(self._ring) * 11 + 1):  # weights >= 0.1: a quantum in 10 visits
            tenant = self._ring[0]
            fn = tenant.runnable() if permits else tenant.ring[0]
            if fn is not None and permits and not self._headroom(tenant):
                fn = None
            if fn is None:
                tenant.deficit = min(tenant.deficit, tenant.weight)
                self._ring.rotate(-1)
                continue
            if tenant.deficit < 1:
                tenant.deficit += tenant.weight
                if tenant.deficit < 1:
                    self._ring.rotate(-1)
                    continue
            tenant.deficit -= 1
            item = fn.ready.popleft()
            self._count -= 1
            tenant.ring.rotate(-1)  # its next function goes first next time (rule 3)
            if not fn.ready:
                tenant.ring = deque(f for f in tenant.ring if f is not fn)
            if not tenant.ring:
                self._leave(tenant)
            elif tenant.deficit < 1:
                self._ring.rotate(-1)
            return item, self._permit(tenant, fn, permits)
        return None

    def _headroom(self, tenant: _Tenant[T]) -> bool:
        """Rule 2a: whether ``tenant`` may take one more slot."""
        now = time.monotonic()
        active = [t for t in self._tenants.values()
                  if t.ring or t.in_flight or now - t.last_active < ACTIVE_S or t is tenant]
        total = sum(t.weight for t in active)
        limit = math.floor(self.limiter.limit)

        def share(t: _Tenant[T]) -> int:
            return max(1, math.floor(limit * t.weight / total))

        if tenant.in_flight < share(tenant):
            return True
        reserve = sum(max(0, min(share(t), RESERVE_SLOTS) - t.in_flight)
                      for t in active if t is not tenant)
        return self.limiter.available() - 1 >= reserve

    def _permit(self, tenant: _Tenant[T], fn: FunctionState[T], permits: bool) -> FairPermit:
        if not permits:
            return FairPermit(0, 0, time.monotonic())
        outer = self.limiter.take()
        tenant.in_flight += 1
        fn.last_active = time.monotonic()
        return FairPermit(outer.generation, outer.in_flight_at_start, outer.started_at,
                          fn.limiter.take(), fn)  # type: ignore[arg-type]

    def give_back(self, permit: Permit, signal: Signal, retry_after_s: float | None = None,
                  latency_s: float | None = None) -> None:
        """An attempt ended (rules 4, 5)."""
        outer = Signal.SUCCESS if signal == Signal.OVERLOAD else signal
        self.limiter.give_back(permit, outer, None, latency_s)
        if not isinstance(permit, FairPermit) or permit.function is None:
            return
        fn = permit.function
        assert permit.function_permit is not None
        fn.limiter.give_back(permit.function_permit, signal, retry_after_s, latency_s)
        owner = self._tenants[fn.tenant]
        owner.in_flight -= 1
        now = time.monotonic()
        owner.last_active = now
        fn.last_active = now
        fn.finished += 1
        fn.window.append(Ended(now, latency_s or 0.0, signal))
        fn.prune(self.window_s, now)
        if fn.labels[0]:
            metrics.FUNCTION_ATTEMPTS.labels(*fn.labels, str(signal)).inc()

    # -- functions --------------------------------------------------------------------------

    def function(self, tenant: str, name: str) -> FunctionState[T]:
        fn = self._functions.get((tenant, name))
        if fn is None:
            limiter = make_limiter(f"{self.pipeline}/{tenant}/{name}",
                                   self.tenancy.function_concurrency, exported=False)
            fn = self._functions[tenant, name] = FunctionState(tenant, name, limiter)
            self._label(fn)
        return fn

    def functions(self) -> list[FunctionState[T]]:
        return list(self._functions.values())

    def in_flight_of(self, tenant: str) -> int:
        entry = self._tenants.get(tenant)
        return 0 if entry is None else entry.in_flight

    def _label(self, fn: FunctionState[T]) -> None:
        """Its own series for the first ``metrics_functions`` functions, else "other"."""
        if self._labelled >= self.tenancy.metrics_functions:
            fn.labels = (self.pipeline, OTHER, OTHER)
            return
        self._labelled += 1
        fn.labels = (self.pipeline, fn.tenant, fn.name)
        metrics.FUNCTION_LIMIT.labels(*fn.labels).set_function(lambda: fn.limiter.limit)
        metrics.FUNCTION_IN_FLIGHT.labels(*fn.labels).set_function(
            lambda: fn.limiter.in_flight)

    def _tenant(self, name: str) -> _Tenant[T]:
        tenant = self._tenants.get(name)
        if tenant is None:
            settings = self.tenancy.tenant(name)
            tenant = self._tenants[name] = _Tenant(name, settings.weight,
                                                   settings.max_concurrency)
        return tenant

    def _leave(self, tenant: _Tenant[T]) -> None:
        tenant.deficit = 0.0
        self._ring = deque(t for t in self._ring if t is not tenant)
