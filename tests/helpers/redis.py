"""Talking to the real Redis server in tests (its conformance connector: ``connector``).

The server is the one ``scripts/services start redis`` runs (``SLUICE_REDIS_URL``, default
redis://127.0.0.1:6379/0). Each test gets streams of its own (a fresh name), deleted after.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from sluice.connectors.base import Source
from tests.conformance.conftest import (
    LEASE_S,
    Connector,
    DeadLetter,
    Item,
    closed_port,
    require_service,
)

URL = os.environ.get("SLUICE_REDIS_URL", "redis://127.0.0.1:6379/0")

_unreachable: list[str] = []


def server_problem() -> str | None:
    """Why the server cannot be used (``None``: it answers)."""
    if not _unreachable:
        try:
            client().ping()
            return None
        except redis.RedisError as exc:
            _unreachable.append(str(exc))
    return (f"Redis is not reachable at {URL} ({_unreachable[0]}); start it with "
            "`scripts/services start redis` (scripts/test does)")


def client() -> redis.Redis:
    return redis.Redis.from_url(URL, socket_connect_timeout=5)


def new_stream(prefix: str = "sluice-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Entry:
    """One entry read back."""

    id: str
    fields: dict[str, bytes]

    @property
    def text(self) -> dict[str, str]:
        return {k: v.decode(errors="replace") for k, v in self.fields.items()}


def add(stream: str, entries: Sequence[dict[str, Any]]) -> list[str]:
    """XADD each entry's fields (str or bytes values) in one pipeline; the entry ids."""
    with client() as c:
        pipe = c.pipeline(transaction=False)
        for fields in entries:
            pipe.xadd(stream, fields)
        return [i.decode() for i in pipe.execute()]


def publish(stream: str, items: Sequence[Item]) -> None:
    add(stream, [{"body": json.dumps(i.payload), "sluice-task-id": i.task_id,
                  **({"key": i.key} if i.key is not None else {})} for i in items])


def read_all(stream: str, expected: int = 0, timeout_s: float = 30) -> list[Entry]:
    """Every entry of ``stream``, once ``expected`` are there (or the timeout: what is there)."""
    deadline = time.monotonic() + timeout_s
    with client() as c:
        while True:
            got = [Entry(i.decode(), {k.decode(): v for k, v in f.items()})
                   for i, f in c.xrange(stream)]
            if len(got) >= expected or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


def delete(*keys: str) -> None:
    with client() as c:
        c.delete(*keys, *(f"{k}:delayed" for k in keys))


class RedisConnector(Connector):
    per_message_leases = True
    service = "redis"

    def __init__(self) -> None:
        self.stream = new_stream("sluice-conf")
        self.dlq = f"{self.stream}.dlq"

    def source_yaml(self, *, lease_s: float = LEASE_S, max_buffered: int | None = None) -> str:
        return json.dumps({"redis": {"url": URL, "stream": self.stream, "lease_s": lease_s}})

    def dead_letter_yaml(self) -> str:
        return json.dumps({"redis": {"stream": self.dlq}})

    def publish(self, items: Sequence[Item]) -> None:
        publish(self.stream, items)

    def publish_raw(self, messages: Sequence[tuple[str, bytes]]) -> None:
        add(self.stream, [{"body": body, "sluice-task-id": task_id,
                           "content-type": "application/octet-stream"}
                          for task_id, body in messages])

    def unreachable_source_yaml(self) -> str | None:
        return json.dumps({"redis": {"url": f"redis://127.0.0.1:{closed_port()}/0",
                                     "stream": self.stream}})

    def dead_letters(self, expected: int) -> list[DeadLetter]:
        return [DeadLetter(e.text["sluice-task-id"], e.text, e.fields.get("body", b""))
                for e in read_all(self.dlq, expected)]

    def holding_back(self, source: Source) -> bool:
        raise NotImplementedError("the redis source buffers nothing")

    def close(self) -> None:
        delete(self.stream, self.dlq)


def connector(data_dir: Path) -> Connector:
    require_service(server_problem())
    return RedisConnector()
