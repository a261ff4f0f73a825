"""A hosting pipeline (one with ``tenancy``) behind a real `sluice serve` over real HTTP, on a
SQLite store: a function's submit puts its tenant and function in the message headers and on
the task record; a tenant's key sees only its own tasks; the quotas answer 429 with
Retry-After; a pinned function's submit goes to its dedicated queue; a bad function name is a
400; and `sluice tenants` / `sluice submit --function` on the command line.

The server runs without workers (--no-workers): the tasks stay QUEUED, so the messages table
shows where each went and max_queued counts them all."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers.server import GW, KEYS, Server, running_server

JSON = {"Content-Type": "application/json"}

HOST_YAML = """\
name: host
tenant: alpha
source: {embedded: {queue: host, lease_s: 2, poll_interval_s: 0.01}}
handler: {python: tests.helpers.handlers:behave}
consumer: {concurrency: 8, timeout_s: 60}
tenancy:
  tenants:
    - {name: ratey, submit_rate_per_s: 0.01, submit_burst: 2}
    - {name: capped, max_queued: 3}
"""


@pytest.fixture(scope="module")
def host_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("host") / "host.yaml"
    path.write_text(HOST_YAML)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, host_file: Path) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("tgw"), "--no-workers",
                        files=(host_file, GW / "a.yaml", GW / "b.yaml")) as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(http: aiohttp.ClientSession, server: Server, method: str, path: str,
               who: str = "alpha", **kwargs: Any) -> tuple[int, Any, Any]:
    headers = {**server.headers(who), **kwargs.pop("headers", {})}
    async with http.request(method, server.url + path, headers=headers, **kwargs) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text.startswith("{") else text), resp.headers


async def submit(http: aiohttp.ClientSession, server: Server, function: str | None = None,
                 who: str = "alpha", pipeline: str = "host", payload: Any = None,
                 **headers: str) -> tuple[int, Any, Any]:
    path = (f"/v1/pipelines/{pipeline}/tasks" if function is None
            else f"/v1/pipelines/{pipeline}/functions/{function}/tasks")
    return await call(http, server, "POST", path, who, headers={**JSON, **headers},
                      data=json.dumps(payload or {}))


def message(server: Server, task_id: str) -> tuple[str, dict[str, str]]:
    """The queue and headers of a task's message in the store."""
    with sqlite3.connect(server.data_dir / "sluice.db") as db:
        queue, headers = db.execute("SELECT queue, headers FROM messages WHERE task_id = ?",
                                    (task_id,)).fetchone()
    return str(queue), json.loads(headers)


def problem(result: tuple[int, Any, Any], status: int) -> dict[str, Any]:
    code, body, headers = result
    assert code == status, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["status"] == status and body["detail"]
    return dict(body)


async def test_function_submit_puts_tenant_and_function_on_message_and_record(
        http: aiohttp.ClientSession, server: Server) -> None:
    status, body, headers = await submit(http, server, "resize", **{"Task-Id": "fn-1"})
    assert status == 202
    assert body == {"task_id": "fn-1", "pipeline": "host", "state": "QUEUED",
                    "status_url": "/v1/tasks/fn-1?pipeline=host", "tenant": "alpha",
                    "function": "resize"}
    assert headers["Location"] == body["status_url"]
    assert message(server, "fn-1") == ("host", {"sluice-tenant": "alpha",
                                                "sluice-function": "resize"})
    record = (await call(http, server, "GET", "/v1/tasks/fn-1"))[1]
    assert (record["tenant"], record["state"]) == ("alpha", "QUEUED")
    # The pipeline's own submit URL: the function "default", for the key's tenant.
    status, body, _ = await submit(http, server, who="beta", **{"Task-Id": "fn-2"})
    assert (status, body["tenant"], body["function"]) == (202, "beta", "default")
    assert message(server, "fn-2")[1] == {"sluice-tenant": "beta", "sluice-function": "default"}
    assert (await call(http, server, "GET", "/v1/tasks/fn-2", "beta"))[1]["tenant"] == "beta"
    # An admin names the tenant in the Tenant header, else it is the pipeline's.
    status, body, _ = await submit(http, server, "resize", "admin", Tenant="gamma")
    assert (status, body["tenant"]) == (202, "gamma")
    status, body, _ = await submit(http, server, "resize", "admin")
    assert (status, body["tenant"]) == (202, "alpha")
    # A tenant's key submits for its own tenant only.
    refused = problem(await submit(http, server, "resize", "beta", Tenant="alpha"), 403)
    assert "'beta'" in refused["detail"]
    assert (await submit(http, server, "resize", "beta", Tenant="beta"))[0] == 202
    problem(await submit(http, server, "resize", "admin", Tenant="Not A Tenant"), 400)


