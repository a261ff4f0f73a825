"""bench/embedded.py's dramatiq and arq rows: N no-op tasks through Redis, one worker process.

Each row starts on an empty Redis database (``SLUICE_BENCH_REDIS_DB``, default 11, flushed
before the row; Redis itself is ``scripts/services start redis`` at 127.0.0.1:6379) and runs
one worker at the system's defaults:

- dramatiq: ``dramatiq --processes 1 bench.peers.dramatiq_tasks`` (1 process × its default
  8 threads; default middleware);
- arq: ``arq bench.peers.arq_tasks.WorkerSettings`` (max_jobs 10, poll_delay 0.5 s, ...).

Two modes, the shapes of sluice's rows in bench/embedded.py:

- ``live``: the worker is up (it has run one warm-up task), then an enqueuer process sends the
  N tasks as fast as it can (dramatiq: ``actor.send()`` one by one, the only way it has;
  arq: ``enqueue_job`` 100 at a time with ``asyncio.gather``); timed from the enqueuer's start
  to the last task finished, as sluice's submitter is.
- ``drain``: the N tasks are queued first, then the worker process is started; timed from the
  worker's first finished task to its last (sluice's drain is timed from its loop's start, its
  process already up); the worker's boot (imports, forking, connecting) is ``startup_s``.

Completion is read from the broker's own bookkeeping, polled every 5 ms, so the tasks do no
extra work: dramatiq keeps each message in the hash ``dramatiq:default.msgs`` until its ack;
arq keeps each job id in the sorted set ``arq:queue`` until the job has finished.

CPU: ``cpu_us_per_task`` is the worker's process tree (user + system) over the timed window
/ N; ``broker_cpu_us_per_task`` is Redis's own (INFO cpu) over the same window / N.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import redis

from bench.peers.procs import tree_cpu_s

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = ("dramatiq", "arq")
DB = int(os.environ.get("SLUICE_BENCH_REDIS_DB", "11"))
URL = f"redis://127.0.0.1:6379/{DB}"
ARQ_BATCH = 100
POLL_S = 0.005


def start_redis() -> str:
    """Start Redis with scripts/services (a running one is reused); its version."""
    subprocess.run([str(ROOT / "scripts" / "services"), "start", "redis"], check=True)
    info = client().info("server")
    return f"Redis {info['redis_version']} (scripts/services) at 127.0.0.1:6379, db {DB}"


def client() -> redis.Redis:
    return redis.Redis.from_url(URL)


def pending(system: str, r: redis.Redis) -> int:
    """Tasks enqueued and not finished yet, from the broker's own keys (a sync client's
    replies are typed by redis-py)."""
    if system == "dramatiq":
        from bench.peers.dramatiq_tasks import MESSAGES_KEY

        return r.hlen(MESSAGES_KEY)
    from bench.peers.arq_tasks import QUEUE_KEY

    return r.zcard(QUEUE_KEY)


def worker_cmd(system: str) -> list[str]:
    if system == "dramatiq":
        return [sys.executable, "-m", "dramatiq", "--processes", "1",
                "bench.peers.dramatiq_tasks"]
    return [sys.executable, "-m", "arq", "bench.peers.arq_tasks.WorkerSettings"]


def enqueue(system: str, n: int, url: str) -> None:
    """Send ``n`` no-op tasks (the body of the enqueuer process)."""
    os.environ["SLUICE_BENCH_REDIS_URL"] = url
    if system == "dramatiq":
        from bench.peers import dramatiq_tasks

        for _ in range(n):
            dramatiq_tasks.noop.send()
        dramatiq_tasks.broker.close()
    else:
        asyncio.run(_arq_enqueue(n))


async def _arq_enqueue(n: int) -> None:
    from arq import create_pool

    from bench.peers import arq_tasks

    pool = await create_pool(arq_tasks.WorkerSettings.redis_settings)
    try:
        for sent in range(0, n, ARQ_BATCH):
            await asyncio.gather(*(pool.enqueue_job("noop")
                                   for _ in range(min(ARQ_BATCH, n - sent))))
    finally:
        await pool.aclose()


def enqueuer(system: str, n: int) -> subprocess.Popen[bytes]:
    """An enqueuer process sending ``n`` tasks (a fresh interpreter importing only this module
    and the system's, as a client application would)."""
    return subprocess.Popen([sys.executable, "-m", "bench.peers.redis_queues", system, str(n)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def redis_cpu_s(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def wait_for(check: Callable[[], bool], worker: subprocess.Popen[bytes], log: Path,
             deadline: float, what: str) -> float:
    """Poll ``check`` until true; the time it was; raise if the worker dies or time runs out."""
    while True:
        now = time.perf_counter()
        if check():
            return now
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode} while {what}; "
                               f"the end of {log.name}: {log.read_text()[-800:]}")
        if now > deadline:
            raise RuntimeError(f"timed out while {what}")
        time.sleep(POLL_S)


def stop(worker: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)


def run_row(system: str, mode: str, n: int, work: Path, timeout_s: float) -> dict[str, Any]:
    """One row: ``system`` (dramatiq, arq) in ``mode`` (live, drain) with ``n`` tasks."""
    r = client()
    r.flushdb()
    log = work / f"{system}_{mode}.log"
    env = dict(os.environ, SLUICE_BENCH_REDIS_URL=URL, PYTHONPATH=str(ROOT))
    deadline = time.perf_counter() + timeout_s
    result: dict[str, Any] = {"system": system, "mode": mode, "tasks": n,
                              "worker": " ".join(worker_cmd(system)[2:])}
    if mode == "drain":
        if (code := enqueuer(system, n).wait()) != 0:
            raise RuntimeError(f"the {system} enqueuer failed with exit code {code}")
        if (queued := pending(system, r)) != n:
            raise RuntimeError(f"{queued} of {n} {system} tasks queued")
    with log.open("wb") as log_file:
        started = time.perf_counter()
        worker = subprocess.Popen(worker_cmd(system), cwd=work, env=env, stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            tree = psutil.Process(worker.pid)
            if mode == "drain":
                first = wait_for(lambda: pending(system, r) < n, worker, log, deadline,
                                 "waiting for its first task")
                cpu0, broker0 = tree_cpu_s(tree), redis_cpu_s(r)
                result["startup_s"] = round(first - started, 3)
                done = wait_for(lambda: pending(system, r) == 0, worker, log, deadline,
                                "draining")
            else:
                if (code := enqueuer(system, 1).wait()) != 0:
                    raise RuntimeError(f"the {system} enqueuer failed with exit code {code}")
                wait_for(lambda: pending(system, r) == 0, worker, log, deadline,
                         "running the warm-up task")
                cpu0, broker0 = tree_cpu_s(tree), redis_cpu_s(r)
                first = time.perf_counter()
                proc = enqueuer(system, n)
                sent: list[float] = []

                def finished() -> bool:
                    if not sent:
                        if (code := proc.poll()) is None:
                            return False
                        if code != 0:
                            raise RuntimeError(f"the {system} enqueuer failed with exit "
                                               f"code {code}")
                        sent.append(time.perf_counter())
                    return pending(system, r) == 0

                try:
                    done = wait_for(finished, worker, log, deadline, "running the tasks")
                finally:
                    if proc.poll() is None:
                        proc.kill()
                    proc.wait()
                result["enqueue_s"] = round(sent[0] - first, 3)
            cpu_s, broker_s = tree_cpu_s(tree) - cpu0, redis_cpu_s(r) - broker0
        finally:
            stop(worker)
    elapsed = done - first
    result.update({"elapsed_s": round(elapsed, 3), "tasks_per_s": round(n / elapsed, 1),
                   "cpu_us_per_task": round(cpu_s / n * 1e6, 1),
                   "broker_cpu_us_per_task": round(broker_s / n * 1e6, 1)})
    r.flushdb()
    r.close()
    return result


if __name__ == "__main__":  # the enqueuer: python -m bench.peers.redis_queues SYSTEM N
    enqueue(sys.argv[1], int(sys.argv[2]), URL)
