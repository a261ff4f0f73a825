"""Benchmark: Kafka → no-op handler → Kafka, against the practical limit, Faust and Quix Streams.

Each row gets its own input topic (6 partitions, created by the bench: the broker's
auto-create is off) holding the same N messages of 200 bytes (default N = 1,000,000), and its
own output topic and consumer group; each runs as its own process, started on a topic already
full:

- ``raw_loop``: a Python loop on confluent-kafka: consume 500, produce each, commit
  asynchronously (no tracking, no retries: the practical limit of Python on this client);
- ``sluice_defaults`` (the headline: what a user tries first): ``sluice run`` of a pipeline
  with a kafka source, ``bench.handlers:noop`` and a kafka ``on_success`` destination (the
  result record of each task, written by the source before it commits the offsets), and no
  ``consumer`` section: concurrency 8, ordering by key, every task recorded in the SQLite
  task store;
- ``sluice`` (tuned): the same with ``consumer.concurrency: --concurrency`` (default 256);
- ``sluice_untracked`` (tuned): that with ``consumer.track_tasks: false`` (no task records);
- ``sluice_batch``: sluice_defaults with a batch handler, ``handler: {python:
  "bench.handlers:noop_batch", batch: {max_size: 500, max_wait_ms: 20}}`` (the function gets
  a list of messages and returns one result per message); skipped, with the reason printed and
  recorded, when that pipeline does not validate (a sluice without batch handlers, or no
  ``noop_batch`` in bench/handlers.py);
- ``faust``: a faust-streaming agent forwarding each value to the output topic;
- ``quix``: a Quix Streams 3 app, ``app.dataframe(input).apply(noop).to_topic(output)``, at
  Quix's defaults (JSON values, at-least-once, its commit interval) with
  ``auto_offset_reset="earliest"`` (bench/peers/quix_app.py). Quix Streams pins confluent-kafka
  below sluice's, so it runs in a venv of its own, made on first use
  (bench/peers/quix_env.py; ``SLUICE_BENCH_QUIX_PYTHON`` names another interpreter).

Throughput = N / (process start → the output topic holds N records); the time to the first
output record (group join, first fetch) and the CPU time of the process tree (all threads,
user + system, sampled when the output holds N) are reported too, with ``cpu_us_per_msg`` =
that CPU / N. Headline ratios (targets): sluice_defaults / quix (>= 0.5), sluice_untracked /
quix (>= 1.0), sluice_batch / raw_loop (>= 0.6), besides the earlier ones against raw_loop
and faust. ``--only row,row`` runs a subset. Writes bench/results/kafka.json (``--out``).
Brokers: ``SLUICE_KAFKA_BROKERS`` (default 127.0.0.1:9092; start it with
``scripts/services start kafka``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from bench.peers import quix_env
from bench.peers.procs import tree_cpu_s

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "kafka.json"
QUIX_APP = ROOT / "bench" / "peers" / "quix_app.py"
ROWS = ("raw_loop", "sluice_defaults", "sluice", "sluice_untracked", "sluice_batch", "faust",
        "quix")
# name: (numerator, denominator, target): the ratios of msgs/s the JSON leads with.
HEADLINE = {"sluice_defaults_vs_quix": ("sluice_defaults", "quix", 0.5),
            "sluice_untracked_vs_quix": ("sluice_untracked", "quix", 1.0),
            "sluice_batch_vs_raw_loop": ("sluice_batch", "raw_loop", 0.6)}
BROKERS = os.environ.get("SLUICE_KAFKA_BROKERS", "127.0.0.1:9092")
PARTITIONS = 6

PIPELINE = """
name: kbench
source: {{kafka: {{brokers: "{brokers}", topic: {topic}, group: {group}}}}}
handler: {handler}
{consumer}
on_success:
  - kafka: {{topic: {out}}}
"""

RAW_LOOP = """
import os, signal, sys
from confluent_kafka import Consumer, Producer
running = True
def stop(*_):
    global running
    running = False
