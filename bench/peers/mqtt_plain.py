"""bench/brokers.py's MQTT rows: the plain aiomqtt loop, and sluice's pipeline.

An MQTT broker keeps messages only for subscribed sessions, so the input "queue" is a
persistent session subscribed to ``$share/<queue>/<queue>`` as client ``<queue>-0``: the id the
sluice worker of :func:`pipeline_yaml` takes (``client_id: <queue>``, slot 0), and the one the
plain loop uses. :func:`fill` makes it before publishing; :func:`prepare` makes the reader
session of the output topic (both rows publish to ``out``, and :func:`count` reads it back).

The plain loop is aiomqtt's iterator over ``client.messages`` with paho's manual
acknowledgement: the messages that have arrived are taken together (up to ``BATCH``), each is
published to ``out`` at QoS 1 concurrently, and once every PUBACK is back each input message is
acknowledged. No task records, retries or dead letters.

Mosquitto drops QoS 1 messages queued per session beyond ``max_queued_messages`` (1000 by
default): a 100,000-message fill needs a broker with ``max_queued_messages 0``
(``SLUICE_MQTT_URL`` points the rows at it).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

URL = os.environ.get("SLUICE_MQTT_URL", "mqtt://127.0.0.1:1883")
HOST, _, PORT = URL.removeprefix("mqtt://").rstrip("/").partition(":")
BATCH = 500
FILL_BATCH = 1000
EXPIRY_S = 3600


def _props(packet: int, **values: Any) -> Properties:
    props = Properties(packet)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


def _client(identifier: str, *, persistent: bool = True, **kwargs: Any) -> aiomqtt.Client:
    return aiomqtt.Client(
        HOST, int(PORT or 1883), identifier=identifier, protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=not persistent, timeout=60,
        properties=_props(PacketTypes.CONNECT, SessionExpiryInterval=EXPIRY_S if persistent
                          else 0, **kwargs))


def _session(queue: str) -> str:
    return f"{queue}-0"


def _reader(out: str) -> str:
    return f"{out}-reader"


async def _subscribe(identifier: str, topic_filter: str) -> None:
    async with _client(identifier) as client:
        await client.subscribe(topic_filter, qos=1)


_counted: dict[str, int] = {}  # what count() has read of each output so far


async def prepare(out: str) -> None:
    """The reader session of ``out`` (a broker drops what no session subscribes to)."""
    _counted[out] = 0
    await delete(out)
    await _subscribe(_reader(out), out)


async def fill(queue: str, n: int, size_b: int) -> None:
    """The session of ``queue``, then ``n`` JSON bodies of about ``size_b`` bytes published
    to it at QoS 1, each with its own ``sluice-task-id`` user property."""
    await delete(queue)
    await _subscribe(_session(queue), f"$share/{queue}/{queue}")
    async with _client(f"fill-{uuid.uuid4().hex[:12]}", persistent=False) as client:
        client.pending_calls_threshold = 1 << 30
        for start in range(0, n, FILL_BATCH):
            sends = []
            for i in range(start, min(start + FILL_BATCH, n)):
                body = json.dumps({"n": i, "pad": ""})
                body = json.dumps({"n": i, "pad": "x" * max(size_b - len(body), 0)})
                props = _props(PacketTypes.PUBLISH, UserProperty=[
                    ("sluice-task-id", f"t{i}-{uuid.uuid4().hex}")])
                sends.append(client.publish(queue, body.encode(), qos=1, properties=props))
            await asyncio.gather(*sends)


async def plain_loop(queue: str, out: str, n: int) -> None:
    """Consume ``n`` messages of ``queue``: each published to ``out`` (PUBACK), then
    acknowledged."""
    done = 0
    async with _client(_session(queue), ReceiveMaximum=BATCH * 2) as client:
        client.pending_calls_threshold = 1 << 30
        client._client.manual_ack_set(True)
        await client.subscribe(f"$share/{queue}/{queue}", qos=1)
        messages = client.messages
        async for first in messages:
            batch = [first]
            while len(batch) < BATCH and len(messages):
                batch.append(await anext(messages))
            await asyncio.gather(*(client.publish(out, m.payload, qos=1,
                                                  properties=m.properties) for m in batch))
            for m in batch:
                client._client.ack(m.mid, 1)
            done += len(batch)
            if done >= n:
                break


def pipeline_yaml(name: str, queue: str, out: str) -> str:
    """A sluice pipeline with default settings: the MQTT source on ``queue`` (its session:
    ``client_id: <queue>`` → ``<queue>-0``), the no-op handler, results to ``out``."""
    return "\n".join([
        f"name: {name}",
        "source:",
        f"  mqtt: {{url: \"{URL}\", topic: \"{queue}\", group: \"{queue}\", "
        f"client_id: \"{queue}\"}}",
        'handler: {python: "bench.handlers:noop"}',
        f"on_success: [{{mqtt: {{topic: \"{out}\"}}}}]",
        "",
    ])


async def count(out: str, quiet_s: float = 1.0) -> int:
    """Messages published to ``out`` since :func:`prepare`: those read before, plus those
    read (and acknowledged) now from its reader session until none comes for ``quiet_s``."""
    got = _counted.get(out, 0)
    async with _client(_reader(out)) as client:
        messages = client.messages
        while True:
            try:
                await asyncio.wait_for(anext(messages), quiet_s)
            except TimeoutError:
                _counted[out] = got
                return got
            got += 1


async def delete(*queues: str) -> None:
    """End the sessions of these queues (and of their readers)."""
    for queue in queues:
        for identifier in (_session(queue), _reader(queue)):
            async with _client(identifier, persistent=False):
                pass
