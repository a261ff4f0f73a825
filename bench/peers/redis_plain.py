"""bench/brokers.py's Redis Streams rows: the plain redis-py asyncio loop, and sluice's pipeline.

The plain loop is the one redis-py's and Redis's documentation describe for a consumer group:
``XREADGROUP COUNT 500 BLOCK``, then for the batch one pipeline (no transaction) of an ``XADD``
to the output per entry and one ``XACK`` of the batch, whose replies confirm every write. No
task records, retries or dead letters.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import redis.asyncio as aioredis

URL = os.environ.get("SLUICE_REDIS_URL", "redis://127.0.0.1:6379/0")
GROUP = "bench"
BATCH = 500
FILL_BATCH = 1000


def client() -> aioredis.Redis:
    return aioredis.Redis.from_url(URL)


async def fill(queue: str, n: int, size_b: int) -> None:
    """The stream ``queue`` with ``n`` JSON bodies of about ``size_b`` bytes, each with its own
    ``sluice-task-id``, and the plain loop's group on it."""
    async with client() as c:
        await c.delete(queue, f"{queue}:delayed")
        for start in range(0, n, FILL_BATCH):
            async with c.pipeline(transaction=False) as pipe:
                for i in range(start, min(start + FILL_BATCH, n)):
                    body = json.dumps({"n": i, "pad": ""})
                    body = json.dumps({"n": i, "pad": "x" * max(size_b - len(body), 0)})
                    pipe.xadd(queue, {"body": body, "sluice-task-id": f"t{i}-{uuid.uuid4().hex}"})
                await pipe.execute()
        await c.xgroup_create(queue, GROUP, id="0")


async def plain_loop(queue: str, out: str, n: int) -> None:
    """Consume ``n`` entries of ``queue``: each added to ``out`` (confirmed), then acked."""
    done = 0
    async with client() as c:
        while done < n:
            reply: Any = await c.xreadgroup(GROUP, "plain", {queue: ">"}, count=BATCH, block=1000)
            for _stream, entries in reply or ():
                if not entries:
                    continue
                async with c.pipeline(transaction=False) as pipe:
                    for _id, fields in entries:
                        pipe.xadd(out, fields)
                    pipe.xack(queue, GROUP, *[entry_id for entry_id, _ in entries])
                    await pipe.execute()
                done += len(entries)


def pipeline_yaml(name: str, queue: str, out: str) -> str:
    """sluice at its defaults on ``queue``, results to the stream ``out``."""
    return (f"name: {name}\n"
            f"source: {{redis: {{url: \"{URL}\", stream: {queue}}}}}\n"
            "handler: {python: \"bench.handlers:noop\"}\n"
            f"on_success: [{{redis: {{stream: {out}}}}}]\n")


async def count(out: str) -> int:
    async with client() as c:
        return int(await c.xlen(out))


async def delete(*queues: str) -> None:
    async with client() as c:
        await c.delete(*queues, *(f"{q}:delayed" for q in queues))
