"""The NATS walk-through (docs/nats.md): its handler, and a small tool for its streams.

The handler is the Kafka walk-through's (:func:`pipelines.kafka_orders.price`): it prices an
order, and rejects an unknown item. The tool reads and deletes JetStream streams with nats-py
(as ``nats stream view`` and ``nats stream rm`` of the NATS CLI would)::

    python -m pipelines.nats_orders read ORDERS_PRICED ORDERS_DLQ   # every message, oldest first
    python -m pipelines.nats_orders delete ORDERS ORDERS_PRICED ORDERS_DLQ

The server is ``$NATS_URL`` (default ``nats://127.0.0.1:4222``), as in nats_orders.yaml.
``read`` prints one line per message: its sequence, subject, the ``sluice-*`` headers and the
body.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from pipelines.kafka_orders import price as price

URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")


async def read(js: JetStreamContext, stream: str) -> None:
    try:
        state = (await js.stream_info(stream)).state
    except NotFoundError:
        print(f"no stream {stream}")
        return
    if not state.messages:
        return
    for seq in range(state.first_seq, state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except NotFoundError:  # deleted meanwhile
            continue
        headers = msg.headers or {}
        fields = [f"{stream}/{msg.seq}", msg.subject or ""]
        fields += [f"{k}={v}" for k, v in headers.items() if k.startswith("sluice-")]
        fields.append((msg.data or b"").decode(errors="replace"))
        print(" ".join(fields))


async def delete(js: JetStreamContext, stream: str) -> None:
    try:
        await js.delete_stream(stream)
        print(f"deleted {stream}")
    except NotFoundError:
        print(f"no stream {stream}")


async def main(command: str, streams: Sequence[str]) -> None:
    client = await nats.connect(URL, connect_timeout=5, allow_reconnect=False)
    try:
        js = client.jetstream()
        for stream in streams:
            await (read if command == "read" else delete)(js, stream)
    finally:
        await client.close()


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("read", "delete"):
        raise SystemExit(__doc__)
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
