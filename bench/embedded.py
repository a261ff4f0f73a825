"""Benchmark: no-op tasks through the embedded queue, end to end, against dramatiq and arq.

Every row runs N tasks (``--tasks``, default 100,000) with one worker; sluice's worker is this
process (its pipeline built in-process), a submitter is a child process. The rows:

- ``sluice_tuned_live`` (throughput, tuned): a submitter enqueues the N tasks in batches of
  100 as fast as it can while the worker (``consumer.concurrency: --concurrency``, default 64,
  ``--handler``, default the async no-op) runs them; ``tasks_per_s`` = N / (first submit →
  last task finished). The worker's RSS is sampled every 0.25 s.
- ``latency`` (tuned): the submitter enqueues one task per millisecond (1,000 tasks/s) for
  ``--latency-s`` seconds; submit→start is the task's ``started_at - queued_at`` (p50, p99).
- ``sluice_defaults_live``: the throughput row at the defaults (what a user tries first: no
  ``consumer`` section, so concurrency 8; the async no-op ``bench.handlers:noop``).
- ``sluice_defaults_drain``: the N tasks are queued first, then one worker at the defaults
  drains them from cold (async no-op); timed from the start of its loop to the last task.
- ``sluice_sync_drain``: the same with the sync no-op ``bench.handlers:noop_sync``.
- ``dramatiq_live``, ``dramatiq_drain``, ``arq_live``, ``arq_drain``: the same two shapes
  with dramatiq (Redis broker; ``dramatiq --processes 1``: 1 process × its default 8 threads)
  and arq (its defaults), one worker process each, on Redis db ``SLUICE_BENCH_REDIS_DB``
  (default 11), flushed before each row. Redis is started with ``scripts/services start
  redis`` (reused when it already runs). ``live``: the worker runs (it finished a warm-up
  task) while an enqueuer process sends the N tasks; timed from the enqueuer's start to the
  last task done. ``drain``: all N queued first, then the worker process started; timed from
  its first finished task to its last (its boot is reported as ``startup_s``). Completion is
  read from each broker's own keys; see bench/peers/redis_queues.py.

CPU per task (``cpu_us_per_task``): the worker's user + system CPU over the timed window / N
(sluice: this process; peers: the worker's process tree); ``broker_cpu_us_per_task``: Redis's
own CPU (INFO cpu) over the window / N (sluice's queue is SQLite, inside its worker). The
enqueuers' CPU is not counted for anyone. Headline: sluice_defaults / max(dramatiq, arq) for
the live and the drain rows (target 5.0). ``--only row,row`` runs a subset. Writes
bench/results/embedded.json (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.peers import redis_queues
from sluice.config.load import parse_pipeline
from sluice.connectors import embedded
from sluice.datadir import Database
from sluice.runtime import build
from sluice.tasks.summary import percentile

RESULTS = Path(__file__).parent / "results" / "embedded.json"

PIPELINE = """
name: bench
source: {{embedded: {{queue: bench}}}}
handler: {{python: {handler}}}
consumer: {{concurrency: {concurrency}, timeout_s: 10}}
"""

DEFAULTS_PIPELINE = """
name: bench
source: {{embedded: {{queue: bench}}}}
handler: {{python: {handler}}}
"""

ASYNC_NOOP, SYNC_NOOP = "bench.handlers:noop", "bench.handlers:noop_sync"
SLUICE_ROWS = ("sluice_tuned_live", "latency", "sluice_defaults_live", "sluice_defaults_drain",
               "sluice_sync_drain")
PEER_ROWS = tuple(f"{system}_{mode}" for system in redis_queues.SYSTEMS
                  for mode in ("live", "drain"))
ROWS = SLUICE_ROWS + PEER_ROWS
TARGET_VS_PEERS = 5.0


def submitter(data_dir: str, total: int, batch: int, rate_per_s: float | None) -> None:
    db = Database.open(data_dir)
    body = b'{"n": 0}'
    sent = 0
    start = time.perf_counter()
    while sent < total:
        n = min(batch, total - sent)
        msgs = [embedded.QueuedMessage(embedded.new_task_id(), body) for _ in range(n)]
        embedded.submit(db, "bench", "default", "bench", msgs)
        sent += n
        if rate_per_s:
            ahead = sent / rate_per_s - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)


class RssSampler:
    def __init__(self, every_s: float = 0.25) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.samples.append(self._proc.memory_info().rss / 2**20)
            self._stop.wait(every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_s() -> float:
    """This process's user + system CPU seconds (all its threads; not its children)."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


