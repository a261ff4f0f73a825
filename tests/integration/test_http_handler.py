"""HTTP function handlers against a real aiohttp server: the CloudEvent each attempt carries
(parsed back with the cloudevents library), the outcome of each status class, timeouts and
refused connections, keep-alive, and the limiter reacting to 429/503 with Retry-After."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cloudevents.core.bindings import http as ce_http

from sluice.config.load import parse_pipeline
from sluice.connectors import embedded
from sluice.connectors.embedded import QueuedMessage
from sluice.datadir import Database
from sluice.handlers.http import HttpHandler
from sluice.message import Message
from sluice.metrics import REGISTRY
from sluice.runtime import build
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState


@dataclass
class Function:
    """What the server saw: each request's CloudEvent, headers, peer port and arrival time."""

    events: list[Any] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    peers: set[int] = field(default_factory=set)
    arrivals: list[float] = field(default_factory=list)
    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # then 200s

    async def handle(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        body = await request.read()
        headers = dict(request.headers)
        self.headers.append(headers)
        event = ce_http.from_http_event(ce_http.HTTPMessage(headers, body))
        self.events.append(event)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.peers.add(peer[1])
        code = request.match_info.get("code")
        if code == "slow":
            await asyncio.sleep(5)
        if code and code.isdigit():
            retry = {"Retry-After": "1"} if code in ("429", "503") else {}
            return web.Response(status=int(code), text=f"status {code}", headers=retry)
        if self.answers:
            status, extra = self.answers.pop(0)
            return web.Response(status=status, text="busy", headers=extra)
        data = event.get_data()
        return web.json_response({"echo": json.loads(data) if isinstance(data, bytes | str)
                                  else data})


@pytest.fixture
async def function() -> AsyncIterator[tuple[Function, str]]:
    fn = Function()
    app = web.Application()
    app.router.add_post("/fn", fn.handle)
    app.router.add_post("/status/{code}", fn.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fn, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def message(task_id: str = "t-1", key: str | None = "user-7", attempt: int = 1) -> Message:
    body = b'{"image": "cat.png"}'
    return Message(task_id, "thumbs", json.loads(body), body, "application/json", key, {},
                   attempt)


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_each_attempt_is_a_cloudevent(function: tuple[Function, str], mode: str) -> None:
    fn, base = function
    handler = HttpHandler(f"{base}/fn", mode=mode, ce_type="com.example.thumbnail")
    try:
        outcome = await handler.invoke(message(attempt=2), timeout_s=5)
    finally:
        await handler.close()
    assert outcome.status == "success"
    assert json.loads(outcome.result or b"") == {"echo": {"image": "cat.png"}}
    (event,) = fn.events
    assert event.get_id() == "t-1"
    assert event.get_source() == "thumbs"
    assert event.get_type() == "com.example.thumbnail"
    assert event.get_specversion() == "1.0"
    assert event.get_extension("partitionkey") == "user-7"
    assert str(event.get_extension("sluiceattempt")) == "2"
    data = event.get_data()
    assert (json.loads(data) if isinstance(data, bytes | str) else data) == {"image": "cat.png"}
    (headers,) = fn.headers
    assert headers["Idempotency-Key"] == "t-1"
    if mode == "binary":
        assert headers["ce-id"] == "t-1" and headers["Content-Type"] == "application/json"
    else:
        assert headers["Content-Type"].startswith("application/cloudevents+json")


@pytest.mark.parametrize(("code", "status", "overload", "retry_after_s"), [
    ("201", "success", False, None),
    ("302", "failure", False, None),  # redirects are not followed
    ("429", "retry", True, 1.0),
    ("503", "retry", True, 1.0),
    ("404", "failure", False, None),
    ("422", "failure", False, None),
    ("500", "retry", False, None),
    ("502", "retry", False, None),
])
async def test_outcome_of_each_status_class(function: tuple[Function, str], code: str,
                                            status: str, overload: bool,
                                            retry_after_s: float | None) -> None:
    _, base = function
    handler = HttpHandler(f"{base}/status/{code}")
    try:
        outcome = await handler.invoke(message(), timeout_s=5)
    finally:
        await handler.close()
    assert (outcome.status, outcome.overload, outcome.retry_after_s) == (
        status, overload, retry_after_s)
    if status != "success":
        assert outcome.error_type == f"HTTP{code}"
        assert f"HTTP {code}" in (outcome.error_message or "")


async def test_timeout_retries_as_an_overload(function: tuple[Function, str]) -> None:
    _, base = function
    handler = HttpHandler(f"{base}/status/slow", timeout_s=0.3)
    try:
        outcome = await handler.invoke(message(), timeout_s=30)
    finally:
        await handler.close()
    assert (outcome.status, outcome.error_type, outcome.overload) == ("retry", "Timeout", True)


async def test_refused_connection_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    handler = HttpHandler(f"http://127.0.0.1:{port}/fn")
    try:
        outcome = await handler.invoke(message(), timeout_s=5)
    finally:
        await handler.close()
    assert (outcome.status, outcome.error_type, outcome.overload) == (
        "retry", "ConnectionError", False)


async def test_one_pooled_connection_is_kept_alive(function: tuple[Function, str]) -> None:
    fn, base = function
    handler = HttpHandler(f"{base}/fn")
    try:
        for i in range(20):
            assert (await handler.invoke(message(f"t-{i}"), timeout_s=5)).status == "success"
    finally:
        await handler.close()
    assert len(fn.arrivals) == 20
    assert len(fn.peers) == 1  # one TCP connection, reused


PIPELINE = """
name: thumbs
source: {{embedded: {{queue: thumbs}}}}
handler: {{http: {{url: "{url}", ce_type: com.example.thumbnail}}}}
consumer:
  concurrency: {{initial: 1, min: 1, max: 8, backoff_ratio: 0.5}}
  timeout_s: 5
  retry: {{max_attempts: 5, initial_backoff_s: 0.01, max_backoff_s: 0.05}}
"""


async def test_a_pipeline_backs_off_on_429_and_holds_for_retry_after(
        function: tuple[Function, str], data_dir: Path) -> None:
    fn, base = function
    fn.answers = [(429, {"Retry-After": "1"})]  # the first call: overloaded, come back in 1 s
    db = Database.open(data_dir)
    embedded.submit(db, "thumbs", "default", "thumbs",
                    [QueuedMessage(f"t{i}", b'{"n": 1}') for i in range(6)])
    loop = build(parse_pipeline(PIPELINE.format(url=f"{base}/fn")), data_dir)
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), 30)
    assert loop.limiter.decreases == 1
    overloads = REGISTRY.get_sample_value("sluice_limit_signals_total",
                                          {"pipeline": "thumbs", "signal": "overload"})
    assert overloads is not None and overloads >= 1
    assert REGISTRY.get_sample_value("sluice_concurrency_limit", {"pipeline": "thumbs"}) == \
        loop.limiter.limit
    assert "overloads 1, cuts 1" in loop.limiter.status()  # sluice run's status line
    # Nothing was sent for a second after the 429 (one call at a time: concurrency initial 1).
    assert fn.arrivals[1] - fn.arrivals[0] >= 0.95
    assert len(fn.arrivals) == 7  # six tasks, one of them twice
    records = [await SqliteTaskStore(db).get(f"t{i}", "thumbs") for i in range(6)]
    assert [r.state for r in records] == [TaskState.SUCCEEDED] * 6
    assert sorted(r.attempts for r in records) == [1, 1, 1, 1, 1, 2]


async def test_a_4xx_fails_the_task_without_a_retry(function: tuple[Function, str],
                                                    data_dir: Path) -> None:
    fn, base = function
    db = Database.open(data_dir)
    embedded.submit(db, "thumbs", "default", "thumbs", [QueuedMessage("bad", b'{"n": 1}')])
    loop = build(parse_pipeline(PIPELINE.format(url=f"{base}/status/422")), data_dir)
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), 30)
    record = await SqliteTaskStore(db).get("bad", "thumbs")
    assert (record.state, record.attempts, record.error_type) == (TaskState.FAILED, 1, "HTTP422")
    assert len(fn.arrivals) == 1
