"""Submitting to a Kafka-sourced pipeline, by the CLI and over HTTP, on the real broker: the
task is created QUEUED, its message produced with the task id header, and the worker runs
that same task once. A refused produce leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers import kafka as kt
from tests.helpers.handlers import read_log
from tests.helpers.server import running_server

PIPELINE = """
name: k-jobs
source: {{kafka: {{brokers: "{brokers}", topic: {topic}, group: {topic}}}}}
handler: {{python: "tests.helpers.handlers:behave"}}
consumer: {{concurrency: 4}}
"""


@pytest.fixture
def topic() -> Iterator[str]:
    kt.require_broker()
    name = kt.new_topic(2, "sluice-submit")
    yield name
    kt.delete_topics(name)


def pipeline_file(tmp_path: Path, topic: str) -> Path:
    path = tmp_path / "k.yaml"
    path.write_text(PIPELINE.format(brokers=kt.BROKERS, topic=topic))
    return path


def sluice(*args: str, log: str = "", timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(SLUICE_TEST_LOG=log), timeout=timeout_s)


def test_cli_submit_produces_to_the_topic_and_the_worker_runs_that_task(
        tmp_path: Path, topic: str) -> None:
    file, data, log = pipeline_file(tmp_path, topic), str(tmp_path / "data"), str(
        tmp_path / "calls.log")
    done = sluice("submit", "k-jobs", "-f", str(file), "--data-dir", data, "--task-id", "cli-1",
                  "--key", "user-1", "--data", '{"n": 1}')
    assert (done.returncode, done.stdout.strip()) == (0, "cli-1"), done.stderr
    queued = json.loads(sluice("tasks", "get", "cli-1", "--data-dir", data, "--json").stdout)
    assert queued["state"] == "QUEUED"
    (message,) = kt.read_all(topic, 1)
    assert message.headers["sluice-task-id"] == "cli-1" and message.key == "user-1"
    again = sluice("submit", "k-jobs", "-f", str(file), "--data-dir", data, "--task-id",
                   "cli-1", "--data", '{"n": 1}')
    assert again.returncode == 2 and "already used" in again.stderr
    delayed = sluice("submit", "k-jobs", "-f", str(file), "--data-dir", data, "--delay-s", "5",
                     "--data", "{}")
    assert delayed.returncode == 2 and "no delayed delivery" in delayed.stderr
    ran = sluice("run", str(file), "--data-dir", data, "--drain", log=log)
    assert ran.returncode == 0, ran.stderr
    final = json.loads(sluice("tasks", "get", "cli-1", "--data-dir", data, "--json").stdout)
    assert (final["state"], final["attempts"]) == ("SUCCEEDED", 1)
    assert [e[:2] for e in read_log(log)] == [("start", "cli-1"), ("done", "cli-1")]


def http(method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_http_trigger_on_a_kafka_pipeline(tmp_path: Path, topic: str) -> None:
    file = pipeline_file(tmp_path, topic)
    with running_server(tmp_path, files=(file,), auth=False) as srv:
        post = f"{srv.url}/v1/pipelines/k-jobs/tasks"
        json_type = {"Content-Type": "application/json"}
        status, body = http("POST", post, b'{"n": 2}', {**json_type, "Task-Id": "http-1"})
        assert status == 202, body
        status, body = http("POST", post, b'{"n": 2}', {**json_type, "Task-Id": "http-1"})
        assert status == 409 and body["state"] in ("QUEUED", "RUNNING", "SUCCEEDED")
        status, body = http("POST", post, b"{}", {**json_type, "Delay-S": "3"})
        assert status == 400 and "no delayed delivery" in body["detail"]
        deadline = time.monotonic() + 60
        while True:
            status, task = http("GET", f"{srv.url}/v1/tasks/http-1")
            if task.get("state") == "SUCCEEDED" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (task["state"], task["attempts"]) == ("SUCCEEDED", 1)
        assert [e[:2] for e in read_log(srv.log)] == [("start", "http-1"), ("done", "http-1")]


def test_a_refused_produce_leaves_no_task(tmp_path: Path) -> None:
    kt.require_broker()
    file = pipeline_file(tmp_path, "sluice-submit-no-such-topic")
    with running_server(tmp_path, "--no-workers", files=(file,), auth=False) as srv:
        status, body = http("POST", f"{srv.url}/v1/pipelines/k-jobs/tasks", b"{}",
                            {"Content-Type": "application/json", "Task-Id": "lost-1"})
        assert status == 503 and "nothing was submitted" in body["detail"]
        status, _ = http("GET", f"{srv.url}/v1/tasks/lost-1")
        assert status == 404  # the same task id may be submitted again


def test_submit_to_a_missing_topic_says_to_create_it_first(tmp_path: Path) -> None:
    kt.require_broker()
    file = pipeline_file(tmp_path, "sluice-submit-no-such-topic")
    done = sluice("submit", "k-jobs", "-f", str(file), "--data-dir", str(tmp_path / "data"),
                  "--data", "{}")
    assert done.returncode != 0
    assert "'sluice-submit-no-such-topic' does not exist" in done.stderr
    assert "a submit never creates topics" in done.stderr
    assert "set create_topic" not in done.stderr and "Traceback" not in done.stderr
