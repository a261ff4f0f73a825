"""bench/brokers.py's NATS JetStream rows: the plain nats-py loop, and sluice's pipeline.

The plain loop is the one nats-py's documentation shows for a pull consumer, batched for
throughput: a durable pull consumer, ``fetch(batch=500)``, each message published to the
output stream with ``publish_async`` and every PubAck awaited together, then each message
acknowledged (``ack()``: no wait for the server's answer). No task records, retries or dead
letters.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import nats
import nats.errors
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError

URL = os.environ.get("SLUICE_NATS_URL", "nats://127.0.0.1:4222")
BATCH = 500
FILL_BATCH = 1000


@asynccontextmanager
async def jetstream() -> AsyncIterator[JetStreamContext]:
    client = await nats.connect(URL, connect_timeout=5)
    try:
        yield client.jetstream()
    finally:
        await client.close()


async def _stream(js: JetStreamContext, name: str, retention: RetentionPolicy) -> None:
    with suppress(NotFoundError):
        await js.delete_stream(name)
    await js.add_stream(StreamConfig(name=name, subjects=[name, f"{name}.>"],
                                     retention=retention))


async def prepare(out: str) -> None:
    """The output stream (both rows publish to an existing stream)."""
    async with jetstream() as js:
        await _stream(js, out, RetentionPolicy.LIMITS)


async def fill(queue: str, n: int, size_b: int) -> None:
    """The work-queue stream ``queue`` with ``n`` JSON bodies of about ``size_b`` bytes, each
    with its own ``sluice-task-id``."""
    async with jetstream() as js:
        await _stream(js, queue, RetentionPolicy.WORK_QUEUE)
        for start in range(0, n, FILL_BATCH):
            acks = []
            for i in range(start, min(start + FILL_BATCH, n)):
                body = json.dumps({"n": i, "pad": ""})
                body = json.dumps({"n": i, "pad": "x" * max(size_b - len(body), 0)})
                acks.append(await js.publish_async(queue, body.encode(), headers={
                    "sluice-task-id": f"t{i}-{uuid.uuid4().hex}"}))
            await asyncio.gather(*acks)


async def plain_loop(queue: str, out: str, n: int) -> None:
    """Consume ``n`` messages of ``queue``: each published to ``out`` (PubAck), then acked."""
    done = 0
    client = await nats.connect(URL)
    try:
        js = client.jetstream()
        sub = await js.pull_subscribe(queue, durable="plain", stream=queue)
        while done < n:
            try:
                msgs = await sub.fetch(BATCH, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            acks = [await js.publish_async(out, m.data, headers=m.headers) for m in msgs]
            await asyncio.gather(*acks)
            for m in msgs:
                await m.ack()
            done += len(msgs)
        await client.flush()
    finally:
        await client.close()


def pipeline_yaml(name: str, queue: str, out: str) -> str:
    """sluice at its defaults on ``queue``, results to the stream ``out``."""
    return (f"name: {name}\n"
            f"source: {{nats: {{url: \"{URL}\", stream: {queue}}}}}\n"
            "handler: {python: \"bench.handlers:noop\"}\n"
            f"on_success: [{{nats: {{stream: {out}}}}}]\n")


async def count(out: str) -> int:
    async with jetstream() as js:
        try:
            return int((await js.stream_info(out)).state.messages)
        except NotFoundError:
            return 0


async def delete(*queues: str) -> None:
    async with jetstream() as js:
        for queue in queues:
            with suppress(NotFoundError):
                await js.delete_stream(queue)
