"""Result destinations on real HTTP receivers: the record's shape, Standard Webhooks signatures,
retries through an outage with nothing lost, Retry-After, permanent errors to the dead letter,
the SSRF guard, and two pipelines chained through an embedded destination."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from standardwebhooks import Webhook

from sluice.config.load import load_pipeline, parse_pipeline
from sluice.connectors import embedded
from sluice.connectors.embedded import EmbeddedQueue, QueuedMessage
from sluice.consumer.loop import ConsumerLoop
from sluice.datadir import Database
from sluice.errors import ConfigError
from sluice.runtime import build
from sluice.sinks.ssrf import GuardedResolver
from sluice.tasks.sqlite import SqliteTaskStore
from tests.conftest import ROOT
from tests.helpers.server import free_port

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
RECORD_SCHEMA = Draft202012Validator(
    json.loads((ROOT / "schemas" / "result-record.schema.json").read_text()))


class Receiver:
    """A real HTTP endpoint that records what it gets and answers as told."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/hook"
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.answer: Callable[[web.Request], Awaitable[web.Response]] | None = None
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append((dict(request.headers), body))
        if self.answer is not None:
            return await self.answer(request)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.got]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(free_port())
    await r.start()
    yield r
    await r.stop()


def pipeline(data_dir: Path, destinations: str, *, retry: str = "max_attempts: 1") -> ConsumerLoop:
    text = f"""
name: jobs
source: {{embedded: {{queue: jobs}}}}
handler: {{python: tests.helpers.handlers:behave}}
consumer: {{concurrency: 8, retry: {{{retry}, initial_backoff_s: 0.01}}}}
{destinations}
"""
    return build(parse_pipeline(text), data_dir)


def submit(data_dir: Path, payloads: list[dict[str, Any]], prefix: str = "t") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(len(payloads))]
    embedded.submit(Database.open(data_dir), "jobs", "default", "jobs",
                    [QueuedMessage(i, json.dumps(p).encode()) for i, p in zip(ids, payloads,
                                                                             strict=True)])
    return ids


async def drain(loop: ConsumerLoop, timeout_s: float = 60) -> None:
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), timeout_s)


def dead_letters(data_dir: Path, queue: str = "jobs.dlq") -> list[Any]:
    db = Database.open(data_dir)
    q = EmbeddedQueue(db, queue)
    return db.run_sync(lambda c: q.lease_in(c, 1000, time.time()))


