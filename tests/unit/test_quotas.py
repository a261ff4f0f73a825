"""A hosting pipeline's submit quotas (sluice.tenancy.quotas) on a fake clock and a fake route
store: the token bucket's burst, refill and wait; max_queued over the store's count plus this
process's submits, read at most once a second; a refusal takes nothing; tenants apart."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from sluice.tenancy.config import TenancyConfig, TenantConfig
from sluice.tenancy.quotas import QUEUED, RATE, SubmitQuotas
from sluice.tenancy.routes import Change, Route, RouteEvent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Routes:
    """The one call the quotas make of a RouteStore: queued()."""

    def __init__(self) -> None:
        self.waiting: dict[str, int] = {}
        self.reads = 0

    async def queued(self, pipeline: str) -> dict[str, int]:
        assert pipeline == "host"
        self.reads += 1
        await asyncio.sleep(0)
        return dict(self.waiting)

    async def routes(self, pipeline: str) -> list[Route]:
        raise NotImplementedError

    async def change(self, change: Change) -> tuple[Route, int] | None:
        raise NotImplementedError

    async def backlog(self, queue: str) -> dict[tuple[str, str], int]:
        raise NotImplementedError

    async def events(self, pipeline: str, limit: int = 100) -> list[RouteEvent]:
        raise NotImplementedError

    async def note(self, pipeline: str, task_ids: Sequence[str], note: str) -> None:
        raise NotImplementedError

    async def notes(self, pipeline: str, task_id: str) -> list[tuple[float, str]]:
        raise NotImplementedError


NO_CAPS = TenantConfig()


def quotas(*tenants: TenantConfig, default: TenantConfig = NO_CAPS) -> tuple[
        SubmitQuotas, Clock, Routes]:
    clock, routes = Clock(), Routes()
    tenancy = TenancyConfig(tenants=tenants, default=default)
    return SubmitQuotas("host", tenancy, routes, clock=clock), clock, routes


async def test_no_limits_always_pass_and_never_read_the_store() -> None:
    q, _, routes = quotas()
    for _ in range(1000):
        assert await q.check("acme") is None
    assert routes.reads == 0


async def test_burst_then_the_wait_for_the_next_token() -> None:
    q, clock, _ = quotas(TenantConfig("acme", submit_rate_per_s=2, submit_burst=3))
    assert [await q.check("acme") for _ in range(3)] == [None, None, None]
    assert await q.check("acme") == pytest.approx(0.5)  # one token at 2/s
    clock.now += 0.25
    assert await q.check("acme") == pytest.approx(0.25)  # refused: took nothing
    clock.now += 0.25
    assert await q.check("acme") is None
    assert await q.check("acme") == pytest.approx(0.5)


async def test_the_bucket_refills_to_its_burst_only() -> None:
    q, clock, _ = quotas(TenantConfig("acme", submit_rate_per_s=10, submit_burst=5))
    clock.now += 3600
    results = [await q.check("acme") for _ in range(6)]
    assert results[:5] == [None] * 5 and results[5] == pytest.approx(0.1)


async def test_default_burst_is_a_seconds_worth() -> None:
    q, _, _ = quotas(TenantConfig("acme", submit_rate_per_s=4))
    assert [await q.check("acme") is None for _ in range(5)] == [True] * 4 + [False]


async def test_n_tokens_at_once_and_more_than_the_burst_is_an_error() -> None:
    q, clock, _ = quotas(TenantConfig("acme", submit_rate_per_s=1, submit_burst=4))
    assert await q.check("acme", 3) is None
    assert await q.check("acme", 3) == pytest.approx(2.0)  # 1 token left, 2 more at 1/s
    clock.now += 2
    assert await q.check("acme", 3) is None
    with pytest.raises(ValueError, match="burst of 4"):
        await q.check("acme", 5)


async def test_tenants_have_buckets_of_their_own_and_defaults_apply() -> None:
    q, _, _ = quotas(TenantConfig("acme", submit_rate_per_s=1, submit_burst=1),
                     default=TenantConfig(submit_rate_per_s=1, submit_burst=2))
    assert await q.check("acme") is None
    assert await q.check("acme") is not None
    assert await q.check("other") is None  # the defaults: burst 2
    assert await q.check("other") is None
    assert await q.check("other") is not None
    assert await q.check("third") is None


async def test_max_queued_counts_the_store_and_this_processs_submits() -> None:
    q, clock, routes = quotas(TenantConfig("acme", max_queued=5))
    routes.waiting = {"acme": 3, "other": 100}
    assert await q.check("acme") is None
    assert await q.check("acme") is None
    refusal = await q.refusal("acme")
    assert refusal is not None and refusal.limit == QUEUED and refusal.retry_after_s == 1.0
    assert "'acme' has 5 tasks waiting" in refusal.detail and "max_queued is 5" in refusal.detail
    assert routes.reads == 1  # read once within the second
    clock.now += 0.99
    assert await q.check("acme") == 1.0
    assert routes.reads == 1
    routes.waiting = {"acme": 1}  # two ran meanwhile
    clock.now += 0.01
    assert await q.check("acme") is None  # a fresh read: 1 + 1
    assert routes.reads == 2
    assert await q.check("acme", 3) is None  # 5 now
    assert await q.check("acme") == 1.0


async def test_one_read_for_many_concurrent_checks() -> None:
    q, _, routes = quotas(TenantConfig("acme", max_queued=10))
    results = await asyncio.gather(*(q.check("acme") for _ in range(15)))
    assert routes.reads == 1
    assert results.count(None) == 10


async def test_a_refusal_by_one_limit_takes_nothing_of_the_other() -> None:
    q, clock, routes = quotas(TenantConfig("acme", submit_rate_per_s=1, submit_burst=2,
                                           max_queued=1))
    assert await q.check("acme") is None
    queued = await q.refusal("acme")  # at max_queued: its token is kept
    assert queued is not None and queued.limit == QUEUED
    routes.waiting = {}
    clock.now += 1.0  # a fresh read; the bucket is full again anyway
    assert await q.check("acme") is None
    assert await q.check("acme") is not None  # max_queued again (1 of this process)
    clock.now += 1.0
    assert await q.check("acme") is None
    q2, _, routes2 = quotas(TenantConfig("acme", submit_rate_per_s=1, submit_burst=1,
                                         max_queued=2))
    assert await q2.check("acme") is None
    rate = await q2.refusal("acme")  # by the rate: no place taken in the waiting count
    assert rate is not None and rate.limit == RATE and "submit_rate_per_s 1" in rate.detail
    assert q2._since == {"acme": 1}
    assert routes2.reads == 1