async def phase(data_dir: str, pipeline: str, total: int, batch: int,
                rate_per_s: float | None, rss: RssSampler) -> dict[str, Any]:
    """Run a worker while a submitter process enqueues ``total`` tasks."""
    loop = build(parse_pipeline(pipeline), Path(data_dir))
    stop = asyncio.Event()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=submitter, args=(data_dir, total, batch, rate_per_s))
    runner = asyncio.create_task(loop.run(stop))
    first_sample = len(rss.samples)
    cpu_before, start = cpu_s(), time.perf_counter()
    proc.start()
    while loop.stats.succeeded < total:
        await asyncio.sleep(0.01)
        if not proc.is_alive() and proc.exitcode not in (0, None):
            raise RuntimeError(f"the submitter failed with exit code {proc.exitcode}")
    elapsed = time.perf_counter() - start
    used = cpu_s() - cpu_before
    stop.set()
    await runner
    proc.join()
    during = rss.samples[first_sample:]  # the worker's RSS while it ran, nothing after
    db = Database.open(data_dir)
    rows = db.read_sync(lambda c: c.execute(
        "SELECT (started_at - queued_at) * 1000 FROM tasks WHERE pipeline = 'bench'").fetchall())
    waits = sorted(float(r[0]) for r in rows)
    await loop.handler.close()
    db.close()  # its checkpoint thread must not run on into the next phase
    return {"tasks": total, "concurrency": loop.config.consumer.concurrency,
            "elapsed_s": elapsed, "tasks_per_s": total / elapsed,
            "cpu_us_per_task": used / total * 1e6, "rss_mb": during,
            "submit_to_start_p50_ms": percentile(waits, 50),
            "submit_to_start_p99_ms": percentile(waits, 99)}


def live_row(result: dict[str, Any], handler: str) -> dict[str, Any]:
    """A live phase's result as a row of the table (RSS as its peak)."""
    return {"system": "sluice", "mode": "live", "handler": handler,
            "concurrency": result["concurrency"], "tasks": result["tasks"],
            "elapsed_s": round(result["elapsed_s"], 3),
            "tasks_per_s": round(result["tasks_per_s"], 1),
            "cpu_us_per_task": round(result["cpu_us_per_task"], 1),
            "broker_cpu_us_per_task": None,
            "peak_rss_mb": round(max(result["rss_mb"], default=0.0), 1)}


async def backlog_phase(data_dir: str, handler: str, total: int) -> dict[str, Any]:
    """Queue ``total`` tasks, then drain them with one worker at the default settings."""
    submitter(data_dir, total, 500, None)
    loop = build(parse_pipeline(DEFAULTS_PIPELINE.format(handler=handler)), Path(data_dir))
    cpu_before, start = cpu_s(), time.perf_counter()
    await loop.run(asyncio.Event(), drain=True)
    elapsed = time.perf_counter() - start
    used = cpu_s() - cpu_before
    if loop.stats.succeeded != total:
        raise RuntimeError(f"drained {loop.stats.succeeded} of {total} tasks")
    await loop.handler.close()
    Database.open(data_dir).close()  # its checkpoint thread must not run on into the next phase
    return {"system": "sluice", "mode": "drain", "handler": handler,
            "concurrency": loop.config.consumer.concurrency,
            "tasks": total, "elapsed_s": round(elapsed, 3),
            "tasks_per_s": round(total / elapsed, 1), "cpu_cores_used": round(used / elapsed, 2),
            "cpu_us_per_task": round(used / total * 1e6, 1), "broker_cpu_us_per_task": None}


def parse_only(values: list[str]) -> list[str]:
    names = [name for value in values for name in value.split(",") if name]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        raise SystemExit(f"--only: unknown rows {', '.join(unknown)}; known: {', '.join(ROWS)}")
    return [name for name in ROWS if name in names]  # the documented order