async def test_webhook_records_verify_and_match_the_schema(
        data_dir: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    loop = pipeline(data_dir, f"""
on_success: [{{webhook: {{url: "{receiver.url}", secret_env: HOOK_SECRET}}}}]
on_failure: [{{webhook: {{url: "{receiver.url}", secret_env: HOOK_SECRET}}}}]
""")
    submit(data_dir, [{"n": 1}, {"reject": "bad input"}])
    await drain(loop)
    assert len(receiver.got) == 2
    hook = Webhook(SECRET)
    by_id = {}
    for headers, body in receiver.got:
        payload = hook.verify(body, headers)  # raises if the signature does not verify
        assert headers["webhook-id"] == payload["id"] == payload["data"]["task_id"]
        assert headers["Content-Type"] == "application/cloudevents+json"
        RECORD_SCHEMA.validate(payload)
        by_id[payload["id"]] = payload
    ok, failed = by_id["t0"], by_id["t1"]
    assert ok["type"] == "sluice.task.succeeded" and ok["source"] == "/sluice/pipelines/jobs"
    assert ok["data"]["result"] == {"attempt": 1}
    assert ok["data"]["request"] == {"content_type": "application/json", "json": {"n": 1}}
    assert [s["stage"] for s in ok["data"]["timeline"]] == ["received", "queued", "started",
                                                            "finished"]
    assert all(s["at"] for s in ok["data"]["timeline"])
    assert failed["type"] == "sluice.task.failed"
    assert failed["data"]["error"] == {"type": "Reject", "message": "bad input"}
    tampered = receiver.got[0][1].replace(b'"attempts":1', b'"attempts":2')
    with pytest.raises(Exception, match="signature"):
        hook.verify(tampered, receiver.got[0][0])
    task = await SqliteTaskStore(Database.open(data_dir)).get("t0", "jobs")
    # A destination's default label: slot, type and a digest of its URL (never the URL).
    label = f"on_success:webhook:{hashlib.sha256(receiver.url.encode()).hexdigest()[:12]}"
    delivery = task.to_json()["deliveries"][label]
    assert (delivery["state"], delivery["attempts"]) == ("delivered", 1)


@pytest.mark.slow
async def test_receiver_down_60s_then_up_gets_every_record(data_dir: Path) -> None:
    port = free_port()
    receiver = Receiver(port)  # not started: connections are refused
    loop = pipeline(data_dir, f"""
on_success:
  - http: {{url: "http://127.0.0.1:{port}/hook", max_attempts: 1000, initial_backoff_s: 0.5,
            max_backoff_s: 4, concurrency: 4}}
""")
    total = 300
    ids = submit(data_dir, [{"i": i} for i in range(total)])
    stop = asyncio.Event()
    runner = asyncio.create_task(loop.run(stop))
    (deliverer,) = loop.deliverers
    rss_mb, in_flight = [], []
    started = time.monotonic()
    while time.monotonic() - started < 60:  # the destination is down for 60 s
        rss_mb.append(psutil.Process().memory_info().rss / 2**20)
        in_flight.append(len(deliverer._in_flight))
        await asyncio.sleep(0.5)
    assert loop.stats.succeeded == total  # handlers were not held up by the dead destination
    assert await deliverer.outbox.pending() == total  # every record waits, durably, in the outbox
    assert max(in_flight) <= deliverer.concurrency  # bounded: the rest stays on disk
    await receiver.start()
    try:
        deadline = time.monotonic() + 60
        while len({r["id"] for r in receiver.records()}) < total:
            assert time.monotonic() < deadline, f"{len(receiver.got)} of {total} arrived"
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(runner, 30)
    finally:
        await receiver.stop()
    counts = Counter(r["id"] for r in receiver.records())
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1  # each arrived once: nothing was acknowledged earlier
    assert await deliverer.outbox.pending() == 0
    print(f"\nRSS while the destination was down: {min(rss_mb):.1f}-{max(rss_mb):.1f} MiB "
          f"({total} records waiting, at most {max(in_flight)} in memory)")


async def test_retry_after_is_honoured_and_4xx_is_permanent(
        data_dir: Path, receiver: Receiver) -> None:
    calls: list[float] = []

    async def answer(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        body = json.loads(await request.read())
        if body["data"]["request"]["json"].get("bad"):
            return web.Response(status=422, text="no")
        if len(calls) == 1:
            return web.Response(status=429, headers={"Retry-After": "2"})
        return web.Response(status=200)

    receiver.answer = answer
    loop = pipeline(data_dir, f"""
on_success: [{{http: {{url: "{receiver.url}", initial_backoff_s: 0.01, max_backoff_s: 0.05}}}}]
""")
    submit(data_dir, [{"n": 1}])
    await drain(loop)
    assert len(calls) == 2 and calls[1] - calls[0] >= 1.9  # waited for Retry-After
    calls.clear()
    submit(data_dir, [{"bad": True}], prefix="b")
    await drain(pipeline(data_dir, f"""
on_success: [{{http: {{url: "{receiver.url}", initial_backoff_s: 0.01}}}}]
"""))
    assert len(calls) == 1  # 422 is permanent: no retry
    (dl,) = dead_letters(data_dir)
    assert dl.task_id == "b0"
    assert dl.headers["sluice-reason"] == "delivery failed: permanent error"
    assert "HTTP 422" in dl.headers["sluice-error-message"]
    label = f"on_success:http:{hashlib.sha256(receiver.url.encode()).hexdigest()[:12]}"
    assert (dl.headers["sluice-destination"], dl.headers["sluice-task-id"]) == (label, "b0")
    assert json.loads(dl.body)["type"] == "sluice.task.succeeded"  # the record itself
    task = await SqliteTaskStore(Database.open(data_dir)).get("b0", "jobs")
    assert task.state == "SUCCEEDED"  # the task itself did succeed
    assert task.to_json()["deliveries"][label]["state"] == "failed"


def test_ssrf_and_malformed_urls_are_refused_at_validate_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    base = ("name: p\nsource: {embedded: {}}\nhandler: {python: tests.helpers.handlers:echo}\n"
            "on_success:\n")
    cases = {
        "  - http: {url: 'http://169.254.169.254/latest/meta-data'}\n":
            "on_success[0].http.url: 169.254.169.254 is a link-local or metadata address",
        "  - webhook: {url: 'ftp://example.com/x', secret_env: HOOK_SECRET}\n":
            "on_success[0].webhook.url: expected an http:// or https:// URL",
        "  - http: {url: 'http://[fe80::1]:80/'}\n": "fe80::1 is a link-local",
        "  - webhook: {url: 'https://example.com/', secret_env: NOPE_UNSET}\n":
            "on_success[0].webhook.secret_env: environment variable 'NOPE_UNSET' is not set",
    }
    for entry, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            parse_pipeline(base + entry, "p.yaml")
        assert expected in str(info.value), str(info.value)
        assert str(info.value).startswith("p.yaml:5:")
    allowed = parse_pipeline(base + "  - http: {url: 'http://169.254.169.254/', "
                                    "allow_link_local: true}\n")
    assert allowed.on_success[0].type == "http"


async def test_resolver_refuses_link_local_addresses() -> None:
    resolver = GuardedResolver()
    try:
        assert (await resolver.resolve("localhost", 80))[0]["host"] in ("127.0.0.1", "::1")
        with pytest.raises(OSError, match="link-local or metadata"):
            await resolver.resolve("169.254.169.254", 80)
    finally:
        await resolver.close()


async def test_chained_pipelines_example(data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    orders = load_pipeline(ROOT / "pipelines" / "chain_orders.yaml")
    receipts = load_pipeline(ROOT / "pipelines" / "chain_receipts.yaml")
    db = Database.open(data_dir)
    embedded.submit(db, orders.name, orders.tenant, orders.source.config["queue"],
                    [QueuedMessage(f"order-{i}", json.dumps({"item": "book", "qty": i + 1})
                                   .encode()) for i in range(3)])
    first, second = build(orders, data_dir), build(receipts, data_dir)
    await asyncio.wait_for(first.run(asyncio.Event(), drain=True), 30)
    await asyncio.wait_for(second.run(asyncio.Event(), drain=True), 30)
    store = SqliteTaskStore(db)
    for i in range(3):
        receipt = await store.get(f"order-{i}", receipts.name)
        assert receipt.state == "SUCCEEDED"
        assert json.loads(receipt.result or b"") == {
            "receipt_for": f"order-{i}", "total_cents": 1250 * (i + 1)}
    assert os.path.exists(data_dir / "sluice.db")
