"""The RabbitMQ walk-through's queue helper (docs/rabbitmq.md), with aio-pika.

``python -m pipelines.rabbitmq_orders read QUEUE...`` prints each message of the queues (taking
them off), one line each: its ``sluice-*`` headers, then its body. ``python -m
pipelines.rabbitmq_orders delete QUEUE...`` deletes queues (with shards: ``orders.k0`` ...).
The broker: ``RABBITMQ_URL`` (default amqp://guest:guest@127.0.0.1:5672/).
"""

from __future__ import annotations

import asyncio
import os
import sys

import aio_pika

URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def read(queues: list[str]) -> None:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            queue = await channel.declare_queue(name, passive=True)
            while (message := await queue.get(fail=False, no_ack=True)) is not None:
                headers = " ".join(f"{k}={v!s}" for k, v in sorted((message.headers or {}).items())
                                   if k.startswith("sluice-") and isinstance(v, str))
                print(f"{name} {headers} {message.body.decode(errors='replace')}")


async def delete(queues: list[str]) -> None:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("read", "delete"):
        print("usage: python -m pipelines.rabbitmq_orders read|delete QUEUE...", file=sys.stderr)
        return 2
    asyncio.run((read if argv[0] == "read" else delete)(argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