def versus_peers(rows: dict[str, dict[str, Any]], mode: str) -> dict[str, Any]:
    """sluice_defaults / the best of dramatiq and arq, in one mode."""
    def rate(name: str) -> float | None:
        value = rows.get(name, {}).get("tasks_per_s")
        return float(value) if value else None

    ours = rate(f"sluice_defaults_{mode}")
    peers = {system: rate(f"{system}_{mode}") for system in redis_queues.SYSTEMS}
    best = max((v for v in peers.values() if v), default=None)
    ratio = round(ours / best, 3) if ours and best else None
    return {"sluice_defaults_tasks_per_s": ours,
            **{f"{system}_tasks_per_s": value for system, value in peers.items()},
            "ratio": ratio, "target": f">= {TARGET_VS_PEERS:g}",
            "met": None if ratio is None else ratio >= TARGET_VS_PEERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks in every row")
    parser.add_argument("--concurrency", type=int, default=64, help="the tuned rows'")
    parser.add_argument("--latency-s", type=float, default=10.0)
    parser.add_argument("--handler", default=ASYNC_NOOP, help="the tuned rows'")
    parser.add_argument("--peer-timeout-s", type=float, default=3600.0,
                        help="per dramatiq or arq row")
    parser.add_argument("--only", nargs="+", default=[",".join(ROWS)], metavar="ROW[,ROW]",
                        help=f"rows to run (default all: {', '.join(ROWS)})")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    only = parse_only(args.only)

    rows: dict[str, dict[str, Any]] = {}
    thr: dict[str, Any] | None = None
    lat: dict[str, Any] | None = None
    broker = None
    root = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    tuned = PIPELINE.format(handler=args.handler, concurrency=args.concurrency)
    try:
        with RssSampler() as rss:
            if "sluice_tuned_live" in only:
                thr = asyncio.run(phase(str(root / "t"), tuned, args.tasks, 100, None, rss))
                rows["sluice_tuned_live"] = live_row(thr, args.handler)
            if "latency" in only:
                lat = asyncio.run(phase(str(root / "l"), tuned, int(1000 * args.latency_s), 1,
                                        1000.0, rss))
            if "sluice_defaults_live" in only:
                rows["sluice_defaults_live"] = live_row(asyncio.run(phase(
                    str(root / "d"), DEFAULTS_PIPELINE.format(handler=ASYNC_NOOP),
                    args.tasks, 100, None, rss)), ASYNC_NOOP)
        for name, handler in (("sluice_defaults_drain", ASYNC_NOOP),
                              ("sluice_sync_drain", SYNC_NOOP)):
            if name in only:
                rows[name] = asyncio.run(backlog_phase(str(root / name), handler, args.tasks))
        if any(name in only for name in PEER_ROWS):
            broker = redis_queues.start_redis()
            for name in PEER_ROWS:
                if name in only:
                    system, mode = name.rsplit("_", 1)
                    (root / name).mkdir()
                    rows[name] = redis_queues.run_row(system, mode, args.tasks, root / name,
                                                      args.peer_timeout_s)
                    print(f"{name}: {json.dumps(rows[name])}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    samples = (thr["rss_mb"] if thr else []) + (lat["rss_mb"] if lat else [])
    rss_thr = thr["rss_mb"] if thr else []
    tenth = max(len(rss_thr) // 10, 1)
    versus = {mode: versus_peers(rows, mode) for mode in ("live", "drain")}
    result = {
        "benchmark": "embedded",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "rows_run": only,
        "handler": args.handler,
        "concurrency": args.concurrency,
        "tasks": args.tasks,
        "tasks_per_s": round(thr["tasks_per_s"], 1) if thr else None,
        "throughput_elapsed_s": round(thr["elapsed_s"], 3) if thr else None,
        "latency_rate_per_s": 1000,
        "latency_tasks": int(1000 * args.latency_s) if lat else None,
        "submit_to_start_p50_ms": round(lat["submit_to_start_p50_ms"], 2) if lat else None,
        "submit_to_start_p99_ms": round(lat["submit_to_start_p99_ms"], 2) if lat else None,
        "peak_rss_mb": round(max(samples), 1) if samples else None,
        "rss_first_tenth_mb": round(max(rss_thr[:tenth]), 1) if rss_thr else None,
        "rss_last_tenth_mb": round(max(rss_thr[-tenth:]), 1) if rss_thr else None,
        "sluice_defaults_live_tasks_per_s": rows.get("sluice_defaults_live", {}).get(
            "tasks_per_s"),
        "backlog_at_defaults": [rows[name] for name in ("sluice_defaults_drain",
                                                        "sluice_sync_drain") if name in rows],
        "broker": broker,
        "vs_redis_queues": versus,
        "cpu_us_per_task": {name: row.get("cpu_us_per_task") for name, row in rows.items()},
        "rows": rows,
        "targets": {"tasks_per_s": ">= 5000", "submit_to_start_p99_ms": "<= 50 at 1000/s",
                    "vs_redis_queues.*.ratio": f">= {TARGET_VS_PEERS:g} (sluice_defaults / "
                                               "max(dramatiq, arq))"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(k) for k in result)
    for key, value in result.items():
        if not isinstance(value, dict | list):
            print(f"{key:<{width}}  {value}")
    print(f"\n{'row':<22} {'tasks/s':>10} {'cpu µs/task':>12} {'broker µs/task':>15} "
          f"{'elapsed s':>10}")
    for name, row in rows.items():
        broker_us = row.get("broker_cpu_us_per_task")
        print(f"{name:<22} {row['tasks_per_s']:>10,.1f} {row['cpu_us_per_task']:>12,.1f} "
              f"{'-' if broker_us is None else f'{broker_us:,.1f}':>15} "
              f"{row['elapsed_s']:>10,.2f}")
    for mode, one in versus.items():
        if one["ratio"] is not None:
            print(f"sluice_defaults_{mode} / max(dramatiq, arq): {one['ratio']} "
                  f"(target {one['target']}: {'met' if one['met'] else 'missed'})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
