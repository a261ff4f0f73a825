"""N machines, one PostgreSQL store: workers and gateways as separate processes, each with a
data directory of its own (as on separate machines), sharing only the store's URL.

- a Kafka worker killed mid-run: the worker that takes its partitions finds the finished tasks
  finished (0 run again), loses nothing, and runs again only what was in flight at the kill;
- a 1,000-way ``Task-Id`` race over two gateway processes: exactly one 202;
- a cancel through gateway A stops the attempt running on worker B within a second;
- PostgreSQL stopped for 10 s mid-run: gateways answer 503 with Retry-After meanwhile, workers
  wait, and everything accepted runs exactly once after it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from sluice import stores
from sluice.stores import open_store
from sluice.stores.postgres import PostgresStore
from sluice.tasks.state import TaskState
from sluice.tasks.store import TaskStore
from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers import kafka as kt
from tests.helpers.handlers import read_log
from tests.helpers.postgres import pg_url  # noqa: F401  (a fixture)
from tests.helpers.server import Server, running_server
from tests.helpers.waiting import wait_until

EMBEDDED = """
name: jobs
source: {{embedded: {{queue: jobs, lease_s: 10}}}}
handler: {{python: "tests.helpers.handlers:{handler}"}}
consumer: {{concurrency: 8}}
"""

KAFKA = """
name: jobs
source:
  kafka: {{brokers: "{brokers}", topic: {topic}, group: {topic}, session_timeout_ms: 6000,
          commit_interval_ms: 5000}}
