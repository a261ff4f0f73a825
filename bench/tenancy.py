"""Benchmark: a noisy function on a hosting pipeline. Writes bench/results/tenancy.json and
bench/results/tenancy.png (each tenant's p99 over time, both runs).

The scenario (the defaults; ``--quick`` shortens it for a smoke run):

- A function server (bench/tenancy_functions.py, an aiohttp process of its own on 127.0.0.1)
  answers every function after 20 ms.
- 20 tenants (t00..t19) each submit a steady 20 tasks/s of their own function (fn00..fn19):
  open loop, evenly paced (one request every 2.5 ms in all, each tenant every 50 ms), each a
  real HTTP request to ``sluice serve`` on 127.0.0.1 (an aiohttp client in this process), from
  t=0 to t=``--end-s`` (100).
- At t=``--change-s`` (20) tenant t19's function turns slow (2 s a call) and t19 floods
  ``--flood`` (20,000) extra tasks, as fast as the gateway takes them (``--flood-concurrency``
  requests at once; a 429/503 is retried after its Retry-After). At t=``--hang-s`` (40) the
  function hangs (30 s, past the pipeline's timeout_s of 5: every call times out). At
  t=``--recover-s`` (60) it answers in 20 ms again, so its backlog drains and its dedicated
  queue can be reclaimed. After ``--end-s`` the bench waits up to ``--drain-s`` (25) for every
  task to end (and, with tenancy, for the reclaim), then reads the task store.

Two runs, each with a fresh data directory (the embedded SQLite store), its own ``sluice
serve`` process (gateway and worker in one process, ``--log-format json``) and its own
function server:

- ``tenancy``: the hosting pipeline (``tenancy:`` at its defaults but for
  ``isolation.reclaim_after_s``, 15 here against a default of 600, so a reclaim fits in the
  run); tasks are submitted to ``/v1/pipelines/hosting/functions/{function}/tasks`` with the
  tenant in a ``Tenant`` header (no keys file: every caller is admin); the HTTP handler's URL
  is ``http://127.0.0.1:PORT/fn/{tenant}/{function}``.
- ``plain``: the same load on a one-queue FIFO pipeline without ``tenancy`` (tenancy off),
  submitted to ``/v1/pipelines/plain/tasks``; the handler's URL is ``.../fn/any`` and the
  function server reads the tenant and function from the task's JSON body (every task's body
  is ``{"tenant", "function", "n"}`` in both runs; in the tenancy run the server checks that
  the body and the URL's placeholders agree).

Both: ``consumer: {concurrency: 256, timeout_s: 5}``, everything else at its defaults (retry
3 attempts, ordering key, prefetch 1,000, ...).

Measured (from the task store, read while the server still runs, at the end of the drain):

- each task's latency: ``finished_at - received_at`` (the gateway's receipt to the recorded
  end, successes and failures alike); a task not finished by then counts with the time it
  had waited so far (a lower bound: ``unfinished`` says how many).
- the quiet tenants' (t00..t18) p50/p99 of their tasks submitted in [5 s, change) ("before")
  and in [change, end) ("after"), the ratio after/before (target, with tenancy: <= 1.2), and
  the same per phase (slow, hang, recovered) and per tenant (the worst one).
- the noisy tenant's completions per 5 s (by finished_at; succeeded and failed): it must
  keep progressing.
- the route changes (the store's ``route_events``): the first ``isolated`` of t19, seconds
  after the change (target: <= 30), its reason, the tasks it moved; the ``reclaimed`` event;
  any change of another tenant's function (a quiet tenant isolated is a false positive).
- CPU: the sluice process, the function server and this process (the load), each as % of
  one core per 5 s and on average over the load; the machine's busy share; ``uptime`` at the
  start and end of each run (others' work on the machine shows in every number).
- the submits: answers by status, the submit call p99 per phase, how late the open-loop
  schedule sent (a late send is the client's or the machine's lag, not sluice's latency).
- the sluice process's log: lines per level, the distinct warnings and errors (digits
  normalised) with counts and a first example, and every line about routes.

Targets are reported, not asserted. The whole invocation takes about 5 minutes (``--quick``:
about 2). Every child process is stopped at the end, on error too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from sluice.cli_common import run_async
from sluice.tasks.summary import percentile

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "tenancy.json"
MODES = ("tenancy", "plain")
NOISY_INDEX = -1  # the last tenant is the noisy one
BUCKET_S = 5.0
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "FILTERED")
LOG_TAIL = 3000

TENANCY_YAML = """name: hosting
source: {{embedded: {{queue: hosting}}}}
handler: {{http: {{url: "http://127.0.0.1:{port}/fn/{{tenant}}/{{function}}"}}}}
consumer: {{concurrency: {concurrency}, timeout_s: {timeout_s:g}}}
tenancy:
  isolation: {{reclaim_after_s: {reclaim_after_s:g}}}
{function_concurrency}"""
PLAIN_YAML = """name: plain
source: {{embedded: {{queue: plain}}}}
handler: {{http: {{url: "http://127.0.0.1:{port}/fn/any"}}}}
consumer: {{concurrency: {concurrency}, timeout_s: {timeout_s:g}}}
"""


@dataclass(frozen=True)
class Scenario:
    tenants: int = 20
    rate_per_s: float = 20.0  # per tenant
    change_s: float = 20.0  # the noisy function slows; the flood starts
    hang_s: float = 40.0  # it hangs past timeout_s
    recover_s: float = 60.0  # 20 ms again
    end_s: float = 100.0  # the steady load stops
    drain_s: float = 25.0  # the most to wait after end_s
    before_from_s: float = 5.0  # the "before" window: [before_from_s, change_s)
    flood: int = 20_000
    flood_concurrency: int = 16
    fast_ms: float = 20.0
    slow_ms: float = 2000.0
    hang_ms: float = 30_000.0
    concurrency: int = 256
    timeout_s: float = 5.0
    reclaim_after_s: float = 15.0
    submit_connections: int = 256  # the steady load's client connection pool
    function_max: int = 0  # tenancy.function_concurrency's max (0: the default, 256)

    @property
    def noisy(self) -> str:
        return tenant_name(self.tenants - 1)


QUICK = Scenario(change_s=10.0, hang_s=15.0, recover_s=20.0, end_s=35.0, drain_s=12.0,
                 flood=2_000, reclaim_after_s=5.0)


def tenant_name(index: int) -> str:
    return f"t{index:02d}"


def function_name(tenant: str) -> str:
    return "fn" + tenant[1:]


# --- processes ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SLUICE_STORE", "SLUICE_DATA_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes], grace_s: float) -> int | None:
    """SIGTERM the process group, SIGKILL it after ``grace_s``; its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
    return proc.returncode


def tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-LOG_TAIL:]
    except OSError:
        return "(no log)"


async def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path,
                    timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: the process exited with {proc.returncode}; the end "
                                   f"of its log: {tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up within {timeout_s:g} s: {tail(log)}")
            await asyncio.sleep(0.1)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_s(proc: psutil.Process) -> float:
    """User + system CPU of a process (all its threads) so far (0 once it is gone)."""
    try:
        times = proc.cpu_times()
        return float(times.user + times.system)
    except psutil.Error:
        return 0.0


# --- the load -------------------------------------------------------------------------------

@dataclass
class Sent:
    tenant: str
    kind: str  # "s" (steady) or "f" (flood)
    seq: int
    planned: float  # seconds after t0 (steady: the schedule; flood: when it was taken)
    sent: float = 0.0
    answered: float = 0.0
    status: int = 0  # 0: no answer (a connection error)
    tries: int = 0


@dataclass
class Load:
    scenario: Scenario
    mode: str
    base: str  # the gateway
    fn_base: str  # the function server
    t0: float = 0.0  # time.time() at the start of the load
    sent: list[Sent] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)
    flood_started: float | None = None
    flood_done: float | None = None
    refusals: Counter[int] = field(default_factory=Counter)  # flood: statuses retried

    def now(self) -> float:
        return time.time() - self.t0

    def request(self, tenant: str, task_id: str, seq: int) -> tuple[str, dict[str, str], bytes]:
        fn = function_name(tenant)
        body = json.dumps({"tenant": tenant, "function": fn, "n": seq}).encode()
        headers = {"Content-Type": "application/json", "Task-Id": task_id}
        if self.mode == "tenancy":
            headers["Tenant"] = tenant
            return f"{self.base}/v1/pipelines/hosting/functions/{fn}/tasks", headers, body
        return f"{self.base}/v1/pipelines/plain/tasks", headers, body

    async def submit(self, http: aiohttp.ClientSession, item: Sent) -> None:
        url, headers, body = self.request(item.tenant, task_id(item), item.seq)
        item.tries += 1
        item.sent = self.now()
        try:
            async with http.post(url, data=body, headers=headers) as resp:
                await resp.read()
                item.status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, OSError, TimeoutError):
            item.status, retry_after = 0, None
        item.answered = self.now()
        if item.kind == "f" and item.status in (429, 503, 0):  # the flood insists
            self.refusals[item.status] += 1
            with contextlib.suppress(ValueError):
                await asyncio.sleep(min(float(retry_after or 0.2), 1.0))
            if self.now() < self.scenario.end_s:
                await self.submit(http, item)

    async def steady(self) -> None:
        sc = self.scenario
        total = int(sc.end_s * sc.rate_per_s * sc.tenants)
        gap = 1.0 / (sc.rate_per_s * sc.tenants)
        running: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(limit=sc.submit_connections)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            for i in range(total):
                planned = i * gap
                ahead = self.t0 + planned - time.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
                item = Sent(tenant_name(i % sc.tenants), "s", i // sc.tenants, planned)
                self.sent.append(item)
                task = asyncio.create_task(self.submit(http, item))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)

    async def flood(self) -> None:
        sc = self.scenario
        await self.sleep_until(sc.change_s)
        self.flood_started = self.now()
        items = iter(range(sc.flood))
        connector = aiohttp.TCPConnector(limit=sc.flood_concurrency)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

            async def worker() -> None:
                for seq in items:
                    item = Sent(sc.noisy, "f", seq, self.now())
                    self.sent.append(item)
                    await self.submit(http, item)

            await asyncio.gather(*(worker() for _ in range(sc.flood_concurrency)))
        self.flood_done = self.now()

    async def sleep_until(self, at_s: float) -> None:
        ahead = self.t0 + at_s - time.time()
        if ahead > 0:
            await asyncio.sleep(ahead)

    async def controller(self) -> None:
        sc = self.scenario
        noisy = {"tenant": sc.noisy, "function": function_name(sc.noisy)}
        async with aiohttp.ClientSession() as http:
            for at_s, delay_ms, what in ((sc.change_s, sc.slow_ms, "slow"),
                                         (sc.hang_s, sc.hang_ms, "hang"),
                                         (sc.recover_s, sc.fast_ms, "recovered")):
                await self.sleep_until(at_s)
                async with http.post(f"{self.fn_base}/control",
                                     json={**noisy, "delay_ms": delay_ms}) as resp:
                    resp.raise_for_status()
                self.changes.append({"what": what, "delay_ms": delay_ms,
                                     "at_s": round(self.now(), 3), "planned_s": at_s})


