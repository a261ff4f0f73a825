"""The SSRF guard against redirects and address literals, on loopback: a second local server
stands in for a metadata service (its address is made forbidden for the test) and records
whether anything reached it. A destination or function answering ``307 Location: <forbidden>``
must not send the request on, whether the Location names the address literally or by a name
that resolves to it; and a literal forbidden address is refused before connecting."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sluice.config.load import parse_pipeline
from sluice.connectors import embedded
from sluice.connectors.base import SinkRecord
from sluice.connectors.embedded import EmbeddedQueue, QueuedMessage
from sluice.datadir import Database
from sluice.errors import DeliveryError
from sluice.handlers.http import HttpHandler
from sluice.message import Message
from sluice.runtime import build
from sluice.sinks import ssrf
from sluice.sinks.http import HttpSink
from sluice.sinks.webhook import WebhookSink
from tests.helpers.sites import Site

METADATA = {"secret": "metadata"}  # what the stand-in metadata service answers
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@dataclass
class Scene:
    target: Site  # the stand-in metadata service (forbidden)
    front: Site  # the destination or function the config names (allowed)


def forbid(monkeypatch: pytest.MonkeyPatch, *networks: str) -> None:
    monkeypatch.setattr(ssrf, "EXTRA_FORBIDDEN",
                        tuple(ipaddress.ip_network(n) for n in networks))


@pytest.fixture(params=["literal", "name"])
async def scene(request: pytest.FixtureRequest,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Scene]:
    """``literal``: the target at 127.0.0.2, redirected to as ``127.0.0.2``. ``name``: the
    target at 127.0.0.1, redirected to as ``localhost``; the front then listens on 127.0.0.3."""
    if request.param == "literal":
        target, front = Site("127.0.0.2", answer=METADATA), Site("127.0.0.1")
        forbid(monkeypatch, "127.0.0.2/32")
        location_host = "127.0.0.2"
    else:
        target, front = Site("127.0.0.1", answer=METADATA), Site("127.0.0.3")
        forbid(monkeypatch, "127.0.0.1/32", "::1/128")
        location_host = "localhost"
    await target.start()
    front.redirect_to = target.url("/latest/meta-data", host=location_host)
    await front.start()
    try:
        yield Scene(target, front)
    finally:
        await front.stop()
        await target.stop()


def record() -> SinkRecord:
    return SinkRecord(task_id="t-1", body=b'{"n": 1}', content_type="application/json")


def message() -> Message:
    return Message("t-1", "jobs", {"n": 1}, b'{"n": 1}', "application/json", None, {}, 1)


@pytest.mark.parametrize("kind", ["http", "webhook"])
async def test_a_destination_does_not_follow_a_redirect(scene: Scene, kind: str) -> None:
    url = scene.front.url("/hook")
    sink = HttpSink(url) if kind == "http" else WebhookSink(url, SECRET)
    try:
        with pytest.raises(DeliveryError) as info:
            await sink.send([record()])
    finally:
        await sink.close()
    assert scene.front.hits == ["/hook"]
    assert scene.target.hits == []  # nothing reached the forbidden address
    assert info.value.permanent  # the same answer would come again: no retry
    assert "HTTP 307" in str(info.value)
    assert f"redirecting to {scene.front.redirect_to}" in str(info.value)


async def test_a_handler_does_not_follow_a_redirect(scene: Scene) -> None:
    handler = HttpHandler(scene.front.url("/fn"))
    try:
        outcome = await handler.invoke(message(), timeout_s=10)
    finally:
        await handler.close()
    assert scene.front.hits == ["/fn"]
    assert scene.target.hits == []
    assert (outcome.status, outcome.error_type) == ("failure", "HTTP307")
    assert f"redirecting to {scene.front.redirect_to}" in (outcome.error_message or "")


@pytest.fixture
async def target() -> AsyncIterator[Site]:
    site = Site("127.0.0.2")
    await site.start()
    try:
        yield site
    finally:
        await site.stop()


async def test_a_literal_address_is_checked_before_connecting(
        target: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    url = target.url("/latest/meta-data")
    sink, handler = HttpSink(url), HttpHandler(url)  # allowed when configured
    forbid(monkeypatch, "127.0.0.2/32")  # then forbidden: the check runs on every request
    try:
        with pytest.raises(DeliveryError, match=r"127\.0\.0\.2 is a link-local or metadata"):
            await sink.send([record()])
        outcome = await handler.invoke(message(), timeout_s=10)
    finally:
        await sink.close()
        await handler.close()
    assert (outcome.status, outcome.error_type) == ("failure", "RefusedAddress")
    assert "127.0.0.2 is a link-local or metadata address" in (outcome.error_message or "")
    assert target.hits == []


async def test_allow_link_local_reaches_the_address(
        target: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    forbid(monkeypatch, "127.0.0.2/32")
    sink = HttpSink(target.url("/latest/meta-data"), allow_link_local=True)
    try:
        await sink.send([record()])
    finally:
        await sink.close()
    assert target.hits == ["/latest/meta-data"]


async def test_a_pipelines_webhook_redirected_goes_to_the_dead_letter(
        scene: Scene, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    loop = build(parse_pipeline(f"""
name: jobs
source: {{embedded: {{queue: jobs}}}}
handler: {{python: tests.helpers.handlers:behave}}
on_success: [{{webhook: {{url: "{scene.front.url('/hook')}", secret_env: HOOK_SECRET,
               max_attempts: 2, initial_backoff_s: 0.01}}}}]
dead_letter: {{embedded: {{queue: jobs.dlq}}}}
"""), data_dir)
    db = Database.open(data_dir)
    embedded.submit(db, "jobs", "default", "jobs", [QueuedMessage("t-1", b'{"n": 1}')])
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), 60)
    assert scene.front.hits == ["/hook"]  # once: a redirect is not retried
    assert scene.target.hits == []
    queue = EmbeddedQueue(db, "jobs.dlq")
    (dead,) = db.run_sync(lambda c: queue.lease_in(c, 10, time.time()))
    assert dead.task_id == "t-1"
    assert f"redirecting to {scene.front.redirect_to}" in dead.headers["sluice-error-message"]


async def test_a_name_is_checked_when_resolved_and_the_error_says_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    target = Site("127.0.0.1", answer=METADATA)
    await target.start()
    forbid(monkeypatch, "127.0.0.1/32", "::1/128")
    sink = HttpSink(target.url("/latest/meta-data", host="localhost"))
    try:
        with pytest.raises(DeliveryError) as info:
            await sink.send([record()])
    finally:
        await sink.close()
        await target.stop()
    assert target.hits == []
    assert "refused: localhost resolves to a link-local or metadata address" in str(info.value)
