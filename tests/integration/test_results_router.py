"""Result routing by stable destination labels: records waiting in the outbox survive a reordered
``on_success``, records waiting under the positional names of earlier versions are delivered,
labels are unique in a pipeline, and the router's choice of outbox or acknowledgement."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest

from sluice.config.destinations import destinations
from sluice.config.load import parse_pipeline
from sluice.connectors.base import Delivery, SinkRecord
from sluice.consumer.loop import ConsumerLoop
from sluice.consumer.results import ResultRouter
from sluice.datadir import Database
from sluice.errors import ConfigError
from sluice.message import Outcome
from sluice.runtime import build, warn_stranded
from sluice.stores import open_store
from sluice.tasks.sqlite import SqliteTaskStore, put_outbox
from sluice.tasks.sqlite_outbox import SqliteOutbox
from sluice.tasks.state import TaskState
from sluice.tasks.store import ClaimResult, ClaimStatus, NewTask, OutboxEntry
from tests.helpers.server import free_port
from tests.integration.test_sinks import Receiver, submit

HEAD = """
name: jobs
source: {embedded: {queue: jobs}}
handler: {python: tests.helpers.handlers:behave}
consumer: {concurrency: 8, retry: {max_attempts: 1}}
"""
RETRIES = "max_attempts: 10000, initial_backoff_s: 0.01, max_backoff_s: 0.05"


def http(url: str) -> str:
    return f'  - http: {{url: "{url}", {RETRIES}}}\n'


def outbox_rows(data_dir: Path) -> dict[str, int]:
    db = Database.open(data_dir)
    rows = db.run_sync(lambda c: c.execute(
        "SELECT queue, COUNT(*) FROM messages WHERE queue LIKE 'sluice.outbox.%'"
        " GROUP BY queue").fetchall())
    return {str(q): int(n) for q, n in rows}


async def run_until_succeeded(loop: ConsumerLoop, total: int) -> None:
    """Run until every task succeeded (its record waits in the outbox), then stop."""
    stop = asyncio.Event()
    runner = asyncio.create_task(loop.run(stop))
    deadline = time.monotonic() + 60
    while loop.stats.succeeded < total:
        assert time.monotonic() < deadline, f"{loop.stats.succeeded} of {total} succeeded"
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(runner, 60)


async def deliveries(data_dir: Path, task_ids: list[str]) -> list[dict[str, str]]:
    store = SqliteTaskStore(Database.open(data_dir))
    return [{name: status["state"] for name, status in
             ((await store.get(t, "jobs")).delivered or {}).items()} for t in task_ids]


async def test_reordered_destinations_deliver_every_pending_record(data_dir: Path) -> None:
    """Records wait in the outbox of a destination that is down; a destination is inserted
    before it; after a restart every waiting record reaches it, and nothing is left."""
    down, added = Receiver(free_port()), Receiver(free_port())
    first = build(parse_pipeline(HEAD + "on_success:\n" + http(down.url)), data_dir)
    (label,) = [d.destination.label for d in first.deliverers]
    ids = submit(data_dir, [{"i": i} for i in range(20)])
    await run_until_succeeded(first, len(ids))
    assert outbox_rows(data_dir) == {f"sluice.outbox.jobs.{label}": len(ids)}

    second = build(parse_pipeline(HEAD + "on_success:\n" + http(added.url) + http(down.url)),
                   data_dir)
    assert [d.destination.label for d in second.deliverers][1] == label  # not renamed
    await down.start()
    await added.start()
    try:
        await asyncio.wait_for(second.run(asyncio.Event(), drain=True), 60)
    finally:
        await down.stop()
        await added.stop()
    assert sorted({r["id"] for r in down.records()}) == sorted(ids)
    assert added.got == []  # it takes the results of tasks that end after it was added
    assert outbox_rows(data_dir) == {}
    assert await deliveries(data_dir, ids) == [{label: "delivered"}] * len(ids)


async def test_records_waiting_under_a_positional_name_are_delivered(data_dir: Path) -> None:
    """A data directory of a version that named outboxes by position
    (``on_success.0.http``): its waiting records go to the destination at that position, and
    their delivery status is written where it was pending."""
    receiver = Receiver(free_port())
    text = HEAD + "on_success:\n" + http(receiver.url)
    first = build(parse_pipeline(text), data_dir)
    (label,) = [d.destination.label for d in first.deliverers]
    ids = submit(data_dir, [{"i": i} for i in range(5)])
    await run_until_succeeded(first, len(ids))
    legacy = "on_success.0.http"
    db = Database.open(data_dir)

    def as_before_labels(conn: sqlite3.Connection) -> None:  # what the earlier version left
        conn.execute("UPDATE messages SET queue = ? WHERE queue = ?",
                     (f"sluice.outbox.jobs.{legacy}", f"sluice.outbox.jobs.{label}"))
        conn.execute("UPDATE tasks SET delivered = json_object(?, json(json_extract(delivered,"
                     " ?))) WHERE pipeline = 'jobs'", (legacy, f'$."{label}"'))

    db.run_sync(as_before_labels)
    assert await deliveries(data_dir, ids) == [{legacy: "pending"}] * len(ids)
    await receiver.start()
    try:
        await asyncio.wait_for(build(parse_pipeline(text), data_dir).run(
            asyncio.Event(), drain=True), 60)
    finally:
        await receiver.stop()
    assert sorted({r["id"] for r in receiver.records()}) == sorted(ids)
    assert outbox_rows(data_dir) == {}
    assert await deliveries(data_dir, ids) == [{legacy: "delivered"}] * len(ids)


async def test_a_changed_target_is_reported_and_its_label_delivers_its_records(
        data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A destination whose URL changed has a new default label: the records waiting under
    the old one are reported at start, and declaring the old label delivers them."""
    old, new = Receiver(free_port()), Receiver(free_port())
    first = build(parse_pipeline(HEAD + "on_success:\n" + http(old.url)), data_dir)
    (label,) = [d.destination.label for d in first.deliverers]
    ids = submit(data_dir, [{"i": i} for i in range(3)])
    await run_until_succeeded(first, len(ids))
    changed = build(parse_pipeline(HEAD + "on_success:\n" + http(new.url)), data_dir)
    with caplog.at_level("WARNING", logger="sluice.runtime"):
        await warn_stranded(open_store(None, data_dir), changed)  # as run_pipelines does
    assert (f"pipeline 'jobs': 3 result record(s) wait in the outbox {label!r}, which no "
            "destination takes now") in caplog.text
    assert f"label: {label}" in caplog.text
    relabelled = (HEAD + "on_success:\n"
                  + f'  - http: {{url: "{new.url}", label: "{label}", {RETRIES}}}\n')
    await new.start()
    try:
        await asyncio.wait_for(build(parse_pipeline(relabelled), data_dir).run(
            asyncio.Event(), drain=True), 60)
    finally:
        await new.stop()
    assert sorted({r["id"] for r in new.records()}) == sorted(ids)
    assert outbox_rows(data_dir) == {}