def task_id(item: Sent) -> str:
    return f"{item.tenant}-{item.kind}-{item.seq:06d}"


def parse_task_id(tid: str) -> tuple[str, str, int]:
    tenant, kind, seq = tid.split("-")
    return tenant, kind, int(seq)


# --- sampling -------------------------------------------------------------------------------

@dataclass
class Samples:
    """CPU seconds of each process and the machine's busy share, once a second."""

    procs: dict[str, psutil.Process]
    t0: float
    rows: list[dict[str, float]] = field(default_factory=list)

    def take(self) -> None:
        row = {"t": round(time.time() - self.t0, 2)}
        for name, proc in self.procs.items():
            row[name] = round(cpu_s(proc), 3)
        row["machine_busy_pct"] = psutil.cpu_percent(interval=None)
        row["load_1m"] = round(os.getloadavg()[0], 2)
        self.rows.append(row)

    async def run(self, until: asyncio.Event) -> None:
        psutil.cpu_percent(interval=None)  # start the machine's counter
        while not until.is_set():
            self.take()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), 1.0)
        self.take()

    def summary(self, start_s: float, end_s: float) -> dict[str, Any]:
        """Each process's CPU as % of one core, over [start_s, end_s] and per 5 s bucket."""
        rows = [r for r in self.rows if start_s - 1 <= r["t"] <= end_s + 1]
        out: dict[str, Any] = {}
        if len(rows) < 2:
            return out
        first, last = rows[0], rows[-1]
        span = last["t"] - first["t"]
        for name in self.procs:
            out[f"{name}_cpu_pct_of_one_core"] = round((last[name] - first[name]) / span * 100, 1)
        per_bucket: dict[str, list[float | None]] = {name: [] for name in self.procs}
        per_bucket["machine_busy_pct"] = []
        b = start_s
        while b < end_s:
            inside = [r for r in rows if b <= r["t"] <= b + BUCKET_S]
            for name in self.procs:
                per_bucket[name].append(
                    round((inside[-1][name] - inside[0][name])
                          / (inside[-1]["t"] - inside[0]["t"]) * 100, 1)
                    if len(inside) >= 2 and inside[-1]["t"] > inside[0]["t"] else None)
            busy = [r["machine_busy_pct"] for r in inside[1:]]
            per_bucket["machine_busy_pct"].append(
                round(sum(busy) / len(busy), 1) if busy else None)
            b += BUCKET_S
        out["machine_busy_pct"] = round(
            sum(r["machine_busy_pct"] for r in rows[1:]) / max(len(rows) - 1, 1), 1)
        # What the machine's other processes used (others' tests, say), in % of one core.
        cores = os.cpu_count() or 1
        ours = [sum(p[i] or 0.0 for p in (per_bucket[n] for n in self.procs))
                for i in range(len(per_bucket["machine_busy_pct"]))]
        per_bucket["others_est"] = [
            None if busy is None else round(max(busy * cores - mine, 0.0), 1)
            for busy, mine in zip(per_bucket["machine_busy_pct"], ours, strict=True)]
        out["others_cpu_pct_of_one_core_est"] = round(max(
            out["machine_busy_pct"] * cores
            - sum(out[f"{n}_cpu_pct_of_one_core"] for n in self.procs), 0.0), 1)
        out["per_5s_pct_of_one_core"] = per_bucket
        out["load_1m_max"] = max(r["load_1m"] for r in rows)
        return out


# --- the store ------------------------------------------------------------------------------

