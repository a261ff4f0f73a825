"""Pipelines defined at runtime (issue 17 item 2) over real HTTP, on the embedded store
(SQLite) and on PostgreSQL: ``sluice serve`` in this process (:func:`sluice.gateway.server.
serve`) with no pipeline files, functions served by local aiohttp servers that count every
call per task id.

- Under load: an update of ``consumer.concurrency``, then of the handler's URL (to a second
  function), mid-stream: every task succeeds, each called exactly once across both functions.
- DELETE mid-stream: what is in flight finishes, nothing new is fetched, the tasks are kept
  (readable through the task API) and a later PUT runs them.
- The API's answers: a bad body (problem+json with key paths), a tenant's key (its own tenant,
  restricted by the network policy), a file's name (409), the trigger alias of a definition.
- Two servers on one PostgreSQL store: a PUT on one is run by the other's workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sluice.config.load import load_pipeline, parse_pipeline
from sluice.datadir import QueuedMessage
from sluice.gateway.auth import KeyRing
from sluice.gateway.server import serve
from sluice.intake import submit
from sluice.netpolicy import NetworkPolicy
from sluice.stores import open_store
from sluice.tasks.state import TaskState
from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers.postgres import fresh_url
from tests.helpers.server import KEYS, free_port, write_keys

YAML = {"Content-Type": "application/yaml"}


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'sluice.db'}"
        return
    with fresh_url() as url:
        yield url


@dataclass
class Function:
    """A local HTTP function: counts each call per task id (``ce-id``)."""

    delay_s: tuple[float, float] = (0.002, 0.02)
    calls: Counter[str] = field(default_factory=Counter)
    started: dict[str, float] = field(default_factory=dict)  # task id -> first call's start
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        task_id = request.headers["ce-id"]
        self.calls[task_id] += 1
        self.started.setdefault(task_id, time.monotonic())
        await request.read()
        await asyncio.sleep(random.uniform(*self.delay_s))
        return web.json_response({"ok": task_id})


@contextlib.asynccontextmanager
async def function(delay_s: tuple[float, float] = (0.002, 0.02)) -> AsyncIterator[Function]:
    fn = Function(delay_s)
    app = web.Application()
    app.router.add_post("/fn", fn.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fn.url = f"http://127.0.0.1:{port}/fn"
    try:
        yield fn
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def server(tmp_path: Path, store_url: str | None, *files: Path,
                 keys: KeyRing | None = None, workers: bool = True,
                 network: NetworkPolicy | None = None, watch: bool = False,
                 ) -> AsyncIterator[str]:
    """``sluice serve FILES`` in this process; its base URL."""
    port = free_port()
    stop = asyncio.Event()
    configs = [load_pipeline(f) for f in files]
    serving = asyncio.create_task(serve(
        configs, tmp_path / "data", host="127.0.0.1", port=port, keys=keys, workers=workers,
        max_body_bytes=1 << 20, stop=stop, store_url=store_url, network=network,
        watch=files if watch else ()))
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 20
        while True:
            if serving.done():
                serving.result()  # raise its error
            try:
                async with http.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            await asyncio.sleep(0.05)
    try:
        yield url
    finally:
        stop.set()
        await serving


def pipeline(name: str, url: str, concurrency: int = 4, extra: str = "") -> str:
    return f"""name: {name}
