"""`sluice serve` over real HTTP: submit with dedup (and the 1,000-way race), the task API,
tenants, cancel/pause/resume of tasks and pipelines, bad input, health and metrics."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers.handlers import read_log
from tests.helpers.server import KEYS, Server, running_server

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("gw")) as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:
        yield session


async def call(http: aiohttp.ClientSession, server: Server, method: str, path: str,
               who: str = "alpha", **kwargs: Any) -> tuple[int, Any, Any]:
    headers = {**server.headers(who), **kwargs.pop("headers", {})}
    async with http.request(method, server.url + path, headers=headers, **kwargs) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text.startswith("{") else text), resp.headers


async def submit(http: aiohttp.ClientSession, server: Server, payload: Any,
                 task_id: str | None = None, pipeline: str = "gw-a", who: str = "alpha",
                 **headers: str) -> tuple[int, Any, Any]:
    h = {**JSON, **headers}
    if task_id:
        h["Task-Id"] = task_id
    return await call(http, server, "POST", f"/v1/pipelines/{pipeline}/tasks", who,
                      headers=h, data=json.dumps(payload))


async def wait_state(http: aiohttp.ClientSession, server: Server, task_id: str, state: str,
                     who: str = "alpha", timeout_s: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status, body, _ = await call(http, server, "GET", f"/v1/tasks/{task_id}", who)
        if status == 200 and body["state"] == state:
            return dict(body)
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} is {body}, not {state}")
        await asyncio.sleep(0.05)


def runs(server: Server, task_id: str, event: str = "start") -> int:
    return sum(1 for e in read_log(server.log) if e[1] == task_id and e[0] == event)


async def test_submit_202_then_status_with_timeline(http: aiohttp.ClientSession,
                                                    server: Server) -> None:
    status, body, headers = await submit(http, server, {"n": 1}, task_id="first")
    assert status == 202
    assert body == {"task_id": "first", "pipeline": "gw-a", "state": "QUEUED",
                    "status_url": "/v1/tasks/first?pipeline=gw-a"}
    assert headers["Location"] == body["status_url"]
    done = await wait_state(http, server, "first", "SUCCEEDED")
    assert done["result"] == {"attempt": 1}
    assert [s["stage"] for s in done["timeline"]] == ["received", "queued", "started",
                                                      "finished"]
    assert all(s["at"] is not None for s in done["timeline"])
    status, same, _ = await call(http, server, "GET", body["status_url"])
    assert status == 200 and same["task_id"] == "first"


async def test_thousand_concurrent_submits_of_one_id_accept_exactly_one(
        http: aiohttp.ClientSession, server: Server) -> None:
    results = await asyncio.gather(*(submit(http, server, {"i": i}, task_id="raced")
                                     for i in range(1000)))
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {202: 1, 409: 999}
    for status, body, _ in results:
        if status == 409:
            assert body["task_id"] == "raced"
            assert body["status_url"] == "/v1/tasks/raced?pipeline=gw-a"
            assert body["state"] in ("QUEUED", "RUNNING", "SUCCEEDED")
    await wait_state(http, server, "raced", "SUCCEEDED")
    assert runs(server, "raced", "done") == 1


async def test_other_tenant_sees_404_like_a_missing_task(http: aiohttp.ClientSession,
                                                         server: Server) -> None:
    await submit(http, server, {}, task_id="alpha-only")
    mine = await call(http, server, "GET", "/v1/tasks/alpha-only", "alpha")
    assert mine[0] == 200
    theirs = await call(http, server, "GET", "/v1/tasks/alpha-only", "beta")
    missing = await call(http, server, "GET", "/v1/tasks/no-such-task", "beta")
    assert theirs[0] == missing[0] == 404
    assert theirs[1]["type"] == missing[1]["type"] and theirs[1]["title"] == missing[1]["title"]
    assert theirs[1]["detail"] == missing[1]["detail"].replace("no-such-task", "alpha-only")
    for action in ("cancel", "pause", "resume"):
        assert (await call(http, server, "POST", f"/v1/tasks/alpha-only/{action}", "beta"))[0] \
            == 404
    assert (await submit(http, server, {}, who="beta"))[0] == 404  # alpha's pipeline
    assert (await call(http, server, "GET", "/v1/tasks?pipeline=gw-a", "beta"))[0] == 404
    listed = (await call(http, server, "GET", "/v1/tasks?limit=1000", "beta"))[1]
    assert all(t["pipeline"] == "gw-b" for t in listed["tasks"])
    pipelines = (await call(http, server, "GET", "/v1/pipelines", "beta"))[1]["pipelines"]
    assert [p["name"] for p in pipelines] == ["gw-b"]
    admin = await call(http, server, "GET", "/v1/tasks/alpha-only", "admin")
    assert admin[0] == 200


async def test_cancel_a_queued_task_it_never_runs(http: aiohttp.ClientSession,
                                                  server: Server) -> None:
    await submit(http, server, {}, task_id="doomed", **{"Delay-S": "1"})
    status, body, _ = await call(http, server, "POST", "/v1/tasks/doomed/cancel")
    assert (status, body["state"]) == (200, "CANCELLED")
    await asyncio.sleep(2.0)  # past its delay: the worker sees the message, skips it
    status, body, _ = await call(http, server, "GET", "/v1/tasks/doomed")
    assert body["state"] == "CANCELLED"
    assert runs(server, "doomed") == 0
    status, body, _ = await call(http, server, "POST", "/v1/tasks/doomed/resume")
    assert (status, body["state"]) == (409, "CANCELLED")


async def test_cancel_a_running_task_stops_its_attempt(http: aiohttp.ClientSession,
                                                       server: Server) -> None:
    await submit(http, server, {"sleep_s": 60}, task_id="long")
    await wait_state(http, server, "long", "RUNNING")
    status, body, _ = await call(http, server, "POST", "/v1/tasks/long/cancel")
    assert (status, body["state"]) == (200, "CANCELLED")
    await asyncio.sleep(0.5)
    assert runs(server, "long", "start") == 1 and runs(server, "long", "done") == 0
    assert (await call(http, server, "GET", "/v1/tasks/long"))[1]["state"] == "CANCELLED"


async def test_pause_and_resume_a_task(http: aiohttp.ClientSession, server: Server) -> None:
    await submit(http, server, {}, task_id="held", **{"Delay-S": "0.5"})
    status, body, _ = await call(http, server, "POST", "/v1/tasks/held/pause")
    assert (status, body["state"]) == (200, "PAUSED")
    await asyncio.sleep(1.5)
    assert (await call(http, server, "GET", "/v1/tasks/held"))[1]["state"] == "PAUSED"
    assert runs(server, "held") == 0
    status, body, _ = await call(http, server, "POST", "/v1/tasks/held/resume")
    assert (status, body["state"]) == (200, "QUEUED")
    await wait_state(http, server, "held", "SUCCEEDED", timeout_s=4)
    status, body, _ = await call(http, server, "POST", "/v1/tasks/held/pause")
    assert (status, body["state"]) == (409, "SUCCEEDED")


async def test_pause_and_resume_a_pipeline(http: aiohttp.ClientSession,
                                           server: Server) -> None:
    status, body, _ = await call(http, server, "POST", "/v1/pipelines/gw-a/pause")
    assert (status, body) == (200, {"name": "gw-a", "paused": True})
    try:
        assert (await submit(http, server, {}, task_id="waits"))[0] == 202  # still accepted
        await asyncio.sleep(1.0)
        assert (await call(http, server, "GET", "/v1/tasks/waits"))[1]["state"] == "QUEUED"
        listed = (await call(http, server, "GET", "/v1/pipelines"))[1]["pipelines"]
        assert listed[0]["paused"] is True
        assert listed[0]["counts"]["QUEUED"] >= 1  # tasks per state
    finally:
        status, body, _ = await call(http, server, "POST", "/v1/pipelines/gw-a/resume")
    assert body == {"name": "gw-a", "paused": False}
    await wait_state(http, server, "waits", "SUCCEEDED")


async def test_trigger_alias_path(http: aiohttp.ClientSession, server: Server) -> None:
    status, body, _ = await call(http, server, "POST", "/hooks/alpha", headers={
        **JSON, "Task-Id": "via-alias"}, data="{}")
    assert (status, body["pipeline"]) == (202, "gw-a")
    await wait_state(http, server, "via-alias", "SUCCEEDED")


async def test_any_content_type_is_kept(http: aiohttp.ClientSession, server: Server) -> None:
    status, _, _ = await call(http, server, "POST", "/v1/pipelines/gw-b/tasks", "beta",
                              headers={"Content-Type": "text/plain", "Task-Id": "text-1"},
                              data="hello")
    assert status == 202


async def test_bad_input(http: aiohttp.ClientSession, server: Server) -> None:
    def problem(result: tuple[int, Any, Any], status: int) -> dict[str, Any]:
        code, body, headers = result
        assert code == status, body
        assert headers["Content-Type"].startswith("application/problem+json")
        assert body["status"] == status and body["detail"]
        return dict(body)

    big = b"x" * (1024 * 1024 + 1)
    problem(await call(http, server, "POST", "/v1/pipelines/gw-a/tasks",
                       headers={"Content-Type": "application/octet-stream"}, data=big), 413)
    bad = problem(await call(http, server, "POST", "/v1/pipelines/gw-a/tasks", headers=JSON,
                             data="{not json"), 400)
    assert "not valid JSON" in bad["detail"]
    problem(await submit(http, server, {}, pipeline="nope"), 404)
    problem(await submit(http, server, {}, task_id="has space"), 400)
    problem(await submit(http, server, {}, **{"Delay-S": "soon"}), 400)
    problem(await submit(http, server, {}, **{"Delay-S": "-1"}), 400)
    problem(await call(http, server, "GET", "/v1/tasks?limit=0"), 400)
    problem(await call(http, server, "GET", "/v1/tasks?state=DONE"), 400)
    async with http.get(server.url + "/v1/tasks") as resp:  # no key
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.get(server.url + "/v1/tasks",
                        headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401


async def test_list_is_newest_first_and_paginates(http: aiohttp.ClientSession,
                                                  server: Server) -> None:
    for i in range(5):
        await submit(http, server, {}, task_id=f"page-{i}", pipeline="gw-b", who="beta")
    _, body, _ = await call(http, server, "GET", "/v1/tasks?pipeline=gw-b&limit=2", "beta")
    first = [t["task_id"] for t in body["tasks"]]
    assert first == ["page-4", "page-3"]
    cursor = body["next_cursor"]
    _, body, _ = await call(http, server, "GET",
                            f"/v1/tasks?pipeline=gw-b&limit=2&cursor={cursor}", "beta")
    assert [t["task_id"] for t in body["tasks"]] == ["page-2", "page-1"]


async def test_cursor_has_one_form(http: aiohttp.ClientSession, server: Server) -> None:
    for cursor in ("abc", "", "-1", "1.5", "%20" + "7", "1" * 19, "\u0661"):
        status, body, _ = await call(http, server, "GET", f"/v1/tasks?cursor={cursor}")
        assert status == 400, (cursor, body)
        assert body["detail"].startswith("query cursor: expected the next_cursor")
    status, body, _ = await call(http, server, "GET", "/v1/tasks?cursor=" + "9" * 18)
    assert status == 200 and isinstance(body["tasks"], list)


async def test_task_routes_allow_exactly_their_methods(http: aiohttp.ClientSession,
                                                       server: Server) -> None:
    for action in ("cancel", "pause", "resume"):
        for method in ("OPTIONS", "GET", "PUT"):
            status, body, headers = await call(http, server, method, f"/v1/tasks/x/{action}")
            assert (status, headers["Allow"]) == (405, "POST"), (method, action, body)
            assert body["type"].endswith("/method-not-allowed")
    status, _, headers = await call(http, server, "OPTIONS", "/v1/tasks/x")
    assert (status, headers["Allow"]) == (405, "GET, HEAD")


async def test_a_task_id_with_a_slash_travels_encoded(http: aiohttp.ClientSession,
                                                      server: Server) -> None:
    status, body, _ = await submit(http, server, {}, task_id="orders/42",
                                   **{"Delay-S": "60"})
    assert status == 202 and body["status_url"] == "/v1/tasks/orders%2F42?pipeline=gw-a"
    status, body, _ = await call(http, server, "GET", body["status_url"])
    assert (status, body["task_id"]) == (200, "orders/42")
    status, body, _ = await call(http, server, "POST", "/v1/tasks/orders%2F42/cancel")
    assert (status, body["task_id"], body["state"]) == (200, "orders/42", "CANCELLED")


async def test_bearer_scheme_is_case_insensitive(http: aiohttp.ClientSession,
                                                 server: Server) -> None:
    for scheme in ("bearer", "BEARER", "Bearer"):
        async with http.get(server.url + "/v1/pipelines",
                            headers={"Authorization": f"{scheme} {KEYS['alpha']}"}) as resp:
            assert resp.status == 200, scheme
    for value in ("Basic " + KEYS["alpha"], "bearer", "Bearer ", KEYS["alpha"]):
        async with http.get(server.url + "/v1/pipelines",
                            headers={"Authorization": value}) as resp:
            assert resp.status == 401, value


async def test_health_ready_metrics(http: aiohttp.ClientSession, server: Server) -> None:
    async with http.get(server.url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(server.url + "/readyz") as resp:
        assert resp.status == 200 and (await resp.json()) == {"status": "ready"}
    assert (await call(http, server, "GET", "/metrics", "alpha"))[0] == 403
    status, text, _ = await call(http, server, "GET", "/metrics", "admin")
    assert status == 200
    assert 'sluice_submits_total{pipeline="gw-a",status="accepted"}' in text
    assert 'sluice_submits_total{pipeline="gw-a",status="duplicate"}' in text
    assert 'sluice_tasks{pipeline="gw-a",state="SUCCEEDED"}' in text
    assert 'sluice_handler_duration_seconds_bucket{le="0.005",outcome="success",' \
           'pipeline="gw-a"}' in text
    assert 'sluice_queue_depth{pipeline="gw-a"}' in text


async def test_store_unavailable_is_503_and_nothing_half_written(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    with running_server(tmp_path, "--no-workers", SLUICE_SQLITE_BUSY_TIMEOUT_MS="200") as srv:
        await submit(http, srv, {}, task_id="warm")  # the database exists
        locker = sqlite3.connect(srv.data_dir / "sluice.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            status, body, headers = await submit(http, srv, {}, task_id="blocked")
            assert status == 503, body
            assert headers["Retry-After"] == "1"
            assert "nothing was submitted" in body["detail"]
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert (await call(http, srv, "GET", "/v1/tasks/blocked"))[0] == 404
        assert (await submit(http, srv, {}, task_id="blocked"))[0] == 202  # the retry works


def test_refuses_non_loopback_without_auth(tmp_path: Path) -> None:
    result = subprocess.run(
        [*sluice_cmd(), "serve", str(ROOT / "pipelines" / "quickstart.yaml"), "--host",
         "0.0.0.0", "--data-dir", str(tmp_path / "d")], cwd=ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "refusing to serve on 0.0.0.0 without --auth-file" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_over_http(server: Server) -> None:
    env = subprocess_env(SLUICE_URL=server.url, SLUICE_TOKEN=KEYS["alpha"])

    def sluice(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)

    ok = sluice("submit", "gw-a", "--data", '{"sleep_s": 0.1}', "--task-id", "from-cli")
    assert (ok.returncode, ok.stdout.strip()) == (0, "from-cli")
    dup = sluice("submit", "gw-a", "--data", "{}", "--task-id", "from-cli")
    assert dup.returncode == 2 and "already used" in dup.stderr
    deadline = time.monotonic() + 15
    while True:
        got = sluice("tasks", "get", "from-cli", "--json")
        if json.loads(got.stdout)["state"] == "SUCCEEDED" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert json.loads(got.stdout)["state"] == "SUCCEEDED"
    listed = sluice("tasks", "list", "--pipeline", "gw-a", "--json", "--limit", "1000")
    assert "from-cli" in [json.loads(line)["task_id"] for line in listed.stdout.splitlines()]
    sluice("submit", "gw-a", "--data", "{}", "--task-id", "cli-later", "--delay-s", "30")
    cancelled = sluice("tasks", "cancel", "cli-later")
    assert (cancelled.returncode, cancelled.stdout.strip()) == (0, "cli-later: CANCELLED")
    again = sluice("tasks", "cancel", "cli-later")
    assert again.returncode == 2 and "HTTP 409" in again.stderr
    assert sluice("pipelines", "pause", "gw-b").returncode == 2  # beta's: a 404 for alpha
    missing = sluice("tasks", "get", "nope")
    assert missing.returncode == 2 and "HTTP 404" in missing.stderr