def test_default_labels_do_not_depend_on_position() -> None:
    first = parse_pipeline(HEAD + "on_success:\n" + http("https://example.com/a?token=s3cret")
                           + "  - embedded: {queue: results}\n")
    second = parse_pipeline(HEAD + "on_success:\n  - embedded: {queue: results}\n"
                            + "  - http: {url: 'https://example.com/b'}\n"
                            + http("https://example.com/a?token=s3cret")
                            + "on_failure:\n  - embedded: {queue: results}\n")
    before = {d.label for d in destinations(first)}
    after = [d.label for d in destinations(second)]
    assert before <= set(after) and len(set(after)) == 4
    assert "on_success:embedded:results" in before and "on_failure:embedded:results" in after
    assert not any("s3cret" in label for label in after)  # a URL is hashed, never shown


def test_a_duplicate_label_names_both_entries() -> None:
    text = HEAD + """on_success:
  - embedded: {queue: results}
  - http: {url: 'https://example.com/a', label: done}
  - embedded: {queue: results}
  - embedded: {queue: other, label: done}
"""
    with pytest.raises(ConfigError) as info:
        parse_pipeline(text, "p.yaml")
    message = str(info.value)
    assert ("p.yaml:9:15: on_success[2].embedded: label 'on_success:embedded:results' is also "
            "the label of on_success[0].embedded (line 7, column 15); give one of them its own "
            "label") in message, message
    assert ("p.yaml:10:37: on_success[3].embedded.label: label 'done' is also the label of "
            "on_success[1].http (line 8") in message, message
    parse_pipeline(text.replace("label: done}\n  - embedded: {queue: results}",
                                "label: done}\n  - embedded: {queue: results, label: again}")
                   .replace("other, label: done", "other"))


