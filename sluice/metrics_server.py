"""``sluice run --metrics-port``: a worker process's ``/metrics`` (Prometheus) and ``/healthz``,
so an autoscaler (KEDA) or Prometheus can read it as it reads a gateway's.

The gauges that describe stored state (tasks per state, queue depth, paused) are refreshed at
each scrape by :func:`refresh`, which the gateway's ``/metrics`` uses too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sluice import metrics
from sluice.consumer.loop import ConsumerLoop
from sluice.tasks.state import TaskState
from sluice.tasks.store import TaskStore

log = logging.getLogger(__name__)


async def refresh(store: TaskStore, pipelines: Iterable[str],
                  loops: Mapping[str, ConsumerLoop]) -> bytes:
    """Refresh the stored-state gauges of ``pipelines`` and return the exposition."""
    counts = await store.counts()
    for name in pipelines:
        for state in TaskState:
            metrics.TASKS.labels(name, str(state)).set(counts.get((name, str(state)), 0))
        metrics.PAUSED.labels(name).set(int(await store.is_paused(name)))
    for name, loop in loops.items():
        metrics.QUEUE_DEPTH.labels(name).set(await loop.source.pending())
    return generate_latest(metrics.REGISTRY)


async def start(host: str, port: int, store: TaskStore,
                loops: Mapping[str, ConsumerLoop]) -> web.AppRunner:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` until the runner is cleaned up."""

    async def metrics_endpoint(request: web.Request) -> web.Response:
        body = await refresh(store, loops, loops)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return runner
