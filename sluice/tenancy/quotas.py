"""A hosting pipeline's submit quotas, per tenant, kept by each gateway process: how fast a
tenant may submit (``submit_rate_per_s``, ``submit_burst``) and how many of its tasks may wait
(``max_queued``). A submit beyond either is refused with the seconds to wait (HTTP 429 with
``Retry-After``).

Invariants:

1. The rate is a token bucket per tenant: ``burst`` tokens at most, refilled at
   ``submit_rate_per_s`` a second; a submit of ``n`` tasks takes ``n`` tokens, or is refused
   with the time until ``n`` tokens are there. A bucket is per process: N gateways of one store
   let a tenant submit N times the rate (the spec says so).
2. The waiting count is the store's (QUEUED and RETRYING tasks of the pipeline, by tenant),
   read at most once every :data:`REFRESH_S` for every tenant at once, plus what this process
   accepted since that read. A submit that would take a tenant past ``max_queued`` is refused
   with :data:`QUEUED_RETRY_AFTER_S`. Between reads other processes' submits are not seen, so
   the cap can be passed by what they accept within one :data:`REFRESH_S`.
3. A refused submit takes nothing: neither tokens nor a place in the waiting count. An
   accepted one takes both (even if its submit then fails: the next read corrects the count;
   tokens are not given back).
4. Time is the injected clock's (monotonic): tests move it by hand.

Why no library: ``aiolimiter`` waits for capacity rather than saying how long to wait, and
``limits`` counts fixed or moving windows, not a bucket whose wait is (n - tokens) / rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from sluice.tenancy.config import TenancyConfig
from sluice.tenancy.routes import RouteStore

REFRESH_S = 1.0  # the store's waiting counts are read at most this often (invariant 2)
QUEUED_RETRY_AFTER_S = 1.0  # the wait told to a tenant at max_queued
RATE, QUEUED = "submit_rate_per_s", "max_queued"  # which limit refused (the config keys)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a submit may not go ahead now, and when to try again."""

    limit: str  # RATE or QUEUED
    retry_after_s: float
    detail: str


@dataclass
class _Bucket:
    tokens: float
    at: float


class SubmitQuotas:
    """The submit quotas of one hosting pipeline's tenants (see the module invariants)."""

    def __init__(self, pipeline: str, tenancy: TenancyConfig, routes: RouteStore, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pipeline = pipeline
        self.tenancy = tenancy
        self.routes = routes
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._queued: dict[str, int] = {}  # the store's counts at the last read
        self._since: dict[str, int] = {}  # accepted here since that read
        self._read_at: float | None = None
        self._reading = asyncio.Lock()

    async def check(self, tenant: str, n: int = 1) -> float | None:
        """None when ``n`` submits of ``tenant`` may go ahead (they are counted), else the
        seconds to wait before trying again (see :meth:`refusal`)."""
        refusal = await self.refusal(tenant, n)
        return None if refusal is None else refusal.retry_after_s

    async def refusal(self, tenant: str, n: int = 1) -> Refusal | None:
        """As :meth:`check`, with which limit refused and why (invariant 3). ``ValueError``:
        ``n`` is more than the tenant's burst (it could never pass)."""
        settings = self.tenancy.tenant(tenant)
        cap = settings.max_queued
        if cap is not None:
            await self._read_counts()  # the only wait: what follows decides and counts at once
        rate = settings.submit_rate_per_s
        bucket = None
        if rate is not None:
            if n > settings.burst:
                raise ValueError(f"{n} submits at once can never pass tenant {tenant!r}'s "
                                 f"burst of {settings.burst}")
            bucket = self._refill(tenant, rate, settings.burst)
            if bucket.tokens < n:
                return Refusal(RATE, (n - bucket.tokens) / rate,
                               f"tenant {tenant!r} is over its submit rate in pipeline "
                               f"{self.pipeline!r} ({RATE} {rate:g}, burst {settings.burst})")
        if cap is not None:
            waiting = self._queued.get(tenant, 0) + self._since.get(tenant, 0)
            if waiting + n > cap:
                return Refusal(QUEUED, QUEUED_RETRY_AFTER_S,
                               f"tenant {tenant!r} has {waiting} tasks waiting in pipeline "
                               f"{self.pipeline!r}, its {QUEUED} is {cap}")
            self._since[tenant] = self._since.get(tenant, 0) + n
        if bucket is not None:
            bucket.tokens -= n
        return None

    def _refill(self, tenant: str, rate: float, burst: int) -> _Bucket:
        now = self.clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(float(burst), now)
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        return bucket

    async def _read_counts(self) -> None:
        """Read the store's waiting counts if the last read is :data:`REFRESH_S` old; one
        read at a time (the others wait for it and use it)."""
        if self._read_at is not None and self.clock() - self._read_at < REFRESH_S:
            return
        async with self._reading:
            if self._read_at is not None and self.clock() - self._read_at < REFRESH_S:
                return
            counts = await self.routes.queued(self.pipeline)
            self._queued, self._since = dict(counts), {}
            self._read_at = self.clock()