signal.signal(signal.SIGTERM, stop)
c = Consumer({"bootstrap.servers": os.environ["BROKERS"], "group.id": os.environ["GROUP"],
              "auto.offset.reset": "earliest", "enable.auto.commit": False})
p = Producer({"bootstrap.servers": os.environ["BROKERS"], "linger.ms": 5,
              "enable.idempotence": True})
c.subscribe([os.environ["IN"]])
out = os.environ["OUT"]
while running:
    batch = c.consume(500, 0.2)
    for m in batch:
        if m.error():
            continue
        while True:
            try:
                p.produce(out, m.value(), m.key())
                break
            except BufferError:
                p.poll(0.01)
    p.poll(0)
    if batch:
        c.commit(asynchronous=True)
p.flush(30)
c.close()
"""

FAUST_APP = """
import os
import faust

app = faust.App(os.environ["GROUP"], broker="kafka://" + os.environ["BROKERS"],
                topic_partitions=6, store="memory://", web_enabled=False,
                consumer_auto_offset_reset="earliest", producer_linger_ms=5)
source = app.topic(os.environ["IN"], value_type=bytes, value_serializer="raw",
                   key_type=bytes, key_serializer="raw")
out = app.topic(os.environ["OUT"], value_type=bytes, value_serializer="raw",
                key_type=bytes, key_serializer="raw")


@app.agent(source)
async def forward(stream):
    async for value in stream:
        await out.send(value=value)


if __name__ == "__main__":
    app.main()
