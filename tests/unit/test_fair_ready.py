"""The fair ready queue of a hosting pipeline (sluice.tenancy.scheduler), without a loop."""

from __future__ import annotations

from collections import Counter

from sluice.consumer.limiter import Limiter, Signal
from sluice.tenancy.config import TenancyConfig, TenantConfig
from sluice.tenancy.scheduler import FairReady


def fair(limit: int, *tenants: TenantConfig) -> FairReady[tuple[str, str, int]]:
    tenancy = TenancyConfig(tenants=tenants, function_concurrency=1000)
    return FairReady("p", tenancy, Limiter("p-fair-test", limit, limit, limit, exported=False),
                     lambda item: (item[0], item[1]))


def test_starts_follow_the_weights_among_tenants_with_work() -> None:
    ready = fair(1000, TenantConfig("a", 1), TenantConfig("b", 3))
    for n in range(400):
        ready.append(("a", "f", n))
        ready.append(("b", "f", n))
    started = Counter(ready.take()[0][0] for _ in range(200))  # type: ignore[index]
    assert started == {"a": 50, "b": 150}
    # Work-conserving: once b has nothing ready, a gets every start.
    ready.remove_where(lambda item: item[0] == "b")
    assert Counter(ready.take()[0][0] for _ in range(100)) == {"a": 100}  # type: ignore[index]


def test_round_robin_over_a_tenants_functions() -> None:
    ready = fair(1000)
    for n in range(10):
        ready.append(("a", "f", n))
        ready.append(("a", "g", n))
    order = [ready.take()[0][1] for _ in range(6)]  # type: ignore[index]
    assert order == ["f", "g", "f", "g", "f", "g"]


def test_a_tenant_past_its_share_leaves_headroom_for_an_active_neighbour() -> None:
    """Ten slots, two active tenants (a share of 5 each): the busy one takes free slots
    beyond its share, but leaves two for the neighbour, whose next task starts at once."""
    ready = fair(10)
    ready.append(("quiet", "f", 0))
    _, permit = ready.take()  # type: ignore[misc]
    ready.give_back(permit, Signal.SUCCESS, latency_s=0.01)  # quiet is active, running nothing
    for n in range(50):
        ready.append(("busy", "f", n))
    running = []
    while (taken := ready.take()) is not None:
        running.append(taken)
    assert len(running) == 8  # 10 slots less the quiet tenant's reserve of 2
    ready.append(("quiet", "f", 1))
    taken = ready.take()
    assert taken is not None and taken[0][0] == "quiet"
