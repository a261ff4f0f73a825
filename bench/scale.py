"""Benchmark: sluice's PostgreSQL store against its SQLite store, 1 against 3 worker processes,
submit→start latency, and procrastinate (a task queue on PostgreSQL) on the same server.

Every sluice row is a pipeline at sluice's defaults: its YAML is ``name``, ``source: {embedded:
{queue: jobs}}`` and ``handler``, nothing else (concurrency 8, task tracking on; prefetch 1,000
per worker on SQLite, 100 on the shared PostgreSQL queue), run by ``python -m sluice.cli run
pipeline.yaml --data-dir D [--store URL] --drain`` processes (cwd the repo root, ``PYTHONPATH``
the repo, the default log level). Each row starts empty: a fresh PostgreSQL schema (``--url``
with ``?schema=bench_<row>_<random>``, created by the store, dropped after the row) or a fresh
temporary data directory (SQLite). The rows, in their order:

- ``sqlite_noop_1w``: N no-op tasks (``--tasks``, default 30,000; ``bench.handlers:noop``) are
  submitted first through ``Store.submit`` in batches of 1,000 (``submit_s``: its wall time, the
  store already open), then ONE worker process drains them on the SQLite store (``--data-dir
  D``, no ``--store``) and exits when the queue is empty (``--drain``).
- ``postgres_noop_1w``, ``postgres_noop_3w``: the same on the PostgreSQL store (``--store URL``)
  with 1 and 3 worker processes, all spawned at once, each with a data directory of its own (as
  on separate machines); each exits on ``--drain`` once it finds the queue empty.
- ``postgres_sleep20_1w``, ``postgres_sleep20_3w``: the same with a handler that sleeps 20 ms
  (``bench.scale_handlers:sleep20``), N = ``--sleep-tasks`` (default 30,000).
- ``postgres_latency``: one worker (no ``--drain``) is up and has run one warm-up task; this
  process then submits one task per ``Store.submit`` call at 500 tasks/s for ``--latency-s``
  seconds (default 10), each call started on a monotonic schedule (open loop: a slow call does
  not delay the next one); the worker is stopped with SIGTERM once every task has finished.
  submit→start is each task's ``started_at - queued_at`` (the worker's claim, see below), both
  the database's clock: p50, p99, max (ms). Also the achieved submit rate, the submit calls'
  own p50/p99, the worker's CPU per task from the first submit to the last task, and its CPU
  while idle (the 2 s between the warm-up and the first submit, % of one core).
- ``procrastinate_noop``, ``procrastinate_sleep20``: procrastinate (bench/peers/
  procrastinate_tasks.py: a no-op task and an ``asyncio.sleep(0.02)`` task) on the same server
  in a fresh schema of its own (``options=-c search_path=...`` in the connection string; its
  schema applied with its schema manager), the same N, "defer + run": all N deferred first with
  its batch API (``batch_defer_async``, 1,000 a call; ``submit_s``), then ONE worker process at
  procrastinate's defaults (``procrastinate --app=bench.peers.procrastinate_tasks.app worker
  --one-shot``: concurrency 1, LISTEN/NOTIFY, exits when no job is left).
- Tuned rows (no headline uses them): ``postgres_sleep20_1w_tuned`` and ``_3w_tuned``, the
  sleep20 rows with ``consumer: {concurrency: 64}``; ``procrastinate_noop_c8_tuned`` and
  ``procrastinate_sleep20_c8_tuned``, procrastinate's rows with ``--concurrency=8`` (sluice's
  default concurrency: the two systems at the same parallelism).

Measured for every throughput row:

- ``tasks_per_s`` = N / ``elapsed_s``, the span from the first task's start to the last task's
  end as the system recorded them (read after the run): sluice, min ``started_at`` → max
  ``finished_at`` of its task records; procrastinate, the first ``started`` → the last
  ``succeeded`` event in ``procrastinate_events``. Every task must have succeeded, else the row
  fails. (sluice's ``started_at`` is when a worker claims the task, which it does for every
  message it fetches, up to its prefetch, before a handler slot is free; the first claim is
  within milliseconds of the first handler call, so the span is unaffected.)
- ``wall_s``: from the worker processes' spawn to the last one's exit (interpreter start,
  imports, connecting and the drain's last look included); ``startup_s``: spawn → the first
  task's start (this machine's clock against the database's: the server runs here).
- ``cpu_us_per_task``: the worker processes' user + system CPU over their whole life (the
  kernel's accounting of each child, ``os.wait4``) / N. ``boot_cpu_s``: the same of one worker
  run on the empty queue before the tasks are submitted (boot, a look at the empty queue, exit);
  ``cpu_us_per_task_net`` = (workers' CPU - workers × boot_cpu_s) / N, the cost of the tasks
  themselves. ``server_cpu_us_per_task``: the PostgreSQL server's CPU (the postmaster, its
  exited backends and its live ones; null unless the server runs on this machine) from the
  spawn to the last exit / N. The submitting process's CPU is not counted for anyone.

Headlines (``headlines`` in the JSON, each with ``value``, ``target`` and ``met``):
``speedup_3w_over_1w_sleep20`` (postgres_sleep20_3w / _1w tasks/s, target ≥ 2.7),
``postgres_over_sqlite_noop_1w`` (≥ 0.5), ``postgres_3w_over_sqlite_1w_noop`` (≥ 1.0),
``sluice_over_procrastinate_noop`` and ``sluice_over_procrastinate_sleep20`` (sluice's 1-worker
PostgreSQL row at its defaults over procrastinate's at its defaults, ≥ 1.0) and
``latency_p99_ms`` (≤ 50 at 500 tasks/s). ``--only row,row`` runs a subset; a row that fails
records its ``error`` and the run goes on. ``--url`` is the server (default
``SLUICE_POSTGRES_URL``, else the one ``scripts/services start postgres`` runs). Writes
bench/results/scale.json (``--out``) with the machine's description and prints a table. Run it
alone on the machine: other load shows in every number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import asyncpg
import psutil

from sluice.config.load import parse_pipeline
from sluice.datadir import QueuedMessage
from sluice.intake import new_task_id
from sluice.registry import Submission
from sluice.stores import default_url, forget, open_store
from sluice.stores.base import Store
from sluice.stores.sqlite import SqliteStore
from sluice.tasks.state import TaskState
from sluice.tasks.store import TaskRecord
from sluice.tasks.summary import percentile

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "scale.json"
DEFAULT_URL = os.environ.get("SLUICE_POSTGRES_URL",
                             "postgresql://sluice:sluice@127.0.0.1:5432/sluice")

PIPELINE, QUEUE, TENANT = "jobs", "jobs", "default"
PIPELINE_YAML = """name: jobs
source: {{embedded: {{queue: jobs}}}}
handler: {{python: "{handler}"}}
{extra}"""
NOOP, SLEEP20 = "bench.handlers:noop", "bench.scale_handlers:sleep20"
TUNED = "consumer: {concurrency: 64}\n"
BODY = b'{"n": 0}'
SUBMIT_BATCH = 1000
LATENCY_RATE = 500.0
IDLE_S = 2.0
LOG_TAIL = 1500


@dataclass(frozen=True)
class SluiceRow:
    store: str  # "sqlite" or "postgres"
    handler: str
    workers: int
    sleep: bool  # N is --sleep-tasks (else --tasks)
    extra: str = ""  # pipeline YAML beyond the defaults (tuned rows only)


SLUICE_ROWS = {
    "sqlite_noop_1w": SluiceRow("sqlite", NOOP, 1, False),
    "postgres_noop_1w": SluiceRow("postgres", NOOP, 1, False),
    "postgres_noop_3w": SluiceRow("postgres", NOOP, 3, False),
    "postgres_sleep20_1w": SluiceRow("postgres", SLEEP20, 1, True),
    "postgres_sleep20_3w": SluiceRow("postgres", SLEEP20, 3, True),
}
LATENCY_ROW = "postgres_latency"
# name → (task, N is --sleep-tasks, --concurrency: None for procrastinate's default, 1)
PEER_ROWS: dict[str, tuple[str, bool, int | None]] = {
    "procrastinate_noop": ("noop", False, None),
    "procrastinate_sleep20": ("sleep20", True, None),
}
TUNED_ROWS = {
    "postgres_sleep20_1w_tuned": SluiceRow("postgres", SLEEP20, 1, True, TUNED),
    "postgres_sleep20_3w_tuned": SluiceRow("postgres", SLEEP20, 3, True, TUNED),
}
TUNED_PEER_ROWS: dict[str, tuple[str, bool, int | None]] = {
    "procrastinate_noop_c8_tuned": ("noop", False, 8),
    "procrastinate_sleep20_c8_tuned": ("sleep20", True, 8),
}
ROWS = (*SLUICE_ROWS, LATENCY_ROW, *PEER_ROWS, *TUNED_ROWS, *TUNED_PEER_ROWS)


# --- URLs and schemas -------------------------------------------------------------------------

def _with_query(url: str, drop: str, add: list[tuple[str, str]]) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != drop]
    return urlunsplit(parts._replace(query=urlencode(query + add, quote_via=quote)))


def server_url(url: str) -> str:
    """``url`` without sluice's ``?schema=`` (what asyncpg and libpq connect to)."""
    return _with_query(url, "schema", [])