async def test_a_tenant_key_sees_only_its_own_tasks_of_a_hosting_pipeline(
        http: aiohttp.ClientSession, server: Server) -> None:
    assert (await submit(http, server, "resize", "alpha", **{"Task-Id": "a-own"}))[0] == 202
    assert (await submit(http, server, "resize", "beta", **{"Task-Id": "b-own"}))[0] == 202
    theirs = problem(await call(http, server, "GET", "/v1/tasks/a-own", "beta"), 404)
    missing = problem(await call(http, server, "GET", "/v1/tasks/no-such-one", "beta"), 404)
    assert theirs["detail"] == missing["detail"].replace("no-such-one", "a-own")
    for action in ("cancel", "pause", "resume"):
        problem(await call(http, server, "POST", f"/v1/tasks/a-own/{action}", "beta"), 404)
    listed = (await call(http, server, "GET", "/v1/tasks?pipeline=host&limit=1000", "beta"))[1]
    assert {t["tenant"] for t in listed["tasks"]} == {"beta"}
    assert "b-own" in {t["task_id"] for t in listed["tasks"]}
    paged = (await call(http, server, "GET", "/v1/tasks?limit=1", "beta"))[1]
    assert len(paged["tasks"]) == 1 and paged["tasks"][0]["tenant"] == "beta"
    everything = (await call(http, server, "GET", "/v1/tasks?limit=1000", "alpha"))[1]["tasks"]
    assert all(t["tenant"] == "alpha" for t in everything)
    assert {"a-own", "fn-1"} <= {t["task_id"] for t in everything}
    # The task id is taken in the pipeline, but its state is not the other tenant's to see.
    dup = problem(await submit(http, server, "resize", "beta", **{"Task-Id": "a-own"}), 409)
    assert dup["state"] == "UNKNOWN"
    assert problem(await submit(http, server, "resize", "alpha", **{"Task-Id": "a-own"}),
                   409)["state"] == "QUEUED"
    status, body, _ = await call(http, server, "POST", "/v1/tasks/b-own/pause", "beta")
    assert (status, body["state"]) == (200, "PAUSED")
    assert (await call(http, server, "GET", "/v1/tasks/a-own", "admin"))[0] == 200
    # Every key sees the hosting pipeline, without the other tenants' counts.
    pipelines = (await call(http, server, "GET", "/v1/pipelines", "beta"))[1]["pipelines"]
    host = next(p for p in pipelines if p["name"] == "host")
    assert host["counts"] == {}
    assert {p["name"] for p in pipelines} == {"host", "gw-b"}
    admin = (await call(http, server, "GET", "/v1/pipelines", "admin"))[1]["pipelines"]
    assert next(p for p in admin if p["name"] == "host")["counts"]["QUEUED"] >= 2
    # Only an admin pauses the whole of it.
    problem(await call(http, server, "POST", "/v1/pipelines/host/pause", "beta"), 403)
    for action in ("pause", "resume"):
        assert (await call(http, server, "POST", f"/v1/pipelines/host/{action}", "admin"))[0] \
            == 200


