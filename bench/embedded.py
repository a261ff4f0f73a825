"""Benchmark: tasks through the embedded queue with a no-op handler, end to end.

Two phases, each with one worker (this process) and one submitter (a child process):

1. throughput: the submitter enqueues N tasks (default 100,000) in batches of 100 as fast as it
   can while the worker runs them; ``tasks_per_s`` = N / (first submit → last task finished).
2. latency: the submitter enqueues one task per millisecond (1,000 tasks/s) for
   ``--latency-s`` seconds; submit→start is the task's ``started_at - queued_at``.

3. backlog at the defaults (what a user tries first: no ``consumer`` section, so concurrency
   8): ``--backlog`` tasks (default 20,000) are queued first, then one worker drains them from
   cold, once with an async and once with a sync no-op handler; ``tasks_per_s`` and the
   worker's CPU use (process CPU seconds / wall seconds; 1.0 = one core busy) while it drained.

The worker's RSS is sampled every 0.25 s. Writes bench/results/embedded.json and prints a table.
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


async def phase(data_dir: str, handler: str, concurrency: int, total: int, batch: int,
                rate_per_s: float | None, rss: RssSampler) -> dict[str, Any]:
    config = parse_pipeline(PIPELINE.format(handler=handler, concurrency=concurrency))
    loop = build(config, Path(data_dir))
    stop = asyncio.Event()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=submitter, args=(data_dir, total, batch, rate_per_s))
    runner = asyncio.create_task(loop.run(stop))
    first_sample = len(rss.samples)
    start = time.perf_counter()
    proc.start()
    while loop.stats.succeeded < total:
        await asyncio.sleep(0.01)
        if not proc.is_alive() and proc.exitcode not in (0, None):
            raise RuntimeError(f"the submitter failed with exit code {proc.exitcode}")
    elapsed = time.perf_counter() - start
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
    return {"tasks": total, "elapsed_s": elapsed, "tasks_per_s": total / elapsed,
            "rss_mb": during,
            "submit_to_start_p50_ms": percentile(waits, 50),
            "submit_to_start_p99_ms": percentile(waits, 99)}


DEFAULTS_PIPELINE = """
name: bench
source: {{embedded: {{queue: bench}}}}
handler: {{python: {handler}}}
"""


async def backlog_phase(data_dir: str, handler: str, total: int) -> dict[str, Any]:
    """Queue ``total`` tasks, then drain them with one worker at the default settings."""
    submitter(data_dir, total, 500, None)
    loop = build(parse_pipeline(DEFAULTS_PIPELINE.format(handler=handler)), Path(data_dir))
    proc = psutil.Process()
    cpu_before, start = proc.cpu_times(), time.perf_counter()
    await loop.run(asyncio.Event(), drain=True)
    elapsed = time.perf_counter() - start
    cpu_after = proc.cpu_times()
    cpu_s = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    if loop.stats.succeeded != total:
        raise RuntimeError(f"drained {loop.stats.succeeded} of {total} tasks")
    await loop.handler.close()
    Database.open(data_dir).close()  # its checkpoint thread must not run on into the next phase
    return {"handler": handler, "concurrency": loop.config.consumer.concurrency,
            "tasks": total, "elapsed_s": round(elapsed, 3),
            "tasks_per_s": round(total / elapsed, 1), "cpu_cores_used": round(cpu_s / elapsed, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-s", type=float, default=10.0)
    parser.add_argument("--handler", default="bench.handlers:noop")
    parser.add_argument("--backlog", type=int, default=20_000,
                        help="tasks queued before the default-settings drain")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    try:
        with RssSampler() as rss:
            thr = asyncio.run(phase(str(root / "t"), args.handler, args.concurrency,
                                    args.tasks, 100, None, rss))
            lat_tasks = int(1000 * args.latency_s)
            lat = asyncio.run(phase(str(root / "l"), args.handler, args.concurrency,
                                    lat_tasks, 1, 1000.0, rss))
        backlog = [asyncio.run(backlog_phase(str(root / f"b{i}"), handler, args.backlog))
                   for i, handler in enumerate(("bench.handlers:noop",
                                                "bench.handlers:noop_sync"))]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    samples = thr["rss_mb"] + lat["rss_mb"]
    rss_thr = thr["rss_mb"]
    tenth = max(len(rss_thr) // 10, 1)
    result = {
        "benchmark": "embedded",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "handler": args.handler,
        "concurrency": args.concurrency,
        "tasks": args.tasks,
        "tasks_per_s": round(thr["tasks_per_s"], 1),
        "throughput_elapsed_s": round(thr["elapsed_s"], 3),
        "latency_rate_per_s": 1000,
        "latency_tasks": lat_tasks,
        "submit_to_start_p50_ms": round(lat["submit_to_start_p50_ms"], 2),
        "submit_to_start_p99_ms": round(lat["submit_to_start_p99_ms"], 2),
        "peak_rss_mb": round(max(samples), 1),
        "rss_first_tenth_mb": round(max(rss_thr[:tenth]), 1),
        "rss_last_tenth_mb": round(max(rss_thr[-tenth:]), 1),
        "backlog_at_defaults": backlog,
        "targets": {"tasks_per_s": ">= 5000", "submit_to_start_p99_ms": "<= 50 at 1000/s"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(k) for k in result)
    for key, value in result.items():
        if not isinstance(value, dict | list):
            print(f"{key:<{width}}  {value}")
    for row in backlog:
        print(f"backlog at defaults ({row['handler']}, concurrency {row['concurrency']}): "
              f"{row['tasks_per_s']} tasks/s, {row['cpu_cores_used']} cores")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