handler: {{python: "tests.helpers.handlers:behave"}}
consumer: {{concurrency: 4}}
"""


def worker(pipeline: Path, data_dir: Path, url: str, run_log: str,
           log_level: str = "warning") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*sluice_cmd(), "run", str(pipeline), "--data-dir", str(data_dir), "--store", url,
         "--log-level", log_level],
        cwd=ROOT, env=subprocess_env(SLUICE_TEST_LOG=run_log),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> str:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        _, errs = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return errs.decode(errors="replace")


@contextlib.contextmanager
def task_store(url: str) -> Iterator[TaskStore]:
    store = open_store(url)
    try:
        yield store.tasks
    finally:
        assert isinstance(store, PostgresStore)
        store.db.terminate()
        stores.forget(url)


@contextlib.contextmanager
def gateway(tmp: Path, pipeline: Path, url: str, *extra: str) -> Iterator[Server]:
    tmp.mkdir(parents=True, exist_ok=True)
    with running_server(tmp, "--store", url, *extra, files=(pipeline,), auth=False) as server:
        yield server


def runs(run_log: str, event: str = "done") -> Counter[str]:
    return Counter(e[1] for e in read_log(run_log) if e[0] == event)


async def test_a_partition_moved_to_another_machine_finds_its_finished_tasks_finished(
        tmp_path: Path, pg_url: str, run_log: str) -> None:  # noqa: F811
    kt.require_broker()
    topic = kt.new_topic(6, "sluice-scale")
    try:
        pipeline = tmp_path / "jobs.yaml"
        pipeline.write_text(KAFKA.format(brokers=kt.BROKERS, topic=topic))
        sent = [f"t{i:04d}" for i in range(3000)]  # each worker alone: about 15 s
        kt.produce(topic, [kt.Out({"sleep_s": 0.02}, t, f"k{i % 60}")
                           for i, t in enumerate(sent)])
        first = worker(pipeline, tmp_path / "machine-a", pg_url, run_log)
        second = worker(pipeline, tmp_path / "machine-b", pg_url, run_log, "info")
        try:
            # Both run (their group is settled) and a third of the work is done ...
            await wait_until(lambda: len({e[3] for e in read_log(run_log)}) == 2
                             and len(runs(run_log)) >= 500, timeout_s=90)
            stop(first, signal.SIGKILL)  # ... with finished tasks whose offsets are unknown
            killed_at = read_log(run_log)
            with task_store(pg_url) as store:
                recorded = {r.task_id for r in await store.stats("jobs")
                            if r.state == TaskState.SUCCEEDED}
            await wait_until(lambda: set(runs(run_log)) == set(sent), timeout_s=120)
        finally:
            stop(first, signal.SIGKILL)
            errs = stop(second)
        assert second.returncode == 0, errs
    finally:
        kt.delete_topics(topic)
    # The partitions it took over held messages finished on the other machine whose offsets
    # were not committed yet (every 5 s): it acknowledged them without running them.
    skipped = re.search(r"(\d+) skipped as already done", errs)
    assert skipped is not None and int(skipped.group(1)) > 0, errs
    # Finished: its end recorded in the store (a handler that returned before the kill, whose
    # end was not written yet, was still in flight).
    finished_by_a = {e[1] for e in killed_at
                     if e[0] == "done" and e[3] == first.pid and e[1] in recorded}
    started_by_a = {e[1] for e in killed_at if e[0] == "start" and e[3] == first.pid}
    in_flight = started_by_a - finished_by_a
    done = runs(run_log)
    assert finished_by_a, "the first worker finished nothing before the kill"
    run_twice = {t for t, n in done.items() if n > 1}
    assert not run_twice & finished_by_a, "a finished task ran again on the other machine"
    assert run_twice <= in_flight
    with task_store(pg_url) as store:
        states = Counter(str(r.state) for r in await store.stats("jobs"))
    assert states == {"SUCCEEDED": len(sent)}


async def test_the_task_id_dedup_holds_across_gateways(tmp_path: Path,
                                                       pg_url: str) -> None:  # noqa: F811
    pipeline = tmp_path / "jobs.yaml"
    pipeline.write_text(EMBEDDED.format(handler="echo"))
    with gateway(tmp_path / "a", pipeline, pg_url, "--no-workers") as a, \
            gateway(tmp_path / "b", pipeline, pg_url, "--no-workers") as b:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as http:
            async def post(server: Server, n: int) -> int:
                async with http.post(f"{server.url}/v1/pipelines/jobs/tasks",
                                     json={"n": n}, headers={"Task-Id": "once"}) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(post(a if n % 2 else b, n) for n in range(1000)))
    assert Counter(statuses) == {202: 1, 409: 999}
    with task_store(pg_url) as store:
        (record,) = await store.find("once")
    assert record.state == TaskState.QUEUED


async def test_a_cancel_through_one_gateway_stops_the_attempt_on_another_machine(
        tmp_path: Path, pg_url: str, run_log: str) -> None:  # noqa: F811
    pipeline = tmp_path / "jobs.yaml"
    pipeline.write_text(EMBEDDED.format(handler="until_cancelled"))
    remote = worker(pipeline, tmp_path / "machine-b", pg_url, run_log)
    try:
        with gateway(tmp_path / "machine-a", pipeline, pg_url, "--no-workers") as a:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{a.url}/v1/pipelines/jobs/tasks", json={"sleep_s": 60},
                                     headers={"Task-Id": "long"}) as resp:
                    assert resp.status == 202, await resp.text()
                await wait_until(lambda: runs(run_log, "start") == {"long": 1}, timeout_s=30)
                started = time.monotonic()
                async with http.post(f"{a.url}/v1/tasks/long/cancel") as resp:
                    assert resp.status == 200, await resp.text()
                await wait_until(lambda: runs(run_log, "cancelled") == {"long": 1},
                                 timeout_s=5)
                stopped_after_s = time.monotonic() - started
                async with http.get(f"{a.url}/v1/tasks/long") as resp:
                    body: dict[str, Any] = await resp.json()
    finally:
        errs = stop(remote)
    assert remote.returncode == 0, errs
    assert stopped_after_s < 1.0, f"the attempt stopped {stopped_after_s:.2f}s after the cancel"
    assert body["state"] == "CANCELLED"
    assert runs(run_log) == {}


def services(action: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "services"), action, "postgres"], check=True,
                   capture_output=True, timeout=120)


async def test_a_postgres_restart_mid_run_loses_and_repeats_nothing(
        tmp_path: Path, pg_url: str, run_log: str) -> None:  # noqa: F811
    pipeline = tmp_path / "jobs.yaml"
    pipeline.write_text(EMBEDDED.format(handler="behave"))
    workers = [worker(pipeline, tmp_path / f"machine-{m}", pg_url, run_log) for m in "bc"]
    accepted: list[str] = []
    refused: list[tuple[int, str | None]] = []
    try:
        with gateway(tmp_path / "machine-a", pipeline, pg_url, "--no-workers") as a:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                async def submit(n: int) -> None:
                    task_id = f"t{n:04d}"
                    async with http.post(f"{a.url}/v1/pipelines/jobs/tasks",
                                         json={"sleep_s": 0.05},
                                         headers={"Task-Id": task_id}) as resp:
                        await resp.read()
                        if resp.status == 202:
                            accepted.append(task_id)
                        else:
                            refused.append((resp.status, resp.headers.get("Retry-After")))

                async def submit_for(duration_s: float, start: int) -> int:
                    n = start
                    until = time.monotonic() + duration_s
                    while time.monotonic() < until:
                        await asyncio.gather(*(submit(n + i) for i in range(10)))
                        n += 10
                        await asyncio.sleep(0.05)
                    return n

                n = await submit_for(3.0, 0)
                await asyncio.to_thread(services, "stop")
                try:
                    n = await submit_for(10.0, n)  # all refused: the store is down
                finally:
                    await asyncio.to_thread(services, "start")
                await submit_for(3.0, n)
        await wait_until(lambda: set(runs(run_log)) >= set(accepted), timeout_s=120)
    finally:
        errs = [stop(w) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errs
    assert refused, "no submit met the outage"
    assert {status for status, _ in refused} == {503}
    assert all(after is not None and int(after) >= 1 for _, after in refused)
    done = runs(run_log)
    assert set(done) == set(accepted)
    assert max(done.values()) == 1, [t for t, c in done.items() if c > 1]
    with task_store(pg_url) as store:
        states = Counter(str(r.state) for r in await store.stats("jobs"))
    assert states == {"SUCCEEDED": len(accepted)}


async def test_a_backlog_is_shared_by_workers_that_join_later(
        tmp_path: Path, pg_url: str, run_log: str) -> None:  # noqa: F811
    """A worker holds 100 of a shared queue by default (not 1,000): one that joins while the
    first is busy gets work at once instead of after the first ran the whole backlog."""
    pipeline = tmp_path / "jobs.yaml"
    pipeline.write_text(EMBEDDED.format(handler="until_cancelled"))
    with gateway(tmp_path / "g", pipeline, pg_url, "--no-workers") as g:
        async with aiohttp.ClientSession() as http:
            for n in range(300):
                async with http.post(f"{g.url}/v1/pipelines/jobs/tasks", json={"sleep_s": 0.5},
                                     headers={"Task-Id": f"t{n:03d}"}) as resp:
                    assert resp.status == 202
    first = worker(pipeline, tmp_path / "machine-a", pg_url, run_log)
    second = None
    try:
        await wait_until(lambda: len(runs(run_log, "start")) >= 8, timeout_s=30)
        second = worker(pipeline, tmp_path / "machine-b", pg_url, run_log)
        await wait_until(lambda: any(e[3] == second.pid for e in read_log(run_log)),
                         timeout_s=30)
        by_first = sum(1 for e in read_log(run_log) if e[0] == "done" and e[3] == first.pid)
    finally:
        stop(first)
        if second is not None:
            stop(second)
    assert by_first < 100, f"the second worker got work only after {by_first} tasks"


async def test_a_pause_through_one_gateway_stops_workers_on_another_machine_at_once(
        tmp_path: Path, pg_url: str, run_log: str) -> None:  # noqa: F811
    pipeline = tmp_path / "jobs.yaml"
    pipeline.write_text(EMBEDDED.format(handler="echo"))
    remote = worker(pipeline, tmp_path / "machine-b", pg_url, run_log)
    try:
        with gateway(tmp_path / "machine-a", pipeline, pg_url, "--no-workers") as a:
            async with aiohttp.ClientSession() as http:
                async def submit(task_id: str) -> None:
                    async with http.post(f"{a.url}/v1/pipelines/jobs/tasks", json={},
                                         headers={"Task-Id": task_id}) as resp:
                        assert resp.status == 202, await resp.text()

                await submit("before")
                await wait_until(lambda: runs(run_log) == {"before": 1}, timeout_s=30)
                await asyncio.sleep(1.0)  # the worker listens, and looks at the store rarely
                async with http.post(f"{a.url}/v1/pipelines/jobs/pause") as resp:
                    assert resp.status == 200, await resp.text()
                await asyncio.sleep(0.5)
                await submit("while-paused")
                await asyncio.sleep(2.0)
                held = runs(run_log)
                async with http.post(f"{a.url}/v1/pipelines/jobs/resume") as resp:
                    assert resp.status == 200, await resp.text()
                resumed = time.monotonic()
                await wait_until(lambda: "while-paused" in runs(run_log), timeout_s=10)
                resumed_after_s = time.monotonic() - resumed
    finally:
        errs = stop(remote)
    assert remote.returncode == 0, errs
    assert held == {"before": 1}, "a task ran while its pipeline was paused"
    assert resumed_after_s < 1.0, f"the worker resumed {resumed_after_s:.2f}s after the resume"
