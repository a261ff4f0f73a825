"""Hosting pipelines on a real store (the data directory's SQLite, and PostgreSQL): fair
shares between tenants, a limiter per function, and a failing function isolated to a queue of
its own, its backlog moved, nothing lost or run twice, then reclaimed when quiet."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice import runtime
from sluice.config.load import parse_pipeline
from sluice.consumer.loop import ConsumerLoop
from sluice.datadir import QueuedMessage
from sluice.errors import Overloaded
from sluice.message import Message
from sluice.registry import Submission
from sluice.stores import open_store
from sluice.stores.base import Store
from sluice.tasks.state import TaskState
from sluice.tenancy.config import FUNCTION_HEADER, TENANT_HEADER
from tests.helpers.postgres import fresh_url

RUNS: Counter[str] = Counter()  # task id → times its handler ran to success
FAILING: set[str] = set()  # functions that raise
OVERLOADED: set[str] = set()  # functions that answer Overloaded


async def handle(message: Message) -> dict[str, Any]:
    await asyncio.sleep(0.01)
    if message.function in OVERLOADED:
        raise Overloaded("busy", retry_after_s=None)
    if message.function in FAILING:
        raise RuntimeError(f"{message.function} is broken")
    RUNS[message.task_id] += 1
    return {"tenant": message.tenant, "function": message.function}


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    RUNS.clear()
    FAILING.clear()
    OVERLOADED.clear()
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sluice.db'}"
        return
    with fresh_url() as url:
        yield url


def pipeline(extra: str) -> str:
    return f"""
name: fns
source: {{embedded: {{queue: fns, lease_s: 10}}}}
handler: {{python: "tests.integration.test_tenancy:handle"}}
consumer:
  concurrency: 4
  ordering: unordered
  retry: {{max_attempts: 50, initial_backoff_s: 0.05, max_backoff_s: 0.2}}
tenancy:
{extra}
"""


async def submit(store: Store, items: list[tuple[str, str]], prefix: str = "t") -> list[str]:
    """Submit one task per (tenant, function), in this order; their ids."""
    subs, ids = [], []
    for i, (tenant, function) in enumerate(items):
        task_id = f"{prefix}{i:05d}-{tenant}-{function}"
        ids.append(task_id)
        headers = {TENANT_HEADER: tenant, FUNCTION_HEADER: function}
        subs.append(Submission("fns", tenant, QueuedMessage(task_id, json.dumps({"i": i})
                                                           .encode(), headers=headers),
                               function=function))
    for start in range(0, len(subs), 500):
        await store.submit("fns", subs[start:start + 500])
    return ids


def build(text: str, url: str, tmp_path: Path) -> ConsumerLoop:
    return runtime.build(parse_pipeline(text), tmp_path, store_url=url)


async def run_for(loop: ConsumerLoop, seconds: float) -> None:
    stop = asyncio.Event()
    runner = asyncio.create_task(runtime.run_pipelines([loop], stop))
    await asyncio.sleep(seconds)
    stop.set()
    await runner


async def states(store: Store) -> dict[str, TaskState]:
    out: dict[str, TaskState] = {}
    cursor = None
    while True:
        page = await store.tasks.list("fns", limit=1000, before_seq=cursor)
        if not page:
            return out
        out.update({t.task_id: t.state for t in page})
        cursor = page[-1].seq


def test_fair_shares_follow_weights(store_url: str, tmp_path: Path) -> None:
    """Three tenants with 1,200 tasks each queued, weights 1:1:2, four slots: what each gets
    done is within 10% of its weighted share (25%, 25%, 50%)."""
    text = pipeline("""  tenants: [{name: a, weight: 1}, {name: b, weight: 1}, {name: c, weight: 2}]
  isolation: {enabled: false}""")

    async def main() -> Counter[str]:
        store = open_store(store_url)
        await submit(store, [(t, "f") for _ in range(1200) for t in ("a", "b", "c")])
        await run_for(build(text, store_url, tmp_path), 4.0)
        done = Counter(task_id.split("-")[1] for task_id in RUNS)
        await store.close()
        return done

    done = asyncio.run(main())
    total = sum(done.values())
    assert total > 200, done
    for tenant, share in (("a", 0.25), ("b", 0.25), ("c", 0.5)):
        assert abs(done[tenant] / total - share) <= 0.1 * share, (done, total)


def test_an_overloaded_function_slows_only_itself(store_url: str, tmp_path: Path) -> None:
    """A function whose backend answers Overloaded (as a 429) has its own limit cut; a
    neighbour's on the same worker keeps its own."""
    text = pipeline("""  function_concurrency: {initial: 8, min: 1, max: 64}
  isolation: {enabled: false}""")

    async def main() -> tuple[float, float, int]:
        store = open_store(store_url)
        OVERLOADED.add("busy")
        await submit(store, [(t, f) for _ in range(300) for t, f in (("x", "busy"),
                                                                        ("y", "calm"))])
        loop = build(text, store_url, tmp_path)
        await run_for(loop, 2.0)
        fair = loop.fair_shares
        assert fair is not None
        busy, calm = fair.function("x", "busy"), fair.function("y", "calm")
        await store.close()
        return busy.limiter.limit, calm.limiter.limit, calm.finished

    busy_limit, calm_limit, calm_done = asyncio.run(main())
    assert busy_limit <= 2, busy_limit
    assert calm_limit >= 8, calm_limit
    assert calm_done >= 100


