"""Tracing (sluice.tracing) through the real wiring: a submit over the gateway carrying a W3C
traceparent, the worker calling a real HTTP function, the result delivered to an embedded
destination: one trace, with the parent/child links right; a broker-like message's traceparent
continued; the exporters chosen by ``--tracing`` and ``OTEL_TRACES_EXPORTER`` (OTLP to a local
receiver, console on stderr); and tracing off: no span, no OpenTelemetry module imported, the
hot path's objects as they were, a traceparent only copied through.

Spans are collected with the SDK's ``InMemorySpanExporter``, through ``tracing.setup``. This
module imports no OpenTelemetry package at import time (the off test imports it elsewhere)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sluice import Message, runtime, tracing
from sluice.config.load import parse_pipeline
from sluice.config.model import PipelineConfig
from sluice.connectors import embedded
from sluice.connectors.base import Delivery
from sluice.connectors.embedded import EmbeddedQueue, QueuedMessage
from sluice.datadir import Database
from sluice.gateway.app import make_app
from sluice.gateway.server import build_gateway
from sluice.stores import open_store
from sluice.tasks.sqlite import SqliteTaskStore
from tests.conftest import ROOT, sluice_cmd, subprocess_env

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PRODUCER_SPAN}-01"
TRACESTATE = "vendor=opaque"


async def seen(message: Message) -> dict[str, str]:
    """A Python handler that answers the headers its message had (and, tracing on, the span
    current while it ran)."""
    out = dict(message.headers)
    if tracing.ENABLED:
        from opentelemetry import trace

        out["current_span"] = f"{trace.get_current_span().get_span_context().span_id:016x}"
    return out


def pipeline(handler: str, name: str = "traced") -> PipelineConfig:
    return parse_pipeline(textwrap.dedent(f"""
        name: {name}
        source: {{embedded: {{queue: {name}}}}}
        handler: {handler}
        consumer: {{retry: {{max_attempts: 1}}}}
        on_success: [{{embedded: {{queue: {name}.results}}}}]
        """))


def results(data_dir: Path, queue: str) -> list[Delivery]:
    db = Database.open(data_dir)
    q = EmbeddedQueue(db, queue)
    return db.run_sync(lambda c: q.lease_in(c, 100, time.time()))


async def drain(config: PipelineConfig, data_dir: Path) -> None:
    loop = runtime.build(config, data_dir)
    await asyncio.wait_for(runtime.run_pipelines([loop], asyncio.Event(), drain=True), 60)


def parts(traceparent: str) -> tuple[str, str]:
    """(trace id, parent span id) of a traceparent."""
    _version, trace_id, span_id, _flags = traceparent.split("-")
    return trace_id, span_id


def hex_ids(span: ReadableSpan) -> tuple[str, str, str | None]:
    """(trace id, span id, parent span id) of a finished span, as hex."""
    assert span.context is not None
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}", parent


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    assert tracing.setup(span_exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()
    assert not tracing.ENABLED


@pytest.fixture
async def function() -> AsyncIterator[tuple[list[dict[str, str]], str]]:
    """A function URL on 127.0.0.1 that records the headers of each call (lower-cased)."""
    calls: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        calls.append({k.lower(): v for k, v in request.headers.items()})
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/fn", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield calls, f"http://127.0.0.1:{port}/fn"
    await runner.cleanup()


async def submit(config: PipelineConfig, data_dir: Path, task_id: str,
                 headers: dict[str, str]) -> int:
    """Submit one task over the real gateway app; its HTTP status."""
    gateway = build_gateway([config], open_store(None, data_dir), None, 1 << 20)
    try:
        async with TestClient(TestServer(make_app(gateway))) as client:
            resp = await client.post(f"/v1/pipelines/{config.name}/tasks", json={"n": 1},
                                     headers={"Task-Id": task_id, **headers})
            return resp.status
    finally:
        await gateway.close()


async def test_one_trace_from_the_producer_through_the_function_to_the_result(
        spans: InMemorySpanExporter, function: tuple[list[dict[str, str]], str],
        data_dir: Path) -> None:
    calls, url = function
    config = pipeline(f'{{http: {{url: "{url}"}}}}')
    status = await submit(config, data_dir, "t1",
                          {"traceparent": TRACEPARENT, "tracestate": TRACESTATE})
    assert status == 202
    await drain(config, data_dir)

    by_name = {s.name: s for s in spans.get_finished_spans()}
    assert set(by_name) == {"submit traced", "attempt traced",
                            "deliver on_success:embedded:traced.results"}, set(by_name)
    submit_span, attempt, delivery = (by_name["submit traced"], by_name["attempt traced"],
                                      by_name["deliver on_success:embedded:traced.results"])
    s_trace, s_id, s_parent = hex_ids(submit_span)
    a_trace, a_id, a_parent = hex_ids(attempt)
    d_trace, _d_id, d_parent = hex_ids(delivery)
    # One trace: producer → submit → attempt → (function, result record → delivery).
    assert s_trace == a_trace == d_trace == TRACE_ID
    assert s_parent == PRODUCER_SPAN
    assert a_parent == s_id
    assert d_parent == a_id
    assert attempt.attributes is not None
    assert dict(attempt.attributes) == {
        "sluice.pipeline": "traced", "sluice.task_id": "t1", "sluice.attempt": 1,
        "sluice.tenant": "default", "sluice.outcome": "success"}
    assert submit_span.attributes is not None
    assert submit_span.attributes["http.response.status_code"] == 202
    # The function got the attempt's context: CloudEvents extension and plain W3C headers.
    (call,) = calls
    assert parts(call["traceparent"]) == parts(call["ce-traceparent"]) == (TRACE_ID, a_id)
    assert call["tracestate"] == call["ce-tracestate"] == TRACESTATE
    # The result record carries it too (its headers), as delivered to the destination.
    (record,) = results(data_dir, "traced.results")
    assert parts(record.headers["traceparent"]) == (TRACE_ID, a_id)
    assert record.headers["tracestate"] == TRACESTATE


async def test_a_submit_without_traceparent_starts_the_trace(
        spans: InMemorySpanExporter, data_dir: Path) -> None:
    config = pipeline("{python: tests.integration.test_tracing:seen}")
    assert await submit(config, data_dir, "t1", {}) == 202
    await drain(config, data_dir)
    by_name = {s.name: s for s in spans.get_finished_spans()}
    s_trace, s_id, s_parent = hex_ids(by_name["submit traced"])
    a_trace, a_id, a_parent = hex_ids(by_name["attempt traced"])
    assert s_parent is None  # the root
    assert (a_trace, a_parent) == (s_trace, s_id)
    task = await SqliteTaskStore(Database.open(data_dir)).get("t1", "traced")
    handler_saw = json.loads(task.result or b"")
    assert parts(handler_saw["traceparent"]) == (s_trace, a_id)  # a Python handler's view
    assert handler_saw["current_span"] == a_id  # an async handler runs in the attempt span


async def test_a_broker_message_with_a_traceparent_is_continued(
        spans: InMemorySpanExporter, data_dir: Path) -> None:
    config = pipeline("{python: tests.integration.test_tracing:seen}", name="brokered")
    embedded.submit(Database.open(data_dir), "brokered", "default", "brokered", [
        QueuedMessage("m1", b"{}", headers={"traceparent": TRACEPARENT,
                                            "tracestate": TRACESTATE, "other": "kept"}),
        QueuedMessage("m2", b"{}", headers={"traceparent": "00-bogus-01"})])
    await drain(config, data_dir)
    attempts = {s.attributes["sluice.task_id"]: s for s in spans.get_finished_spans()
                if s.name == "attempt brokered" and s.attributes is not None}
    trace_id, span_id, parent = hex_ids(attempts["m1"])
    assert (trace_id, parent) == (TRACE_ID, PRODUCER_SPAN)
    bogus_trace, _, bogus_parent = hex_ids(attempts["m2"])
    assert bogus_parent is None and bogus_trace != TRACE_ID  # invalid: a new trace
    store = SqliteTaskStore(Database.open(data_dir))
    saw = json.loads((await store.get("m1", "brokered")).result or b"")
    assert parts(saw["traceparent"]) == (TRACE_ID, span_id)
    assert saw["tracestate"] == TRACESTATE and saw["other"] == "kept"
    records = {r.task_id: r for r in results(data_dir, "brokered.results")}
    assert parts(records["m1"].headers["traceparent"]) == (TRACE_ID, span_id)


async def seen_batch(messages: list[Message]) -> list[dict[str, str]]:
    """A batch handler that answers, per message, the headers it had."""
    return [dict(m.headers) for m in messages]


async def test_each_message_of_a_batch_call_gets_its_own_attempt_span(
        spans: InMemorySpanExporter, data_dir: Path) -> None:
    config = pipeline("{python: tests.integration.test_tracing:seen_batch, "
                      "batch: {max_size: 10, max_wait_ms: 200}}", name="batched")
    other_trace, other_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    embedded.submit(Database.open(data_dir), "batched", "default", "batched", [
        QueuedMessage("b1", b"{}", headers={"traceparent": TRACEPARENT}),
        QueuedMessage("b2", b"{}", headers={"traceparent": f"00-{other_trace}-{other_span}-01"}),
        QueuedMessage("b3", b"{}")])
    await drain(config, data_dir)
    attempts = {s.attributes["sluice.task_id"]: s for s in spans.get_finished_spans()
                if s.name == "attempt batched" and s.attributes is not None}
    assert set(attempts) == {"b1", "b2", "b3"}
    assert {a.attributes["sluice.outcome"] for a in attempts.values()
            if a.attributes is not None} == {"success"}
    b1, b2, b3 = (hex_ids(attempts[t]) for t in ("b1", "b2", "b3"))
    assert (b1[0], b1[2]) == (TRACE_ID, PRODUCER_SPAN)
    assert (b2[0], b2[2]) == (other_trace, other_span)
    assert b3[2] is None and b3[0] not in (TRACE_ID, other_trace)  # none: a new trace
    store = SqliteTaskStore(Database.open(data_dir))
    records = {r.task_id: r for r in results(data_dir, "batched.results")}
    for task_id, (trace_id, span_id, _) in (("b1", b1), ("b2", b2), ("b3", b3)):
        saw = json.loads((await store.get(task_id, "batched")).result or b"")
        assert parts(saw["traceparent"]) == (trace_id, span_id)  # its own span, in the call
        assert parts(records[task_id].headers["traceparent"]) == (trace_id, span_id)


async def test_an_http_destination_gets_the_records_trace_context(
        spans: InMemorySpanExporter, function: tuple[list[dict[str, str]], str],
        data_dir: Path) -> None:
    calls, url = function
    config = parse_pipeline(textwrap.dedent(f"""
        name: hooked
        source: {{embedded: {{queue: hooked}}}}
        handler: {{python: tests.integration.test_tracing:seen}}
        on_success: [{{http: {{url: "{url}"}}}}]
        """))
    embedded.submit(Database.open(data_dir), "hooked", "default", "hooked", [
        QueuedMessage("h1", b"{}", headers={"traceparent": TRACEPARENT,
                                            "tracestate": TRACESTATE})])
    await drain(config, data_dir)
    for _ in range(100):  # the outbox delivers after the task is recorded
        if calls:
            break
        await asyncio.sleep(0.05)
    (attempt,) = [s for s in spans.get_finished_spans() if s.name == "attempt hooked"]
    _, attempt_id, _ = hex_ids(attempt)
    (call,) = calls
    assert parts(call["traceparent"]) == (TRACE_ID, attempt_id)
    assert call["tracestate"] == TRACESTATE


def test_the_exporters_asked_for() -> None:
    assert tracing.exporters_asked(None, {}) == []
    assert tracing.exporters_asked(None, {"OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.exporters_asked(None, {"OTEL_TRACES_EXPORTER": "otlp, console"}) == [
        "otlp", "console"]
    assert tracing.exporters_asked(None, {"OTEL_TRACES_EXPORTER": "zipkin"}) == []
    assert tracing.exporters_asked(None, {"OTEL_TRACES_EXPORTER": "otlp",
                                          "OTEL_SDK_DISABLED": "true"}) == []
    assert tracing.exporters_asked("none", {"OTEL_TRACES_EXPORTER": "otlp"}) == []
    assert tracing.exporters_asked("console", {"OTEL_SDK_DISABLED": "true"}) == ["console"]


def test_trace_context_headers_are_copied_only_when_valid() -> None:
    assert tracing.carried({}) is None
    assert tracing.carried({"traceparent": TRACEPARENT, "tracestate": TRACESTATE}) == {
        "traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    for bad in ("00-bogus-01", f"ff-{TRACE_ID}-{PRODUCER_SPAN}-01",
                f"00-{'0' * 32}-{PRODUCER_SPAN}-01", f"00-{TRACE_ID}-{'0' * 16}-01",
                f"00-{TRACE_ID}-{PRODUCER_SPAN}-01-extra", TRACEPARENT.upper()):
        assert tracing.carried({"traceparent": bad}) is None, bad
    assert tracing.carried({"traceparent": f"01-{TRACE_ID}-{PRODUCER_SPAN}-01-more"})
    assert tracing.carried({"traceparent": TRACEPARENT, "tracestate": "x" * 600}) == {
        "traceparent": TRACEPARENT}


class _Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps each POST's path, content type and body."""

    got: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.got.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


