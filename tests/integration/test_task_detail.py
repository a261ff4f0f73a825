"""A task's attempt history and kept payload (issue 17: the console's task page) on a real
store (the data directory's SQLite, and PostgreSQL): a task retried twice has three attempt
entries; one that succeeds at once writes none (asserted on the table); the submit path and
the consumer's claim keep the head of the body (``consumer.keep_payload_bytes``), truncated
at the limit, none with 0; the task API's JSON shape of both."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice import intake, runtime
from sluice.config.load import parse_pipeline
from sluice.config.model import PipelineConfig
from sluice.datadir import QueuedMessage
from sluice.errors import TaskNotFound
from sluice.message import Message
from sluice.stores import open_store
from sluice.stores.base import Store
from sluice.tasks.state import FINAL, TaskState
from sluice.tasks.store import TaskRecord
from tests.helpers.postgres import URL, fresh_url

FAIL_FIRST: dict[str, int] = {}  # task id → how many of its first attempts raise


async def handle(message: Message) -> dict[str, Any]:
    if message.attempt <= FAIL_FIRST.get(message.task_id, 0):
        raise RuntimeError(f"attempt {message.attempt} of {message.task_id} fails")
    return {"ok": message.task_id}


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    FAIL_FIRST.clear()
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sluice.db'}"
        return
    with fresh_url() as url:
        yield url


def pipeline(keep: int | None = 16) -> PipelineConfig:
    keep_line = "" if keep is None else f"\n  keep_payload_bytes: {keep}"
    return parse_pipeline(f"""
name: det
source: {{embedded: {{queue: det, lease_s: 10}}}}
handler: {{python: "tests.integration.test_task_detail:handle"}}
consumer:
  concurrency: 4
  ordering: unordered
  retry: {{max_attempts: 5, initial_backoff_s: 0.2, max_backoff_s: 0.2}}{keep_line}
