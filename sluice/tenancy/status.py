"""What the gateway and ``sluice tenants`` show and change of a hosting pipeline's functions:
their routes (from the store, for the whole deployment), their backlogs, and, where this
process runs the pipeline's worker, what that worker sees of them (in flight, limit, error
share, p99)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sluice import metrics, registry
from sluice.errors import Unsupported
from sluice.tenancy.config import FUNCTION_PATTERN
from sluice.tenancy.routes import (
    DEDICATED,
    PINNED,
    SHARED,
    TIERS,
    Change,
    Route,
    dedicated_queue,
)

if TYPE_CHECKING:
    from sluice.config.model import PipelineConfig
    from sluice.stores.base import Store
    from sluice.tenancy.hosting import Hosting
    from sluice.tenancy.queues import QueueOps


def queues_of(store: Store, config: PipelineConfig) -> QueueOps | None:
    """The pipeline's queue operations (None: its source has no dedicated queues)."""
    spec = registry.get("source", config.source.type)
    if spec.hosting is None:
        return None
    ctx = registry.BuildContext(pipeline=config.name, tenant=config.tenant, opened=store,
                                pipeline_file=config.path, ordering=config.consumer.ordering,
                                source=config.source)
    queues: QueueOps = spec.hosting(spec.typed(config.source.config), ctx)
    return queues


async def functions(store: Store, config: PipelineConfig, tenant: str,
                    hosting: Hosting | None) -> list[dict[str, Any]]:
    """One row per function of ``tenant`` in the hosting pipeline ``config``."""
    routes = {(r.tenant, r.function): r for r in await store.routes.routes(config.name)
              if r.tenant == tenant}
    if hosting is not None and hosting.running:
        backlog = {k: n for k, n in hosting.backlog.items() if k[0] == tenant}
    else:
        backlog = {k: n for k, n in (await _backlog(store, config, routes)).items()
                   if k[0] == tenant}
        hosting = None  # a process that serves the API only: its loops do not run
    seen = {fn.name: fn for fn in (hosting.fair.functions() if hosting else [])
            if fn.tenant == tenant}
    names = sorted(set(seen) | {f for _, f in routes} | {f for _, f in backlog})
    rows = []
    for name in names:
        route = routes.get((tenant, name))
        fn = seen.get(name)
        rows.append({
            "pipeline": config.name, "tenant": tenant, "function": name,
            "tier": route.tier if route is not None else SHARED,
            "queue": route.queue if route is not None and route.queue else None,
            "pinned": bool(route and route.pinned),
            "reason": route.reason if route is not None else None,
            "since": route.changed_at if route is not None else None,
            "backlog": backlog.get((tenant, name), 0),
            "in_flight": fn.limiter.in_flight if fn else None,
            "limit": round(fn.limiter.limit, 2) if fn else None,
            "error_share": round(fn.error_share(), 4) if fn else None,
            "p99_s": round(fn.p99_s(), 4) if fn else None,
            "finished": fn.finished if fn else None,
        })
    return rows


async def _backlog(store: Store, config: PipelineConfig,
                   routes: dict[tuple[str, str], Route]) -> dict[tuple[str, str], int]:
    queues = queues_of(store, config)
    if queues is None:
        return {}
    out: dict[tuple[str, str], int] = {}
    for queue in {queues.shared} | {r.queue for r in routes.values() if r.queue}:
        for key, n in (await queues.backlog(queue) or {}).items():
            out[key] = out.get(key, 0) + n
    return out


async def pin(store: Store, config: PipelineConfig, tenant: str, function: str,
              tier: str) -> dict[str, Any]:
    """Pin a function to its dedicated queue or the shared one, or give it back to the rules
    (``auto``); returns the route as JSON. Raises ValueError for a bad tier or name."""
    import re

    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    if not re.fullmatch(FUNCTION_PATTERN, function):
        raise ValueError(f"function name {function!r}: expected letters, digits and ._- "
                         "(at most 63), starting with a letter or digit")
    queues = queues_of(store, config)
    if tier == DEDICATED and queues is None:
        raise Unsupported(f"a {config.source.type} source has no dedicated queues")
    for _ in range(5):  # compare-and-set: look again if another change came first
        current = {(r.tenant, r.function): r
                   for r in await store.routes.routes(config.name)}.get((tenant, function))
        version = current.version if current is not None else 0
        was = current.tier if current is not None else SHARED
        was_queue = current.queue if current is not None else None
        to = tier if tier != "auto" else was
        queue = (dedicated_queue(config.name, tenant, function) if to == DEDICATED
                 else None)
        moves = queues is not None and queues.moves_in_store and was != to
        if queues is not None and to == DEDICATED:
            await queues.create(queue or "")
        change = Change(config.name, tenant, function, to, queue, PINNED,
                        f"pinned {tier} by hand" if tier != "auto" else
                        "given back to the isolation rules by hand", version,
                        pinned=tier != "auto",
                        move_from=(queues.shared if to == DEDICATED else was_queue)
                        if moves and queues else None,
                        move_to=(queue if to == DEDICATED else queues.shared)
                        if moves and queues else None)
        result = await store.routes.change(change)
        if result is not None:
            route, moved = result
            metrics.ROUTE_CHANGES.labels(config.name, tenant, function, PINNED).inc()
            return {"pipeline": config.name, "tenant": tenant, "function": function,
                    **route.to_json(), "moved": moved, "at": time.time()}
    raise ValueError(f"the route of {tenant}/{function} kept changing; try again")


async def events(store: Store, config: PipelineConfig, tenant: str | None,
                 limit: int = 100) -> list[dict[str, Any]]:
    """The latest route changes of the pipeline (of ``tenant`` only, if given)."""
    found = await store.routes.events(config.name, limit if tenant is None else limit * 10)
    rows = [e.to_json() for e in found if tenant is None or e.tenant == tenant]
    return rows[:limit]