source: {{embedded: {{queue: {name}, lease_s: 30, poll_interval_s: 0.01}}}}
handler: {{http: {{url: "{url}"}}}}
consumer: {{concurrency: {concurrency}, timeout_s: 10, retry: {{max_attempts: 1}}}}
{extra}"""


async def put(http: aiohttp.ClientSession, base: str, name: str, text: str,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with http.put(f"{base}/v1/pipelines/{name}", data=text.encode(),
                        headers={**YAML, **(headers or {})}) as resp:
        return resp.status, await resp.json(content_type=None)


async def submit_all(http: aiohttp.ClientSession, base: str, name: str, ids: list[str],
                     rate_per_s: float) -> None:
    """Submit one task per id at a steady rate (batches every 50 ms)."""
    per_tick = max(1, round(rate_per_s * 0.05))
    start = time.monotonic()
    for n, i in enumerate(range(0, len(ids), per_tick)):
        batch = ids[i:i + per_tick]

        async def one(task_id: str) -> None:
            async with http.post(f"{base}/v1/pipelines/{name}/tasks", json={"id": task_id},
                                 headers={"Task-Id": task_id}) as resp:
                assert resp.status == 202, await resp.text()

        await asyncio.gather(*(one(t) for t in batch))
        await asyncio.sleep(max(0.0, start + (n + 1) * 0.05 - time.monotonic()))


async def states(store_url: str, pipeline: str) -> Counter[str]:
    counts = await open_store(store_url).tasks.counts()
    return Counter({state: n for (p, state), n in counts.items() if p == pipeline})


async def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


# -- under load ------------------------------------------------------------------------------

def test_updates_under_load_lose_nothing_and_run_nothing_twice(store_url: str,
                                                               tmp_path: Path) -> None:
    """2,000 tasks at 500/s; mid-stream, concurrency 4 -> 8, then the handler's URL moves to a
    second function: every task succeeded, each called exactly once across both."""
    total = 2000

    async def main() -> None:
        async with function() as first, function() as second, \
                server(tmp_path, store_url) as base, aiohttp.ClientSession() as http:
            assert (await put(http, base, "load", pipeline("load", first.url)))[0] == 201
            ids = [f"t{i:05d}" for i in range(total)]
            submitting = asyncio.create_task(submit_all(http, base, "load", ids, 500))
            await asyncio.sleep(1.3)
            status, body = await put(http, base, "load", pipeline("load", first.url, 8))
            assert status == 200 and body["version"] == 2, body
            await asyncio.sleep(1.3)
            status, body = await put(http, base, "load", pipeline("load", second.url, 8))
            assert status == 200 and body["version"] == 3, body
            await submitting

            async def all_done() -> bool:
                return (await states(store_url, "load"))[str(TaskState.SUCCEEDED)] == total

            await wait_for(all_done, 60, "every task to succeed")
            calls = first.calls + second.calls
            assert set(calls) == set(ids)  # 0 lost
            assert [t for t, n in calls.items() if n != 1] == []  # 0 run twice
            assert second.calls and first.calls  # both functions took part
            assert not set(first.calls) & set(second.calls)
            async with http.get(f"{base}/v1/pipelines/load",
                                headers={"Accept": "application/json"}) as resp:
                now = await resp.json()
            assert now["version"] == 3 and second.url in now["body"]

    asyncio.run(main())


def test_delete_mid_stream_finishes_in_flight_keeps_tasks_and_a_put_resumes(
        store_url: str, tmp_path: Path) -> None:
    total = 60

    async def main() -> None:
        async with function((0.3, 0.3)) as fn, server(tmp_path, store_url) as base, \
                aiohttp.ClientSession() as http:
            assert (await put(http, base, "slow", pipeline("slow", fn.url)))[0] == 201
            ids = [f"s{i:03d}" for i in range(total)]
            await submit_all(http, base, "slow", ids, 2000)
            while sum(fn.calls.values()) < 6:  # some done, some in flight
                await asyncio.sleep(0.02)
            async with http.delete(f"{base}/v1/pipelines/slow") as resp:
                assert resp.status == 204
            deleted_at = time.monotonic()
            await asyncio.sleep(1.0)  # the in-flight calls (0.3 s) are over
            called = set(fn.calls)
            late = [t for t, at in fn.started.items() if at > deleted_at + 0.1]
            assert late == []  # nothing new fetched after the delete
            counts = await states(store_url, "slow")
            assert counts[str(TaskState.SUCCEEDED)] == len(called)  # in flight: finished
            assert counts[str(TaskState.QUEUED)] == total - len(called)  # kept
            assert counts[str(TaskState.RUNNING)] == 0
            waiting = next(t for t in ids if t not in called)
            async with http.get(f"{base}/v1/tasks/{waiting}?pipeline=slow") as resp:
                assert resp.status == 200  # still readable
                assert (await resp.json())["state"] == "QUEUED"
            async with http.post(f"{base}/v1/pipelines/slow/tasks", json={}) as resp:
                assert resp.status == 404  # no longer served
            async with http.get(f"{base}/v1/pipelines/slow") as resp:
                assert resp.status == 404
            await asyncio.sleep(0.5)
            assert set(fn.calls) == called

            status, body = await put(http, base, "slow", pipeline("slow", fn.url, 30))
            assert status == 201 and body["version"] == 3

            async def all_done() -> bool:
                return (await states(store_url, "slow"))[str(TaskState.SUCCEEDED)] == total

            await wait_for(all_done, 30, "the kept tasks to run")
            assert set(fn.calls) == set(ids)
            assert [t for t, n in fn.calls.items() if n != 1] == []

    asyncio.run(main())


# -- the API's answers -----------------------------------------------------------------------

FILE_PIPELINE = """name: from-file
tenant: alpha
source: {embedded: {queue: from-file}}
handler: {http: {url: "http://127.0.0.1:9/fn"}}
"""


def test_bad_bodies_file_names_and_aliases(tmp_path: Path) -> None:
    file = tmp_path / "from-file.yaml"
    file.write_text(FILE_PIPELINE)

    async def main() -> None:
        async with function() as fn, server(tmp_path, None, file) as base, \
                aiohttp.ClientSession() as http:
            bad = pipeline("bad", fn.url).replace("concurrency: 4", "concurrency: lots")
            status, body = await put(http, base, "bad", bad)
            assert status == 422, body
            (error,) = body["errors"]
            assert error["path"] == "consumer.concurrency"
            assert (error["line"], error["file"]) == (4, "store:bad")
            assert error["col"] > 1 and error["message"]
            status, body = await put(http, base, "bad", "name: bad\nsource: {embedded: {}}\n"
                                     "handler: {http: {url: 3}}\n")
            assert status == 422 and "handler.http.url" in {e["path"] for e in body["errors"]}
            status, body = await put(http, base, "other", pipeline("bad", fn.url))
            assert status == 422 and body["errors"][0]["path"] == "name"
            async with http.put(f"{base}/v1/pipelines/bad", data=b"x",
                                headers={"Content-Type": "text/plain"}) as resp:
                assert resp.status == 415
                assert resp.content_type == "application/problem+json"
            # A file's pipeline: not replaced nor deleted; GET gives the file.
            status, body = await put(http, base, "from-file", pipeline("from-file", fn.url))
            assert status == 409, body
            async with http.delete(f"{base}/v1/pipelines/from-file") as resp:
                assert resp.status == 409
            async with http.get(f"{base}/v1/pipelines/from-file",
                                headers={"Accept": "application/json"}) as resp:
                got = await resp.json()
            assert (got["from"], got["body"]) == ("file", FILE_PIPELINE)
            # A JSON body without a name gets the URL's; its trigger alias submits.
            async with http.put(f"{base}/v1/pipelines/hooked", json={
                    "source": {"embedded": {"queue": "hooked", "poll_interval_s": 0.01}},
                    "handler": {"http": {"url": fn.url}},
                    "trigger": {"http": {"path": "/hooks/hooked"}}}) as resp:
                assert resp.status == 201, await resp.text()
                assert (await resp.json())["format"] == "json"
            async with http.get(f"{base}/v1/pipelines/hooked") as resp:
                assert resp.content_type == "application/yaml"
                assert '"name": "hooked"' in await resp.text()
            async with http.post(f"{base}/hooks/hooked", json={"a": 1},
                                 headers={"Task-Id": "via-alias"}) as resp:
                assert resp.status == 202, await resp.text()
            status, body = await put(http, base, "clash", pipeline(
                "clash", fn.url, extra="trigger: {http: {path: /hooks/hooked}}\n"))
            assert status == 409, body
            for _ in range(100):
                if fn.calls["via-alias"]:
                    break
                await asyncio.sleep(0.05)
            assert fn.calls["via-alias"] == 1
            async with http.post(f"{base}/hooks/nothing", json={}) as resp:
                assert resp.status == 404
            # A definition whose handler's code is missing on this worker: stored (the code
            # may be on other workers), logged and skipped here; the others run on.
            status, body = await put(http, base, "ghost", 'name: ghost\nsource: {embedded: '
                                     '{queue: ghost}}\nhandler: {python: "no_such_mod:fn"}\n')
            assert status == 201, body
            async with http.post(f"{base}/hooks/hooked", json={},
                                 headers={"Task-Id": "after-ghost"}) as resp:
                assert resp.status == 202
            for _ in range(100):
                if fn.calls["after-ghost"]:
                    break
                await asyncio.sleep(0.05)
            assert fn.calls["after-ghost"] == 1

    asyncio.run(main())


def test_a_tenants_key_puts_its_own_restricted_pipelines(tmp_path: Path) -> None:
    keys = KeyRing.load(write_keys(tmp_path / "keys.yaml"))

    def auth(who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[who]}"}

    async def main() -> None:
        async with function() as fn, aiohttp.ClientSession() as http:
            async with server(tmp_path, None, keys=keys) as base:
                # The function is on loopback: refused to a tenant without --allow-network.
                status, body = await put(http, base, "mine", pipeline("mine", fn.url),
                                         auth("alpha"))
                assert status == 422, body
                assert {e["path"] for e in body["errors"]} == {"handler.http.url"}
                status, body = await put(http, base, "mine", pipeline(
                    "mine", fn.url).replace("handler: {http:", "handler: {python: x}\n#"),
                    auth("alpha"))
                assert status == 422 and body["errors"][0]["path"].startswith("handler")
                # An admin's pipeline is the operator's own: not restricted.
                status, body = await put(http, base, "ops", pipeline("ops", fn.url),
                                         auth("admin"))
                assert status == 201 and not body["restricted"], body
            async with server(tmp_path, None, keys=keys,
                              network=NetworkPolicy.parse(["127.0.0.1/32"])) as base:
                status, body = await put(http, base, "mine", pipeline(
                    "mine", fn.url, extra="tenant: beta\n"), auth("alpha"))
                assert status == 403 and body["errors"][0]["path"] == "tenant"
                status, body = await put(http, base, "mine", pipeline("mine", fn.url),
                                         auth("alpha"))
                assert status == 201, body
                assert (body["tenant"], body["put_by"], body["restricted"]) == (
                    "alpha", "alpha", True)
                # Another tenant: the name is taken, the definition is not its to see.
                status, body = await put(http, base, "mine", pipeline("mine", fn.url),
                                         auth("beta"))
                assert status == 409, body
                async with http.get(f"{base}/v1/pipelines/mine", headers=auth("beta")) as r:
                    assert r.status == 404
                async with http.delete(f"{base}/v1/pipelines/mine", headers=auth("beta")) as r:
                    assert r.status == 404
                async with http.get(f"{base}/v1/pipelines/ops", headers=auth("alpha")) as r:
                    assert r.status == 404
                # It runs (its tenant's task), under the policy.
                async with http.post(f"{base}/v1/pipelines/mine/tasks", json={},
                                     headers={**auth("alpha"), "Task-Id": "a1"}) as r:
                    assert r.status == 202, await r.text()
                for _ in range(100):
                    if fn.calls["a1"]:
                        break
                    await asyncio.sleep(0.05)
                assert fn.calls["a1"] == 1
                async with http.delete(f"{base}/v1/pipelines/mine", headers=auth("alpha")) as r:
                    assert r.status == 204
                async with http.get(f"{base}/v1/tasks/a1", headers=auth("alpha")) as r:
                    assert r.status == 200  # a deleted pipeline's tasks stay readable
                async with http.get(f"{base}/v1/tasks/a1", headers=auth("beta")) as r:
                    assert r.status == 404  # ... by their tenant only

    asyncio.run(main())


# -- one store, two servers ------------------------------------------------------------------

def test_a_put_on_one_server_is_run_by_another_of_the_store(tmp_path: Path) -> None:
    """A ``sluice serve`` process with no files runs the definition put on another server (this
    process's, without workers) of the same PostgreSQL store, within a couple of seconds."""
    with fresh_url() as url:
        port = free_port()
        worker = subprocess.Popen(
            [*sluice_cmd(), "serve", "--port", str(port), "--store", url, "--log-level",
             "warning"], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        try:
            async def main() -> float:
                async with function() as fn, aiohttp.ClientSession() as http:
                    deadline = time.monotonic() + 30
                    while True:  # the other server is up
                        with contextlib.suppress(aiohttp.ClientError):
                            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                                if resp.status == 200:
                                    break
                        assert worker.poll() is None and time.monotonic() < deadline
                        await asyncio.sleep(0.1)
                    async with server(tmp_path, url, workers=False) as base:
                        status, body = await put(http, base, "shared",
                                                 pipeline("shared", fn.url))
                        assert status == 201, body
                        put_at = time.monotonic()
                        async with http.post(f"{base}/v1/pipelines/shared/tasks", json={},
                                             headers={"Task-Id": "x1"}) as resp:
                            assert resp.status == 202, await resp.text()
                        while not fn.calls["x1"]:
                            assert time.monotonic() - put_at < 5, "not run by the other"
                            await asyncio.sleep(0.02)
                        took = time.monotonic() - put_at
                        # ... and an update reaches it too.
                        status, body = await put(http, base, "shared",
                                                 pipeline("shared", fn.url, 2))
                        assert status == 200 and body["version"] == 2
                        async with http.post(f"{base}/v1/pipelines/shared/tasks", json={},
                                             headers={"Task-Id": "x2"}) as resp:
                            assert resp.status == 202
                        while not fn.calls["x2"]:
                            assert time.monotonic() - put_at < 10, "x2 not run"
                            await asyncio.sleep(0.02)
                        assert fn.calls == Counter({"x1": 1, "x2": 1})
                        return took

            took = asyncio.run(main())
            assert took < 3.0
        finally:
            worker.terminate()
            try:
                worker.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()


# -- sluice run and serve --watch ------------------------------------------------------------

ECHO = """name: echoed
source: {embedded: {queue: echoed, poll_interval_s: 0.01}}
handler: {python: "tests.helpers.handlers:echo"}
"""


def test_run_without_files_runs_the_stores_definitions(tmp_path: Path) -> None:
    """``sluice run`` with no files runs the store's definitions; a store without any: exit 2
    (nothing to run)."""
    data = tmp_path / "data"
    log = tmp_path / "calls.log"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([*sluice_cmd(), "run", "--data-dir", str(data), "--drain"],
                              cwd=ROOT, env=subprocess_env(SLUICE_TEST_LOG=str(log)),
                              capture_output=True, text=True, timeout=60)

    empty = run()
    assert empty.returncode == 2 and "nothing to run" in empty.stderr, empty

    async def define() -> None:
        store = open_store(None, data)
        await store.definitions.put("echoed", "default", ECHO, "yaml", put_by="admin",
                                    restricted=False)
        config = parse_pipeline(ECHO, "store:echoed")
        await submit(store, config, [QueuedMessage(f"e{i}", b"{}") for i in range(3)])
        await store.close()

    asyncio.run(define())
    done = run()
    assert done.returncode == 0, done.stderr
    assert sorted(line.split()[1] for line in log.read_text().splitlines()) == [
        "e0", "e1", "e2"]


def test_serve_watch_swaps_a_changed_file(tmp_path: Path) -> None:
    """``serve --watch``: a saved file that loads is applied (its loop swapped: the tasks go to
    the new handler URL), one that does not load leaves the pipeline as it was."""
    file = tmp_path / "watched.yaml"

    async def main() -> None:
        async with function() as first, function() as second, aiohttp.ClientSession() as http:
            file.write_text(pipeline("watched", first.url))
            async with server(tmp_path, None, file, watch=True) as base:

                async def one(task_id: str, fn: Function) -> None:
                    async with http.post(f"{base}/v1/pipelines/watched/tasks", json={},
                                         headers={"Task-Id": task_id}) as resp:
                        assert resp.status == 202
                    deadline = time.monotonic() + 10
                    while not fn.calls[task_id]:
                        assert time.monotonic() < deadline, f"{task_id} not run"
                        await asyncio.sleep(0.02)

                await one("w1", first)
                await asyncio.sleep(0.5)  # the watcher is set up
                file.write_text(pipeline("watched", second.url))
                deadline = time.monotonic() + 10
                n = 0
                while not second.calls:
                    assert time.monotonic() < deadline, "the change was not applied"
                    n += 1
                    async with http.post(f"{base}/v1/pipelines/watched/tasks", json={},
                                         headers={"Task-Id": f"w2-{n}"}) as resp:
                        assert resp.status == 202
                    await asyncio.sleep(0.2)
                file.write_text("name: watched\nsource: {embedded: {}}\nhandler: 3\n")
                await asyncio.sleep(1.5)  # logged, not applied
                await one("w3", second)
                calls = first.calls + second.calls
                assert [t for t, c in calls.items() if c != 1] == []

    asyncio.run(main())


# -- the supervisor's rules ------------------------------------------------------------------

def test_a_file_wins_and_a_late_worker_hears_of_deletes(store_url: str, tmp_path: Path) -> None:
    """A worker with a file of a definition's name runs the file (definitions invariant 4);
    a worker that starts after a delete knows the deleted pipeline's tenant (its tasks stay
    readable) and runs nothing of it."""
    from sluice.gateway.app import Gateway
    from sluice.supervisor import FILE, STORE, Supervisor

    file = tmp_path / "x.yaml"
    file.write_text(pipeline("x", "http://127.0.0.1:9/from-file"))

    async def main() -> None:
        store = open_store(store_url, tmp_path / "data")
        defs = store.definitions
        await defs.put("x", "default", pipeline("x", "http://127.0.0.1:9/from-store"), "yaml",
                       put_by="admin", restricted=False)
        await defs.put("y", "acme", pipeline("y", "http://127.0.0.1:9/y"), "yaml",
                       put_by="acme", restricted=True)
        await defs.put("z", "default", pipeline("z", "http://127.0.0.1:9/z"), "yaml",
                       put_by="admin", restricted=False)
        await defs.delete("y")
        gateway = Gateway(pipelines={}, state=store)
        supervisor = Supervisor(store, tmp_path / "data", store_url=store_url,
                                gateway=gateway, workers=False)
        await supervisor.start([load_pipeline(file)])
        try:
            assert supervisor.origin("x") == FILE and supervisor.origin("z") == STORE
            assert "from-file" in str(gateway.pipelines["x"].handler.config)
            assert sorted(gateway.pipelines) == sorted(gateway.loops) == ["x", "z"]
            assert gateway.retired == {"y": "acme"}
            await defs.delete("z")
            await supervisor.sync()
            await supervisor.settled()
            assert sorted(gateway.pipelines) == ["x"] and gateway.retired["z"] == "default"
        finally:
            stop = asyncio.Event()
            stop.set()
            await supervisor.run(stop)
            await store.close()

    asyncio.run(main())
