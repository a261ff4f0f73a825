"""HTTP batch handlers (``handler: {http: ..., batch: ...}``) against a real aiohttp server on
127.0.0.1: one ``POST`` of ``application/cloudevents-batch+json`` (a JSON array of structured
CloudEvents, one per task, its id the task id) per batch, answered 2xx with one item per event:
each item's status is that task's outcome (200 with its body the result, 429 with
``retry_after_s`` retried, 422 failed); an event left out of the answer is retried; a non-2xx
answer to the whole request is every task's outcome."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sluice.config.load import parse_pipeline
from sluice.connectors import embedded
from sluice.connectors.embedded import EmbeddedQueue, QueuedMessage
from sluice.consumer.loop import ConsumerLoop
from sluice.datadir import Database
from sluice.handlers.http import HttpHandler
from sluice.message import Message
from sluice.runtime import build
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState

BATCH_TYPE = "application/cloudevents-batch+json"
RETRY_AFTER_S = 0.3
DEADLINE_S = 30.0


@dataclass
class Request:
    content_type: str
    events: list[dict[str, Any]]


@dataclass
class Function:
    """A batch function: each event's ``data.do`` says how to answer for it (``ok``, ``busy``:
    429 on its first attempt, ``invalid``: 422, ``skip``: left out of the answer on its first
    attempt, ``nostatus``: an item without a status); ``whole``: statuses for the whole of the
    next requests (then per-item answers)."""

    requests: list[Request] = field(default_factory=list)
    whole: list[int] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        events = json.loads(body)
        self.requests.append(Request(request.headers.get("Content-Type", ""), events))
        if self.whole:
            status = self.whole.pop(0)
            return web.Response(status=status, text=f"whole batch: {status}")
        answer: list[dict[str, Any]] = []
        for event in events:
            data = event.get("data") or {}
            do, first = data.get("do", "ok"), int(event.get("sluiceattempt", 1)) == 1
            if do == "busy" and first:
                answer.append({"id": event["id"], "status": 429,
                               "retry_after_s": RETRY_AFTER_S})
            elif do == "invalid":
                answer.append({"id": event["id"], "status": 422, "body": "why it failed"})
            elif do == "skip" and first:
                continue
            elif do == "nostatus":
                answer.append({"id": event["id"], "body": {"plain": event["id"]}})
            else:
                answer.append({"id": event["id"], "status": 200,
                               "body": {"echo": data, "id": event["id"]}})
        answer.reverse()  # in any order
        return web.json_response(answer)

    def seen(self, task_id: str) -> list[int]:
        """The attempts of ``task_id`` the function got."""
        return [int(e.get("sluiceattempt", 0)) for r in self.requests for e in r.events
                if e["id"] == task_id]


@pytest.fixture
async def function() -> AsyncIterator[tuple[Function, str]]:
    fn = Function()
    app = web.Application()
    app.router.add_post("/batch", fn.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fn, f"http://127.0.0.1:{port}/batch"
    await runner.cleanup()


def message(task_id: str, do: str, key: str | None = None, attempt: int = 1) -> Message:
    body = json.dumps({"do": do}).encode()
    return Message(task_id, "fns", body=body, content_type="application/json", key=key,
                   attempt=attempt)


# -- the handler ----------------------------------------------------------------------------

async def test_one_request_of_cloudevents_and_an_outcome_per_item(
        function: tuple[Function, str]) -> None:
    fn, url = function
    handler = HttpHandler(url, ce_type="com.example.batch")
    messages = [message("a-ok", "ok", key="k1"), message("b-busy", "busy"),
                message("c-invalid", "invalid", attempt=2), message("d-skip", "skip"),
                message("e-nostatus", "nostatus")]
    try:
        got = await handler.invoke_batch(messages, timeout_s=5)
    finally:
        await handler.close()

    (request,) = fn.requests  # one request for the whole batch
    assert request.content_type.split(";")[0] == BATCH_TYPE
    assert [e["id"] for e in request.events] == [m.task_id for m in messages]
    for event, m in zip(request.events, messages, strict=True):
        assert event["specversion"] == "1.0"
        assert event["source"] == "fns"
        assert event["type"] == "com.example.batch"
        assert event["data"] == json.loads(m.body)  # structured: the JSON payload itself
        assert int(event["sluiceattempt"]) == m.attempt
    assert request.events[0]["partitionkey"] == "k1"
    assert "partitionkey" not in request.events[1]

    assert len(got) == len(messages)
    ok, busy, invalid, skipped, nostatus = got
    assert ok.status == "success"
    assert json.loads(ok.result or b"") == {"echo": {"do": "ok"}, "id": "a-ok"}
    assert ok.result_type == "application/json"
    assert (busy.status, busy.overload, busy.retry_after_s, busy.delay_s, busy.error_type) == (
        "retry", True, RETRY_AFTER_S, RETRY_AFTER_S, "HTTP429")
    assert (invalid.status, invalid.error_type) == ("failure", "HTTP422")
    assert "why it failed" in (invalid.error_message or "")
    assert (skipped.status, skipped.error_type) == ("retry", "InvalidBatchAnswer")
    assert "d-skip" in (skipped.error_message or "")
    assert nostatus.status == "success"  # status defaults to 200
    assert json.loads(nostatus.result or b"") == {"plain": "e-nostatus"}


async def test_a_message_that_does_not_decode_fails_alone_unsent(
        function: tuple[Function, str]) -> None:
    fn, url = function
    handler = HttpHandler(url)
    bad = Message("bad", "fns", body=b"{not json", content_type="application/json")
    try:
        got = await handler.invoke_batch([message("a", "ok"), bad, message("c", "ok")],
                                         timeout_s=5)
    finally:
        await handler.close()
    (request,) = fn.requests
    assert [e["id"] for e in request.events] == ["a", "c"]
    assert [(o.status, o.error_type) for o in got] == [
        ("success", None), ("failure", "InvalidPayload"), ("success", None)]
    assert json.loads(got[2].result or b"") == {"echo": {"do": "ok"}, "id": "c"}


@pytest.mark.parametrize(("code", "status", "overload"), [
    (503, "retry", True),
    (500, "retry", False),
    (400, "failure", False),
])
async def test_a_non_2xx_answer_is_every_tasks_outcome(function: tuple[Function, str],
                                                       code: int, status: str,
                                                       overload: bool) -> None:
    fn, url = function
    fn.whole.append(code)
    handler = HttpHandler(url)
    messages = [message(f"t{i}", "ok") for i in range(4)]
    try:
        got = await handler.invoke_batch(messages, timeout_s=5)
    finally:
        await handler.close()
    assert len(fn.requests) == 1
    assert [(o.status, o.error_type, o.overload) for o in got] == [
        (status, f"HTTP{code}", overload)] * 4
    assert all(f"whole batch: {code}" in (o.error_message or "") for o in got)


# -- through the consumer loop --------------------------------------------------------------

PIPELINE = """
name: fns
source: {{embedded: {{queue: fns}}}}
handler: {{http: {{url: "{url}"}}, batch: {{max_size: {max_size}, max_wait_ms: 20}}}}
consumer:
  concurrency: 4
  timeout_s: 5
  retry: {{max_attempts: 3, initial_backoff_s: 0.05, max_backoff_s: 0.1}}
