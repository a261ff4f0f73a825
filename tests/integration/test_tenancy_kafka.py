"""A hosting pipeline on a real Kafka broker: a failing function gets a topic of its own (made
with the shared topic's partition count), its messages forwarded there from the shared topic,
nothing lost or run twice; reclaimed when quiet, its topic deleted. Tenant and function come
from the payload here (``tenancy.tenant_from`` / ``function_from``)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from confluent_kafka.admin import AdminClient

from sluice import runtime
from sluice.config.load import parse_pipeline
from sluice.stores import open_store
from tests.helpers import kafka as kt
from tests.integration import test_tenancy as hosted


def topics() -> dict[str, int]:
    meta = AdminClient({"bootstrap.servers": kt.BROKERS}).list_topics(timeout=10)
    return {name: len(t.partitions) for name, t in meta.topics.items()}


def test_kafka_isolates_to_a_topic_of_its_own_and_reclaims(tmp_path: Path) -> None:
    kt.require_broker()
    hosted.RUNS.clear()
    hosted.FAILING.clear()
    topic = kt.new_topic(partitions=3)
    name = f"fns{topic[-6:]}"
    dedicated = f"{name}.fn.x.bad"
    text = f"""
name: {name}
source:
  kafka: {{brokers: "{kt.BROKERS}", topic: {topic}, session_timeout_ms: 6000,
          commit_interval_ms: 200}}
handler: {{python: "tests.integration.test_tenancy:handle"}}
consumer:
  concurrency: 8
  ordering: unordered
  retry: {{max_attempts: 50, initial_backoff_s: 0.05, max_backoff_s: 0.2}}
tenancy:
  tenant_from: "payload:tenant"
  function_from: "payload:fn"
  isolation: {{window_s: 5, min_tasks: 10, error_share: 0.5, backlog: null, p99_s: null,
              reclaim_after_s: 2, check_interval_s: 0.2}}
"""
    url = f"sqlite:///{tmp_path / 'sluice.db'}"
    ids = [f"k{i:04d}-{t}" for i in range(120) for t in ("x", "y")]
    kt.produce(topic, [kt.Out({"tenant": i.split("-")[1], "fn": "bad" if i.endswith("x")
                                else "good", "i": n}, task_id=i, key=i)
                       for n, i in enumerate(ids)])

    async def main() -> None:
        store = open_store(url)
        hosted.FAILING.add("bad")
        loop = runtime.build(parse_pipeline(text), tmp_path, store_url=url)
        stop = asyncio.Event()
        runner = asyncio.create_task(runtime.run_pipelines([loop], stop))
        try:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                routes = {(r.tenant, r.function): r for r in await store.routes.routes(name)}
                if ("x", "bad") in routes:
                    break
                await asyncio.sleep(0.1)
            assert routes[("x", "bad")].queue == dedicated, routes
            assert ("y", "good") not in routes
            assert topics().get(dedicated) == 3  # the shared topic's partition count
            hosted.FAILING.clear()
            while time.monotonic() < deadline + 40 and set(hosted.RUNS) != set(ids):
                await asyncio.sleep(0.2)
            while time.monotonic() < deadline + 60:
                routes = {(r.tenant, r.function): r for r in await store.routes.routes(name)}
                if routes[("x", "bad")].tier == "shared" and dedicated not in topics():
                    break
                await asyncio.sleep(0.3)
        finally:
            stop.set()
            await runner
        assert set(hosted.RUNS) == set(ids), len(set(ids) - set(hosted.RUNS))
        assert set(hosted.RUNS.values()) == {1}  # none twice
        assert loop.hosting is not None and loop.hosting.source.forwarded > 0
        noted = [await store.routes.notes(name, i) for i in ids if i.endswith("-x")]
        assert any(n and n[0][1].startswith(f"forwarded to its function's own queue {dedicated}")
                   for n in noted), noted[:3]
        events = [e.action for e in reversed(await store.routes.events(name))]
        assert events == ["isolated", "reclaimed"], events
        assert dedicated not in topics()
        tasks = {t.task_id: t for t in await store.tasks.list(name, limit=1000)}
        assert Counter(t.tenant for t in tasks.values()) == {"x": 120, "y": 120}
        await store.close()

    try:
        asyncio.run(main())
    finally:
        kt.delete_topics(topic, dedicated)