async def test_submit_rate_beyond_the_burst_is_429_with_retry_after(
        http: aiohttp.ClientSession, server: Server) -> None:
    for _ in range(2):  # the burst
        assert (await submit(http, server, "resize", "admin", Tenant="ratey"))[0] == 202
    result = await submit(http, server, "resize", "admin", Tenant="ratey")
    body = problem(result, 429)
    assert int(result[2]["Retry-After"]) >= 1
    assert "'ratey'" in body["detail"] and "submit_rate_per_s" in body["detail"]
    assert (body["tenant"], body["limit"]) == ("ratey", "submit_rate_per_s")
    # The pipeline's own URL takes the same quota; another tenant is not held.
    problem(await submit(http, server, who="admin", Tenant="ratey"), 429)
    assert (await submit(http, server, "resize", "admin", Tenant="other"))[0] == 202


async def test_max_queued_is_429_with_retry_after(http: aiohttp.ClientSession,
                                                  server: Server) -> None:
    for i in range(3):
        assert (await submit(http, server, f"f{i}", "admin", Tenant="capped"))[0] == 202
    result = await submit(http, server, "f9", "admin", Tenant="capped")
    body = problem(result, 429)
    assert result[2]["Retry-After"] == "1"
    assert "'capped' has 3 tasks waiting" in body["detail"] and "max_queued" in body["detail"]
    assert body["limit"] == "max_queued"
    # A cancelled task no longer waits: within a second's refresh there is room again.
    listed = (await call(http, server, "GET", "/v1/tasks?pipeline=host&limit=1000",
                         "admin"))[1]["tasks"]
    one = next(t["task_id"] for t in listed if t["tenant"] == "capped")
    assert (await call(http, server, "POST", f"/v1/tasks/{one}/cancel", "admin"))[0] == 200
    for _ in range(40):
        status = (await submit(http, server, "f9", "admin", Tenant="capped"))[0]
        if status == 202:
            break
        await asyncio.sleep(0.1)
    assert status == 202


async def test_pin_dedicated_then_a_submit_goes_to_the_dedicated_queue(
        http: aiohttp.ClientSession, server: Server) -> None:
    status, route, _ = await call(http, server, "POST", "/v1/tenants/alpha/functions/thumbs/pin",
                                  json={"tier": "dedicated"})
    assert status == 200, route
    assert (route["tier"], route["pinned"]) == ("dedicated", True)
    assert route["queue"] == "host.fn.alpha.thumbs"
    assert (await submit(http, server, "thumbs", **{"Task-Id": "to-dedicated"}))[0] == 202
    assert message(server, "to-dedicated")[0] == "host.fn.alpha.thumbs"
    assert (await submit(http, server, "thumbs", "beta", **{"Task-Id": "b-thumbs"}))[0] == 202
    assert message(server, "b-thumbs")[0] == "host"  # beta's thumbs: another function
    status, body, _ = await call(http, server, "GET", "/v1/tenants/alpha/functions")
    assert status == 200 and body["tenant"] == "alpha"
    rows = {r["function"]: r for r in body["functions"]}
    assert (rows["thumbs"]["tier"], rows["thumbs"]["pinned"]) == ("dedicated", True)
    events = (await call(http, server, "GET", "/v1/tenants/alpha/events?pipeline=host"))[1]
    assert events["events"][0]["function"] == "thumbs"
    assert events["events"][0]["action"] == "pinned"
    # Another tenant's view is a 404; an admin sees any; bad input is a 400.
    problem(await call(http, server, "GET", "/v1/tenants/alpha/functions", "beta"), 404)
    problem(await call(http, server, "POST", "/v1/tenants/alpha/functions/thumbs/pin", "beta",
                       json={"tier": "shared"}), 404)
    problem(await call(http, server, "GET", "/v1/tenants/alpha/events", "beta"), 404)
    assert (await call(http, server, "GET", "/v1/tenants/beta/functions", "admin"))[0] == 200
    bad = problem(await call(http, server, "POST", "/v1/tenants/alpha/functions/thumbs/pin",
                             json={"tier": "gold"}), 400)
    assert "tier" in bad["detail"]
    problem(await call(http, server, "POST", "/v1/tenants/alpha/functions/thumbs/pin",
                       data="{nope", headers=JSON), 400)
    problem(await call(http, server, "POST", "/v1/tenants/alpha/functions/thumbs/pin",
                       json={"tier": "shared", "pipeline": "gw-a"}), 404)
    problem(await call(http, server, "GET", "/v1/tenants/alpha/functions?pipeline=nope"), 404)
    # Back to the shared queue: the waiting task moves with it.
    status, route, _ = await call(http, server, "POST", "/v1/tenants/alpha/functions/thumbs/pin",
                                  json={"tier": "shared", "pipeline": "host"})
    assert (status, route["tier"], route["queue"]) == (200, "shared", None)
    assert message(server, "to-dedicated")[0] == "host"
    # The move is a note on the task's timeline.
    timeline = (await call(http, server, "GET", "/v1/tasks/to-dedicated"))[1]["timeline"]
    notes = [e["note"] for e in timeline if e["stage"] == "note"]
    assert notes == ["pinned: moved back to the shared queue (pinned shared by hand)"], timeline


