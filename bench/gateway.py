"""Benchmark: accepted HTTP submits per second (every one with its own Task-Id) against a bare
aiohttp handler answering 202, with the same load generator in the same run.

The load generator is vegeta (github.com/tsenart/vegeta, installed with `go install` from the
Go module proxy when it is not on PATH). Both servers run in their own process; sluice runs as
`sluice serve --no-workers` (the API process alone), on a fresh data directory.

1. Peak: vegeta at unbounded rate with --workers connections for --duration-s; the rate of
   202 answers is the server's peak.
2. Half load: sluice at half its peak rate for --duration-s; p50/p99 of its latency; then
   the bare server at that same rate, whose p99 is this machine's and vegeta's own tail.

Writes bench/results/gateway.json and prints the numbers.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "gateway.json"
VEGETA = "github.com/tsenart/vegeta/v12@v12.12.0"


def vegeta_binary() -> str:
    found = shutil.which("vegeta")
    if found:
        return found
    bin_dir = Path.home() / ".cache" / "sluice-bench" / "bin"
    binary = bin_dir / "vegeta"
    if not binary.exists():
        if shutil.which("go") is None:
            sys.exit("bench/gateway.py needs vegeta on PATH, or Go to install it")
        print(f"installing {VEGETA} into {bin_dir}", file=sys.stderr)
        subprocess.run(["go", "install", VEGETA], check=True,
                       env={**os.environ, "GOBIN": str(bin_dir)})
    return str(binary)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def targets_file(path: Path, url: str, count: int, prefix: str) -> Path:
    body = base64.b64encode(b'{"image": "cat.png", "width": 128}').decode()
    with path.open("w") as f:
        for i in range(count):
            f.write(json.dumps({"method": "POST", "url": url, "body": body, "header": {
                "Content-Type": ["application/json"], "Task-Id": [f"{prefix}-{i}"]}}) + "\n")
    return path


def attack(vegeta: str, targets: Path, duration_s: float, rate: int | None,
           workers: int) -> dict[str, Any]:
    args = [vegeta, "attack", "-format=json", f"-targets={targets}", f"-duration={duration_s}s",
            "-keepalive=true", "-timeout=10s"]
    if rate is None:
        args += ["-rate=0", f"-max-workers={workers}", f"-workers={workers}"]
    else:
        args += [f"-rate={rate}/s", f"-workers={workers}"]
    attack_proc = subprocess.Popen(args, stdout=subprocess.PIPE)
    report = subprocess.run([vegeta, "report", "-type=json"], stdin=attack_proc.stdout,
                            capture_output=True, check=True)
    attack_proc.wait()
    result: dict[str, Any] = json.loads(report.stdout)
    return result


def summary(report: dict[str, Any]) -> dict[str, Any]:
    lat = report["latencies"]
    return {
        "requests": report["requests"],
        "accepted_per_s": round(report["throughput"], 1),  # successful (2xx) per second
        "success_share": report["success"],
        "status_codes": report["status_codes"],
        "p50_ms": round(lat["50th"] / 1e6, 2),
        "p99_ms": round(lat["99th"] / 1e6, 2),
    }


def serve(cmd: list[str], url: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_up(url, proc)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=64, help="vegeta connections")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    vegeta = vegeta_binary()
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-gw-"))
    py = sys.executable
    try:
        bare_port, sluice_port = free_port(), free_port()
        n = 400_000
        sluice = serve([py, "-m", "sluice.cli", "serve", str(HERE / "gateway.yaml"),
                        "--no-workers", "--port", str(sluice_port), "--data-dir",
                        str(work / "data"), "--log-level", "warning"],
                       f"http://127.0.0.1:{sluice_port}/healthz")
        try:
            url = f"http://127.0.0.1:{sluice_port}/v1/pipelines/bench-gw/tasks"
            peak = summary(attack(vegeta, targets_file(work / "peak.jsonl", url, n, "peak"),
                                  args.duration_s, None, args.workers))
            half_rate = max(int(peak["accepted_per_s"] / 2), 1)
            half_n = int(half_rate * args.duration_s) + 100
            half = summary(attack(vegeta, targets_file(work / "half.jsonl", url, half_n, "half"),
                                  args.duration_s, half_rate, args.workers))
        finally:
            sluice.terminate()
            sluice.wait()
        bare = serve([py, "-m", "bench.bare_server", "--port", str(bare_port)],
                     f"http://127.0.0.1:{bare_port}/")
        try:
            bare_url = f"http://127.0.0.1:{bare_port}/v1/pipelines/bench-gw/tasks"
            bare_peak = summary(attack(vegeta, targets_file(work / "bare.jsonl", bare_url, n,
                                                            "bare"),
                                       args.duration_s, None, args.workers))
            # The same rate against the bare server: the latency tail of this machine and
            # load generator alone, to read sluice's p99 against.
            bare_half = summary(attack(vegeta, targets_file(work / "bare-half.jsonl", bare_url,
                                                            half_n, "bare-half"),
                                       args.duration_s, half_rate, args.workers))
        finally:
            bare.terminate()
            bare.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "gateway",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "load_generator": f"vegeta ({VEGETA}), {args.workers} connections, keep-alive",
        "duration_s": args.duration_s,
        "sluice_rps": peak["accepted_per_s"],
        "bare_rps": bare_peak["accepted_per_s"],
        "ratio": round(peak["accepted_per_s"] / bare_peak["accepted_per_s"], 3),
        "half_load_rps": half_rate,
        "p99_ms_at_half_load": half["p99_ms"],
        "p50_ms_at_half_load": half["p50_ms"],
        "bare_p99_ms_at_the_same_rate": bare_half["p99_ms"],
        "sluice_peak": peak,
        "bare_peak": bare_peak,
        "bare_at_the_same_rate": bare_half,
        "sluice_half_load": half,
        "targets": {"ratio": ">= 0.5", "p99_ms_at_half_load": "< 10"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key in ("sluice_rps", "bare_rps", "ratio", "half_load_rps", "p50_ms_at_half_load",
                "p99_ms_at_half_load", "bare_p99_ms_at_the_same_rate"):
        print(f"{key:<22} {result[key]}")
    print(f"sluice peak status codes {peak['status_codes']}, half {half['status_codes']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