def read_store(db: Path, pipeline: str) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]]]:
    """The pipeline's tasks and route events, read-only, beside the running server."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        tasks = conn.execute(
            "SELECT task_id, tenant, state, attempts, received_at, started_at, finished_at,"
            " error_type FROM tasks WHERE pipeline = ?", (pipeline,)).fetchall()
    finally:
        conn.close()
    return tasks, route_events(db, pipeline)


def route_events(db: Path, pipeline: str) -> list[dict[str, Any]]:
    """The pipeline's rows of the store's route_events, oldest first."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'route_events'"
                            ).fetchone():
            return []
        rows = conn.execute("SELECT tenant, function, action, tier, reason, moved, at FROM"
                            " route_events WHERE pipeline = ? ORDER BY id", (pipeline,)
                            ).fetchall()
    finally:
        conn.close()
    return [{"tenant": r[0], "function": r[1], "action": r[2], "tier": r[3], "reason": r[4],
             "moved": r[5], "at": r[6]} for r in rows]


def unfinished(db: Path, pipeline: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        marks = ",".join("?" * len(FINAL))
        row = conn.execute(f"SELECT COUNT(*) FROM tasks WHERE pipeline = ? AND state NOT IN"
                           f" ({marks})", (pipeline, *FINAL)).fetchone()
        return int(row[0])
    finally:
        conn.close()


# --- the log --------------------------------------------------------------------------------

ROUTE_WORDS = re.compile(r"isolat|reclaim|dedicated|route|tenan", re.IGNORECASE)


def read_log(log: Path, t0: float) -> dict[str, Any]:
    """Lines per level; distinct warnings and errors (digits normalised) with a count and the
    first example; every line about routes (at most 40), its time as seconds after t0."""
    levels: Counter[str] = Counter()
    distinct: dict[str, dict[str, Any]] = {}
    infos: dict[str, dict[str, Any]] = {}
    routes: list[str] = []
    other = 0
    for line in log.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
            level, msg, ts = str(doc["level"]), str(doc["msg"]), float(doc["ts"])
            logger = str(doc.get("logger", ""))
        except (ValueError, KeyError, TypeError):
            other += 1  # not a log record (a traceback's lines are inside their record)
            continue
        levels[level] += 1
        stamp = f"t={ts - t0:7.2f} {level} {logger}: {msg}"
        if doc.get("exc"):
            stamp += " | " + str(doc["exc"]).strip().splitlines()[-1]
        if (ROUTE_WORDS.search(msg) or "tenancy" in logger) and len(routes) < 40:
            routes.append(stamp[:400])
        shape = re.sub(r"\d+(\.\d+)?", "N", f"{level} {logger}: {msg}")[:200]
        kind = distinct if level in ("warning", "error", "critical") else infos
        seen = kind.setdefault(shape, {"count": 0, "first": stamp[:600]})
        seen["count"] += 1
    top = sorted(distinct.values(), key=lambda d: -int(d["count"]))[:15]
    top_infos = sorted(infos.values(), key=lambda d: -int(d["count"]))[:8]
    return {"lines_per_level": dict(levels), "non_record_lines": other,
            "warnings_and_errors": top, "distinct_warning_shapes": len(distinct),
            "route_lines": routes, "commonest_other_lines": top_infos}


# --- one run --------------------------------------------------------------------------------

async def run_mode(mode: str, sc: Scenario, work: Path) -> dict[str, Any]:
    rundir = work / mode
    rundir.mkdir()
    fn_port, port = free_port(), free_port()
    fn_log, log = rundir / "functions.log", rundir / "sluice.log"
    pipeline_name = "hosting" if mode == "tenancy" else "plain"
    yaml = (TENANCY_YAML if mode == "tenancy" else PLAIN_YAML).format(
        port=fn_port, concurrency=sc.concurrency, timeout_s=sc.timeout_s,
        reclaim_after_s=sc.reclaim_after_s,
        function_concurrency=(f"  function_concurrency: {{max: {sc.function_max}}}\n"
                              if sc.function_max else ""))
    pipeline = rundir / "pipeline.yaml"
    pipeline.write_text(yaml)
    data_dir = rundir / "data"
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {
        "pipeline_yaml": yaml, "uptime_at_start": uptime(),
        # The tree this run's sluice process imports (others commit to it meanwhile).
        "sluice_commit_at_start": git_commit(),
        "uncommitted_sluice_files_at_start": uncommitted("sluice")}
    try:
        procs.append(spawn([sys.executable, "-m", "bench.tenancy_functions", "--port",
                            str(fn_port)], fn_log))
        fn_base = f"http://127.0.0.1:{fn_port}"
        await wait_http(f"{fn_base}/stats", procs[0], fn_log)
        serve_cmd = [sys.executable, "-m", "sluice.cli", "serve", str(pipeline), "--port",
                     str(port), "--data-dir", str(data_dir), "--log-format", "json",
                     "--log-level", "info"]
        procs.append(spawn(serve_cmd, log))
        base = f"http://127.0.0.1:{port}"
        await wait_http(f"{base}/readyz", procs[1], log)
        result["serve_command"] = " ".join(["sluice", *serve_cmd[3:]])
        load = Load(sc, mode, base, fn_base)
        samples = Samples({"sluice": psutil.Process(procs[1].pid),
                           "functions": psutil.Process(procs[0].pid),
                           "load": psutil.Process()}, 0.0)
        load.t0 = samples.t0 = time.time()
        sampling_done = asyncio.Event()
        sampler = asyncio.create_task(samples.run(sampling_done))
        watcher = asyncio.create_task(watch_routes(data_dir / "sluice.db", pipeline_name, load))
        functions: list[dict[str, Any]] = []
        poller = asyncio.create_task(watch_functions(load, [tenant_name(0), sc.noisy],
                                                     functions)) if mode == "tenancy" else None
        try:
            await asyncio.gather(load.steady(), load.flood(), load.controller())
            load_end = load.now()
            drained = await drain(data_dir / "sluice.db", pipeline_name, load, mode, procs[1])
            snapshot = time.time()
            tasks, events = read_store(data_dir / "sluice.db", pipeline_name)
        finally:
            sampling_done.set()
            await sampler
            for watching in (watcher, poller):
                if watching is not None:
                    watching.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watching
        async with aiohttp.ClientSession() as http, http.get(f"{fn_base}/stats") as resp:
            fn_stats = await resp.json()
        result["uptime_at_end"] = uptime()
        result["serve_exit_code"] = stop(procs[1], 40.0)
        result.update(analyse(sc, mode, load, tasks, events, snapshot, load_end, drained,
                              fn_stats))
        result["cpu"] = samples.summary(0.0, snapshot - load.t0)
        if mode == "tenancy":
            result["function_status_every_2s"] = functions
        result["log"] = read_log(log, load.t0)
        return result
    finally:
        for proc in reversed(procs):
            stop(proc, 40.0)


async def watch_routes(db: Path, pipeline: str, load: Load) -> None:
    """Print each route change as it happens (the store's route_events)."""
    seen = 0
    while True:
        await asyncio.sleep(1.0)
        with contextlib.suppress(sqlite3.Error, OSError):
            events = await asyncio.to_thread(route_events, db, pipeline)
            for e in events[seen:]:
                print(f"  t={e['at'] - load.t0:6.1f}s route: {e['action']} {e['tenant']}/"
                      f"{e['function']} → {e['tier']} ({e['reason']}; moved {e['moved']})",
                      flush=True)
            seen = len(events)


async def watch_functions(load: Load, tenants: list[str], out: list[dict[str, Any]]) -> None:
    """Every 2 s, what ``GET /v1/tenants/{t}/functions`` says of these tenants' functions
    (the route, backlog, the worker's in flight, limit, error share and p99)."""
    keep = ("tier", "backlog", "in_flight", "limit", "error_share", "p99_s", "finished")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            await asyncio.sleep(2.0)
            for tenant in tenants:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                    async with http.get(f"{load.base}/v1/tenants/{tenant}/functions") as resp:
                        if resp.status != 200:
                            continue
                        doc = await resp.json()
                    for row in doc.get("functions", []):
                        out.append({"t": round(load.now(), 1), "tenant": tenant,
                                    "function": row.get("function"),
                                    **{k: row.get(k) for k in keep}})


async def drain(db: Path, pipeline: str, load: Load, mode: str,
                proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Wait until every task has ended (and, with tenancy, the noisy function is reclaimed),
    at most drain_s after the load's end."""
    sc = load.scenario
    deadline = load.t0 + sc.end_s + sc.drain_s
    left = -1
    while time.time() < deadline and proc.poll() is None:
        left = await asyncio.to_thread(unfinished, db, pipeline)
        reclaimed = True
        if mode == "tenancy":
            events = await asyncio.to_thread(route_events, db, pipeline)
            reclaimed = any(e["action"] == "reclaimed" and e["tenant"] == sc.noisy
                            for e in events)
        if left == 0 and reclaimed:
            break
        await asyncio.sleep(1.0)
    if proc.poll() is not None:
        raise RuntimeError(f"sluice serve exited with {proc.returncode} during the run")
    return {"waited_s": round(load.now() - sc.end_s, 1), "unfinished_at_end": left}


# --- analysis -------------------------------------------------------------------------------

def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def quantiles(values: list[float]) -> dict[str, Any]:
    values = sorted(values)
    return {"n": len(values), "p50_ms": ms(percentile(values, 50)),
            "p99_ms": ms(percentile(values, 99)),
            "max_ms": ms(values[-1] if values else None)}


@dataclass(frozen=True)
class Task:
    tenant: str
    kind: str
    submit_s: float  # received_at after t0
    latency_s: float  # finished - received, or (snapshot - received) if unfinished
    finished: bool
    finished_s: float | None
    state: str
    attempts: int
    error_type: str | None


def tasks_of(rows: list[tuple[Any, ...]], t0: float, snapshot: float) -> list[Task]:
    out = []
    for tid, _tenant, state, attempts, received, _started, finished, error_type in rows:
        tenant, kind, _ = parse_task_id(str(tid))
        done = finished is not None and state in FINAL
        end = float(finished) if done else snapshot
        out.append(Task(tenant, kind, float(received) - t0, end - float(received), done,
                        float(finished) - t0 if done else None, str(state), int(attempts),
                        error_type))
    return out


def window(tasks: list[Task], lo: float, hi: float) -> dict[str, Any]:
    inside = [t for t in tasks if lo <= t.submit_s < hi]
    q = quantiles([t.latency_s for t in inside])
    q["unfinished"] = sum(not t.finished for t in inside)
    q["window_s"] = [lo, hi]
    return q


def analyse(sc: Scenario, mode: str, load: Load, rows: list[tuple[Any, ...]],
            events: list[dict[str, Any]], snapshot: float, load_end: float,
            drained: dict[str, Any], fn_stats: dict[str, Any]) -> dict[str, Any]:
    t0 = load.t0
    tasks = tasks_of(rows, t0, snapshot)
    quiet_names = [tenant_name(i) for i in range(sc.tenants - 1)]
    quiet = [t for t in tasks if t.tenant != sc.noisy]
    noisy = [t for t in tasks if t.tenant == sc.noisy]
    before = window(quiet, sc.before_from_s, sc.change_s)
    after = window(quiet, sc.change_s, sc.end_s)
    ratio = (round(after["p99_ms"] / before["p99_ms"], 2)
             if after["p99_ms"] and before["p99_ms"] else None)
    phases = {"slow": window(quiet, sc.change_s, sc.hang_s),
              "hang": window(quiet, sc.hang_s, sc.recover_s),
              "recovered": window(quiet, sc.recover_s, sc.end_s)}
    per_tenant_after = {name: window([t for t in quiet if t.tenant == name], sc.change_s,
                                     sc.end_s)["p99_ms"] for name in quiet_names}
    worst = max(per_tenant_after.items(), key=lambda kv: kv[1] or 0.0)

    # Each tenant's p99 per 5 s bucket of submit time (the plot).
    buckets = [b * BUCKET_S for b in range(int(sc.end_s // BUCKET_S))]
    timeline: dict[str, list[float | None]] = {}
    for index in range(sc.tenants):
        name = tenant_name(index)
        mine = [t for t in tasks if t.tenant == name]
        timeline[name] = [quantiles([t.latency_s for t in mine
                                     if b <= t.submit_s < b + BUCKET_S])["p99_ms"]
                          for b in buckets]

    # The noisy tenant's completions per 5 s (by finished_at).
    end_rel = snapshot - t0
    n_buckets = int(end_rel // BUCKET_S) + 1
    succeeded = [0] * n_buckets
    failed = [0] * n_buckets
    for t in noisy:
        if t.finished_s is not None and t.finished_s >= 0:
            slot = int(t.finished_s // BUCKET_S)
            if t.state == "SUCCEEDED":
                succeeded[slot] += 1
            else:
                failed[slot] += 1
    states = Counter(t.state for t in noisy)
    # Buckets from the change to the load's end outside the hang (when a success is possible):
    # the fewest successes in one of them ("keeps progressing" if > 0).
    progress = [succeeded[int(b // BUCKET_S)]
                for b in buckets if b >= sc.change_s and not sc.hang_s <= b < sc.recover_s
                and int(b // BUCKET_S) < n_buckets]

    rel_events = [{**e, "at_s": round(float(e["at"]) - t0, 2)} for e in events]
    isolated = next((e for e in rel_events if e["action"] == "isolated"
                     and e["tenant"] == sc.noisy), None)
    reclaimed = next((e for e in rel_events if e["action"] == "reclaimed"
                      and e["tenant"] == sc.noisy), None)
    others = [e for e in rel_events if e["tenant"] != sc.noisy]

    steady = [s for s in load.sent if s.kind == "s"]
    flood = [s for s in load.sent if s.kind == "f"]

    def submit_calls(lo: float, hi: float) -> dict[str, Any]:
        calls = sorted(s.answered - s.sent for s in steady if lo <= s.planned < hi)
        late = sorted(s.sent - s.planned for s in steady if lo <= s.planned < hi)
        return {"p99_ms": ms(percentile(calls, 99)), "max_ms": ms(calls[-1] if calls else None),
                "send_late_p99_ms": ms(percentile(late, 99)),
                "send_late_max_ms": ms(late[-1] if late else None)}

    return {
        "tasks_in_store": len(tasks),
        "tasks_submitted": {"steady": len(steady), "flood": len(flood)},
        "submit_statuses": {"steady": dict(Counter(str(s.status) for s in steady)),
                            "flood_final": dict(Counter(str(s.status) for s in flood)),
                            "flood_retried": {str(k): v for k, v in load.refusals.items()}},
        "submit_calls": {"before": submit_calls(sc.before_from_s, sc.change_s),
                         "after": submit_calls(sc.change_s, sc.end_s)},
        "flood_accepted_s": ([round(load.flood_started, 2), round(load.flood_done, 2)]
                             if load.flood_started is not None and load.flood_done is not None
                             else None),
        "function_changes": load.changes,
        "load_end_s": round(load_end, 2),
        "snapshot_s": round(end_rel, 2),
        "drain": drained,
        "quiet": {"before": before, "after": after, "p99_ratio_after_over_before": ratio,
                  "after_per_phase": phases,
                  "worst_tenant_after": {"tenant": worst[0], "p99_ms": worst[1]},
                  "states": dict(Counter(t.state for t in quiet)),
                  "attempts": {str(k): v for k, v in
                               sorted(Counter(t.attempts for t in quiet).items())},
                  "p99_after_per_tenant_ms": per_tenant_after},
        "noisy": {"tenant": sc.noisy, "states": dict(states),
                  "latency_all": quantiles([t.latency_s for t in noisy if t.finished]),
                  "unfinished": sum(not t.finished for t in noisy),
                  "succeeded_per_5s": succeeded, "failed_per_5s": failed,
                  "fewest_successes_in_a_5s_bucket_outside_the_hang": (min(progress)
                                                                       if progress else None),
                  "succeeded_after_change": sum(1 for t in noisy if t.state == "SUCCEEDED"
                                                and (t.finished_s or 0) >= sc.change_s),
                  "error_types": dict(Counter(t.error_type for t in noisy if t.error_type)),
                  "attempts": {str(k): v for k, v in
                               sorted(Counter(t.attempts for t in noisy).items())}},
        "isolation": {
            "isolated_at_s": isolated["at_s"] if isolated else None,
            "isolation_delay_s": round(isolated["at_s"] - sc.change_s, 2) if isolated else None,
            "isolated_reason": isolated["reason"] if isolated else None,
            "isolated_moved": isolated["moved"] if isolated else None,
            "reclaimed_at_s": reclaimed["at_s"] if reclaimed else None,
            "reclaimed_after_recovery_s": (round(reclaimed["at_s"] - sc.recover_s, 2)
                                           if reclaimed else None),
            "reclaimed_before_load_end": (reclaimed["at_s"] < sc.end_s) if reclaimed else None,
            "other_tenants_route_changes": others[:20],
            "route_events": rel_events[:40],
        } if mode == "tenancy" else None,
        "p99_timeline_ms": {"bucket_s": BUCKET_S, "buckets_start_s": buckets,
                            "by_tenant": timeline},
        "function_server": {
            "mismatches": fn_stats.get("mismatches"), "unnamed": fn_stats.get("unnamed"),
            "noisy": {k: v for k, v in fn_stats.get("functions", {}).get(
                f"{sc.noisy}/{function_name(sc.noisy)}", {}).items() if k != "per_second"},
            "quiet_max_in_flight": max((f["max_in_flight"] for k, f in
                                        fn_stats.get("functions", {}).items()
                                        if not k.startswith(sc.noisy)), default=None)},
    }


# --- the plot -------------------------------------------------------------------------------

def plot(runs: dict[str, dict[str, Any]], sc: Scenario, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in MODES if m in runs and "error" not in runs[m]]
    if not shown:
        return
    fig, axes = plt.subplots(len(shown), 1, figsize=(11, 4.2 * len(shown)), sharex=True,
                             sharey=True, squeeze=False)
    for ax, mode in zip(axes[:, 0], shown, strict=True):
        run = runs[mode]
        tl = run["p99_timeline_ms"]
        xs = [b + BUCKET_S / 2 for b in tl["buckets_start_s"]]
        for name, ys in tl["by_tenant"].items():
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if name == sc.noisy:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color="crimson", lw=2.2,
                        drawstyle="steps-mid",
                        label=f"{name} (noisy)", zorder=3)
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color="steelblue", lw=0.7,
                        drawstyle="steps-mid",
                        alpha=0.6, label="quiet tenants" if name == "t00" else None)
        marks = [(sc.change_s, "slow 2 s + flood", "black", "--"),
                 (sc.hang_s, "hangs (timeouts)", "dimgray", ":"),
                 (sc.recover_s, "recovers", "green", ":"),
                 (sc.end_s, "load ends", "gray", "-.")]
        iso = run.get("isolation") or {}
        if iso.get("isolated_at_s") is not None:
            marks.append((iso["isolated_at_s"], "isolated", "darkorange", "-"))
        if iso.get("reclaimed_at_s") is not None:
            marks.append((iso["reclaimed_at_s"], "reclaimed", "purple", "-"))
        for x, label, color, style in marks:
            ax.axvline(x, color=color, ls=style, lw=1.2, label=label)
        ax.set_yscale("log")
        ax.set_ylabel("p99 submit→finish (ms)")
        quiet = run["quiet"]
        ax.set_title(f"{mode}: quiet p99 {quiet['before']['p99_ms']} ms before → "
                     f"{quiet['after']['p99_ms']} ms after "
                     f"({quiet['p99_ratio_after_over_before']}×)", fontsize=10)
        ax.legend(loc="upper left", fontsize=7, ncol=2)
        ax.grid(True, which="both", alpha=0.2)
    axes[-1, 0].set_xlabel(f"submitted at (s, {BUCKET_S:g} s buckets; a task unfinished at "
                           "the end counts with its wait so far)")
    fig.suptitle(f"{sc.tenants} tenants × {sc.rate_per_s:g} tasks/s; at t={sc.change_s:g} s "
                 f"{sc.noisy}'s function slows and it floods {sc.flood:,} tasks", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------

def fmt(value: Any, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(runs: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'run':<8} {'quiet p99 before':>16} {'after':>10} {'ratio':>6} "
          f"{'slow':>9} {'hang':>9} {'recov.':>9} {'unfin.':>6} {'isolated':>9} "
          f"{'reclaimed':>9} {'noisy ok':>8} {'sluice CPU':>10}")
    for mode, run in runs.items():
        if "error" in run:
            print(f"{mode:<8} error: {run['error'][:300]}")
            continue
        q = run["quiet"]
        iso = run.get("isolation") or {}
        ph = q["after_per_phase"]
        print(f"{mode:<8} {fmt(q['before']['p99_ms']):>13} ms {fmt(q['after']['p99_ms']):>10} "
              f"{fmt(q['p99_ratio_after_over_before'], '.2f'):>6} "
              f"{fmt(ph['slow']['p99_ms']):>9} {fmt(ph['hang']['p99_ms']):>9} "
              f"{fmt(ph['recovered']['p99_ms']):>9} {q['after']['unfinished']:>6} "
              f"{fmt(iso.get('isolation_delay_s'), '+.1f'):>9} "
              f"{fmt(iso.get('reclaimed_at_s'), '.1f'):>9} "
              f"{run['noisy']['states'].get('SUCCEEDED', 0):>8} "
              f"{fmt(run['cpu'].get('sluice_cpu_pct_of_one_core')):>9}%")
    print("(p99 in ms of the quiet tenants' tasks by submit time; isolated: seconds after the "
          "change; reclaimed: seconds after t0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run (change at 10 s, load until 35 s, flood "
                             "2,000, reclaim_after_s 5)")
    parser.add_argument("--only", nargs="+", choices=MODES, default=list(MODES))
    for name, value in asdict(Scenario()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                            help=f"(default {value}; --quick: {getattr(QUICK, name)})")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="the JSON to write (the PNG beside it, same stem)")
    args = parser.parse_args()
    sc = QUICK if args.quick else Scenario()
    sc = replace(sc, **{k: getattr(args, k) for k in asdict(sc) if getattr(args, k) is not None})
    if not sc.before_from_s < sc.change_s <= sc.hang_s <= sc.recover_s <= sc.end_s:
        parser.error("expected before-from-s < change-s <= hang-s <= recover-s <= end-s")

    started = time.time()
    commit = git_commit()
    runs: dict[str, dict[str, Any]] = {}
    work = Path(tempfile.mkdtemp(prefix="sluice-tenancy-"))
    try:
        for mode in args.only:
            print(f"{mode}: {sc.tenants} tenants × {sc.rate_per_s:g}/s for {sc.end_s:g} s, "
                  f"change at {sc.change_s:g} s ({uptime()})", flush=True)
            began = time.perf_counter()
            try:
                runs[mode] = run_async(run_mode(mode, sc, work))
            except Exception as exc:
                traceback.print_exc()
                runs[mode] = {"error": f"{type(exc).__name__}: {exc}",
                              "log_tail": tail(work / mode / "sluice.log")}
            runs[mode]["run_s"] = round(time.perf_counter() - began, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ten, plain = runs.get("tenancy", {}), runs.get("plain", {})
    iso = ten.get("isolation") or {}
    ratio = (ten.get("quiet") or {}).get("p99_ratio_after_over_before")
    delay = iso.get("isolation_delay_s")
    headlines: dict[str, dict[str, Any]] = {
        "tenancy_quiet_p99_ratio": {"value": ratio, "target": "<= 1.2",
                                    "met": None if ratio is None else ratio <= 1.2},
        "tenancy_isolation_delay_s": {"value": delay, "target": "<= 30",
                                      "met": None if delay is None else delay <= 30},
        "tenancy_reclaimed_at_s": {"value": iso.get("reclaimed_at_s"),
                                   "target": "reported (after the recovery at "
                                             f"{sc.recover_s:g} s)"},
        "plain_quiet_p99_ratio": {
            "value": (plain.get("quiet") or {}).get("p99_ratio_after_over_before"),
            "target": "reported (how far one FIFO queue degrades)"},
    }
    result = {
        "benchmark": "tenancy",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
        "sluice_commit_at_start": commit,
        "sluice_commit_at_end": git_commit(),
        "command": " ".join(["python -m bench.tenancy", *sys.argv[1:]]),
        "quick": args.quick,
        "scenario": {**asdict(sc), "noisy_tenant": sc.noisy,
                     "note": "reclaim_after_s is 15 s here (default 600) so a reclaim fits "
                             "in the run; everything else of tenancy at its defaults"},
        "wall_s": round(time.time() - started, 1),
        "headlines": headlines,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    plot(runs, sc, png)
    print_table(runs)
    for key, one in headlines.items():
        met = one.get("met")
        verdict = "-" if met is None else "met" if met else "missed"
        print(f"{key:<28} {fmt(one['value'], ',.2f'):>9}  (target {one['target']}: {verdict})")
    print(f"wrote {args.out} and {png}")


def uncommitted(path: str) -> list[str]:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", path], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                             cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


if __name__ == "__main__":
    main()
