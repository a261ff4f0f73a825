"""Talking to the real NATS server in tests (its conformance connector: ``connector``).

The server is the one ``scripts/services start nats`` runs (``SLUICE_NATS_URL``, default
nats://127.0.0.1:4222, JetStream on). Every helper here is synchronous: it runs its own event
loop on a thread of its own, so a test may call it from inside its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StreamConfig

from sluice.connectors.base import Source
from tests.conformance.conftest import Connector, DeadLetter, Item, closed_port, require_service

URL = os.environ.get("SLUICE_NATS_URL", "nats://127.0.0.1:4222")
T = TypeVar("T")

_problem: list[str] = []  # the first failure, so later tests fail at once


def on_server(use: Callable[[JetStreamContext], Awaitable[T]], *, url: str = URL) -> T:
    """Run ``use`` with a fresh connection, in an event loop on a thread of its own."""
    async def main() -> T:
        client: Client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0,
                                            allow_reconnect=False, error_cb=_quiet)
        try:
            return await use(client.jetstream())
        finally:
            await client.close()

    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, main()).result()


async def _quiet(_exc: Exception) -> None:
    return None


def server_problem() -> str | None:
    """Why the server cannot be used (``None``: it answers, with JetStream); asked once."""
    if not _problem:
        async def check(js: JetStreamContext) -> None:
            await js.account_info()

        try:
            on_server(check)
            return None
        except Exception as exc:
            _problem.append(f"{type(exc).__name__}: {exc}")
    return (f"NATS (JetStream) is not reachable at {URL} ({_problem[0]}); start it with "
            "`scripts/services start nats` (scripts/test does)")


def require_server() -> None:
    """Fail (not skip) the test when the server does not answer."""
    problem = server_problem()
    if problem is not None:
        pytest.fail(problem, pytrace=False)


def new_name(prefix: str = "SLUICE_TEST") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def create_stream(stream: str, subjects: Sequence[str], *,
                  retention: RetentionPolicy = RetentionPolicy.WORK_QUEUE) -> None:
    async def create(js: JetStreamContext) -> None:
        await js.add_stream(StreamConfig(name=stream, subjects=list(subjects),
                                         retention=retention))

    on_server(create)


def delete_streams(*streams: str) -> None:
    async def delete(js: JetStreamContext) -> None:
        for stream in streams:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)

    on_server(delete)


def stream_exists(stream: str) -> bool:
    async def exists(js: JetStreamContext) -> bool:
        try:
            await js.stream_info(stream)
            return True
        except nats.js.errors.NotFoundError:
            return False

    return on_server(exists)


@dataclass(frozen=True)
class Out:
    """One message to publish: to ``subject`` (``<subject>.<key>`` with a key)."""

    body: bytes
    task_id: str | None = None
    key: str | None = None
    headers: dict[str, str] | None = None


def publish(subject: str, messages: Sequence[Out]) -> None:
    """Publish and wait for every PubAck."""
    async def send(js: JetStreamContext) -> None:
        acks = []
        for m in messages:
            headers = dict(m.headers or {})
            if m.task_id is not None:
                headers["sluice-task-id"] = m.task_id
            acks.append(await js.publish_async(subject if m.key is None else f"{subject}.{m.key}",
                                               m.body, headers=headers or None))
        await asyncio.wait_for(asyncio.gather(*acks), 60)

    on_server(send)


@dataclass(frozen=True)
class Stored:
    """A message read back from a stream."""

    subject: str
    body: bytes
    headers: dict[str, str]
    seq: int

    @property
    def payload(self) -> Any:
        return json.loads(self.body)


def read_all(stream: str, expected: int = 0, timeout_s: float = 30.0) -> list[Stored]:
    """Every message in ``stream`` (waiting up to ``timeout_s`` for ``expected`` of them)."""
    async def read(js: JetStreamContext) -> list[Stored]:
        deadline = time.monotonic() + timeout_s
        while True:
            info = await js.stream_info(stream)
            if info.state.messages >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        out: list[Stored] = []
        if not info.state.messages:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                raw = await js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                continue  # deleted (acknowledged in a work queue)
            out.append(Stored(raw.subject or "", raw.data or b"", dict(raw.headers or {}),
                              int(raw.seq or seq)))
        return out

    return on_server(read)


def consumer_counts(stream: str, consumer: str) -> tuple[int, int]:
    """(num_pending, num_ack_pending) of a consumer."""
    async def read(js: JetStreamContext) -> tuple[int, int]:
        info = await js.consumer_info(stream, consumer)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    return on_server(read)


def _flow(value: dict[str, Any]) -> str:
    return json.dumps(value)


class NatsConnector(Connector):
    """A fresh stream per test (a work queue on ``conf.<id>`` and ``conf.<id>.>``), its own
    durable consumer, and a dead-letter stream; both streams deleted at ``close``."""

    per_message_leases = True  # AckWait: other workers of the consumer do not get it
    service = "nats"

    def __init__(self) -> None:
        token = uuid.uuid4().hex[:12]
        self.stream = f"SLUICE_CONF_{token}"
        self.subject = f"conf.{token}"
        self.dlq = f"SLUICE_CONF_{token}_DLQ"
        self.dlq_subject = f"dlq.{token}"
        create_stream(self.stream, [self.subject, f"{self.subject}.>"])

    def source_yaml(self, *, lease_s: float = 2.0, max_buffered: int | None = None) -> str:
        return _flow({"nats": {"url": URL, "stream": self.stream, "subject": self.subject,
                               "lease_s": lease_s}})  # no buffer of its own

    def dead_letter_yaml(self) -> str:
        return _flow({"nats": {"stream": self.dlq, "subject": self.dlq_subject,
                               "create_stream": True}})

    def publish(self, items: Sequence[Item]) -> None:
        # The key in the subject (as a plain NATS publisher puts it), no sluice-key header.
        publish(self.subject, [Out(json.dumps(i.payload).encode(), i.task_id, i.key)
                               for i in items])

    def publish_raw(self, messages: Sequence[tuple[str, bytes]]) -> None:
        publish(self.subject, [Out(body, task_id, headers={
            "content-type": "application/octet-stream"}) for task_id, body in messages])

    def unreachable_source_yaml(self) -> str | None:
        return _flow({"nats": {"url": f"nats://127.0.0.1:{closed_port()}",
                               "stream": self.stream, "connect_timeout_s": 1}})

    def dead_letters(self, expected: int) -> list[DeadLetter]:
        if not stream_exists(self.dlq):
            return []
        return [DeadLetter(m.headers["sluice-task-id"], m.headers, m.body)
                for m in read_all(self.dlq, expected)]

    def holding_back(self, source: Source) -> bool:
        raise NotImplementedError("the nats source holds nothing beyond what is fetched")

    def close(self) -> None:
        delete_streams(self.stream, self.dlq)


def connector(data_dir: Path) -> Connector:
    require_service(server_problem())
    return NatsConnector()