""")


async def attempt_rows(url: str, task_id: str) -> list[tuple[Any, ...]]:
    """The task's rows in the store's task_attempts table, read past the store."""
    if url.startswith("sqlite:"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            return db.execute("SELECT attempt, outcome FROM task_attempts WHERE"
                                " pipeline = 'det' AND task_id = ? ORDER BY attempt",
                                (task_id,)).fetchall()
    import asyncpg

    schema = url.rsplit("schema=", 1)[1]
    conn = await asyncpg.connect(URL)
    try:
        rows = await conn.fetch(f"SELECT attempt, outcome FROM {schema}.task_attempts WHERE"
                                " pipeline = 'det' AND task_id = $1 ORDER BY attempt", task_id)
    finally:
        await conn.close()
    return [tuple(r) for r in rows]


async def run_until_final(store: Store, config: PipelineConfig, url: str, tmp_path: Path,
                          ids: list[str], timeout_s: float = 20.0) -> dict[str, TaskRecord]:
    loop = runtime.build(config, tmp_path, store_url=url)
    stop = asyncio.Event()
    runner = asyncio.create_task(runtime.run_pipelines([loop], stop))
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            found: dict[str, TaskRecord] = {}
            for i in ids:
                with contextlib.suppress(TaskNotFound):  # a broker's: made at its claim
                    found[i] = await store.tasks.get(i, "det")
            if len(found) == len(ids) and all(r.state in FINAL for r in found.values()):
                return found
            assert time.monotonic() < deadline, {i: r.state for i, r in found.items()}
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await runner


def test_a_retried_task_has_one_entry_per_attempt_and_a_first_time_success_none(
        store_url: str, tmp_path: Path) -> None:
    FAIL_FIRST["twice"] = 2

    async def main() -> None:
        store = open_store(store_url)
        config = pipeline()
        await intake.submit(store, config, [QueuedMessage("twice", b'{"n": 1}'),
                                            QueuedMessage("once", b'{"n": 2}')])
        found = await run_until_final(store, config, store_url, tmp_path, ["twice", "once"])
        twice, once = found["twice"], found["once"]
        assert twice.state == TaskState.SUCCEEDED and twice.attempts == 3
        log = twice.attempt_log
        assert log is not None and [a.attempt for a in log] == [1, 2, 3]
        assert [a.outcome for a in log] == ["RETRYING", "RETRYING", "SUCCEEDED"]
        assert [a.error_type for a in log] == ["RuntimeError", "RuntimeError", None]
        assert log[0].error_message == "attempt 1 of twice fails"
        times = [t for a in log for t in (a.started_at, a.ended_at) if t is not None]
        assert len(times) == 6 and times == sorted(times), times
        # Each attempt starts after the previous one ended (the retry wait between them).
        assert all(later > earlier for earlier, later in itertools.pairwise(times[1:-1])), times
        assert await attempt_rows(store_url, "twice") == [
            (1, "RETRYING"), (2, "RETRYING"), (3, "SUCCEEDED")]
        # The common path writes nothing more: no row for a first-time success.
        assert once.state == TaskState.SUCCEEDED and once.attempt_log == []
        assert await attempt_rows(store_url, "once") == []
        body = twice.to_json()
        assert [a["outcome"] for a in body["attempt_log"]] == ["RETRYING", "RETRYING",
                                                              "SUCCEEDED"]
        assert body["attempt_log"][0]["error"] == {"type": "RuntimeError",
                                                   "message": "attempt 1 of twice fails"}
        assert body["attempt_log"][2]["error"] is None
        # A list leaves the detail out (read with the single-task read).
        listed = {r.task_id: r for r in await store.tasks.list("det")}
        assert listed["twice"].attempt_log is None and "attempt_log" not in (
            listed["twice"].to_json())
        await store.close()

    asyncio.run(main())


def test_a_task_that_fails_for_good_after_retries_logs_every_attempt(
        store_url: str, tmp_path: Path) -> None:
    FAIL_FIRST["bad"] = 99

    async def main() -> None:
        store = open_store(store_url)
        config = pipeline()
        await intake.submit(store, config, [QueuedMessage("bad", b"{}")])
        record = (await run_until_final(store, config, store_url, tmp_path, ["bad"]))["bad"]
        assert record.state == TaskState.FAILED and record.attempts == 5
        assert record.attempt_log is not None
        assert [a.outcome for a in record.attempt_log] == ["RETRYING"] * 4 + ["FAILED"]
        assert record.attempt_log[-1].error_type == "RuntimeError"
        await store.close()

    asyncio.run(main())


def test_the_submit_keeps_the_head_of_the_body(store_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        store = open_store(store_url)
        config = pipeline(keep=16)
        long = json.dumps({"text": "x" * 40}).encode()
        await intake.submit(store, config, [
            QueuedMessage("short", b'{"a": [1, 2]}'),
            QueuedMessage("long", long),
            QueuedMessage("plain", ("a" + "é" * 20).encode(), "text/plain"),
            QueuedMessage("binary", b"\xff\xfe\x00\x01", "application/octet-stream")])
        short = await store.tasks.get("short", "det")
        assert short.payload == b'{"a": [1, 2]}' and not short.payload_truncated
        assert short.to_json()["payload"] == {
            "content_type": "application/json", "size_bytes": 13, "kept_bytes": 13,
            "truncated": False, "encoding": "json", "value": {"a": [1, 2]}}
        cut = await store.tasks.get("long", "det")
        assert cut.payload == long[:16] and cut.payload_size == len(long)
        assert cut.payload_truncated
        shown = cut.to_json()["payload"]
        assert shown["encoding"] == "text" and shown["value"] == long[:16].decode()
        assert shown["truncated"] and shown["kept_bytes"] == 16
        # A character cut at the limit is left out of the text, not an error.
        plain = (await store.tasks.get("plain", "det")).to_json()["payload"]
        assert plain["encoding"] == "text" and plain["content_type"] == "text/plain"
        assert plain["value"] == "a" + "é" * 7  # 15 bytes: the 8th é was cut in half
        assert plain["kept_bytes"] == 16 and plain["size_bytes"] == 41
        binary = (await store.tasks.get("binary", "det")).to_json()["payload"]
        assert binary["encoding"] == "base64" and binary["value"] == "//4AAQ=="
        # find (the gateway's read by id) reads the same detail.
        (found,) = await store.tasks.find("long")
        assert found.payload == long[:16] and found.attempt_log == []
        await store.close()

    asyncio.run(main())


def task_schema_errors(body: dict[str, Any]) -> list[str]:
    """What the API document's Task schema finds wrong with ``body`` (a task's JSON)."""
    import jsonschema
    import yaml

    from tests.conftest import ROOT

    doc = yaml.safe_load((ROOT / "schemas" / "openapi.yaml").read_text(encoding="utf-8"))
    schema = {**doc["components"]["schemas"]["Task"], "components": doc["components"]}
    validator = jsonschema.Draft202012Validator(schema)
    return [e.message for e in validator.iter_errors({**body, "status_url": "/v1/tasks/x"})]


def test_the_detail_matches_the_api_document(store_url: str, tmp_path: Path) -> None:
    FAIL_FIRST["api"] = 1

    async def main() -> None:
        store = open_store(store_url)
        config = pipeline(keep=4)
        await intake.submit(store, config, [QueuedMessage("api", b'{"a": 1}'),
                                            QueuedMessage("bin", b"\xff\xfe", "image/png")])
        retried = (await run_until_final(store, config, store_url, tmp_path, ["api"]))["api"]
        for record in (retried, await store.tasks.get("bin", "det"),
                       *(await store.tasks.list("det"))):
            assert task_schema_errors(record.to_json()) == [], record
        assert [a["outcome"] for a in retried.to_json()["attempt_log"]] == ["RETRYING",
                                                                           "SUCCEEDED"]
        await store.close()

    asyncio.run(main())


def test_keep_payload_bytes_0_keeps_none(store_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        store = open_store(store_url)
        config = pipeline(keep=0)
        await intake.submit(store, config, [QueuedMessage("none", b'{"a": 1}')])
        record = await store.tasks.get("none", "det")
        assert record.payload is None and record.payload_size is None
        assert record.to_json()["payload"] is None
        await store.close()

    asyncio.run(main())


def test_the_default_keeps_4096_bytes(store_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        store = open_store(store_url)
        config = pipeline(keep=None)
        assert config.consumer.keep_payload_bytes == 4096
        body = b"y" * 5000
        await intake.submit(store, config, [QueuedMessage("big", body, "text/plain")])
        record = await store.tasks.get("big", "det")
        assert record.payload == body[:4096] and record.payload_size == 5000
        await store.close()

    asyncio.run(main())


def test_a_task_first_seen_at_the_consumer_keeps_its_payload(
        store_url: str, tmp_path: Path) -> None:
    """A message put on the queue without a task (as a broker's): the claim that creates the
    task keeps the head of its body."""

    async def main() -> None:
        store = open_store(store_url)
        config = pipeline(keep=8)
        await store.put("det", [QueuedMessage("raw", b'{"from": "a broker"}'),
                                QueuedMessage("tiny", b'{"b": 2}')])
        found = await run_until_final(store, config, store_url, tmp_path, ["raw", "tiny"])
        raw, tiny = found["raw"], found["tiny"]
        assert raw.state == TaskState.SUCCEEDED
        assert raw.payload == b'{"from":' and raw.payload_size == 20
        assert raw.payload_type == "application/json" and raw.payload_truncated
        assert tiny.to_json()["payload"]["value"] == {"b": 2}
        await store.close()

    asyncio.run(main())


def test_the_broker_path_keeps_none_with_0(store_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        store = open_store(store_url)
        config = pipeline(keep=0)
        await store.put("det", [QueuedMessage("raw0", b'{"from": "a broker"}')])
        found = await run_until_final(store, config, store_url, tmp_path, ["raw0"])
        assert found["raw0"].payload is None and found["raw0"].payload_type is None
        await store.close()

    asyncio.run(main())