def sluice_url(url: str, schema: str) -> str:
    return _with_query(url, "schema", [("schema", schema)])


def libpq_url(url: str, schema: str) -> str:
    """A libpq connection string whose sessions use ``schema`` (procrastinate's)."""
    return _with_query(server_url(url), "options", [("options", f"-c search_path={schema}")])


def new_schema(row: str) -> str:
    return f"bench_{row}_{secrets.token_hex(3)}"


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(server_url(url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def drop_schema(url: str, schema: str) -> None:
    """Drop a row's schema (a failure is printed, not raised: the row's own error matters)."""
    try:
        asyncio.run(_admin(url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    except Exception as exc:
        print(f"could not drop schema {schema}: {type(exc).__name__}: {exc}", file=sys.stderr)


async def server_version(url: str) -> str:
    conn = await asyncpg.connect(server_url(url))
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


# --- processes --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Exit:
    code: int
    at: float  # time.perf_counter() when it was seen to exit
    cpu_s: float  # user + system over its whole life (the kernel's rusage of the child)


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SLUICE_STORE", "SLUICE_DATA_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**env, **extra}


def reap(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> list[Exit]:
    """Wait for every process to exit (killing them all past ``timeout_s``); each one's exit
    code, time and CPU from ``os.wait4``, which accounts for a child exactly."""
    exits: dict[int, Exit] = {}

    def wait(proc: subprocess.Popen[bytes]) -> None:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        exits[proc.pid] = Exit(proc.returncode, time.perf_counter(),
                               usage.ru_utime + usage.ru_stime)

    waiters = [threading.Thread(target=wait, args=(p,), daemon=True) for p in procs]
    for waiter in waiters:
        waiter.start()
    deadline = time.monotonic() + timeout_s
    for waiter in waiters:
        waiter.join(max(deadline - time.monotonic(), 0.0))
    if any(w.is_alive() for w in waiters):
        for proc in procs:
            kill(proc, signal.SIGKILL)
        for waiter in waiters:
            waiter.join(30)
        raise RuntimeError(f"the workers did not finish within {timeout_s:g} s (killed)")
    return [exits[p.pid] for p in procs]


def kill(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill what is still running of ``procs`` (a row that failed) and reap it."""
    for proc in procs:
        if proc.returncode is None:
            kill(proc, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
                proc.wait(30)


def check_exits(exits: list[Exit], logs: list[Path]) -> None:
    for n, (exit_, log) in enumerate(zip(exits, logs, strict=True)):
        if exit_.code != 0:
            raise RuntimeError(f"worker {n} exited with {exit_.code}; the end of its log: "
                               f"{tail(log)}")


def tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-LOG_TAIL:]
    except OSError:
        return "(no log)"


def postmaster(url: str) -> psutil.Process | None:
    """The PostgreSQL server's main process when it runs on this machine (else ``None``)."""
    parts = urlsplit(server_url(url))
    if parts.hostname not in ("127.0.0.1", "localhost", "::1", None):
        return None
    port = str(parts.port or 5432)
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            parent = proc.parent()
            if proc.info["name"] != "postgres" or parent is None or parent.name() == "postgres":
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            if f"port={port}" in cmdline or f"-p {port}" in cmdline or port == "5432":
                found.append(proc)
    return found[0] if len(found) == 1 else None


def server_cpu_s(main: psutil.Process | None) -> float | None:
    """The server's CPU so far: the postmaster, its reaped backends (children_*) and its live
    ones (a backend exiting between the two reads may be missed or counted twice: µs)."""
    if main is None:
        return None
    try:
        times = main.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in main.children():
            with contextlib.suppress(psutil.Error):
                t = child.cpu_times()
                total += t.user + t.system
        return total
    except psutil.Error:
        return None


def per_task_us(seconds: float | None, n: int) -> float | None:
    return None if seconds is None else round(seconds / n * 1e6, 1)


def boot(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> Exit:
    """Run one worker on the empty queue until it exits: what a worker costs by itself."""
    started = time.perf_counter()
    exit_ = reap([spawn(cmd, env, log)], timeout_s)[0]
    check_exits([exit_], [log])
    return Exit(exit_.code, exit_.at - started, exit_.cpu_s)


def cpu_fields(exits: list[Exit], booted: Exit, n: int) -> dict[str, Any]:
    cpu = sum(e.cpu_s for e in exits)
    return {"cpu_us_per_task": per_task_us(cpu, n),
            "cpu_us_per_task_net": per_task_us(max(cpu - len(exits) * booted.cpu_s, 0.0), n),
            "worker_cpu_s": [round(e.cpu_s, 2) for e in exits],
            "boot_cpu_s": round(booted.cpu_s, 3), "boot_wall_s": round(booted.at, 3)}


# --- sluice -----------------------------------------------------------------------------------

async def close_store(store: Store, url: str) -> None:
    """Close what this process holds of the store (its pool in this loop; SQLite: its file, so
    no checkpoint thread of ours runs beside the workers) and forget it."""
    await store.close()
    if isinstance(store, SqliteStore):
        store.db.close()
    forget(url)


def submissions(n: int) -> list[Submission]:
    return [Submission(PIPELINE, TENANT, QueuedMessage(new_task_id(), BODY)) for _ in range(n)]


async def migrate(url: str) -> None:
    """Create the store's schema (a worker then finds it ready)."""
    store = open_store(url)
    try:
        await store.migrate()
    finally:
        await close_store(store, url)


async def submit_all(url: str, n: int) -> float:
    """Submit ``n`` tasks in batches of 1,000; the seconds it took (the store already open)."""
    store = open_store(url)
    try:
        await store.migrate()
        start = time.perf_counter()
        for sent in range(0, n, SUBMIT_BATCH):
            created = await store.submit(QUEUE, submissions(min(SUBMIT_BATCH, n - sent)))
            if any(record is None for record in created):
                raise RuntimeError("a fresh task id was refused as already used")
        return time.perf_counter() - start
    finally:
        await close_store(store, url)


async def task_records(url: str) -> list[TaskRecord]:
    store = open_store(url)
    try:
        return await store.tasks.stats(PIPELINE)
    finally:
        await close_store(store, url)


def finished_span(records: list[TaskRecord], n: int) -> tuple[float, float]:
    """(first start, last end) of ``n`` tasks that must all have succeeded."""
    if len(records) != n:
        raise RuntimeError(f"{len(records)} task records, {n} submitted")
    states: dict[str, int] = {}
    for r in records:
        states[str(r.state)] = states.get(str(r.state), 0) + 1
    if states.get(TaskState.SUCCEEDED, 0) != n:
        raise RuntimeError(f"not every task succeeded: {states}")
    starts = [r.started_at for r in records if r.started_at is not None]
    ends = [r.finished_at for r in records if r.finished_at is not None]
    if len(starts) != n or len(ends) != n:
        raise RuntimeError("succeeded tasks without a start or end time")
    return min(starts), max(ends)


def worker_cmd(pipeline: Path, data_dir: Path, url: str | None, drain: bool) -> list[str]:
    return [sys.executable, "-m", "sluice.cli", "run", str(pipeline), "--data-dir", str(data_dir),
            *(["--store", url] if url else []), *(["--drain"] if drain else [])]


def sluice_row(name: str, spec: SluiceRow, n: int, base_url: str, work: Path,
               timeout_s: float) -> dict[str, Any]:
    rowdir = work / name
    rowdir.mkdir()
    pipeline = rowdir / "pipeline.yaml"
    yaml = PIPELINE_YAML.format(handler=spec.handler, extra=spec.extra)
    pipeline.write_text(yaml)
    schema = new_schema(name) if spec.store == "postgres" else None
    if schema is None:
        url, store_arg = default_url(rowdir / "data"), None
        data_dirs = [rowdir / "data"] * spec.workers
    else:
        url = store_arg = sluice_url(base_url, schema)
        data_dirs = [rowdir / f"worker{i}" for i in range(spec.workers)]
    result: dict[str, Any] = {
        "system": "sluice", "store": spec.store, "handler": spec.handler,
        "workers": spec.workers, "tuned": bool(spec.extra),
        "concurrency_per_worker": parse_pipeline(yaml).consumer.concurrency, "tasks": n,
        "schema": schema}
    procs: list[subprocess.Popen[bytes]] = []
    env = child_env()
    try:
        asyncio.run(migrate(url))
        booted = boot(worker_cmd(pipeline, data_dirs[0], store_arg, True), env,
                      rowdir / "boot.log", timeout_s)
        submit_s = asyncio.run(submit_all(url, n))
        result.update({"submit_s": round(submit_s, 3),
                       "submit_tasks_per_s": round(n / submit_s, 1)})
        logs = [rowdir / f"worker{i}.log" for i in range(spec.workers)]
        server = postmaster(base_url) if schema else None
        server0 = server_cpu_s(server)
        spawned_at, started = time.time(), time.perf_counter()
        procs = [spawn(worker_cmd(pipeline, d, store_arg, True), env, log)
                 for d, log in zip(data_dirs, logs, strict=True)]
        exits = reap(procs, timeout_s)
        server1 = server_cpu_s(server)
        check_exits(exits, logs)
        first, last = finished_span(asyncio.run(task_records(url)), n)
        elapsed = last - first
        result.update({
            "elapsed_s": round(elapsed, 3), "tasks_per_s": round(n / elapsed, 1),
            "wall_s": round(max(e.at for e in exits) - started, 3),
            "startup_s": round(first - spawned_at, 3),
            **cpu_fields(exits, booted, n),
            "server_cpu_us_per_task": per_task_us(
                None if server0 is None or server1 is None else server1 - server0, n)})
        return result
    finally:
        stop_all(procs)
        if schema:
            drop_schema(base_url, schema)


# --- latency ----------------------------------------------------------------------------------

async def wait_final(store: Store, task_id: str, proc: subprocess.Popen[bytes], log: Path,
                     timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            if (await store.tasks.get(task_id, PIPELINE)).state.final:
                return
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}; the end of its "
                               f"log: {tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"task {task_id} did not finish within {timeout_s:g} s")
        await asyncio.sleep(0.02)


async def wait_all_final(store: Store, n: int, proc: subprocess.Popen[bytes], log: Path,
                         timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    finals = {str(s) for s in TaskState if s.final}
    while True:
        counts = await store.tasks.counts()
        if sum(v for (p, s), v in counts.items() if p == PIPELINE and s in finals) >= n:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}; the end of its "
                               f"log: {tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the tasks did not finish within {timeout_s:g} s: {counts}")
        await asyncio.sleep(0.05)


def proc_cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


async def latency_phase(url: str, pipeline: Path, rowdir: Path, seconds: float,
                        timeout_s: float, procs: list[subprocess.Popen[bytes]],
                        ) -> dict[str, Any]:
    store = open_store(url)
    try:
        await store.migrate()
        log = rowdir / "worker.log"
        proc = spawn(worker_cmd(pipeline, rowdir / "worker", url, False), child_env(), log)
        procs.append(proc)
        worker = psutil.Process(proc.pid)
        warm = submissions(1)
        await store.submit(QUEUE, warm)
        await wait_final(store, warm[0].message.task_id, proc, log, 120.0)
        idle0 = proc_cpu_s(worker)
        await asyncio.sleep(IDLE_S)
        idle_cpu_pct = (proc_cpu_s(worker) - idle0) / IDLE_S * 100

        total = int(LATENCY_RATE * seconds)
        calls_ms: list[float] = []
        running: set[asyncio.Task[None]] = set()

        async def one() -> None:
            begun = time.perf_counter()
            if None in await store.submit(QUEUE, submissions(1)):
                raise RuntimeError("a fresh task id was refused as already used")
            calls_ms.append((time.perf_counter() - begun) * 1000)

        cpu0 = proc_cpu_s(worker)
        t0 = time.monotonic()
        for i in range(total):
            ahead = t0 + i / LATENCY_RATE - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
            task = asyncio.create_task(one())
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running)
        sent_s = time.monotonic() - t0
        await wait_all_final(store, total + 1, proc, log, timeout_s)
        cpu = proc_cpu_s(worker) - cpu0
        kill(proc, signal.SIGTERM)
        code = (await asyncio.to_thread(reap, [proc], 60.0))[0].code
        if code != 0:
            raise RuntimeError(f"the worker exited with {code} on SIGTERM; the end of its log: "
                               f"{tail(log)}")
        records = [r for r in await store.tasks.stats(PIPELINE)
                   if r.task_id != warm[0].message.task_id]
    finally:
        await close_store(store, url)
    _, _ = finished_span(records, total)
    waits = sorted((r.started_at - r.queued_at) * 1000 for r in records
                   if r.started_at is not None and r.queued_at is not None)
    calls_ms.sort()

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 2)

    return {"system": "sluice", "store": "postgres", "handler": NOOP, "workers": 1,
            "tuned": False, "tasks": total, "target_rate_per_s": LATENCY_RATE,
            "achieved_rate_per_s": round(total / sent_s, 1),
            "submit_to_start_p50_ms": ms(percentile(waits, 50)),
            "submit_to_start_p99_ms": ms(percentile(waits, 99)),
            "submit_to_start_max_ms": ms(waits[-1] if waits else None),
            "submit_call_p50_ms": ms(percentile(calls_ms, 50)),
            "submit_call_p99_ms": ms(percentile(calls_ms, 99)),
            "cpu_us_per_task": per_task_us(cpu, total),
            "worker_idle_cpu_pct": round(idle_cpu_pct, 2)}


def latency_row(seconds: float, base_url: str, work: Path, timeout_s: float) -> dict[str, Any]:
    rowdir = work / LATENCY_ROW
    rowdir.mkdir()
    pipeline = rowdir / "pipeline.yaml"
    pipeline.write_text(PIPELINE_YAML.format(handler=NOOP, extra=""))
    schema = new_schema("latency")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        result = asyncio.run(latency_phase(sluice_url(base_url, schema), pipeline, rowdir,
                                           seconds, timeout_s, procs))
        return {**result, "schema": schema}
    finally:
        stop_all(procs)
        drop_schema(base_url, schema)


# --- procrastinate ----------------------------------------------------------------------------

async def procrastinate_defer(dsn: str, task: str, n: int) -> float:
    """Defer ``n`` jobs of ``task`` with procrastinate's batch API, 1,000 a call (``n`` 0:
    apply its schema); the seconds the deferring took (its pool already open)."""
    from procrastinate import PsycopgConnector

    from bench.peers.procrastinate_tasks import app

    with app.replace_connector(PsycopgConnector(conninfo=dsn)) as here:
        async with here.open_async():
            if n == 0:
                await here.schema_manager.apply_schema_async()
            deferrer = here.configure_task(task)
            start = time.perf_counter()
            for sent in range(0, n, SUBMIT_BATCH):
                await deferrer.batch_defer_async(*({} for _ in range(min(SUBMIT_BATCH,
                                                                           n - sent))))
            return time.perf_counter() - start


async def procrastinate_span(url: str, schema: str, n: int) -> tuple[float, float]:
    """(first start, last success) from procrastinate's own tables; all ``n`` must have
    succeeded."""
    conn = await asyncpg.connect(server_url(url), server_settings={"search_path": schema})
    try:
        jobs = await conn.fetch("SELECT status::text, COUNT(*) FROM procrastinate_jobs "
                                "GROUP BY status")
        states = {str(r[0]): int(r[1]) for r in jobs}
        if states.get("succeeded", 0) != n or sum(states.values()) != n:
            raise RuntimeError(f"procrastinate jobs by status: {states}, {n} deferred")
        row = await conn.fetchrow(
            "SELECT EXTRACT(EPOCH FROM MIN(at) FILTER (WHERE type = 'started')),"
            " EXTRACT(EPOCH FROM MAX(at) FILTER (WHERE type = 'succeeded'))"
            " FROM procrastinate_events")
    finally:
        await conn.close()
    if row is None or row[0] is None or row[1] is None:
        raise RuntimeError("procrastinate_events has no started or succeeded event")
    return float(row[0]), float(row[1])


def procrastinate_row(name: str, task: str, concurrency: int | None, n: int, base_url: str,
                      work: Path, timeout_s: float) -> dict[str, Any]:
    import procrastinate

    from bench.peers.procrastinate_tasks import DSN_ENV

    rowdir = work / name
    rowdir.mkdir()
    schema = new_schema(name)
    dsn = libpq_url(base_url, schema)
    cmd = [sys.executable, "-m", "procrastinate", "--app=bench.peers.procrastinate_tasks.app",
           "worker", "--one-shot",
           *([f"--concurrency={concurrency}"] if concurrency else [])]
    result: dict[str, Any] = {
        "system": "procrastinate", "version": procrastinate.__version__,
        "handler": f"bench.peers.procrastinate_tasks:{task}", "workers": 1,
        "concurrency_per_worker": concurrency or 1, "tuned": concurrency is not None,
        "tasks": n, "schema": schema, "worker": " ".join(cmd[2:])}
    procs: list[subprocess.Popen[bytes]] = []
    env = child_env(**{DSN_ENV: dsn})
    asyncio.run(_admin(base_url, f'CREATE SCHEMA "{schema}"'))
    try:
        asyncio.run(procrastinate_defer(dsn, task, 0))
        booted = boot(cmd, env, rowdir / "boot.log", timeout_s)
        submit_s = asyncio.run(procrastinate_defer(dsn, task, n))
        result.update({"submit_s": round(submit_s, 3),
                       "submit_tasks_per_s": round(n / submit_s, 1)})
        log = rowdir / "worker.log"
        server = postmaster(base_url)
        server0 = server_cpu_s(server)
        spawned_at, started = time.time(), time.perf_counter()
        procs = [spawn(cmd, env, log)]
        exits = reap(procs, timeout_s)
        server1 = server_cpu_s(server)
        check_exits(exits, [log])
        first, last = asyncio.run(procrastinate_span(base_url, schema, n))
        elapsed = last - first
        result.update({
            "elapsed_s": round(elapsed, 3), "tasks_per_s": round(n / elapsed, 1),
            "wall_s": round(exits[0].at - started, 3),
            "startup_s": round(first - spawned_at, 3),
            **cpu_fields(exits, booted, n),
            "server_cpu_us_per_task": per_task_us(
                None if server0 is None or server1 is None else server1 - server0, n)})
        return result
    finally:
        stop_all(procs)
        drop_schema(base_url, schema)


# --- the run ----------------------------------------------------------------------------------

def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def git_commit() -> str | None:
    """The repository's commit (``-dirty`` with uncommitted changes)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                             cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def parse_only(values: list[str]) -> list[str]:
    names = [name for value in values for name in value.split(",") if name]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        raise SystemExit(f"--only: unknown rows {', '.join(unknown)}; known: {', '.join(ROWS)}")
    return [name for name in ROWS if name in names]  # the documented order


def headline(rows: dict[str, dict[str, Any]], num: str, den: str, target: float,
             ) -> dict[str, Any]:
    def rate(name: str) -> float | None:
        value = rows.get(name, {}).get("tasks_per_s")
        return float(value) if value else None

    a, b = rate(num), rate(den)
    value = round(a / b, 3) if a and b else None
    return {"value": value, "of": f"{num} / {den} (tasks/s)", "target": f">= {target:g}",
            "met": None if value is None else value >= target}


def headlines(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    p99 = rows.get(LATENCY_ROW, {}).get("submit_to_start_p99_ms")
    return {
        "speedup_3w_over_1w_sleep20": headline(rows, "postgres_sleep20_3w",
                                               "postgres_sleep20_1w", 2.7),
        "postgres_over_sqlite_noop_1w": headline(rows, "postgres_noop_1w", "sqlite_noop_1w",
                                                 0.5),
        "postgres_3w_over_sqlite_1w_noop": headline(rows, "postgres_noop_3w", "sqlite_noop_1w",
                                                    1.0),
        "sluice_over_procrastinate_noop": headline(rows, "postgres_noop_1w",
                                                   "procrastinate_noop", 1.0),
        "sluice_over_procrastinate_sleep20": headline(rows, "postgres_sleep20_1w",
                                                      "procrastinate_sleep20", 1.0),
        "latency_p99_ms": {"value": p99, "of": f"{LATENCY_ROW} submit→start p99 at "
                                               f"{LATENCY_RATE:g} tasks/s",
                           "target": "<= 50", "met": None if p99 is None else p99 <= 50},
    }


def run_row(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if name in SLUICE_ROWS or name in TUNED_ROWS:
        spec = SLUICE_ROWS.get(name) or TUNED_ROWS[name]
        return sluice_row(name, spec, args.sleep_tasks if spec.sleep else args.tasks, args.url,
                          work, args.timeout_s)
    if name == LATENCY_ROW:
        return latency_row(args.latency_s, args.url, work, args.timeout_s)
    task, sleep, concurrency = PEER_ROWS.get(name) or TUNED_PEER_ROWS[name]
    return procrastinate_row(name, task, concurrency, args.sleep_tasks if sleep else args.tasks,
                             args.url, work, args.timeout_s)


def fmt(value: Any, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: dict[str, dict[str, Any]], heads: dict[str, dict[str, Any]],
                out: Callable[[str], None] = print) -> None:
    out(f"\n{'row':<31} {'tasks':>7} {'tasks/s':>9} {'elapsed s':>9} {'wall s':>8} "
        f"{'submit s':>8} {'cpu µs/task':>11} {'net µs/task':>11} {'server µs/task':>14}")
    for name, row in rows.items():
        if "error" in row:
            out(f"{name:<31} error: {row['error'][:300]}")
        elif name == LATENCY_ROW:
            p50, p99, top = (fmt(row[f"submit_to_start_{q}_ms"], ".2f")
                             for q in ("p50", "p99", "max"))
            out(f"{name:<31} {row['tasks']:>7,} submit→start p50 {p50} / p99 {p99} / max {top}"
                f" ms at {fmt(row['achieved_rate_per_s'])} tasks/s; worker "
                f"{fmt(row['cpu_us_per_task'])} µs/task, idle "
                f"{fmt(row['worker_idle_cpu_pct'], '.2f')}% CPU")
        else:
            out(f"{name:<31} {row['tasks']:>7,} {fmt(row.get('tasks_per_s')):>9} "
                f"{fmt(row.get('elapsed_s'), ',.2f'):>9} {fmt(row.get('wall_s'), ',.2f'):>8} "
                f"{fmt(row.get('submit_s'), ',.2f'):>8} {fmt(row.get('cpu_us_per_task')):>11} "
                f"{fmt(row.get('cpu_us_per_task_net')):>11} "
                f"{fmt(row.get('server_cpu_us_per_task')):>14}")
    out("")
    for key, one in heads.items():
        verdict = {True: "met", False: "missed", None: "not measured"}[one["met"]]
        out(f"{key:<35} {fmt(one['value'], ',.3f'):>9}  (target {one['target']}: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30_000, help="N of the no-op rows")
    parser.add_argument("--sleep-tasks", type=int, default=30_000, help="N of the sleep20 rows")
    parser.add_argument("--latency-s", type=float, default=10.0,
                        help=f"how long the latency row submits at {LATENCY_RATE:g} tasks/s")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="the PostgreSQL server (env SLUICE_POSTGRES_URL); each row uses a "
                             "fresh schema of it, dropped after")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="per row")
    parser.add_argument("--only", nargs="+", default=[",".join(ROWS)], metavar="ROW[,ROW]",
                        help=f"rows to run (default all: {', '.join(ROWS)})")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    only = parse_only(args.only)
    args.url = server_url(args.url)

    try:
        pg_version: str | None = asyncio.run(server_version(args.url))
    except Exception as exc:  # the SQLite row can still run
        pg_version = None
        print(f"PostgreSQL at {args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
    rows: dict[str, dict[str, Any]] = {}
    work = Path(tempfile.mkdtemp(prefix="sluice-scale-"))
    try:
        for name in only:
            began = time.perf_counter()
            try:
                rows[name] = run_row(name, args, work)
            except Exception as exc:
                traceback.print_exc()
                rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
            rows[name]["row_s"] = round(time.perf_counter() - began, 1)
            print(f"{name}: {json.dumps(rows[name])}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    heads = headlines(rows)
    from sluice.stores.postgres_db import redact

    result = {
        "benchmark": "scale",
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "postgresql": pg_version, "postgresql_url": redact(args.url)},
        "sluice_commit": git_commit(),
        "rows_run": only,
        "tasks": args.tasks,
        "sleep_tasks": args.sleep_tasks,
        "latency_s": args.latency_s,
        "headlines": heads,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows, heads)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
