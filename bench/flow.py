"""Benchmark: the consumer layer's flow control. Writes bench/results/flow.json and, for the
AIMD run, bench/results/aimd.png (limit and goodput over time).

key_order
    A handler that sleeps 20 ms, ``ordering: key``, 10,000 keys, 20,000 messages on a 4-partition
    Kafka topic (``SLUICE_KAFKA_BROKERS``, default 127.0.0.1:9092; ``--key-source embedded`` runs
    it on the embedded queue instead). The topic's partition count is read back and every
    partition must hold messages. The sequential baseline, one message at a time per partition,
    is 4 / 20 ms = 200 msg/s. The handler checks every message: its key's messages must run one
    at a time, in the order sent. Run ``--key-runs`` times (3), each on a fresh topic: ``runs``
    keeps each run's figures, ``msgs_per_s`` and ``speedup`` (= msgs_per_s / 200) are the
    medians.

aimd
    sluice calls an HTTP function (bench/backend.py, in its own process) that serves at most C
    requests at once, each taking ``--service-ms``, and answers 429 above C. C is 64, then 32,
    then 128, each for ``--phase-s``. The headline row ``aimd`` is ``concurrency: {}``: an
    adaptive limit at its defaults (algorithm ``proportional``, see sluice/consumer/limiter.py).
    The same run with plain AIMD at backoff_ratio 0.9 (the earlier headline) and at 0.5, the
    gradient limiter, static limits of 16 and 200, and ``oracle``: a static limit that the bench
    moves to C at each step, the most a limiter that never sees a 429 can get (what it misses
    of the ideal is the per-request time outside the function: both sides' HTTP stacks and event
    loops, while the function's slot is free). The headline and oracle rows run
    ``--aimd-runs`` times (3), alternating, as the machine's load varies: each keeps the median
    run (by goodput_share) and lists every run under ``runs``.
    - goodput_share: requests served / what C allowed (the function's capacity integrated over
      the run, from its first request, / service time); ``per_phase`` gives it per C;
    - goodput_share_of_oracle: goodput_share / the oracle row's (when it ran); for the
      headline, ``..._per_pair`` also compares each run with the oracle run right after it;
    - rejected_share: 429s / all requests the function received;
    - settle_s: per step, seconds from the step until the limit first comes within 10% of the
      new C (the phase length if never: a static limit never moves); the JSON gives each step
      and the worst.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench import handlers
from sluice.cli_common import run_async
from sluice.config.load import parse_pipeline
from sluice.connectors import embedded
from sluice.datadir import Database
from sluice.runtime import build, run_pipelines

RESULTS = Path(__file__).parent / "results"
BROKERS = os.environ.get("SLUICE_KAFKA_BROKERS", "127.0.0.1:9092")

KEY_PIPELINE = """
name: key-order
source: {source}
handler: {{python: "bench.handlers:ordered_sleep"}}
consumer: {{concurrency: {concurrency}, ordering: key, timeout_s: 30}}
"""

AIMD_PIPELINE = """
name: aimd-{name}
source: {{embedded: {{queue: aimd}}}}
handler: {{http: {{url: "{url}", timeout_s: 10}}}}
consumer:
  concurrency: {concurrency}
  ordering: unordered
  timeout_s: 10
  retry: {{max_attempts: 1000, initial_backoff_s: 0.02, max_backoff_s: 0.2, max_age_s: 3600}}
