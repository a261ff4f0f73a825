"""The source of a hosting pipeline: its shared queue and its functions' dedicated queues, as
one :class:`~sluice.connectors.base.Source` for the consumer loop.

Invariants:

1. Each delivery is marked with its tenant and function (``tenancy.tenant_from`` and
   ``function_from``; a name that is not a valid function name, or none, is the function
   ``default``) before the loop sees it, and is settled (ack, retry, extend) on the queue it
   came from.
2. A dedicated queue is fetched only up to what its function can use: ``HELD_PER_SLOT`` times
   its limit, less what this worker holds of it. So a slow function's queue waits on the
   broker, not in the worker, and never takes room the shared queue's tasks need.
3. A delivery from the shared queue of a tenant that already holds its share of the worker
   (what the worker may hold, split by weight among the tenants holding some or with tasks
   waiting) is handed back
   unclaimed for ``DEFER_S`` (on the embedded queue it then sorts behind what came meanwhile),
   so one tenant's backlog ahead in the shared queue does not fill the worker while its
   neighbours' tasks wait behind it. Nothing is claimed or counted as an attempt.
4. A delivery from the shared queue of a function routed to a dedicated queue (a submit that
   raced the route change, or a broker queue whose backlog is moved this way) is published to
   the dedicated queue, then acknowledged (:mod:`sluice.tenancy.queues` rule 3).
5. Routes come from the store (:meth:`set_routes`); a dedicated queue's member is made when
   its route appears and closed when its route is gone, it holds nothing here and its queue
   is empty.
6. A fetch takes from every queue in turn, each at most its part of what the worker asks for
   (the shared queue one part, each dedicated queue one): a dedicated queue draining a large
   backlog never takes the whole fetch while the shared queue's tasks wait.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from sluice.connectors.base import Delivery, Source
from sluice.datadir import QueuedMessage
from sluice.tenancy.config import DEFAULT_FUNCTION, FUNCTION_PATTERN, TenancyConfig
from sluice.tenancy.routes import DEDICATED, Route

if TYPE_CHECKING:
    from sluice.tenancy.queues import QueueOps
    from sluice.tenancy.scheduler import FairReady

log = logging.getLogger(__name__)

HELD_PER_SLOT = 3  # as the consumer loop's: running, ready, finished and not yet recorded
MIN_HELD = 4  # a function may hold this many whatever its limit
DEFER_S = 1.0  # rule 3
POLL_S = 0.02  # between rounds over the queues while all are empty
# Most a dedicated queue gives one fetch (rule 6): a function draining a large backlog comes
# in batches small enough that its claims and records do not hold up the shared queue's.
DEDICATED_PART = 128
NAME = re.compile(FUNCTION_PATTERN)


def reader(spec: str) -> Callable[[Delivery], str | None]:
    """``header:<name>`` or ``payload:<field>`` → what reads it from a delivery."""
    kind, _, name = spec.partition(":")
    if kind == "header":
        lowered = name.lower()

        def from_header(d: Delivery) -> str | None:
            value = d.headers.get(name)
            if value is None:
                value = next((v for k, v in d.headers.items() if k.lower() == lowered), None)
            return value

        return from_header

    def from_payload(d: Delivery) -> str | None:
        try:
            value = json.loads(d.body)
        except ValueError:
            return None
        field = value.get(name) if isinstance(value, dict) else None
        return field if isinstance(field, str) else None

    return from_payload


class RoutedSource:
    """See the module invariants."""

    def __init__(self, tenancy: TenancyConfig, default_tenant: str, shared: Source,
                 shared_queue: str, queues: QueueOps | None) -> None:
        self.tenancy = tenancy
        self.default_tenant = default_tenant
        self.shared = shared
        self.shared_queue = shared_queue
        self.queues = queues
        self.lease_s = shared.lease_s
        self.orders_keys = bool(getattr(shared, "orders_keys", False))
        self.shares_backlog = bool(getattr(shared, "shares_backlog", False))
        self.members: dict[str, Source] = {}  # dedicated queue → its source
        self.routes: dict[tuple[str, str], Route] = {}  # dedicated routes by (tenant, function)
        self.fair: FairReady[Any] | None = None  # the loop's (rules 2, 3)
        # Told of each forward (the hosting controller notes it on the tasks' timelines).
        self.on_forward: Callable[[list[str], str], Awaitable[None]] | None = None
        self.capacity: Callable[[], int] = lambda: 1000  # the loop's (rule 3)
        self.held: Counter[tuple[str, str]] = Counter()
        self.waiting_tenants: set[str] = set()  # with tasks waiting (the controller's count)
        self.held_by_tenant: Counter[str] = Counter()
        self.deferred = 0
        # Deferred since the hosting controller last looked, by function: where the broker
        # cannot count a queue by function, what waits beyond a tenant's share shows here.
        self.deferred_by: Counter[tuple[str, str]] = Counter()
        self.forwarded = 0
        self._from: dict[int, Source] = {}  # id(delivery) → the member it came from
        self._tenant_of = reader(tenancy.tenant_from)
        self._function_of = reader(tenancy.function_from)
        self._turn = 0

    # -- routes ----------------------------------------------------------------------------

    async def set_routes(self, routes: Sequence[Route]) -> None:
        """The store's routes of this pipeline (rule 5)."""
        self.routes = {(r.tenant, r.function): r for r in routes
                       if r.tier == DEDICATED and r.queue}
        wanted = {r.queue for r in self.routes.values() if r.queue}
        for queue in wanted - set(self.members):
            if self.queues is None:
                continue
            await self.queues.create(queue)
            member = self.queues.member(queue)
            await member.start()
            self.members[queue] = member
        for queue in set(self.members) - wanted:  # routed away: read until drained
            member = self.members[queue]
            if not any(src is member for src in self._from.values()) \
                    and await member.pending() == 0:
                del self.members[queue]
                await member.close()

    def queue_of(self, tenant: str, function: str) -> str:
        route = self.routes.get((tenant, function))
        return route.queue if route is not None and route.queue else self.shared_queue

    # -- Source ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.shared.start()

    async def fetch(self, max_n: int, wait_s: float) -> list[Delivery]:
        """A round over the shared queue and the dedicated ones; while all are empty, another
        every ``POLL_S`` until ``wait_s`` (with the shared queue alone, its own fetch waits:
        a broker's long poll)."""
        deadline = time.monotonic() + wait_s
        shared_wait_s = 0.0
        while True:
            got = await self._round(max_n, shared_wait_s)
            remaining_s = deadline - time.monotonic()
            if got or remaining_s <= 0:
                return got
            shared_wait_s = min(POLL_S, remaining_s)
            if self.members:
                await asyncio.sleep(shared_wait_s)

    async def _round(self, max_n: int, shared_wait_s: float) -> list[Delivery]:
        """One fetch from each queue (rule 6): the shared one and each dedicated one with
        room, taking turns at going first, each at most its part of ``max_n``."""
        out: list[Delivery] = []
        queues: list[tuple[str | None, Source]] = [(None, self.shared),
                                                   *self.members.items()]
        self._turn = (self._turn + 1) % len(queues)
        queues = queues[self._turn:] + queues[:self._turn]
        part = max(MIN_HELD, -(-max_n // len(queues)))
        for queue, member in queues:
            if len(out) >= max_n:
                break
            if queue is None:
                wait_s = 0.0 if out or self.members else shared_wait_s
                fetched = await self.shared.fetch(min(max_n - len(out), part), wait_s)
                out.extend(await self._sorted_out(self._mark(fetched, self.shared)))
                continue
            budget = min(max_n - len(out), part, DEDICATED_PART, self._room_of_queue(queue))
            if budget > 0:
                out.extend(self._mark(await member.fetch(budget, 0.0), member))
        for d in out:
            self._hold(d)
        return out

    def _mark(self, deliveries: list[Delivery], member: Source) -> list[Delivery]:
        """Rule 1: each delivery's tenant and function, and where it came from."""
        for d in deliveries:
            tenant = self._tenant_of(d)
            function = self._function_of(d)
            d.tenant = tenant if tenant and NAME.fullmatch(tenant) else self.default_tenant
            d.function = function if function and NAME.fullmatch(function) else DEFAULT_FUNCTION
            self._from[id(d)] = member
        return deliveries

    async def _sorted_out(self, deliveries: list[Delivery]) -> list[Delivery]:
        """The shared queue's deliveries to run here; the others forwarded (rule 4) or
        deferred (rule 3)."""
        keep: list[Delivery] = []
        forward: dict[str, list[Delivery]] = {}
        defer: list[Delivery] = []
        extra_tenant: Counter[str] = Counter()
        for d in deliveries:
            assert d.tenant is not None and d.function is not None
            key = (d.tenant, d.function)
            route = self.routes.get(key)
            if route is not None and route.queue and self.queues is not None:
                forward.setdefault(route.queue, []).append(d)
            elif (self.held_by_tenant[d.tenant] + extra_tenant[d.tenant]
                  >= self._share_of_tenant(d.tenant)):
                defer.append(d)
            else:
                extra_tenant[d.tenant] += 1
                keep.append(d)
        for queue, items in forward.items():
            await self._forward(queue, items)
        if defer:
            self.deferred += len(defer)
            self.deferred_by.update((d.tenant or "", d.function or "") for d in defer)
            await self._settle_retry([(d, DEFER_S) for d in defer])
        return keep

    async def _forward(self, queue: str, deliveries: list[Delivery]) -> None:
        assert self.queues is not None
        await self.queues.publish(queue, [
            QueuedMessage(d.task_id, d.body, d.content_type, d.key, dict(d.headers) or None)
            for d in deliveries])
        await self.shared.ack(deliveries)
        for d in deliveries:
            self._from.pop(id(d), None)
        self.forwarded += len(deliveries)
        if self.on_forward is not None:
            await self.on_forward([d.task_id for d in deliveries], queue)

    def _share_of_function(self, key: tuple[str, str]) -> int:
        if self.fair is None:
            return 1 << 30
        limit = self.fair.function(*key).limiter.limit
        return max(MIN_HELD, HELD_PER_SLOT * math.floor(limit))

    def _share_of_tenant(self, tenant: str) -> int:
        """Its weighted share of what the worker may hold, among the tenants holding some or
        with tasks waiting (as the hosting controller last counted them)."""
        weights = {t: self.tenancy.tenant(t).weight
                   for t in {*self.waiting_tenants, *(t for t, n in self.held_by_tenant.items()
                                                      if n)}}
        weights[tenant] = self.tenancy.tenant(tenant).weight
        return max(MIN_HELD, math.floor(self.capacity() * weights[tenant]
                                        / sum(weights.values())))

    def _room_of_queue(self, queue: str) -> int:
        """Rule 2: what a dedicated queue's function can still use."""
        key = next((k for k, r in self.routes.items() if r.queue == queue), None)
        if key is None:  # its route is gone: drain what is left
            return MIN_HELD
        return self._share_of_function(key) - self.held[key]

    def _hold(self, d: Delivery) -> None:
        assert d.tenant is not None and d.function is not None
        self.held[d.tenant, d.function] += 1
        self.held_by_tenant[d.tenant] += 1

    def _release(self, d: Delivery) -> Source:
        member = self._from.pop(id(d), self.shared)
        if d.tenant is not None and d.function is not None:
            key = (d.tenant, d.function)
            self.held[key] -= 1
            if self.held[key] <= 0:
                del self.held[key]
            self.held_by_tenant[d.tenant] -= 1
            if self.held_by_tenant[d.tenant] <= 0:
                del self.held_by_tenant[d.tenant]
        return member

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        groups: dict[int, tuple[Source, list[Delivery]]] = {}
        for d in deliveries:
            member = self._release(d)
            groups.setdefault(id(member), (member, []))[1].append(d)
        for member, items in groups.values():
            await member.ack(items)

    async def retry_later(self, deliveries: Sequence[tuple[Delivery, float]]) -> None:
        groups: dict[int, tuple[Source, list[tuple[Delivery, float]]]] = {}
        for d, delay in deliveries:
            member = self._release(d)
            groups.setdefault(id(member), (member, []))[1].append((d, delay))
        for member, items in groups.values():
            await member.retry_later(items)

    async def _settle_retry(self, items: list[tuple[Delivery, float]]) -> None:
        """Hand back deliveries never held (rule 3)."""
        for d, _ in items:
            self._from.pop(id(d), None)
        await self.shared.retry_later(items)

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        groups: dict[int, tuple[Source, list[Delivery]]] = {}
        for d in deliveries:
            member = self._from.get(id(d), self.shared)
            groups.setdefault(id(member), (member, []))[1].append(d)
        for member, items in groups.values():
            await member.extend(items)

    async def pending(self) -> int:
        total = await self.shared.pending()
        for member in list(self.members.values()):
            total += await member.pending()
        return total

    async def close(self) -> None:
        for member in list(self.members.values()):
            await member.close()
        self.members.clear()
        await self.shared.close()
        if self.queues is not None:
            await self.queues.close()