def test_a_failing_function_is_isolated_then_reclaimed(store_url: str, tmp_path: Path) -> None:
    """A function that starts failing is moved to a queue of its own within the window, with
    its waiting tasks (their ids and attempts kept), while its neighbour runs on; once fixed,
    every task runs to success exactly once, and the idle queue is reclaimed."""
    text = pipeline("""  isolation: {window_s: 5, min_tasks: 10, error_share: 0.5, backlog: null,
              p99_s: null, reclaim_after_s: 1.5, check_interval_s: 0.2}""")

    async def main() -> None:
        store = open_store(store_url)
        FAILING.add("bad")
        ids = await submit(store, [(t, f) for _ in range(150) for t, f in (("x", "bad"),
                                                                              ("y", "good"))])
        loop = build(text, store_url, tmp_path)
        stop = asyncio.Event()
        runner = asyncio.create_task(runtime.run_pipelines([loop], stop))
        try:
            deadline = time.monotonic() + 20
            route = None
            while time.monotonic() < deadline:
                routes = {(r.tenant, r.function): r for r in await store.routes.routes("fns")}
                route = routes.get(("x", "bad"))
                if route is not None and route.tier == "dedicated":
                    break
                await asyncio.sleep(0.1)
            assert route is not None and route.tier == "dedicated", route
            assert route.queue == "fns.fn.x.bad"
            assert ("y", "good") not in routes
            events = await store.routes.events("fns")
            assert events[0].action == "isolated" and "failed" in events[0].reason, events
            assert events[0].moved > 0
            noted = [await store.routes.notes("fns", i) for i in ids if "-x-bad" in i]
            assert any(n and n[0][1].startswith("isolated: moved to its function's own queue "
                                                "fns.fn.x.bad (") for n in noted), noted[:3]
            FAILING.clear()  # fixed: everything runs to success now
            while time.monotonic() < deadline + 20:
                found = await states(store)
                if all(found.get(i) == TaskState.SUCCEEDED for i in ids):
                    break
                await asyncio.sleep(0.2)
            while time.monotonic() < deadline + 30:
                routes = {(r.tenant, r.function): r for r in await store.routes.routes("fns")}
                if routes[("x", "bad")].tier == "shared":
                    break
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await runner
        found = await states(store)
        assert Counter(found.values()) == {TaskState.SUCCEEDED: 300}
        assert set(RUNS) == set(ids) and set(RUNS.values()) == {1}  # none lost, none twice
        routes = {(r.tenant, r.function): r for r in await store.routes.routes("fns")}
        assert routes[("x", "bad")].tier == "shared"
        actions = [e.action for e in reversed(await store.routes.events("fns"))]
        assert actions == ["isolated", "reclaimed"], actions
        assert await store.routes.backlog("fns.fn.x.bad") == {}
        await store.close()

    asyncio.run(main())


def test_a_small_tenant_is_not_stuck_behind_a_large_one(store_url: str, tmp_path: Path) -> None:
    """5,000 tasks of one tenant queued ahead of 10 of another on the shared queue, isolation
    off: the small tenant's tasks finish within seconds (its share of the worker), long before
    the large tenant's backlog is done."""
    text = pipeline("""  isolation: {enabled: false, check_interval_s: 0.2}""")

    async def main() -> None:
        store = open_store(store_url)
        await submit(store, [("big", "f")] * 5000, prefix="a")
        small = await submit(store, [("small", "f")] * 10, prefix="b")
        loop = build(text, store_url, tmp_path)
        stop = asyncio.Event()
        runner = asyncio.create_task(runtime.run_pipelines([loop], stop))
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not all(RUNS[i] for i in small):
                await asyncio.sleep(0.05)
            done_big = sum(1 for i in RUNS if "-big-" in i)
        finally:
            stop.set()
            await runner
        assert all(RUNS[i] == 1 for i in small), [RUNS[i] for i in small]
        assert done_big < 2500, done_big  # the small tenant did not wait for the big backlog
        await store.close()

    asyncio.run(main())