async def test_a_bad_function_name_is_400_and_a_plain_pipeline_hosts_none(
        http: aiohttp.ClientSession, server: Server) -> None:
    bad = problem(await submit(http, server, "no%20spaces"), 400)
    assert "'no spaces'" in bad["detail"]
    problem(await submit(http, server, "-leading-dash"), 400)
    problem(await submit(http, server, "x" * 64), 400)
    plain = problem(await submit(http, server, "resize", pipeline="gw-a"), 404)
    assert "hosts no functions" in plain["detail"]
    hidden = problem(await submit(http, server, "resize", "beta", pipeline="gw-a"), 404)
    assert hidden["detail"] == "no pipeline named 'gw-a'"  # another tenant's: as if missing
    # A plain pipeline's submit is as it was: no tenant or function in the answer.
    status, body, _ = await submit(http, server, pipeline="gw-a")
    assert status == 202 and set(body) == {"task_id", "pipeline", "state", "status_url"}


def sluice(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)


def test_cli_tenants_and_submit_function(server: Server, host_file: Path) -> None:
    remote = ("--url", server.url, "--token", KEYS["admin"])
    done = sluice("submit", "host", "--function", "crop", "--tenant", "delta", "--data", "{}",
                  "--task-id", "cli-crop", *remote)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cli-crop"
    assert message(server, "cli-crop") == ("host", {"sluice-tenant": "delta",
                                                    "sluice-function": "crop"})
    pinned = sluice("tenants", "pin", "delta", "crop", "--tier", "dedicated", *remote)
    assert pinned.returncode == 0, pinned.stderr
    assert "delta/crop: dedicated (queue host.fn.delta.crop), pinned" in pinned.stdout
    assert "1 waiting tasks moved" in pinned.stdout
    shown = sluice("tenants", "delta", *remote)
    assert shown.returncode == 0, shown.stderr
    header = shown.stdout.splitlines()[1]
    for column in ("function", "tier", "backlog", "in flight", "limit", "error share", "p99",
                   "reason"):
        assert column in header
    line = next(row for row in shown.stdout.splitlines() if " crop " in row)
    assert "dedicated (pinned)" in line  # the reason column wraps on a narrow terminal
    as_json = json.loads(sluice("tenants", "show", "delta", "--json", *remote).stdout)
    assert [r["function"] for r in as_json["functions"]] == ["crop"]
    assert as_json["functions"][0]["reason"] == "pinned dedicated by hand"
    events = sluice("tenants", "events", "delta", *remote)
    assert events.returncode == 0 and "pinned" in events.stdout and "crop" in events.stdout
    # Locally: the pipeline file and the store the server uses.
    local = ("-f", str(host_file), "--data-dir", str(server.data_dir))
    shown = sluice("tenants", "delta", "--json", *local)
    assert shown.returncode == 0, shown.stderr
    rows = {r["function"]: r for r in json.loads(shown.stdout)["functions"]}
    assert set(rows) == {"crop"}  # delta's only (others' backlogs are theirs)
    row = rows["crop"]
    assert (row["function"], row["tier"], row["pinned"]) == ("crop", "dedicated", True)
    assert row["backlog"] == 1 and row["in_flight"] is None  # no worker to ask locally
    shown = sluice("tenants", "delta", *local)
    assert shown.returncode == 0, shown.stderr
    line = next(row for row in shown.stdout.splitlines() if " crop " in row)
    assert "dedicated (pinned)" in line and " 1 " in line
    back = sluice("tenants", "pin", "delta", "crop", "--tier", "auto", "--json", *local)
    assert back.returncode == 0, back.stderr
    assert (json.loads(back.stdout)["tier"], json.loads(back.stdout)["pinned"]) == (
        "dedicated", False)
    done = sluice("submit", "host", "--function", "crop", "--tenant", "delta", "--data", "{}",
                  "--task-id", "cli-local", *local)
    assert done.returncode == 0, done.stderr
    assert message(server, "cli-local") == ("host.fn.delta.crop", {
        "sluice-tenant": "delta", "sluice-function": "crop"})
    # A tenant's token shows only its own tenant; a plain pipeline takes no function.
    theirs = sluice("tenants", "delta", "--url", server.url, "--token", KEYS["beta"])
    assert theirs.returncode == 2 and "no tenant named 'delta'" in theirs.stderr
    plain = sluice("submit", "gw-a", "--function", "crop", "--data", "{}", "-f",
                   str(GW / "a.yaml"), "--data-dir", str(server.data_dir))
    assert plain.returncode == 2 and "hosts no functions" in plain.stderr
    plain = sluice("submit", "gw-a", "--tenant", "beta", "--data", "{}", *remote)
    assert plain.returncode == 2 and "hosts no functions" in plain.stderr
    bad = sluice("submit", "host", "--function", "bad name", "--data", "{}", *local)
    assert bad.returncode == 2 and "--function" in bad.stderr
    assert sluice("tenants", "alpha", "-f", str(GW / "a.yaml")).returncode == 2