def _run_cli(tmp_path: Path, data_dir: Path, *args: str, **env: str) -> str:
    """``sluice run --drain`` of one echo task carrying a traceparent; its stderr."""
    (tmp_path / "p.yaml").write_text("name: cli\nsource: {embedded: {queue: cli}}\n"
                                     "handler: {python: tests.helpers.handlers:echo}\n")
    db = Database.open(data_dir)
    embedded.submit(db, "cli", "default", "cli",
                    [QueuedMessage("c1", b"{}", headers={"traceparent": TRACEPARENT})])
    db.close()
    full_env = subprocess_env(**env)
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"):
        if name not in env:
            full_env.pop(name, None)
    done = subprocess.run([*sluice_cmd(), "run", str(tmp_path / "p.yaml"), "--drain",
                           "--data-dir", str(data_dir), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_sluice_run_tracing_otlp_exports_to_the_endpoint(tmp_path: Path,
                                                         data_dir: Path) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    _Receiver.got = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _run_cli(tmp_path, data_dir, "--tracing", "otlp",
                 OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
                 OTEL_SERVICE_NAME="traced-worker")
    finally:
        server.shutdown()
        server.server_close()
    assert _Receiver.got, "nothing exported"
    names = []
    for path, content_type, body in _Receiver.got:
        assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value
                       for a in resource_spans.resource.attributes}["service.name"]
            assert service == "traced-worker"
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    names.append(span.name)
                    assert span.trace_id.hex() == TRACE_ID
                    assert span.parent_span_id.hex() == PRODUCER_SPAN
    assert names == ["attempt cli"]


def test_otel_traces_exporter_console_writes_spans_on_stderr(tmp_path: Path,
                                                             data_dir: Path) -> None:
    stderr = _run_cli(tmp_path, data_dir, OTEL_TRACES_EXPORTER="console")
    assert '"name": "attempt cli"' in stderr and TRACE_ID in stderr


OFF_SCRIPT = """
import asyncio, json, sys, time
from sluice import tracing
import sluice.cli  # everything the commands import
from sluice import runtime
from sluice.connectors.base import Delivery
from sluice.datadir import Database
from sluice.connectors.embedded import EmbeddedQueue
from sluice.tasks.sqlite import SqliteTaskStore
from tests.integration import test_tracing as t

def refuse(*args, **kwargs):
    raise AssertionError("tracing work with tracing off")

# No span object may be made, no context looked up, with tracing off.
tracing.submit_span = tracing.attempt_span = tracing.delivery_span = refuse
tracing.handler_headers = tracing.inject = refuse

async def main(data_dir):
    assert tracing.setup() is False and not tracing.enabled()
    config = t.pipeline("{python: tests.integration.test_tracing:seen}")
    statuses = [await t.submit(config, data_dir, "with", {"traceparent": t.TRACEPARENT,
                                                           "tracestate": t.TRACESTATE}),
                await t.submit(config, data_dir, "without", {})]
    loop = runtime.build(config, data_dir)
    plain = Delivery("x", b"{}", headers={"k": "v"})
    same_headers = loop._message(plain, 1).headers is plain.headers  # the hot path's object
    await runtime.run_pipelines([loop], asyncio.Event(), drain=True)
    store = SqliteTaskStore(Database.open(data_dir))
    saw = {i: json.loads((await store.get(i, "traced")).result) for i in ("with", "without")}
    records = {r.task_id: dict(r.headers) for r in t.results(data_dir, "traced.results")}
    print(json.dumps({
        "statuses": statuses, "same_headers": same_headers, "saw": saw, "records": records,
        "otel": sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")}))

asyncio.run(main(sys.argv[1]))
"""


def test_tracing_off_makes_no_span_imports_nothing_and_copies_the_traceparent(
        tmp_path: Path) -> None:
    env = subprocess_env()
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", OFF_SCRIPT, str(tmp_path / "data")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["otel"] == []  # not the SDK, not even the API
    assert out["statuses"] == [202, 202]
    assert out["same_headers"] is True
    # A traceparent (and tracestate) only copied through: request → message → handler, record.
    context = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    assert out["saw"] == {"with": context, "without": {}}
    assert out["records"] == {"with": context, "without": {}}
