"""The console's app over the gateway (aiohttp's test server, a real SQLite store and real
consumer loops): the login keeps the key in an encrypted cookie and re-checks it on every
request, forms need the session's CSRF token, SLUICE_UI_SECRET shares sessions between
processes, the sampler reads the running pipelines afresh, and the event stream shows a
tenant only its own pipelines."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sluice import runtime
from sluice.config.load import parse_pipeline
from sluice.console.common import SAMPLER
from sluice.gateway.app import Gateway, make_app
from sluice.gateway.auth import ADMIN, KeyRing, Principal, hash_key
from sluice.gateway.server import build_gateway
from sluice.stores import open_store

ALPHA_KEY, ADMIN_KEY = "alpha-console-key-0123", "admin-console-key-0123"
PIPELINE = """\
name: {name}
tenant: {tenant}
source: {{embedded: {{queue: {name}, lease_s: 5, poll_interval_s: 0.01}}}}
handler: {{python: tests.helpers.handlers:behave}}
consumer: {{concurrency: 4, ordering: unordered}}
"""


def keys() -> KeyRing:
    return KeyRing({hash_key(ALPHA_KEY): Principal("alpha"), hash_key(ADMIN_KEY): ADMIN})


@dataclass
class Served:
    gateway: Gateway
    client: TestClient  # type: ignore[type-arg]
    app: web.Application


@pytest.fixture
async def served(data_dir: Path) -> AsyncIterator[Served]:
    configs = [parse_pipeline(PIPELINE.format(name=name, tenant=tenant), f"{name}.yaml")
               for name, tenant in (("mine", "alpha"), ("theirs", "beta"))]
    store = open_store(None, data_dir)
    gateway = build_gateway(configs, store, keys(), 1 << 20)
    loops = [runtime.build(c, data_dir) for c in configs]
    gateway.loops = {lp.config.name: lp for lp in loops}
    stop = asyncio.Event()
    running = asyncio.create_task(runtime.run_pipelines(loops, stop, store=store))
    try:
        app = make_app(gateway)
        async with TestClient(TestServer(app)) as client:
            yield Served(gateway, client, app)
    finally:
        stop.set()
        await running
        await gateway.close()
        await store.close()


async def csrf_of(client: TestClient, path: str) -> str:  # type: ignore[type-arg]
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    found = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    assert found is not None
    return found.group(1)


async def log_in(client: TestClient, key: str) -> int:  # type: ignore[type-arg]
    token = await csrf_of(client, "/ui/login")
    resp = await client.post("/ui/login", data={"key": key, "csrf": token},
                             allow_redirects=False)
    return resp.status


async def test_the_login_keeps_the_key_in_a_cookie_and_checks_it_on_every_request(
        served: Served) -> None:
    client = served.client
    resp = await client.get("/ui/", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/ui/login"
    assert await log_in(client, "not-a-key") == 401
    assert await log_in(client, ALPHA_KEY) == 303
    cookie = next(c for c in client.session.cookie_jar if c.key == "sluice_ui")
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/ui"
    assert ALPHA_KEY not in cookie.value
    page = await (await client.get("/ui/")).text()
    assert 'data-row="mine"' in page and 'data-row="theirs"' not in page  # rule 1
    assert (await client.get("/ui/pipelines/theirs")).status == 404
    served.gateway.keys = KeyRing({})  # the key is taken away: its session ends
    resp = await client.get("/ui/", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/ui/login"
    served.gateway.keys = keys()
    resp = await client.get("/ui/", allow_redirects=False)
    assert resp.status == 303  # the session was ended, not only refused


async def test_forms_need_the_session_s_csrf_token(served: Served) -> None:
    client, gw = served.client, served.gateway
    assert await log_in(client, ALPHA_KEY) == 303
    resp = await client.post("/ui/pipelines/mine/pause", data={"csrf": "guessed"},
                             allow_redirects=False)
    assert resp.status == 403
    assert not await gw.store.is_paused("mine")
    token = await csrf_of(client, "/ui/pipelines/mine")
    resp = await client.post("/ui/pipelines/mine/pause", data={"csrf": token},
                             allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/ui/pipelines/mine"
    assert await gw.store.is_paused("mine")
    assert "Pipeline mine paused." in await (await client.get("/ui/pipelines/mine")).text()
    resp = await client.post("/ui/pipelines/mine/resume", data={"csrf": token},
                             allow_redirects=False)
    assert resp.status == 303 and not await gw.store.is_paused("mine")


async def test_sluice_ui_secret_lets_another_process_read_the_session(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_pipeline(PIPELINE.format(name="mine", tenant="alpha"), "mine.yaml")

    async def cookie_from_one_and_status_on_another() -> int:
        store = open_store(None, data_dir)
        gateway = build_gateway([config], store, keys(), 1 << 20)
        try:
            async with TestClient(TestServer(make_app(gateway))) as one, \
                    TestClient(TestServer(make_app(gateway))) as other:
                assert await log_in(one, ALPHA_KEY) == 303
                cookie = next(c for c in one.session.cookie_jar if c.key == "sluice_ui")
                resp = await other.get("/ui/", headers={"Cookie": f"sluice_ui={cookie.value}"},
                                       allow_redirects=False)
                return resp.status
        finally:
            await gateway.close()
            await store.close()

    monkeypatch.delenv("SLUICE_UI_SECRET", raising=False)
    assert await cookie_from_one_and_status_on_another() == 303  # a random secret each
    monkeypatch.setenv("SLUICE_UI_SECRET", "shared by every gateway process")
    assert await cookie_from_one_and_status_on_another() == 200


async def test_the_sampler_and_the_event_stream_follow_the_running_pipelines(
        served: Served) -> None:
    client, gw = served.client, served.gateway
    sampler = served.app[SAMPLER]
    # Nobody watching: the sources are not asked for their backlog (live rule 4).
    assert (await sampler.sample())["mine"].backlog is None
    assert await log_in(client, ALPHA_KEY) == 303
    assert (await client.get("/ui/")).status == 200  # a page shown: watched from now on
    for i in range(40):
        resp = await client.post("/v1/pipelines/mine/tasks", json={"sleep_s": 0.05},
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                          "Task-Id": f"t{i}"})
        assert resp.status == 202
    deadline = time.monotonic() + 20
    while True:
        points = list(sampler.history.get("mine", ()))
        if any(p.rate_per_s for p in points) and any(p.p50_ms for p in points):
            break
        assert time.monotonic() < deadline, points[-3:]
        await asyncio.sleep(0.2)
    last = points[-1]
    assert last.limit == 4 and last.backlog is not None and not last.paused
    p50 = next(p.p50_ms for p in reversed(points) if p.p50_ms)
    assert 25 <= p50 <= 100  # 50 ms sleeps, within the histogram's (25, 50] and (50, 100]

    resp = await client.get("/ui/live")
    assert resp.headers["Content-Type"] == "text/event-stream"
    events: list[tuple[str, Any]] = []
    while len(events) < 2:
        block = b""
        while not block.endswith(b"\n\n"):
            block += await asyncio.wait_for(resp.content.readline(), 5)
        fields = dict(line.split(": ", 1) for line in block.decode().strip().split("\n"))
        events.append((fields["event"], json.loads(fields["data"])))
    (first, history), (second, tick) = events
    assert first == "history" and set(history["series"]) == {"mine"}
    assert second == "tick" and set(tick) == {"mine"}
    resp.close()

    # A task id with '/' in it is one URL segment (%2F), as on the API.
    resp = await client.post("/v1/pipelines/mine/tasks", json={},
                             headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                      "Task-Id": "orders/42", "Delay-S": "600"})
    assert resp.status == 202
    page = await (await client.get("/ui/pipelines/mine?id=orders/42")).text()
    assert 'href="/ui/pipelines/mine/tasks/orders%2F42"' in page
    resp = await client.get("/ui/pipelines/mine/tasks/orders%2F42")
    assert resp.status == 200 and "orders/42" in await resp.text()

    del gw.pipelines["theirs"]  # a pipeline that goes away loses its history (rule 1)
    await sampler.sample()
    assert "theirs" not in sampler.history and "mine" in sampler.history
