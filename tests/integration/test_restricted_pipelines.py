"""Connect-time enforcement of the network policy of restricted pipelines
(:mod:`sluice.netpolicy`, rule 4), on loopback only, against real aiohttp servers.

A pipeline built with ``network=`` (a pipeline put with a tenant's key) refuses, at every
request and every resolution, what its policy refuses: a name that passed validation but now
resolves to loopback (DNS rebinding; here, ``localhost`` under a policy allowing nothing) and a
literal loopback address are refused before any connection, so the server never sees a request.
The same pipeline built for the operator (no policy) reaches the server, and so does a
restricted one whose policy allows the range (``sluice serve --allow-network 127.0.0.0/8``).
A redirect from an allowed server to a refused address is not followed.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sluice import registry
from sluice.config.load import parse_pipeline
from sluice.config.model import PipelineConfig
from sluice.connectors import embedded
from sluice.connectors.base import Sink, SinkRecord
from sluice.connectors.embedded import EmbeddedQueue, QueuedMessage
from sluice.datadir import Database
from sluice.errors import DeliveryError
from sluice.message import Message, Outcome
from sluice.netpolicy import NetworkPolicy
from sluice.runtime import build
from tests.helpers.sites import Site

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
NOTHING = NetworkPolicy()  # the default: no range of the server's network allowed
LOOPBACK = NetworkPolicy.parse(["127.0.0.0/8", "::1/128"])  # --allow-network 127.0.0.0/8 ...
OWN_NETWORK = "an address of the server's own network"


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    server = Site("127.0.0.1")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def message() -> Message:
    return Message("t-1", "jobs", {"n": 1}, b'{"n": 1}', "application/json", None, {}, 1)


def record() -> SinkRecord:
    return SinkRecord(task_id="t-1", body=b'{"n": 1}', content_type="application/json")


def handler_pipeline(url: str) -> PipelineConfig:
    return parse_pipeline(f"""
name: jobs
source: {{embedded: {{queue: jobs}}}}
handler: {{http: {{url: "{url}"}}}}
consumer: {{retry: {{max_attempts: 1}}}}
dead_letter: {{embedded: {{queue: jobs.dlq}}}}
""", trusted=False)


async def invoke(url: str, data_dir: Path, network: NetworkPolicy | None) -> Outcome:
    """One call of the handler of a pipeline built by the runtime with ``network``."""
    loop = build(handler_pipeline(url), data_dir, network=network)
    try:
        return await loop.handler.invoke(message(), 10)
    finally:
        await loop.handler.close()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_a_restricted_handler_is_refused_before_connecting(
        site: Site, data_dir: Path, host: str) -> None:
    """``localhost``: a name checked at validate time that resolves to loopback now (the
    resolver refuses it); ``127.0.0.1``: a literal (the request middleware refuses it)."""
    url = site.url("/fn", host=host)
    outcome = await invoke(url, data_dir, NOTHING)
    assert site.hits == []  # nothing reached the server
    assert outcome.status in ("failure", "retry")
    assert f"refused: {host} " in (outcome.error_message or "")
    assert OWN_NETWORK in (outcome.error_message or "")
    assert "sluice serve --allow-network CIDR" in (outcome.error_message or "")
    if host == "127.0.0.1":
        assert (outcome.status, outcome.error_type) == ("failure", "RefusedAddress")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_the_operators_pipeline_and_an_allowed_range_reach_the_server(
        site: Site, data_dir: Path, host: str) -> None:
    url = site.url("/fn", host=host)
    for network in (None, LOOPBACK):
        outcome = await invoke(url, data_dir, network)
        assert outcome.status == "success", outcome.error_message
    assert site.hits == ["/fn", "/fn"]


def sink(kind: str, url: str, network: NetworkPolicy | None) -> Sink:
    """A sink made by its spec's factory, as the runtime makes it (the context's policy)."""
    config = {"url": url, **({"secret_env": "HOOK_SECRET"} if kind == "webhook" else {})}
    ctx = registry.BuildContext(pipeline="jobs", network=network)
    return registry.sink(kind).build(config, ctx)


@pytest.mark.parametrize("kind", ["http", "webhook"])
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_a_restricted_destination_is_refused_before_connecting(
        site: Site, kind: str, host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    refused, allowed = (sink(kind, site.url("/hook", host=host), n) for n in (NOTHING, LOOPBACK))
    try:
        with pytest.raises(DeliveryError) as info:
            await refused.send([record()])
        assert site.hits == []
        assert f"refused: {host} " in str(info.value) and OWN_NETWORK in str(info.value)
        await allowed.send([record()])
    finally:
        await refused.close()
        await allowed.close()
    assert site.hits == ["/hook"]


@dataclass
class Scene:
    target: Site  # on the server's network (refused)
    front: Site  # the function or destination the pipeline names (allowed)
    policy: NetworkPolicy  # allows the front only


@pytest.fixture(params=["literal", "name"])
async def scene(request: pytest.FixtureRequest) -> AsyncIterator[Scene]:
    """``literal``: the front at 127.0.0.1 (allowed) redirects to ``127.0.0.2``; ``name``: the
    front at 127.0.0.3 (allowed) redirects to ``localhost`` (the target at 127.0.0.1)."""
    if request.param == "literal":
        target, front, location_host = Site("127.0.0.2"), Site("127.0.0.1"), "127.0.0.2"
    else:
        target, front, location_host = Site("127.0.0.1"), Site("127.0.0.3"), "localhost"
    await target.start()
    front.redirect_to = target.url("/internal", host=location_host)
    await front.start()
    try:
        yield Scene(target, front, NetworkPolicy.parse([f"{front.host}/32"]))
    finally:
        await front.stop()
        await target.stop()


async def test_a_restricted_handler_does_not_follow_a_redirect(
        scene: Scene, data_dir: Path) -> None:
    outcome = await invoke(scene.front.url("/fn"), data_dir, scene.policy)
    assert scene.front.hits == ["/fn"]  # the allowed first hop is reached
    assert scene.target.hits == []
    assert (outcome.status, outcome.error_type) == ("failure", "HTTP307")
    assert f"redirecting to {scene.front.redirect_to}" in (outcome.error_message or "")


@pytest.mark.parametrize("kind", ["http", "webhook"])
async def test_a_restricted_destination_does_not_follow_a_redirect(
        scene: Scene, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    destination = sink(kind, scene.front.url("/hook"), scene.policy)
    try:
        with pytest.raises(DeliveryError, match="HTTP 307") as info:
            await destination.send([record()])
    finally:
        await destination.close()
    assert scene.front.hits == ["/hook"]
    assert scene.target.hits == []
    assert info.value.permanent


async def test_a_restricted_pipeline_dead_letters_a_refused_call(
        site: Site, data_dir: Path) -> None:
    """The whole loop, built by the runtime with the policy: the task fails for good, its
    dead letter saying why, and the server never saw a request."""
    loop = build(handler_pipeline(site.url("/fn")), data_dir, network=NOTHING)
    db = Database.open(data_dir)
    embedded.submit(db, "jobs", "default", "jobs", [QueuedMessage("t-1", b'{"n": 1}')])
    try:
        await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), 60)
    finally:
        await loop.handler.close()
    assert site.hits == []
    queue = EmbeddedQueue(db, "jobs.dlq")
    (dead,) = db.run_sync(lambda c: queue.lease_in(c, 10, time.time()))
    assert dead.task_id == "t-1"
    assert f"refused: 127.0.0.1 is {OWN_NETWORK}" in dead.headers["sluice-error-message"]