def _delivery() -> Delivery:
    return Delivery("t1", b'{"n": 1}', key="k")


def test_the_router_sends_each_state_to_its_own_destinations() -> None:
    config = parse_pipeline(HEAD + """on_success:
  - embedded: {queue: ok}
  - embedded: {queue: also-ok}
on_failure:
  - embedded: {queue: failed}
""")
    ok, also, failed = destinations(config)
    router = ResultRouter(config, [ok, failed], [(also, "topic-ok")])
    claim = ClaimResult(ClaimStatus.RUN, 1, 1.0, None, 1.0, 1.0)
    outbox, outputs = router.route(_delivery(), claim, TaskState.SUCCEEDED,
                                   Outcome("success", result=b"{}",
                                           result_type="application/json"))
    assert [(e.pipeline, e.destination) for e in outbox] == [("jobs", ok.label)]
    assert [o.topic for o in outputs] == ["topic-ok"]
    assert outbox[0].record is outputs[0].record  # one record, made once
    assert json.loads(outbox[0].record.body)["type"] == "sluice.task.succeeded"
    outbox, outputs = router.route(_delivery(), claim, TaskState.FAILED,
                                   Outcome("failure", error_type="Reject"), "bad (why)")
    assert [e.destination for e in outbox] == [failed.label] and outputs == ()
    assert json.loads(outbox[0].record.body)["data"]["error"]["message"] == "bad (why)"
    nothing = ResultRouter(config)
    assert nothing.route(_delivery(), claim, TaskState.SUCCEEDED,
                         Outcome("success")) == ((), ())
    letter = router.dead_letter(_delivery(), Outcome("failure", error_type="Reject",
                                                     error_message="no"), 3, "")
    assert letter.headers["sluice-reason"] == "rejected by the handler"
    assert letter.headers["sluice-attempts"] == "3"


async def test_the_sqlite_outbox_settles_with_the_status_and_drains_old_names_first(
        data_dir: Path) -> None:
    """The Outbox protocol on SQLite: entries taken are leased; a removal writes the task's
    delivery status with it; a retry comes back after its delay; entries under a positional
    name from before labels are taken first and keep that name."""
    db = Database.open(data_dir)
    store = SqliteTaskStore(db)
    await store.create("jobs", "default", [NewTask("a"), NewTask("b"), NewTask("c")], 1.0)
    record = SinkRecord("a", b"{}", "application/cloudevents+json")

    def put(conn: sqlite3.Connection) -> None:
        put_outbox(conn, [OutboxEntry("jobs", "on_success.0.http",
                                      SinkRecord("c", b"{}", "application/json"))], time.time())
        put_outbox(conn, [OutboxEntry("jobs", "done", record),
                          OutboxEntry("jobs", "done", SinkRecord("b", b"[]", "x/y"))],
                   time.time())

    db.run_sync(put)
    outbox = SqliteOutbox(db, "jobs", "done", lease_s=30.0, legacy=["on_success.0.http"])
    assert await outbox.pending() == 3
    (old,) = await outbox.take(10, 0.0)  # the positional name's entry first, alone
    assert (old.destination, old.record.task_id, old.attempts) == ("on_success.0.http", "c", 1)
    await outbox.failed(old, "HTTP 410 (permanent error)")
    first, second = await outbox.take(10, 0.0)
    assert [i.destination for i in (first, second)] == ["done", "done"]
    assert (first.record.task_id, first.record.body, first.record.key) == ("a", b"{}", None)
    assert await outbox.take(10, 0.0) == []  # leased
    await outbox.retry_later(second, 0.2, "HTTP 503")
    await outbox.delivered([first])
    assert await outbox.pending() == 1
    (again,) = await outbox.take(10, 5.0)  # back after its delay
    assert (again.record.task_id, again.attempts) == ("b", 2)
    statuses = {t: (await store.get(t, "jobs")).delivered for t in "abc"}
    assert {t: {k: v["state"] for k, v in (s or {}).items()} for t, s in statuses.items()} == {
        "a": {"done": "delivered"}, "b": {"done": "pending"},
        "c": {"on_success.0.http": "failed"}}
    assert (statuses["b"] or {})["done"]["error"] == "HTTP 503"
    await outbox.retry_later(again, 0.0, None)  # no error: the status stays as it was
    assert (await store.get("b", "jobs")).delivered == statuses["b"]
