"""One hosting pipeline in one worker: reads the routes, applies the isolation rules, moves
functions to dedicated queues and back.

Invariants:

1. Decisions are made once for the whole deployment: every worker looks at the rules, but a
   route changes only by compare-and-set in the store (:mod:`sluice.tenancy.routes` invariant
   1): of two workers that decide to move one function at once, one moves it; the other
   reads the winner's route at its next look. Where the tasks go is the route in the store;
   every worker and gateway follows it (routes invariant 3, source invariant 4).
2. A function is isolated when, while it is on the shared queue and not pinned, one rule
   holds: ``backlog`` tasks of it wait in the shared queue; or, over the last ``window_s``
   with at least ``min_tasks`` attempts ended in this worker, its share of failed or timed-out
   attempts reaches ``error_share``, or its p99 attempt duration reaches ``p99_s``. Its window
   starts again whenever its route changes: what it did on its dedicated queue does not send
   it back there once reclaimed.
3. Its dedicated queue is made first (a topic with the shared one's partitions), then the
   route changes, with its waiting tasks moved in the same transaction where the queues are
   the store's; on a broker, the shared queue's consumers forward them as they come
   (source invariant 4). Tasks keep their ids, attempts and timelines.
4. A dedicated queue that has been empty, with nothing of its function held by this worker,
   for ``reclaim_after_s`` (and whose route is that old) is reclaimed: the route goes back to
   shared (any message that arrived meanwhile moved back with it), then the queue is deleted
   once every worker has had time to stop reading it (``DELETE_AFTER_CHECKS`` looks).
5. Each change is logged (one line, saying why), counted in ``sluice_route_changes_total``,
   and kept as a route event (``GET /v1/tenants/{t}/events``); each task it moves (or that is
   forwarded) gets a note on its timeline (``GET /v1/tasks/{id}``).
6. A pinned route (by hand: API or CLI) is left alone by the rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from sluice import metrics
from sluice.tenancy.routes import (
    DEDICATED,
    ISOLATED,
    RECLAIMED,
    SHARED,
    Change,
    Route,
    dedicated_queue,
)

if TYPE_CHECKING:
    from sluice.config.model import PipelineConfig
    from sluice.stores.base import Store
    from sluice.tenancy.queues import QueueOps
    from sluice.tenancy.scheduler import FairReady, FunctionState
    from sluice.tenancy.source import RoutedSource

log = logging.getLogger(__name__)

DELETE_AFTER_CHECKS = 5  # rule 4: looks of every worker before a reclaimed queue is deleted


class Hosting:
    """See the module invariants."""

    def __init__(self, config: PipelineConfig, store: Store, source: RoutedSource,
                 fair: FairReady[Any], queues: QueueOps | None) -> None:
        assert config.tenancy is not None
        self.config = config
        self.tenancy = config.tenancy
        self.rules = config.tenancy.isolation
        self.store = store
        self.source = source
        self.fair = fair
        self.queues = queues
        self.routes: dict[tuple[str, str], Route] = {}
        self.backlog: dict[tuple[str, str], int] = {}  # waiting, by function, where it is
        self._idle_since: dict[tuple[str, str], float] = {}
        self._to_delete: dict[str, float] = {}  # reclaimed queue → when to delete it
        self._versions: dict[tuple[str, str], int] = {}  # each route's version last seen
        self.running = False  # run() under way (a loop built to serve the API only is not)
        source.on_forward = self._forwarded

    async def run(self, stop: asyncio.Event) -> None:
        """Look every ``check_interval_s`` until ``stop``."""
        failing: str | None = None
        self.running = True
        while not stop.is_set():
            try:
                await self.check()
                if failing is not None:
                    log.info("pipeline %r: the hosted functions' routes are looked after "
                             "again", self.config.name)
                failing = None
            except Exception as exc:  # a store or broker outage: look again next time
                if str(exc) != failing:  # one line per failure, not one per look
                    log.warning("pipeline %r: looking after the hosted functions' routes "
                                "failed: %s; will look again", self.config.name, exc)
                failing = str(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rules.check_interval_s)

    async def check(self) -> None:
        await self.refresh()
        if self.rules.enabled:
            for key, reason in self._to_isolate():
                await self.isolate(key, reason)
            for route in list(self.routes.values()):
                if self._reclaimable(route):
                    await self.reclaim(route)
        await self._delete_due()

    async def refresh(self) -> None:
        routes = await self.store.routes.routes(self.config.name)
        self.routes = {(r.tenant, r.function): r for r in routes}
        for key, route in self.routes.items():  # rule 2: a window per stay on a queue
            if self._versions.get(key, route.version) != route.version:
                self.fair.function(*key).window.clear()
            self._versions[key] = route.version
        await self.source.set_routes(routes)
        self.backlog = await self._backlog()
        self.source.waiting_tenants = {t for (t, _), n in self.backlog.items() if n}
        for key, count in self.backlog.items():
            fn = self.fair.function(*key)
            if fn.labels[1] != "other":
                metrics.FUNCTION_BACKLOG.labels(*fn.labels).set(count)

    async def _backlog(self) -> dict[tuple[str, str], int]:
        """Tasks waiting by function, each on its queue (rule 5 of sluice.tenancy.queues: the
        worker's own holdings where the broker cannot tell)."""
        seen, self.source.deferred_by = self.source.deferred_by, Counter()
        if self.queues is None:
            return dict(self.source.held + seen)
        out: dict[tuple[str, str], int] = {}
        queues = {self.queues.shared} | {r.queue for r in self.routes.values()
                                         if r.tier == DEDICATED and r.queue}
        for queue in sorted(queues):
            counts = await self.queues.backlog(queue)
            if counts is None:
                return dict(self.source.held + seen)
            for key, n in counts.items():
                route = self.routes.get(key)
                on_own = route is not None and route.tier == DEDICATED and route.queue == queue
                if on_own or queue == self.queues.shared:
                    out[key] = out.get(key, 0) + n
        return out

    # -- rules ------------------------------------------------------------------------------

    def _to_isolate(self) -> list[tuple[tuple[str, str], str]]:
        out: list[tuple[tuple[str, str], str]] = []
        keys = {(fn.tenant, fn.name) for fn in self.fair.functions()} | set(self.backlog)
        for key in sorted(keys):
            route = self.routes.get(key)
            if route is not None and (route.pinned or route.tier == DEDICATED):
                continue
            reason = self._reason(self.fair.function(*key), self.backlog.get(key, 0))
            if reason:
                out.append((key, reason))
        return out

    def _reason(self, fn: FunctionState[Any], backlog: int) -> str | None:
        """Why the function hurts its neighbours on the shared queue (rule 2), or None."""
        rules = self.rules
        if rules.backlog is not None and backlog >= rules.backlog:
            return f"{backlog} tasks waiting in the shared queue (backlog >= {rules.backlog})"
        fn.prune(rules.window_s, time.monotonic())
        ended = len(fn.window)
        if ended < rules.min_tasks:
            return None
        window = f"over the last {rules.window_s:g}s ({ended} attempts)"
        share = fn.error_share()
        if rules.error_share is not None and share >= rules.error_share:
            return (f"{share:.0%} of attempts failed or timed out {window} (error_share >= "
                    f"{rules.error_share:g})")
        p99 = fn.p99_s()
        if rules.p99_s is not None and p99 >= rules.p99_s:
            return f"p99 {p99:.2f}s {window} (p99_s >= {rules.p99_s:g})"
        return None

    def _reclaimable(self, route: Route) -> bool:
        key = (route.tenant, route.function)
        if route.tier != DEDICATED or route.pinned:
            self._idle_since.pop(key, None)
            return False
        now = time.monotonic()
        if self.backlog.get(key, 0) or self.source.held.get(key, 0):
            self._idle_since.pop(key, None)
            return False
        since = self._idle_since.setdefault(key, now)
        return (now - since >= self.rules.reclaim_after_s
                and time.time() - route.changed_at >= self.rules.reclaim_after_s)

    # -- moves ------------------------------------------------------------------------------

    async def isolate(self, key: tuple[str, str], reason: str) -> Route | None:
        """Give the function its dedicated queue (rule 3); None if another worker's change
        came first."""
        tenant, function = key
        queue = dedicated_queue(self.config.name, tenant, function)
        if self.queues is not None:
            await self.queues.create(queue)
        route = self.routes.get(key)
        moves = self.queues is not None and self.queues.moves_in_store
        change = Change(self.config.name, tenant, function, DEDICATED, queue, ISOLATED, reason,
                        route.version if route is not None else 0,
                        move_from=self.queues.shared if moves and self.queues else None,
                        move_to=queue if moves else None)
        return await self._apply(change)

    async def reclaim(self, route: Route) -> Route | None:
        idle_s = time.monotonic() - self._idle_since.get((route.tenant, route.function),
                                                         time.monotonic())
        moves = self.queues is not None and self.queues.moves_in_store
        change = Change(self.config.name, route.tenant, route.function, SHARED, None,
                        RECLAIMED, f"its queue was empty and idle for {idle_s:.0f}s "
                        f"(reclaim_after_s {self.rules.reclaim_after_s:g})", route.version,
                        move_from=route.queue if moves else None,
                        move_to=self.queues.shared if moves and self.queues else None)
        changed = await self._apply(change)
        if changed is not None and route.queue:
            self._to_delete[route.queue] = (time.monotonic() + DELETE_AFTER_CHECKS
                                            * self.rules.check_interval_s)
        return changed

    async def _apply(self, change: Change) -> Route | None:
        result = await self.store.routes.change(change)
        if result is None:
            log.debug("pipeline %r: %s/%s was changed by another worker first",
                      change.pipeline, change.tenant, change.function)
            await self.refresh()
            return None
        route, moved = result
        where = f"to its own queue {route.queue}" if route.tier == DEDICATED else \
            "back to the shared queue"
        log.warning("pipeline %r: function %r of tenant %r %s %s: %s; %d task(s) moved",
                    change.pipeline, change.function, change.tenant, change.action, where,
                    change.reason, moved)
        fn = self.fair.function(change.tenant, change.function)
        metrics.ROUTE_CHANGES.labels(*fn.labels, change.action).inc()
        await self.refresh()
        return route

    async def _forwarded(self, task_ids: list[str], queue: str) -> None:
        """Forwarded tasks (source rule 4) get a note on their timelines (rule 5)."""
        route = next((r for r in self.routes.values() if r.queue == queue), None)
        why = f" ({route.reason})" if route is not None and route.reason else ""
        await self.store.routes.note(self.config.name, task_ids,
                                     f"forwarded to its function's own queue {queue}{why}")

    async def _delete_due(self) -> None:
        now = time.monotonic()
        for queue, when in list(self._to_delete.items()):
            if when > now or queue in self.source.members:
                continue
            if any(r.queue == queue for r in self.routes.values()):
                del self._to_delete[queue]  # routed to again meanwhile
                continue
            if self.queues is not None:
                await self.queues.delete(queue)
            del self._to_delete[queue]