def test_two_workers_isolate_once_and_agree(store_url: str, tmp_path: Path) -> None:
    """Two workers on one store see one function fail: it is isolated once (one route change,
    one event), both then fetch its tasks from its dedicated queue, and each task runs once."""
    text = pipeline("""  isolation: {window_s: 5, min_tasks: 5, error_share: 0.5, backlog: null,
              p99_s: null, check_interval_s: 0.1}""")

    async def main() -> None:
        store = open_store(store_url)
        FAILING.add("bad")
        ids = await submit(store, [(t, f) for _ in range(200) for t, f in (("x", "bad"),
                                                                              ("y", "good"))])
        loops = [build(text, store_url, tmp_path / f"w{n}") for n in range(2)]
        stop = asyncio.Event()
        runner = asyncio.create_task(runtime.run_pipelines(loops, stop))
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not all(
                    lp.hosting and ("x", "bad") in lp.hosting.source.routes for lp in loops):
                await asyncio.sleep(0.1)
            queues = {lp.hosting.source.queue_of("x", "bad") for lp in loops if lp.hosting}
            assert queues == {"fns.fn.x.bad"}, queues
            FAILING.clear()
            while time.monotonic() < deadline + 20 and set(RUNS) != set(ids):
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await runner
        assert set(RUNS) == set(ids) and set(RUNS.values()) == {1}
        events = await store.routes.events("fns")
        assert [(e.tenant, e.function, e.action) for e in events] == [("x", "bad", "isolated")]
        await store.close()

    asyncio.run(main())


def test_the_route_store_counts_what_waits(store_url: str) -> None:
    """What the quotas (max_queued) and the backlog rule read, on either store."""

    async def main() -> None:
        store = open_store(store_url)
        await submit(store, [("a", "f")] * 3 + [("a", "g")] * 2 + [("b", "f")])
        assert await store.routes.queued("fns") == {"a": 5, "b": 1}
        assert await store.routes.backlog("fns") == {("a", "f"): 3, ("a", "g"): 2,
                                                     ("b", "f"): 1}
        await store.close()

    asyncio.run(main())


def test_a_429ing_http_function_slows_only_itself(tmp_path: Path) -> None:
    """Through the HTTP handler (its URL names the function): the backend answers 429 for
    one function and 200 for another; only the first one's limit falls."""
    from aiohttp import web

    url = f"sqlite:///{tmp_path / 'sluice.db'}"

    async def fn(request: web.Request) -> web.Response:
        await asyncio.sleep(0.005)
        if request.match_info["name"] == "busy":
            return web.Response(status=429, text="slow down")
        return web.json_response({"ok": True})

    async def main() -> tuple[float, float]:
        app = web.Application()
        app.router.add_post("/fn/{name}", fn)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        text = pipeline("""  function_concurrency: {initial: 8, min: 1, max: 64}
  isolation: {enabled: false}""").replace(
            '{python: "tests.integration.test_tenancy:handle"}',
            f'{{http: {{url: "http://127.0.0.1:{port}/fn/{{function}}"}}}}')
        store = open_store(url)
        await submit(store, [(t, f) for _ in range(300) for t, f in (("x", "busy"),
                                                                        ("y", "calm"))])
        loop = build(text, url, tmp_path)
        await run_for(loop, 2.0)
        fair = loop.fair_shares
        assert fair is not None
        busy, calm = fair.function("x", "busy"), fair.function("y", "calm")
        await store.close()
        await runner.cleanup()
        assert calm.finished >= 100
        return busy.limiter.limit, calm.limiter.limit

    busy_limit, calm_limit = asyncio.run(main())
    assert busy_limit <= 2, busy_limit
    assert calm_limit >= 8, calm_limit


def test_json_log_lines_carry_the_task_fields(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """``--log-format json``: a task's log line has its pipeline, task id, attempt, tenant and
    function as keys, not only in the message."""
    from sluice.cli_common import _JsonFormatter

    url = f"sqlite:///{tmp_path / 'sluice.db'}"
    text = pipeline("""  isolation: {enabled: false}""").replace("max_attempts: 50",
                                                                "max_attempts: 1")
    FAILING.add("bad")

    async def main() -> None:
        store = open_store(url)
        traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        await store.submit("fns", [Submission("fns", "x", QueuedMessage(
            "t00000-x-bad", b"{}", headers={TENANT_HEADER: "x", FUNCTION_HEADER: "bad",
                                            "traceparent": traceparent}), function="bad")])
        await run_for(build(text, url, tmp_path), 1.0)
        await store.close()

    with caplog.at_level("WARNING", logger="sluice.consumer.loop"):
        asyncio.run(main())
    FAILING.clear()
    (record,) = [r for r in caplog.records if "failed for good" in r.getMessage()]
    line = json.loads(_JsonFormatter().format(record))
    fields = ("pipeline", "task_id", "attempt", "tenant", "function", "trace_id")
    assert {k: line[k] for k in fields} == {
        "pipeline": "fns", "task_id": "t00000-x-bad", "attempt": 1, "tenant": "x",
        "function": "bad", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}