async def test_dead_letters_of_a_hosting_pipeline_are_each_tenants_own(
        http: aiohttp.ClientSession, tmp_path: Path, host_file: Path) -> None:
    with running_server(tmp_path, files=(host_file,)) as srv:
        for who in ("alpha", "beta"):
            status, _, _ = await submit(http, srv, "resize", who, payload={"reject": "no"},
                                        **{"Task-Id": f"dl-{who}"})
            assert status == 202
        for who in ("alpha", "beta"):
            for _ in range(200):
                state = (await call(http, srv, "GET", f"/v1/tasks/dl-{who}", who))[1]["state"]
                if state == "FAILED":
                    break
                await asyncio.sleep(0.05)
            assert state == "FAILED"
        mine = (await call(http, srv, "GET", "/v1/pipelines/host/dead-letters", "beta"))[1]
        assert [d["task_id"] for d in mine["items"]] == ["dl-beta"]
        every = (await call(http, srv, "GET", "/v1/pipelines/host/dead-letters", "admin"))[1]
        assert {d["task_id"] for d in every["items"]} == {"dl-alpha", "dl-beta"}
        status, body, _ = await call(http, srv, "POST", "/v1/pipelines/host/dead-letters/replay",
                                     "beta", json={"task_ids": ["dl-alpha", "dl-beta"]})
        assert status == 200
        assert body["items"] == [
            {"task_id": "dl-alpha", "replay_id": None,
             "skipped": "no dead letter with this task id"},
            {"task_id": "dl-beta", "replay_id": "dl-beta.replay-1", "skipped": None}]
        replayed = (await call(http, srv, "GET", "/v1/tasks/dl-beta.replay-1", "beta"))[1]
        assert replayed["tenant"] == "beta"  # a replay keeps its tenant
        status, body, _ = await call(http, srv, "POST", "/v1/pipelines/host/dead-letters/replay",
                                     "alpha", json={"all": True})
        assert (status, [i["task_id"] for i in body["items"]]) == (200, ["dl-alpha"])
