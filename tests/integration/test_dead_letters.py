"""Handler tracebacks kept with the task, and dead letters listed and replayed (as new tasks
linked to the old ones) through the service, the CLI and the API."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from sluice import Message
from sluice.config.load import parse_pipeline
from sluice.connectors import embedded
from sluice.connectors.embedded import EmbeddedQueue, QueuedMessage
from sluice.datadir import Database
from sluice.dead_letters import REPLAY_OF_HEADER, replay
from sluice.intake import Intake
from sluice.runtime import build
from sluice.stores.sqlite import SqliteStore
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState
from tests.conftest import sluice_cmd, subprocess_env

PIPELINE = """
name: jobs
source: {embedded: {queue: jobs}}
handler: {python: tests.integration.test_dead_letters:until_fixed}
consumer:
  retry: {max_attempts: 2, initial_backoff_s: 0.01, max_backoff_s: 0.02}
dead_letter: {embedded: {queue: jobs.dlq}}
"""

FIXED: set[str] = set()  # payload "bug" values the handler no longer fails on
SEEN_HEADERS: dict[str, dict[str, str]] = {}


def _explode(bug: str) -> None:
    raise ValueError(f"cannot handle {bug}")


async def until_fixed(message: Message) -> Any:
    SEEN_HEADERS[message.task_id] = dict(message.headers)
    bug = str(message.payload.get("bug", ""))
    if bug and bug not in FIXED:
        _explode(bug)
    return {"ok": message.task_id}


def submit(data_dir: Path, **payloads: dict[str, Any]) -> None:
    messages = [QueuedMessage(tid, json.dumps(p).encode(), key=f"key-{tid}")
                for tid, p in payloads.items()]
    embedded.submit(Database.open(data_dir), "jobs", "default", "jobs", messages)


async def drain(data_dir: Path) -> None:
    loop = build(parse_pipeline(PIPELINE), data_dir)
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), 30)


@pytest.fixture(autouse=True)
def _fresh_handler_state() -> None:
    FIXED.clear()
    SEEN_HEADERS.clear()


async def test_the_last_attempts_traceback_is_kept_logged_and_cleared_by_a_success(
        data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    submit(data_dir, bad={"bug": "b1"}, good={})
    with caplog.at_level(logging.INFO, logger="sluice.consumer.loop"):
        await drain(data_dir)
    store = SqliteTaskStore(Database.open(data_dir))
    bad = await store.get("bad", "jobs")
    assert (bad.state, bad.error_type) == (TaskState.FAILED, "ValueError")
    assert bad.error_traceback is not None
    assert bad.error_traceback.startswith("Traceback (most recent call last)")
    assert "in _explode" in bad.error_traceback
    assert bad.error_traceback.rstrip().endswith("ValueError: cannot handle b1")
    assert bad.to_json()["error"]["traceback"] == bad.error_traceback
    logged = [r.getMessage() for r in caplog.records if "task bad" in r.getMessage()]
    assert len(logged) == 2  # the retried attempt and the last one, each with its traceback
    assert all("in _explode" in line for line in logged)
    assert (await store.get("good", "jobs")).error_traceback is None


async def test_a_success_after_a_failed_attempt_keeps_no_traceback(data_dir: Path) -> None:
    submit(data_dir, flaky={"bug": "b2"})
    FIXED.add("b2")
    await drain(data_dir)
    rec = await SqliteTaskStore(Database.open(data_dir)).get("flaky", "jobs")
    assert (rec.state, rec.error_traceback) == (TaskState.SUCCEEDED, None)


async def test_dead_letters_are_listed_and_replayed_as_new_linked_tasks(
        data_dir: Path) -> None:
    submit(data_dir, a={"bug": "x", "n": 1}, b={"bug": "y"}, c={})
    await drain(data_dir)
    db = Database.open(data_dir)
    letters = {d.task_id: d for d in await SqliteTaskStore(db).dead_letters("jobs")}
    assert set(letters) == {"a", "b"}
    assert letters["a"].error_type == "ValueError"
    assert "cannot handle x" in (letters["a"].error_message or "")
    assert letters["a"].attempts == 2
    assert json.loads(letters["a"].message.body) == {"bug": "x", "n": 1}
    assert letters["a"].message.key == "key-a"

    FIXED.update({"x", "y"})
    config = parse_pipeline(PIPELINE)
    store, intake = SqliteTaskStore(db), Intake(SqliteStore(db))
    (done,) = await replay(store, intake, config, ["a"])
    assert (done.task_id, done.replay_id) == ("a", "a.replay-1")
    # Asked again: refused (already replayed) unless again; unknown ids are reported.
    again, unknown = await replay(store, intake, config, ["a", "nope"])
    assert again.replay_id is None and "already replayed as 'a.replay-1'" in str(again.skipped)
    assert unknown.replay_id is None and unknown.skipped == "no dead letter with this task id"
    # All: only those not replayed yet.
    assert [(r.task_id, r.replay_id) for r in await replay(store, intake, config, None)] == [
        ("b", "b.replay-1")]
    await drain(data_dir)
    replayed = await store.get("a.replay-1", "jobs")
    assert (replayed.state, replayed.key) == (TaskState.SUCCEEDED, "key-a")
    assert SEEN_HEADERS["a.replay-1"][REPLAY_OF_HEADER] == "a"
    assert "sluice-error-type" not in SEEN_HEADERS["a.replay-1"]
    assert (await store.get("a", "jobs")).state == TaskState.FAILED  # final stays final
    letters = {d.task_id: d for d in await SqliteTaskStore(db).dead_letters("jobs")}
    assert letters["a"].replayed_as == "a.replay-1"
    assert letters["b"].replayed_as == "b.replay-1"
    (twice,) = await replay(store, intake, config, ["a"], again=True)
    assert twice.replay_id == "a.replay-2"
    # The dead-letter destination got its messages as before.
    q = EmbeddedQueue(db, "jobs.dlq")
    assert {m.task_id for m in db.run_sync(lambda c: q.lease_in(c, 100, 1e12))} == {"a", "b"}


def test_the_cli_lists_and_replays_dead_letters(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    pipeline = tmp_path / "jobs.yaml"
    pipeline.write_text(PIPELINE)
    submit(data_dir, a={"bug": "[red]x[/red]"})
    asyncio.run(drain(data_dir))
    Database.open(data_dir).close()

    def sluice(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*sluice_cmd(), *args, "--data-dir", str(data_dir)],
                              capture_output=True, text=True, env=subprocess_env(),
                              timeout=60)

    listed = sluice("dead-letters", "list", "jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    (item,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (item["task_id"], item["error"]["type"]) == ("a", "ValueError")
    table = sluice("dead-letters", "list", "jobs")
    assert table.returncode == 0 and "[red]x" in table.stdout  # printed literally
    done = sluice("dead-letters", "replay", "jobs", "a", "-f", str(pipeline))
    assert (done.returncode, done.stdout.strip()) == (0, "a -> a.replay-1"), done.stderr
    refused = sluice("dead-letters", "replay", "jobs", "a", "-f", str(pipeline))
    assert refused.returncode == 2
    assert "already replayed as 'a.replay-1'" in refused.stderr
    assert "Traceback" not in refused.stderr
    usage = sluice("dead-letters", "replay", "jobs", "-f", str(pipeline))
    assert usage.returncode == 2 and "or --all" in usage.stderr


def test_the_api_lists_and_replays_dead_letters_of_the_callers_tenant(tmp_path: Path) -> None:
    from sluice.client import Client
    from tests.helpers.server import KEYS, running_server

    with running_server(tmp_path) as server:
        alpha, beta = Client(server.url, KEYS["alpha"]), Client(server.url, KEYS["beta"])
        sent = alpha.submit("gw-a", b'{"reject": "bad [input]"}', task_id="r1")
        assert sent.status == 202, sent.body
        deadline = time.monotonic() + 30
        while alpha.get_task("r1").body["state"] != "FAILED":
            assert time.monotonic() < deadline, "the task did not fail"
            time.sleep(0.05)
        listed = alpha.request("GET", "/v1/pipelines/gw-a/dead-letters")
        assert listed.status == 200
        (item,) = listed.body["items"]
        assert (item["task_id"], item["error"]["type"]) == ("r1", "Reject")
        assert item["error"]["message"] == "bad [input]"
        # Another tenant's pipeline reads as missing.
        assert beta.request("GET", "/v1/pipelines/gw-a/dead-letters").status == 404
        bad = alpha.request("POST", "/v1/pipelines/gw-a/dead-letters/replay", b'{"task_ids": 3}',
                            {"Content-Type": "application/json"})
        assert bad.status == 400 and "task_ids" in bad.detail()
        done = alpha.request("POST", "/v1/pipelines/gw-a/dead-letters/replay",
                             b'{"all": true}', {"Content-Type": "application/json"})
        assert done.status == 200
        assert done.body["items"] == [{"task_id": "r1", "replay_id": "r1.replay-1",
                                       "skipped": None}]
        replayed = alpha.get_task("r1.replay-1", "gw-a")
        assert replayed.status == 200 and replayed.body["state"] in (
            "QUEUED", "RUNNING", "FAILED")
        # The CLI speaks the same API.
        cli = subprocess.run([*sluice_cmd(), "dead-letters", "list", "gw-a", "--json", "--url",
                              server.url, "--token", KEYS["alpha"]], capture_output=True,
                             text=True, env=subprocess_env(), timeout=60)
        assert cli.returncode == 0, cli.stderr
        rows = {json.loads(line)["task_id"]: json.loads(line) for line in cli.stdout.splitlines()}
        assert rows["r1"]["replayed_as"] == "r1.replay-1"