"""


def run_loop(data_dir: Path, url: str, tasks: dict[str, str], max_size: int = 50,
             ) -> ConsumerLoop:
    embedded.submit(Database.open(data_dir), "fns", "default", "fns", [
        QueuedMessage(task_id, json.dumps({"do": do}).encode()) for task_id, do in tasks.items()])
    return build(parse_pipeline(PIPELINE.format(url=url, max_size=max_size)), data_dir)


def dead_letter_ids(data_dir: Path) -> list[str]:
    db = Database.open(data_dir)
    letters = db.run_sync(lambda c: EmbeddedQueue(db, "fns.dlq").lease_in(c, 100, time.time()))
    return sorted(m.task_id for m in letters)


async def test_per_item_statuses_decide_each_tasks_outcome(data_dir: Path,
                                                           function: tuple[Function, str],
                                                           ) -> None:
    fn, url = function
    tasks = {f"ok-{i:02d}": "ok" for i in range(20)}
    tasks.update({"busy": "busy", "invalid": "invalid", "skip": "skip"})
    loop = run_loop(data_dir, url, tasks)
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), DEADLINE_S)

    assert all(r.content_type.split(";")[0] == BATCH_TYPE for r in fn.requests)
    assert max(len(r.events) for r in fn.requests) > 1  # batches, not one request per task
    assert len(fn.requests) < len(tasks)
    store = SqliteTaskStore(Database.open(data_dir))
    for task_id in tasks:
        rec = await store.get(task_id, "fns")
        if task_id == "invalid":
            assert (rec.state, rec.attempts, rec.error_type) == (TaskState.FAILED, 1, "HTTP422")
            assert "why it failed" in (rec.error_message or "")
        elif task_id in ("busy", "skip"):  # 429, left out: retried, then answered 200
            assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 2), task_id
            assert fn.seen(task_id) == [1, 2], task_id
        else:
            assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 1), task_id
            assert json.loads(rec.result or b"") == {"echo": {"do": "ok"}, "id": task_id}
            assert fn.seen(task_id) == [1], task_id
    assert dead_letter_ids(data_dir) == ["invalid"]
    assert [d.task_id for d in await store.dead_letters("fns")] == ["invalid"]


@pytest.mark.parametrize(("code", "final", "attempts"), [
    (503, TaskState.SUCCEEDED, 2),  # retried, then answered per item
    (400, TaskState.FAILED, 1),  # fails every task at once
])
async def test_a_non_2xx_answer_to_the_request_is_every_tasks_outcome(
        data_dir: Path, function: tuple[Function, str], code: int, final: TaskState,
        attempts: int) -> None:
    fn, url = function
    fn.whole.append(code)
    tasks = {f"t{i:02d}": "ok" for i in range(10)}
    loop = run_loop(data_dir, url, tasks)
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), DEADLINE_S)

    assert sorted(e["id"] for e in fn.requests[0].events) == sorted(tasks)  # one batch
    store = SqliteTaskStore(Database.open(data_dir))
    for task_id in tasks:
        rec = await store.get(task_id, "fns")
        assert (rec.state, rec.attempts) == (final, attempts), task_id
        if final == TaskState.FAILED:
            assert rec.error_type == f"HTTP{code}"
    assert dead_letter_ids(data_dir) == (sorted(tasks) if final == TaskState.FAILED else [])