"""

# "aimd" is the headline row: an adaptive limit at its defaults. "oracle" starts at the first C
# and the bench sets its limit to each new C as it steps (ORACLE).
CONFIGS: dict[str, str] = {
    "aimd": "{}",
    "aimd_plain_backoff_0.9": ("{initial: 16, min: 1, max: 400, algorithm: aimd, "
                               "backoff_ratio: 0.9}"),
    "aimd_plain_backoff_0.5": "{initial: 16, min: 1, max: 400, algorithm: aimd}",
    "gradient": "{initial: 16, min: 1, max: 400, algorithm: gradient}",
    "static_16": "16",
    "static_200": "200",
    "oracle": "64",
}
ORACLE = "oracle"


# -- key_order --------------------------------------------------------------------------------

def produce_keyed(topic: str, keys: int, per_key: int) -> dict[int, int]:
    """Create ``topic`` with 4 partitions and fill it; returns the messages per partition (from
    the delivery reports), after checking the broker reports 4 partitions."""
    from confluent_kafka import KafkaError, Message, Producer
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": BROKERS})
    admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])[topic].result()
    partitions = len(admin.list_topics(topic, timeout=10).topics[topic].partitions)
    if partitions != 4:
        raise RuntimeError(f"topic {topic} has {partitions} partitions, not 4")
    per_partition: dict[int, int] = {}

    def delivered(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            raise RuntimeError(f"produce failed: {error}")
        partition = message.partition() or 0
        per_partition[partition] = per_partition.get(partition, 0) + 1

    producer = Producer({"bootstrap.servers": BROKERS, "linger.ms": 20, "acks": "all"})
    for seq in range(per_key):
        for k in range(keys):
            producer.produce(topic, json.dumps({"seq": seq}).encode(), key=f"key-{k:05d}",
                             on_delivery=delivered)
            producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("messages left unsent after 60 s")
    if sorted(per_partition) != [0, 1, 2, 3]:
        raise RuntimeError(f"messages per partition: {per_partition} (expected all 4)")
    return dict(sorted(per_partition.items()))


def delete_topic(topic: str) -> None:
    from confluent_kafka.admin import AdminClient

    with contextlib.suppress(Exception):
        AdminClient({"bootstrap.servers": BROKERS}).delete_topics([topic])[topic].result(30)


async def key_order(source_kind: str, keys: int, per_key: int, concurrency: int,
                    work: Path) -> dict[str, Any]:
    total = keys * per_key
    handlers.KEY_SEEN.clear()
    handlers.KEYS_RUNNING.clear()
    handlers.ORDER_VIOLATIONS.clear()
    topic = f"bench-keys-{uuid.uuid4().hex[:8]}"
    data_dir = work / topic
    per_partition: dict[int, int] | None = None
    if source_kind == "kafka":
        per_partition = produce_keyed(topic, keys, per_key)
        source = (f"{{kafka: {{brokers: '{BROKERS}', topic: {topic}, group: {topic}}}}}")
    else:
        db = Database.open(data_dir)
        msgs = [embedded.QueuedMessage(f"{k}-{seq}", json.dumps({"seq": seq}).encode(),
                                       key=f"key-{k:05d}")
                for seq in range(per_key) for k in range(keys)]
        embedded.submit(db, "key-order", "default", "keys", msgs)
        source = "{embedded: {queue: keys}}"
    loop = build(parse_pipeline(KEY_PIPELINE.format(source=source, concurrency=concurrency)),
                 data_dir)
    stop = asyncio.Event()
    running = asyncio.create_task(run_pipelines([loop], stop))
    started = time.perf_counter()
    first_start: float | None = None
    while loop.stats.succeeded < total:
        if running.done():
            running.result()
            raise RuntimeError("the pipeline stopped early")
        if first_start is None and loop.limiter.in_flight:
            first_start = time.perf_counter()
        await asyncio.sleep(0.002 if first_start is None else 0.02)
    finished = time.perf_counter()
    elapsed = finished - (first_start or started)
    stop.set()
    await running
    if source_kind == "kafka":
        delete_topic(topic)
    rate = total / elapsed
    baseline = 4 / 0.020
    return {
        "source": (f"kafka topic, 4 partitions ({BROKERS})" if source_kind == "kafka"
                   else "embedded queue (key order kept by the queue itself)"),
        "messages": total, "keys": keys, "handler_sleep_ms": 20,
        "messages_per_partition": per_partition,
        "concurrency": concurrency,
        "startup_s": round((first_start or started) - started, 2),
        "elapsed_s": round(elapsed, 2),
        "msgs_per_s": round(rate, 1),
        "msgs_per_s_with_startup": round(total / (finished - started), 1),
        "measured": "from the first message started to the last finished; startup_s (the "
                    "consumer joining its group, first fetch) is before that",
        "baseline_msgs_per_s": baseline,
        "speedup": round(rate / baseline, 1),
        "order_violations": len(handlers.ORDER_VIOLATIONS),
        "keys_seen": len(handlers.KEY_SEEN),
    }


async def key_order_runs(source_kind: str, keys: int, per_key: int, concurrency: int,
                         runs: int, work: Path) -> dict[str, Any]:
    """``runs`` runs of key_order, each on a fresh topic (or queue); the medians on top."""
    results = []
    for index in range(runs):
        run = await key_order(source_kind, keys, per_key, concurrency, work)
        print(f"key_order run {index + 1}/{runs}:", json.dumps(run), flush=True)
        results.append(run)
    first = results[0]
    rate = statistics.median(r["msgs_per_s"] for r in results)
    return {
        "source": first["source"], "messages": first["messages"], "keys": keys,
        "handler_sleep_ms": 20, "concurrency": concurrency,
        "measured": first["measured"],
        "runs": results,
        "msgs_per_s": rate,
        "msgs_per_s_per_run": [r["msgs_per_s"] for r in results],
        "baseline_msgs_per_s": first["baseline_msgs_per_s"],
        "speedup": round(rate / first["baseline_msgs_per_s"], 1),
        "speedup_per_run": [r["speedup"] for r in results],
        "statistic": f"median of {len(results)} runs",
        "order_violations": sum(r["order_violations"] for r in results),
        "target_speedup": ">= 50",
    }


# -- aimd -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_backend(url: str) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/stats") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError("the backend simulator did not start")
            await asyncio.sleep(0.1)


async def aimd_run(name: str, concurrency: str, phases: list[int], phase_s: float,
                   service_s: float, work: Path, run: int = 1) -> dict[str, Any]:
    port = free_port()
    backend = subprocess.Popen(
        [sys.executable, "-m", "bench.backend", "--port", str(port), "--capacity",
         str(phases[0]), "--service-ms", str(service_s * 1000)],
        stdout=subprocess.DEVNULL, cwd=Path(__file__).parent.parent)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_for_backend(base)
        data_dir = work / f"aimd-{name}-{run}"
        db = Database.open(data_dir)
        # Enough work that the function is never short of it: the most C allows, plus a margin.
        needed = int(sum(c / service_s * phase_s for c in phases) * 1.3) + 1000
        body = b'{"n": 0}'
        for start in range(0, needed, 20_000):
            embedded.submit(db, f"aimd-{name}", "default", "aimd",
                            [embedded.QueuedMessage(f"t{i}", body)
                             for i in range(start, min(start + 20_000, needed))])
        text = AIMD_PIPELINE.format(name=name, url=f"{base}/fn", concurrency=concurrency)
        loop = build(parse_pipeline(text), data_dir)
        stop = asyncio.Event()
        running = asyncio.create_task(run_pipelines([loop], stop))
        timeline: list[dict[str, float]] = []
        started = time.monotonic()
        async with aiohttp.ClientSession() as http:
            for index, capacity in enumerate(phases):
                if index:
                    async with http.post(f"{base}/control", json={"capacity": capacity}):
                        pass
                if name == ORACLE:  # a static limit, moved by the bench to each C
                    loop.limiter.limit = float(capacity)
                phase_end = started + phase_s * (index + 1)
                while time.monotonic() < phase_end:
                    timeline.append({"t": round(time.monotonic() - started, 2),
                                     "limit": round(loop.limiter.limit, 2),
                                     "in_flight": loop.limiter.in_flight,
                                     "capacity": capacity})
                    await asyncio.sleep(0.1)
            async with http.get(f"{base}/stats") as resp:
                stats = await resp.json()
        stop.set()
        await running
    finally:
        backend.terminate()
        backend.wait(10)
    result = summarize(concurrency, phases, phase_s, service_s, stats, timeline)
    return {"algorithm": loop.limiter.algorithm + (" (moved to C by the bench)"
                                                   if name == ORACLE else ""), **result}


def summarize(concurrency: str, phases: list[int], phase_s: float, service_s: float,
              stats: dict[str, Any], timeline: list[dict[str, float]]) -> dict[str, Any]:
    # One window per second from the function's first request (the pipeline's start-up before
    # it is not counted; finding C from the initial limit is), each with C integrated over it.
    windows = stats["history"]
    served = sum(w["served"] for w in windows)
    rejected = sum(w["rejected"] for w in windows)
    ideal = sum(w["capacity_s"] / service_s for w in windows)
    # Per C: the windows that held it throughout; the same leaving out the first 2 s of each
    # phase (the start, and each step).
    per_phase: dict[str, float] = {}
    steady: list[dict[str, float]] = []
    last_change, last_cap = 0, None
    for i, w in enumerate(windows):
        if w["capacity"] != last_cap:
            last_change, last_cap = i, w["capacity"]
        if i - last_change >= 2:
            steady.append(w)
    for cap in dict.fromkeys(phases):
        whole = [w for w in windows if w["capacity"] == cap and w["capacity_s"] == cap]
        if whole:
            per_phase[str(cap)] = round(sum(w["served"] for w in whole)
                                        / (cap * len(whole) / service_s), 3)
    steady_ideal = sum(w["capacity_s"] / service_s for w in steady)
    # Settle: after each step, the first time the limit comes within 10% of the new C.
    settle: list[float] = []
    for index in range(1, len(phases)):
        step_t, cap = phase_s * index, phases[index]
        after = [p for p in timeline if step_t <= p["t"] < step_t + phase_s]
        hit = next((p["t"] - step_t for p in after if abs(p["limit"] - cap) <= 0.1 * cap), None)
        settle.append(round(hit, 1) if hit is not None else phase_s)
    return {
        "concurrency": concurrency,
        "goodput_share": round(served / ideal, 3) if ideal else 0.0,
        "goodput_share_after_2s_of_each_phase": (
            round(sum(w["served"] for w in steady) / steady_ideal, 3) if steady_ideal else 0.0),
        "goodput_share_per_phase": per_phase,
        "rejected_share": round(rejected / max(served + rejected, 1), 4),
        "settle_s": max(settle) if settle else None,
        "settle_s_per_step": settle,
        "served": served, "rejected": rejected, "ideal": round(ideal),
        "seconds": len(windows),
        "max_in_flight_at_function": stats["max_in_flight"],
        "timeline": timeline,
        "per_second": windows,
    }


def plot(run: dict[str, Any], service_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = run["timeline"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot([p["t"] for p in tl], [p["limit"] for p in tl],
             label=f"limit ({run['algorithm']}, concurrency: {run['concurrency']})")
    top.plot([p["t"] for p in tl], [p["capacity"] for p in tl], "--", label="capacity C")
    top.set_ylabel("concurrency")
    top.legend(loc="upper left")
    per_s = run["per_second"]
    xs = list(range(len(per_s)))
    bottom.plot(xs, [w["served"] for w in per_s], label="served/s (goodput)")
    bottom.plot(xs, [w["capacity_s"] / service_s for w in per_s], "--",
                label="ideal C / service time")
    bottom.plot(xs, [w["rejected"] for w in per_s], label="429s/s")
    bottom.set_xlabel("seconds (top: since the pipeline started; bottom: since its first "
                      "request)")
    bottom.set_ylabel("requests/s")
    bottom.legend(loc="upper left")
    fig.suptitle("sluice's adaptive limit (defaults) against a function of capacity "
                 "64 → 32 → 128")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# -- main -------------------------------------------------------------------------------------

def kafka_reachable() -> bool:
    host, _, port = BROKERS.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sluice-flow-"))
    try:
        result: dict[str, Any] = {
            "benchmark": "flow",
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(),
                        "load_average_1m_at_start": round(os.getloadavg()[0], 2)},
        }
        if "key_order" in args.only:
            source = args.key_source or ("kafka" if kafka_reachable() else "embedded")
            result["key_order"] = await key_order_runs(source, args.keys, 2,
                                                       args.key_concurrency, args.key_runs, work)
            brief = {k: v for k, v in result["key_order"].items() if k != "runs"}
            print(json.dumps(brief, indent=2), flush=True)
        if "aimd" in args.only:
            result.update(await aimd_rows(args, work))
        result["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


REPEATED = ("aimd", ORACLE)  # run --aimd-runs times, alternating: the median of each


async def aimd_rows(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    phases = [64, 32, 128]
    service_s = args.service_ms / 1000
    repeated = [name for name in REPEATED if name in args.configs]
    order = [(name, i + 1) for i in range(args.aimd_runs) for name in repeated]
    order += [(name, 1) for name in args.configs if name not in REPEATED]
    all_runs: dict[str, list[dict[str, Any]]] = {}
    for name, index in order:
        load = os.getloadavg()[0]
        run = await aimd_run(name, CONFIGS[name], phases, args.phase_s, service_s, work, index)
        run["load_average_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        all_runs.setdefault(name, []).append(run)
        brief = {k: v for k, v in run.items() if k not in ("timeline", "per_second")}
        print(f"{name} (run {index}):", json.dumps(brief), flush=True)
    runs: dict[str, dict[str, Any]] = {}
    for name, done in all_runs.items():  # the median run by goodput (a run that happened)
        runs[name] = dict(sorted(done, key=lambda r: r["goodput_share"])[(len(done) - 1) // 2])
        if len(done) > 1:
            runs[name]["statistic"] = (f"the median of {len(done)} runs by goodput_share, "
                                       f"alternating with {', '.join(repeated)}")
            runs[name]["runs"] = [{k: v for k, v in r.items()
                                   if k not in ("timeline", "per_second", "concurrency")}
                                  for r in done]
    if ORACLE in runs and runs[ORACLE]["goodput_share"]:
        for run in runs.values():
            run["goodput_share_of_oracle"] = round(
                run["goodput_share"] / runs[ORACLE]["goodput_share"], 3)
        if "aimd" in all_runs:  # each run against the oracle run right after it
            runs["aimd"]["goodput_share_of_oracle_per_pair"] = [
                round(a["goodput_share"] / o["goodput_share"], 3)
                for a, o in zip(all_runs["aimd"], all_runs[ORACLE], strict=False)]
    rows: dict[str, Any] = {}
    for name, run in runs.items():
        rows[name] = {k: v for k, v in run.items()
                      if k != "timeline" and (k != "per_second" or name == "aimd")}
    if "aimd" in runs:
        plot(runs["aimd"], service_s, args.out.parent / "aimd.png")
        rows["aimd"].update({
            "function": {"capacity_steps": phases, "phase_s": args.phase_s,
                         "service_ms": args.service_ms},
            "settle_definition": "seconds from a step until the limit first comes "
                                 "within 10% of the new C",
            "targets": {"goodput_share": ">= 0.95", "rejected_share": "<= 0.03",
                        "settle_s": "<= 10"},
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=["key_order", "aimd"],
                        choices=["key_order", "aimd"])
    parser.add_argument("--keys", type=int, default=10_000, help="key_order: keys (2 msgs each)")
    parser.add_argument("--key-concurrency", type=int, default=1000)
    parser.add_argument("--key-source", choices=["kafka", "embedded"], default=None)
    parser.add_argument("--key-runs", type=int, default=3, help="key_order: runs (the median)")
    parser.add_argument("--phase-s", type=float, default=20.0, help="aimd: seconds per C")
    parser.add_argument("--service-ms", type=float, default=100.0)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="aimd: the rows to run")
    parser.add_argument("--aimd-runs", type=int, default=3,
                        help="aimd: runs of the headline and oracle rows (alternating; the "
                             "median), on a machine whose load varies")
    parser.add_argument("--out", type=Path, default=RESULTS / "flow.json",
                        help="the JSON to write (aimd.png beside it)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = run_async(main_async(args))  # uvloop, as `sluice run` uses
    out: Path = args.out
    if out.exists() and (len(args.only) < 2 or len(args.configs) < len(CONFIGS)):
        earlier = json.loads(out.read_text())  # keep the rest of an earlier run
        earlier.update(result)
        result = earlier
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