"""


_ADMIN: list[AdminClient] = []


def admin() -> AdminClient:
    """One client for the run (a client dropped while a request is out cancels it)."""
    if not _ADMIN:
        _ADMIN.append(AdminClient({"bootstrap.servers": BROKERS}))
    return _ADMIN[0]


def create(topic: str) -> None:
    admin().create_topics([NewTopic(topic, num_partitions=PARTITIONS,
                                    replication_factor=1)])[topic].result(60)


def fill(topic: str, n: int, size: int) -> None:
    producer = Producer({"bootstrap.servers": BROKERS, "linger.ms": 20,
                         "batch.size": 1_000_000, "enable.idempotence": True})
    payload = json.dumps({"pad": "x" * (size - 11)}).encode()[:size]
    for i in range(n):
        while True:
            try:
                producer.produce(topic, payload, key=str(i).encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError(f"filling {topic}: messages left unsent")


def count(topic: str, consumer: Consumer) -> int:
    total = 0
    for p in range(PARTITIONS):
        _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        total += high
    return total


def measure(name: str, cmd: list[str], env: dict[str, str], out: str, n: int,
            timeout_s: float, log: Path, cwd: Path = ROOT) -> dict[str, Any]:
    watcher = Consumer({"bootstrap.servers": BROKERS, "group.id": f"watch-{uuid.uuid4().hex}"})
    with log.open("w") as log_file:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log_file, stderr=log_file,
                                start_new_session=True)
        first: float | None = None
        done = 0
        try:
            while True:
                done = count(out, watcher)
                now = time.perf_counter()
                if done and first is None:
                    first = now
                if done >= n:
                    break
                if proc.poll() is not None:
                    return {"error": f"exited with {proc.returncode}; see {log.name}: "
                                     + log.read_text()[-800:]}
                if now - started > timeout_s:
                    return {"error": f"timed out after {timeout_s:g}s with {done} of {n}"}
                time.sleep(0.25)
            elapsed = time.perf_counter() - started
            cpu_s = tree_cpu_s(psutil.Process(proc.pid))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            watcher.close()
    result = {"msgs_per_s": round(n / elapsed, 1), "elapsed_s": round(elapsed, 2),
              "first_output_s": round((first or started) - started, 2),
              "cpu_s": round(cpu_s, 2), "cpu_us_per_msg": round(cpu_s / n * 1e6, 1),
              "output_records": done}
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def sluice_pipeline(name: str, src: str, out: str, group: str, concurrency: int) -> str:
    handler = '{python: "bench.handlers:noop"}'
    consumer = ""
    if name == "sluice_batch":
        handler = ('{python: "bench.handlers:noop_batch", '
                   'batch: {max_size: 500, max_wait_ms: 20}}')
    elif name != "sluice_defaults":
        consumer = (f"consumer: {{concurrency: {concurrency}, "
                    f"track_tasks: {str(name == 'sluice').lower()}}}")
    return PIPELINE.format(brokers=BROKERS, topic=src, group=group, out=out, handler=handler,
                           consumer=consumer)


def invalid(file: Path) -> str | None:
    """Why ``sluice validate`` refuses the pipeline file, or None when it passes."""
    done = subprocess.run([sys.executable, "-m", "sluice.cli", "validate", str(file)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True)
    if done.returncode == 0:
        return None
    return (done.stderr.strip() or done.stdout.strip())[-800:] or f"exit {done.returncode}"


def run_one(name: str, n: int, size: int, work: Path, timeout_s: float,
            concurrency: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    src, out, group = f"bench-{name}-in-{tag}", f"bench-{name}-out-{tag}", f"bench-{name}-{tag}"
    env = dict(os.environ, BROKERS=BROKERS, IN=src, OUT=out, GROUP=group,
               PYTHONPATH=str(ROOT))
    cwd = ROOT
    if name.startswith("sluice"):
        file = work / "kbench.yaml"
        file.write_text(sluice_pipeline(name, src, out, group, concurrency))
        if (reason := invalid(file)) is not None:  # before any topic is made or filled
            print(f"{name}: skipped: the pipeline does not validate:\n{reason}", flush=True)
            return {"skipped": f"the pipeline does not validate: {reason}"}
        cmd = [sys.executable, "-m", "sluice.cli", "run", str(file), "--data-dir",
               str(work / "data"), "--log-level", "warning"]
    elif name == "raw_loop":
        cmd = [sys.executable, "-c", RAW_LOOP]
    elif name == "faust":
        app = work / "faust_bench.py"
        app.write_text(textwrap.dedent(FAUST_APP))
        cmd = [sys.executable, str(app), "worker", "-l", "warn", "--without-web"]
    else:  # quix: its own interpreter; its state directory (unused: no state) in the scratch
        cmd = [str(quix_env.python()), str(QUIX_APP)]
        env["STATE_DIR"] = str(work / "state")
        cwd = work
    create(src)
    create(out)
    try:
        t0 = time.perf_counter()
        fill(src, n, size)
        print(f"{name}: filled {src} with {n:,} messages in {time.perf_counter() - t0:.1f}s",
              flush=True)
        return measure(name, cmd, env, out, n, timeout_s, work / f"{name}.log", cwd)
    finally:
        with contextlib.suppress(Exception):
            for future in admin().delete_topics([src, out], operation_timeout=30).values():
                future.result(60)


def parse_only(values: list[str]) -> list[str]:
    names = [name for value in values for name in value.split(",") if name]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        raise SystemExit(f"--only: unknown rows {', '.join(unknown)}; known: {', '.join(ROWS)}")
    return [name for name in ROWS if name in names]  # the documented order


def peer_versions(only: list[str]) -> dict[str, str]:
    versions = {}
    if "faust" in only:
        from importlib.metadata import version

        versions["faust"] = f"faust-streaming {version('faust-streaming')}"
    if "quix" in only:
        versions["quix"] = quix_env.version(quix_env.python())
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=200, help="message bytes")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per system")
    parser.add_argument("--concurrency", type=int, default=256,
                        help="sluice's consumer.concurrency (a no-op handler)")
    parser.add_argument("--only", nargs="+", default=[",".join(ROWS)], metavar="ROW[,ROW]",
                        help=f"rows to run (default all: {', '.join(ROWS)})")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    only = parse_only(args.only)
    versions = peer_versions(only)  # and the quix venv made, before any row is timed
    work = Path(tempfile.mkdtemp(prefix="sluice-kbench-"))
    try:
        rows: dict[str, dict[str, Any]] = {}
        for name in only:
            (work / name).mkdir()
            rows[name] = run_one(name, args.messages, args.size, work / name, args.timeout_s,
                                 args.concurrency)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def rate(name: str) -> float | None:
        value = rows.get(name, {}).get("msgs_per_s")
        return float(value) if value else None

    sluice, raw, faust = rate("sluice"), rate("raw_loop"), rate("faust")
    untracked, defaults = rate("sluice_untracked"), rate("sluice_defaults")
    headline: dict[str, dict[str, Any]] = {}
    for key, (top, bottom, target) in HEADLINE.items():
        over, under = rate(top), rate(bottom)
        ratio = round(over / under, 3) if over and under else None
        headline[key] = {"ratio": ratio, "target": f">= {target:g}",
                         "met": None if ratio is None else ratio >= target}
    result = {
        "benchmark": "kafka",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "broker": f"Apache Kafka 4.3.1 (scripts/services) at {BROKERS}",
        "peers": versions,
        "rows_run": only,
        "messages": args.messages, "message_bytes": args.size, "partitions": PARTITIONS,
        "headline": headline,
        "quix_msgs_per_s": rate("quix"), "sluice_batch_msgs_per_s": rate("sluice_batch"),
        "sluice_defaults_msgs_per_s": defaults,
        "defaults_ratio_vs_faust": round(defaults / faust, 3) if defaults and faust else None,
        "sluice_msgs_per_s": sluice, "raw_loop_msgs_per_s": raw, "faust_msgs_per_s": faust,
        "ratio_vs_raw": round(sluice / raw, 3) if sluice and raw else None,
        "ratio_vs_faust": round(sluice / faust, 3) if sluice and faust else None,
        "sluice_untracked_msgs_per_s": untracked,
        "untracked_ratio_vs_raw": round(untracked / raw, 3) if untracked and raw else None,
        "untracked_ratio_vs_faust": (round(untracked / faust, 3) if untracked and faust
                                     else None),
        "sluice_config": {"concurrency": f"sluice_defaults: 8 (the default); sluice and "
                                         f"sluice_untracked: {args.concurrency}",
                          "ordering": "key (the default)",
                          "tracking": "sluice: every task recorded in the SQLite task store "
                                      "(the default); sluice_untracked: "
                                      "consumer.track_tasks: false",
                          "batch": "sluice_batch: handler bench.handlers:noop_batch with "
                                   "batch {max_size: 500, max_wait_ms: 20}, otherwise the "
                                   "defaults",
                          "results": "on_success kafka: one CloudEvent result record per "
                                     "task, written by the source before it commits the "
                                     "offsets (acknowledged by the broker first)"},
        "cpu_us_per_msg": {name: row.get("cpu_us_per_msg") for name, row in rows.items()},
        "rows": rows,
        "targets": {"ratio_vs_raw": ">= 0.7", "ratio_vs_faust": ">= 3",
                    **{key: f">= {target:g}" for key, (_, _, target) in HEADLINE.items()}},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    print(f"\n{'row':<18} {'msgs/s':>10} {'cpu µs/msg':>11} {'first out s':>12} "
          f"{'elapsed s':>10}")
    for name, row in rows.items():
        if "msgs_per_s" not in row:
            print(f"{name:<18} {(row.get('skipped') or row.get('error') or '')[:60]}")
            continue
        print(f"{name:<18} {row['msgs_per_s']:>10,.1f} {row['cpu_us_per_msg']:>11,.1f} "
              f"{row['first_output_s']:>12.2f} {row['elapsed_s']:>10.2f}")
    for key, one in headline.items():
        if one["ratio"] is not None:
            print(f"{key}: {one['ratio']} (target {one['target']}: "
                  f"{'met' if one['met'] else 'missed'})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
