"""The sluice CLI as a user runs it: a real process, real exit codes, no tracebacks."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers.handlers import read_log

QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"


def sluice(*args: str, env: dict[str, str] | None = None,
           timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=timeout_s)


def test_validate_ok_and_every_error_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsource: {embedded: {lease_s: zero}}\nhandler: {python: a.b:c}\n"
                   "consumer: {concurency: 2}\n")
    result = sluice("validate", str(QUICKSTART), str(bad))
    assert result.returncode == 2
    assert f"{QUICKSTART}: ok" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"{bad}:2:30: source.embedded.lease_s: expected a number > 0, got 'zero'",
        f"{bad}:4:12: consumer.concurency: unknown key 'concurency' (did you mean "
        "'concurrency'?); expected one of: concurrency, exactly_once, keep_payload_bytes, "
        "ordering, prefetch, prefetch_bytes, retry, timeout_s, track_tasks",
    ]
    assert "Traceback" not in result.stderr
    assert sluice("validate", str(QUICKSTART)).returncode == 0


def test_import_error_reported_after_schema_passes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsource: {embedded: {}}\nhandler: {python: a.b:c}\n")
    result = sluice("validate", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{bad}:3:19: handler.python: cannot import module 'a.b'")


def test_submit_run_and_inspect(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    ok = sluice("submit", "thumbnails", "-f", str(QUICKSTART), "--data-dir", data,
                "--data", '{"image": "a.png"}', "--task-id", "job-1")
    assert ok.returncode == 0 and ok.stdout.strip() == "job-1"
    again = sluice("submit", "thumbnails", "-f", str(QUICKSTART), "--data-dir", data,
                   "--data", '{"image": "a.png"}', "--task-id", "job-1")
    assert again.returncode == 2
    assert "already used in pipeline 'thumbnails' (state QUEUED)" in again.stderr
    bad = sluice("submit", "thumbnails", "-f", str(QUICKSTART), "--data-dir", data,
                 "--data", "{oops")
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    missing = sluice("submit", "nosuch", "-f", str(QUICKSTART), "--data-dir", data,
                     "--data", "{}")
    assert missing.returncode == 2 and "no pipeline named 'nosuch'" in missing.stderr
    run = sluice("run", str(QUICKSTART), "--data-dir", data, "--drain")
    assert run.returncode == 0, run.stderr
    got = json.loads(sluice("tasks", "get", "job-1", "--json", "--data-dir", data).stdout)
    assert got["state"] == "SUCCEEDED"
    assert got["result"] == {"thumbnail": "a-128w.png", "width": 128}
    assert [s["stage"] for s in got["timeline"]] == ["received", "queued", "started",
                                                     "finished"]
    shown = sluice("tasks", "get", "job-1", "--data-dir", data)
    assert "SUCCEEDED" in shown.stdout and "finished" in shown.stdout
    listed = sluice("tasks", "list", "--json", "--data-dir", data, "--state", "succeeded")
    assert [json.loads(line)["task_id"] for line in listed.stdout.splitlines()] == ["job-1"]
    summary = sluice("tasks", "summary", "--data-dir", data)
    assert "SUCCEEDED" in summary.stdout and "p99" in summary.stdout
    nope = sluice("tasks", "get", "nope", "--data-dir", data)
    assert nope.returncode == 2 and "no task with id 'nope'" in nope.stderr


def test_delay_s_schedules_a_task(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    sluice("submit", "thumbnails", "-f", str(QUICKSTART), "--data-dir", data,
           "--data", '{"image": "a.png"}', "--task-id", "later", "--delay-s", "1.5")
    start = time.monotonic()
    assert sluice("run", str(QUICKSTART), "--data-dir", data, "--drain").returncode == 0
    assert time.monotonic() - start >= 1.5
    got = json.loads(sluice("tasks", "get", "later", "--json", "--data-dir", data).stdout)
    started = got["timeline"][2]["at"]
    queued = got["timeline"][1]["at"]
    assert started - queued >= 1.5


def test_sigterm_finishes_in_flight_and_exits_0(tmp_path: Path) -> None:
    data = tmp_path / "d"
    log = str(tmp_path / "calls.log")
    pipeline = tmp_path / "slow.yaml"
    pipeline.write_text("name: slow\nsource: {embedded: {}}\n"
                        "handler: {python: tests.helpers.handlers:behave}\n")
    sluice("submit", "slow", "-f", str(pipeline), "--data-dir", str(data),
           "--data", '{"sleep_s": 1.0}', "--task-id", "s1")
    env = subprocess_env(SLUICE_TEST_LOG=log)
    proc = subprocess.Popen([*sluice_cmd(), "run", str(pipeline), "--data-dir", str(data)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 20
    while not read_log(log) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, errs = proc.communicate(timeout=20)
    assert proc.returncode == 0, errs
    assert "finishing tasks in flight" in errs
    got = json.loads(sluice("tasks", "get", "s1", "--json", "--data-dir", str(data)).stdout)
    assert got["state"] == "SUCCEEDED"


def test_connectors_lists_keys_types_defaults() -> None:
    result = sluice("connectors")
    assert result.returncode == 0
    for text in ("source embedded", "lease_s", "30.0", "handler python", "sink embedded"):
        assert text in result.stdout
    schemas = json.loads(sluice("connectors", "--json").stdout)
    assert schemas["source.embedded"]["properties"]["lease_s"]["default"] == 30.0


def test_run_with_a_bad_file_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    result = sluice("run", str(bad), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert "missing required key 'source'" in result.stderr
    assert "Traceback" not in result.stderr
