"""Benchmark: each broker → no-op Python handler → the same broker, sluice at its defaults
against a plain loop on the same client library, in the same run.

For each broker (Kafka, RabbitMQ, NATS JetStream, Redis Streams, MQTT; ``--only`` picks some)
two rows, each on a queue (topic, stream) of its own holding the same N messages of 200 bytes
(default N = 100,000), each run as its own process started on a full queue:

- ``plain``: a loop written with the broker's own client library the way its documentation
  recommends for throughput: consume, publish each message to the output queue (confirmed by
  the broker), acknowledge (``bench/peers/<broker>_plain.py``: no task records, no retries, no
  dead letters: the practical limit of Python on that client);
- ``sluice`` (the headline: what a user tries first): ``sluice run`` of a pipeline with that
  broker's source, ``bench.handlers:noop`` and an ``on_success`` destination on the same broker,
  and no ``consumer`` section: concurrency 8, every task recorded in the SQLite task store,
  results through the durable outbox (or with the source's commits, where the source writes
  them itself).

Throughput = N / (process start → the output holds N messages). The CPU time of the process
tree is reported as ``cpu_us_per_msg``. Target: sluice >= 0.5x plain on every broker. Writes
bench/results/brokers.json (``--out``); a run of some brokers (``--only``) keeps the others'
rows there, each with the time it was measured. The brokers are those ``scripts/services
start`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from bench.peers.procs import tree_cpu_s

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "brokers.json"
BROKERS = ("kafka", "rabbitmq", "nats", "redis", "mqtt")
TARGET = 0.5
POLL_S = 0.25


def peer(broker: str) -> ModuleType:
    return importlib.import_module(f"bench.peers.{broker}_plain")


def count(mod: ModuleType, out: str) -> int:
    return int(asyncio.run(mod.count(out)))


def measure(row: str, cmd: list[str], mod: ModuleType, out: str, n: int, timeout_s: float,
            log: Path) -> dict[str, Any]:
    """Start ``cmd``; the time until ``out`` holds ``n`` messages, and the CPU it used."""
    before = psutil.Process().cpu_times()
    with log.open("w") as log_file:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                stdout=log_file, stderr=log_file, start_new_session=True)
        done = 0
        try:
            while True:
                done = count(mod, out)
                now = time.perf_counter()
                if done >= n:
                    break
                if proc.poll() is not None and proc.returncode != 0:
                    return {"error": f"exited with {proc.returncode}: "
                                     + log.read_text()[-800:]}
                if now - started > timeout_s:
                    return {"error": f"timed out after {timeout_s:g}s with {done} of {n}"}
                time.sleep(POLL_S)
            elapsed = time.perf_counter() - started
            cpu_s = tree_cpu_s(psutil.Process(proc.pid)) if proc.poll() is None else None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if cpu_s is None:  # it exited by itself (the plain loop): the reaped child's times
            usage = psutil.Process().cpu_times()
            cpu_s = (usage.children_user - before.children_user
                     + usage.children_system - before.children_system)
    result = {"msgs_per_s": round(n / elapsed, 1), "elapsed_s": round(elapsed, 2),
              "cpu_s": round(cpu_s, 2), "cpu_us_per_msg": round(cpu_s / n * 1e6, 1),
              "output_messages": done}
    print(f"  {row}: {json.dumps(result)}", flush=True)
    return result


def run_row(broker: str, row: str, n: int, size_b: int, work: Path,
            timeout_s: float) -> dict[str, Any]:
    mod = peer(broker)
    tag = uuid.uuid4().hex[:8]
    queue, out = f"bench-{row}-in-{tag}", f"bench-{row}-out-{tag}"
    if row == "sluice":
        file = work / f"{broker}.yaml"
        file.write_text(mod.pipeline_yaml(f"bench-{broker}", queue, out))
        cmd = [sys.executable, "-m", "sluice.cli", "run", str(file), "--data-dir",
               str(work / f"{broker}-data"), "--log-level", "warning"]
    else:
        cmd = [sys.executable, "-c",
               f"import asyncio; from bench.peers.{broker}_plain import plain_loop; "
               f"asyncio.run(plain_loop({queue!r}, {out!r}, {n}))"]
    try:
        if hasattr(mod, "prepare"):
            asyncio.run(mod.prepare(out))
        t0 = time.perf_counter()
        asyncio.run(mod.fill(queue, n, size_b))
        print(f"  {row}: filled {queue} with {n:,} messages in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        return measure(row, cmd, mod, out, n, timeout_s, work / f"{broker}-{row}.log")
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(mod.delete(queue, out))


def parse_only(values: list[str]) -> list[str]:
    names = [name for value in values for name in value.split(",") if name]
    unknown = sorted(set(names) - set(BROKERS))
    if unknown:
        raise SystemExit(f"--only: unknown brokers {', '.join(unknown)}; "
                         f"known: {', '.join(BROKERS)}")
    return [name for name in BROKERS if name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=200, help="message bytes")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per row")
    parser.add_argument("--only", nargs="+", default=[",".join(BROKERS)],
                        metavar="BROKER[,BROKER]",
                        help=f"brokers to run (default all: {', '.join(BROKERS)})")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    only = parse_only(args.only)
    work = Path(tempfile.mkdtemp(prefix="sluice-brokers-bench-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        for broker in only:
            print(f"{broker}:", flush=True)
            rows = {row: run_row(broker, row, args.messages, args.size, work, args.timeout_s)
                    for row in ("plain", "sluice")}
            plain, ours = rows["plain"].get("msgs_per_s"), rows["sluice"].get("msgs_per_s")
            ratio = round(ours / plain, 3) if plain and ours else None
            results[broker] = {"sluice_vs_plain": ratio, "target": f">= {TARGET:g}",
                               "met": None if ratio is None else ratio >= TARGET,
                               "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               **rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(only) < len(BROKERS) and args.out.exists():  # a subset: the others' rows are kept
        kept = json.loads(args.out.read_text()).get("brokers", {})
        results = {b: results.get(b) or kept[b] for b in BROKERS if b in results or b in kept}
    result = {
        "benchmark": "brokers",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "messages": args.messages, "message_bytes": args.size,
        "sluice_config": "defaults: no consumer section (concurrency 8, every task recorded "
                         "in the SQLite task store); handler bench.handlers:noop; results "
                         "on_success to the same broker",
        "plain": "bench/peers/<broker>_plain.py: consume, publish each (confirmed), ack",
        "brokers": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'broker':<10} {'plain msg/s':>12} {'sluice msg/s':>13} {'ratio':>7} "
          f"{'sluice cpu µs/msg':>18}")
    for broker, r in results.items():
        print(f"{broker:<10} {r['plain'].get('msgs_per_s', '-')!s:>12} "
              f"{r['sluice'].get('msgs_per_s', '-')!s:>13} {r['sluice_vs_plain']!s:>7} "
              f"{r['sluice'].get('cpu_us_per_msg', '-')!s:>18}")


if __name__ == "__main__":
    main()
