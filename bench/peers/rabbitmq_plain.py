"""bench/brokers.py's RabbitMQ rows: the plain aio-pika loop, and sluice's pipeline.

The plain loop is the one aio-pika's and RabbitMQ's documentation describe for throughput with
safety: a consumer with a prefetch of a few hundred (``basic.qos``), each delivery handled in
its own task as it arrives (aio-pika's consume callback): published to the output on a channel
in confirm mode, and acknowledged once the broker confirmed that publish. Quorum queues on both
sides, as sluice declares them. No task records, retries or dead letters.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

import aio_pika

URL = os.environ.get("SLUICE_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
PREFETCH = 300
FILL_BATCH = 2000
QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


async def fill(queue: str, n: int, size_b: int) -> None:
    """The quorum queue ``queue`` with ``n`` persistent JSON bodies of about ``size_b`` bytes,
    each with its own ``sluice-task-id``, published with confirms."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True, arguments=QUORUM)
        for start in range(0, n, FILL_BATCH):
            sends = []
            for i in range(start, min(start + FILL_BATCH, n)):
                body = json.dumps({"n": i, "pad": ""})
                body = json.dumps({"n": i, "pad": "x" * max(size_b - len(body), 0)})
                sends.append(channel.default_exchange.publish(aio_pika.Message(
                    body.encode(), headers={"sluice-task-id": f"t{i}-{uuid.uuid4().hex}"},
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue))
            await asyncio.gather(*sends)


async def plain_loop(queue: str, out: str, n: int) -> None:
    """Consume ``n`` messages of ``queue``: each published to ``out`` (confirmed), then
    acknowledged."""
    connection = await aio_pika.connect(URL)
    async with connection:
        consume = await connection.channel()
        await consume.set_qos(prefetch_count=PREFETCH)
        publish = await connection.channel(publisher_confirms=True)
        await publish.declare_queue(out, durable=True, arguments=QUORUM)
        source = await consume.declare_queue(queue, durable=True, arguments=QUORUM)
        done = 0
        finished = asyncio.Event()

        async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal done
            await publish.default_exchange.publish(aio_pika.Message(
                message.body, headers=message.headers, content_type=message.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=out)
            await message.ack()
            done += 1
            if done >= n:
                finished.set()

        await source.consume(handle)
        await finished.wait()


def pipeline_yaml(name: str, queue: str, out: str) -> str:
    """sluice at its defaults on ``queue``, results to the queue ``out``."""
    return (f"name: {name}\n"
            f"source: {{rabbitmq: {{url: \"{URL}\", queue: {queue}}}}}\n"
            "handler: {python: \"bench.handlers:noop\"}\n"
            f"on_success: [{{rabbitmq: {{queue: {out}}}}}]\n")


async def count(out: str) -> int:
    """Messages ready in ``out`` (0 while it does not exist yet)."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(out, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return 0
        return int(queue.declaration_result.message_count or 0)


async def delete(*queues: str) -> None:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
