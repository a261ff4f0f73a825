"""The Redis Streams source, sink and submitter on the real server: task ids and delivery
counts from the group, retries delayed in ``<stream>:delayed`` (kept pending meanwhile), lapsed
leases claimed by another consumer, trimming of acknowledged entries only, results written by
the source in one script with its acknowledgements (all or nothing, never twice) unless the sink
asks for the outbox, the sink's layout and errors, submits by the CLI and the HTTP trigger,
start errors, a server outage mid-run, and the example pipeline."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice.config.load import parse_pipeline
from sluice.connectors.base import Delivery, Output, SinkRecord
from sluice.connectors.redis import DELAYED_CONSUMER, SPEC, RedisSource
from sluice.datadir import Database
from sluice.errors import ConfigError, DeliveryError, Misconfigured, Unavailable
from sluice.runtime import build, run_pipelines
from sluice.sinks.redis import SPEC as SINK
from sluice.sinks.redis import RedisSink
from tests.conformance.conftest import Item, closed_port
from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers import redis as rt
from tests.helpers.handlers import read_log
from tests.helpers.server import running_server
from tests.integration.test_kafka_submit import http

DEADLINE_S = 60.0


@pytest.fixture
def stream() -> Iterator[str]:
    problem = rt.server_problem()
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    name = rt.new_stream()
    yield name
    rt.delete(name, f"{name}.dlq", f"{name}.out")


@pytest.fixture
async def sources(stream: str) -> AsyncIterator[Any]:
    opened: list[RedisSource] = []

    async def make(outputs: tuple[str, ...] = (), **options: Any) -> RedisSource:
        config = {"url": rt.URL, "stream": stream, "group": "g", "lease_s": 1.0, **options}
        src = SPEC.factory(SPEC.typed(config), _ctx())
        src.produce_to([(out, None) for out in outputs])
        opened.append(src)
        await src.start()
        return src

    yield make
    for src in opened:
        await src.close()


def _ctx() -> Any:
    from sluice.registry import BuildContext

    return BuildContext(pipeline="jobs")


async def fetch_n(src: RedisSource, n: int, timeout_s: float = DEADLINE_S) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n:
        assert time.monotonic() < deadline, f"got {len(got)} of {n}"
        got += await src.fetch(n - len(got), 0.1)
    return got


# -- the source ------------------------------------------------------------------------------

async def test_an_entry_without_a_task_id_keeps_its_entry_id_across_a_delayed_retry(
        stream: str, sources: Any) -> None:
    (entry_id,) = rt.add(stream, [{"body": b"\xff\xfe not json", "key": "alice",
                                   "trace": "t-1"}])
    src = await sources()
    (first,) = await fetch_n(src, 1)
    assert (first.task_id, first.deliveries, first.key) == (entry_id, 1, "alice")
    assert first.body == b"\xff\xfe not json" and first.headers == {"trace": "t-1"}
    assert first.content_type == "application/json"
    asked = time.monotonic()
    await src.retry_later([(first, 1.0)])
    with rt.client() as c:  # delayed: in the set, and still pending (never acknowledged)
        assert c.zscore(f"{stream}:delayed", entry_id) is not None
        (pending,) = c.xpending_range(stream, "g", "-", "+", 10)
        assert pending["consumer"].decode() == DELAYED_CONSUMER
    assert await src.fetch(1, 0.5) == []
    (again,) = await fetch_n(src, 1)
    waited = time.monotonic() - asked
    assert 0.8 <= waited <= 1.2, f"redelivered after {waited:.3f}s, not 1.0s +-20%"
    assert (again.task_id, again.deliveries, again.ref) == (entry_id, 2, entry_id)
    await src.ack([again])
    assert await src.pending() == 0


async def test_a_lapsed_lease_is_claimed_by_another_consumer_not_by_its_old_one(
        stream: str, sources: Any) -> None:
    rt.publish(stream, [Item("crashed", {"n": 1})])
    first, second = await sources(), await sources()
    (held,) = await fetch_n(first, 1)
    assert await second.fetch(1, 0.3) == []  # leased to the first
    await asyncio.sleep(1.1)  # the first "dies": its lease (1 s) lapses without an extend
    (taken,) = await fetch_n(second, 1)
    assert (taken.task_id, taken.deliveries) == ("crashed", 2)
    await first.extend([held])  # too late: the entry is the second's now, and stays so
    with rt.client() as c:
        (pending,) = c.xpending_range(stream, "g", "-", "+", 10)
        assert pending["consumer"].decode() == second.consumer
    await second.ack([taken])
    assert await first.pending() == 0


async def test_trimming_removes_only_what_every_group_acknowledged(stream: str,
                                                                   sources: Any) -> None:
    ids = rt.add(stream, [{"body": "{}"} for _ in range(1000)])
    src = await sources(trim_interval_s=0.01)
    got = await fetch_n(src, 1000)
    kept = got[499]  # stays pending (unacknowledged)
    await src.ack([d for d in got if d is not kept])
    await asyncio.sleep(0.02)
    await src.fetch(1, 0.0)  # a fetch trims when trim_interval_s has passed
    with rt.client() as c:
        left = [i.decode() for i, _ in c.xrange(stream)]
    assert ids[499] in left and len(left) < 1000, len(left)
    assert left == ids[ids.index(left[0]):]  # only the oldest entries went
    assert ids.index(left[0]) <= 499
    with rt.client() as c:  # another group that has read nothing: nothing more is trimmed
        c.xgroup_create(stream, "other", id="0")
    await src.ack([kept])
    await asyncio.sleep(0.02)
    await src.fetch(1, 0.0)
    with rt.client() as c:
        assert [i.decode() for i, _ in c.xrange(stream)] == left
        c.xgroup_destroy(stream, "other")
    await asyncio.sleep(0.02)
    await src.fetch(1, 0.0)
    with rt.client() as c:
        assert c.xlen(stream) < 200  # whole nodes of acknowledged entries went


async def test_a_missing_stream_or_group_without_create_is_an_error_at_start(
        stream: str, sources: Any) -> None:
    with pytest.raises(Misconfigured, match="the stream does not exist"):
        await sources(create=False)
    rt.add(stream, [{"body": "{}"}])
    with pytest.raises(Misconfigured, match="the group does not exist"):
        await sources(create=False, group="nobody")


async def test_an_unreachable_server_at_start_is_unavailable(stream: str) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    src = SPEC.factory(SPEC.typed({"url": url, "stream": stream}), _ctx())
    with pytest.raises(Unavailable, match=f"{url}.*start the server or correct url"):
        await src.start()
    await src.close()


# -- results written with the acknowledgement --------------------------------------------------

def result(delivery: Delivery, out: str) -> Output:
    return Output(out, SinkRecord(delivery.task_id, b'{"for": "%s"}' % delivery.task_id.encode(),
                                  "application/cloudevents+json", delivery.key))


def pending_ids(stream: str) -> set[str]:
    with rt.client() as c:
        return {p["message_id"].decode() for p in c.xpending_range(stream, "g", "-", "+", 100)}


async def test_results_and_acknowledgements_are_one_script_all_or_nothing_and_never_twice(
        stream: str, sources: Any, caplog: pytest.LogCaptureFixture) -> None:
    out, other = f"{stream}.out", f"{stream}.dlq"
    rt.publish(stream, [Item(f"w{i}", {"n": i}, key="k" if i == 0 else None) for i in range(3)])
    src = await sources((out, other))
    got = await fetch_n(src, 3)
    with rt.client() as c:  # the second result stream becomes a string after the start check
        c.set(other, "not a stream")
    await src.ack_producing([(d, (result(d, out), result(d, other))) for d in got])
    await src.pending()  # waits for the script's reply
    assert "WRONGTYPE" in caplog.text
    # Refused as a whole: not the first result stream, not the acknowledgements.
    assert rt.read_all(out) == [] and pending_ids(stream) == {d.ref for d in got}
    rt.delete(other)
    await src.ack_producing([(d, (result(d, out), result(d, other))) for d in got])
    assert await src.pending() == 0
    written = rt.read_all(out, 3)
    assert [e.text["sluice-task-id"] for e in written] == ["w0", "w1", "w2"]
    assert written[0].fields == {"content-type": b"application/cloudevents+json",
                                 "sluice-task-id": b"w0", "key": b"k", "body": b'{"for": "w0"}'}
    assert "key" not in written[1].fields and len(rt.read_all(other, 3)) == 3
    # Settled again (the script's reply lost and sent again, or another worker settling them):
    # its XACKs acknowledge nothing, so nothing is written a second time.
    await src.ack_producing([(d, (result(d, out),)) for d in got])
    await src.pending()
    assert len(rt.read_all(out)) == 3


async def test_a_worker_that_dies_before_its_script_ran_leaves_neither(
        stream: str, sources: Any) -> None:
    out = f"{stream}.out"
    rt.publish(stream, [Item(f"d{i}", {}) for i in range(3)])
    first = await sources((out,))
    got = await fetch_n(first, 3)
    with rt.client() as c:
        c.client_pause(5000, all=False)  # writes (and write scripts) wait at the server
        try:
            await first.ack_producing([(d, (result(d, out),)) for d in got])  # sent
            await asyncio.sleep(0.3)
            assert not first._acking.done()  # the script waits at the server
            # The worker dies: its connections close before the server ran the script.
            first._acking.cancel()
            await first._client.connection_pool.disconnect()
            await asyncio.sleep(0.1)
        finally:
            c.client_unpause()
    await asyncio.sleep(0.2)
    assert rt.read_all(out) == [] and pending_ids(stream) == {d.ref for d in got}
    # Another worker takes them once their lease lapsed and settles them: each result once.
    await asyncio.sleep(1.0)
    second = await sources((out,))
    again = await fetch_n(second, 3)
    assert sorted((d.task_id, d.deliveries) for d in again) == [("d0", 2), ("d1", 2), ("d2", 2)]
    await second.ack_producing([(d, (result(d, out),)) for d in again])
    assert await second.pending() == 0
    assert sorted(e.text["sluice-task-id"] for e in rt.read_all(out, 3)) == ["d0", "d1", "d2"]


async def test_results_wait_for_the_replicas_asked_for_and_a_shortfall_is_logged_once(
        stream: str, sources: Any, caplog: pytest.LogCaptureFixture) -> None:
    out = f"{stream}.out"
    rt.publish(stream, [Item(f"v{i}", {}) for i in range(4)])
    src = SPEC.factory(SPEC.typed({"url": rt.URL, "stream": stream, "group": "g"}), _ctx())
    src.produce_to([(out, SINK.typed({"stream": out, "wait_replicas": 1,
                                      "wait_timeout_ms": 50}))])
    await src.start()
    try:
        for left in (2, 0):  # this server has no replica: WAIT 1 50 answers 0 after 50 ms
            got = await fetch_n(src, 2)
            asked = time.monotonic()
            await src.ack_producing([(d, (result(d, out),)) for d in got])
            assert await src.pending() == left
            assert time.monotonic() - asked >= 0.05
    finally:
        await src.close()
    assert len(rt.read_all(out, 4)) == 4  # written all the same (not undone)
    assert caplog.text.count("0 of 1 replica(s) acknowledged") == 1


RESULTS = """
name: r-results
source: {{redis: {{url: "{url}", stream: {stream}, group: g, lease_s: 1}}}}
handler: {{python: "tests.helpers.handlers:echo"}}
on_success: [{{redis: {{stream: {stream}.out{sink}}}}}]
"""


def outboxed(config_text: str, tmp_path: Path) -> bool:
    return bool(build(parse_pipeline(config_text), tmp_path / "data").deliverers)


def test_results_go_with_the_acknowledgement_only_to_the_same_server_and_database(
        tmp_path: Path) -> None:
    def with_sink(sink: str) -> str:
        return RESULTS.format(url="redis://127.0.0.1:6379/0", stream="s", sink=sink)

    assert not outboxed(with_sink(""), tmp_path)
    assert not outboxed(with_sink(", url: 'redis://127.0.0.1'"), tmp_path)  # port, db: defaults
    assert outboxed(with_sink(", outbox: true"), tmp_path)
    assert outboxed(with_sink(", url: 'redis://127.0.0.1:6379/1'"), tmp_path)  # another db
    assert outboxed(with_sink(", url: 'redis://127.0.0.1:6380/0'"), tmp_path)  # another server


@pytest.mark.parametrize("outbox", [False, True], ids=["with_ack", "outbox"])
async def test_results_to_a_redis_stream(tmp_path: Path, stream: str, run_log: str,
                                         outbox: bool) -> None:
    """By default the source writes the results with its acknowledgements (no outbox entry,
    no delivery status); ``outbox: true`` sends them through the durable outbox."""
    rt.publish(stream, [Item(f"r{i}", {"n": i}) for i in range(20)])
    sink = ", outbox: true" if outbox else ""
    loop = build(parse_pipeline(RESULTS.format(url=rt.URL, stream=stream, sink=sink)),
                 tmp_path / "data")
    assert bool(loop.deliverers) == outbox
    await asyncio.wait_for(run_pipelines([loop], asyncio.Event(), drain=True), DEADLINE_S)
    events = {e.text["sluice-task-id"]: json.loads(e.fields["body"])
              for e in rt.read_all(f"{stream}.out", 20)}
    assert set(events) == {f"r{i}" for i in range(20)}
    assert events["r3"]["type"] == "sluice.task.succeeded"
    assert events["r3"]["data"]["result"] == {"n": 3}
    assert pending_ids(stream) == set()
    task = await loop.store.get("r3", "r-results")
    states = {name: d["state"] for name, d in (task.delivered or {}).items()}
    assert states == ({f"on_success:redis:{stream}.out": "delivered"} if outbox else {})
    outbox_rows = Database.open(tmp_path / "data").run_sync(lambda c: c.execute(
        "SELECT COUNT(*) FROM messages WHERE queue LIKE 'sluice.outbox.%'").fetchone()[0])
    assert outbox_rows == 0


async def test_an_entry_read_again_after_its_task_finished_gets_its_result_from_the_store(
        tmp_path: Path, stream: str, run_log: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker records its tasks' ends, then dies before its script (it never runs): the
    entries come back after lease_s, their tasks are final, and each result is written once,
    made from the task store, the handler not run again."""
    rt.publish(stream, [Item(f"s{i}", {"n": i}) for i in range(5)])
    text = RESULTS.format(url=rt.URL, stream=stream, sink="")
    first = build(parse_pipeline(text), tmp_path / "data")
    died: list[int] = []

    async def dies(items: Any) -> None:
        died.append(len(items))

    monkeypatch.setattr(first.source, "ack_producing", dies)
    monkeypatch.setattr(first.source, "pending", _nothing_pending)
    await asyncio.wait_for(run_pipelines([first], asyncio.Event(), drain=True), DEADLINE_S)
    assert sum(died) == 5 and rt.read_all(f"{stream}.out") == []
    assert len(pending_ids(stream)) == 5
    await asyncio.sleep(1.1)  # their lease lapses
    second = build(parse_pipeline(text), tmp_path / "data")
    await asyncio.wait_for(run_pipelines([second], asyncio.Event(), drain=True), DEADLINE_S)
    assert second.stats.skipped == 5 and second.stats.succeeded == 0
    events = [json.loads(e.fields["body"]) for e in rt.read_all(f"{stream}.out", 5)]
    assert sorted(e["id"] for e in events) == [f"s{i}" for i in range(5)]
    assert {e["data"]["result"]["n"] for e in events} == set(range(5))
    assert sorted(task_id for _, task_id, _, _ in read_log(run_log)) == [
        f"s{i}" for i in range(5)]  # each handler ran once, in the first worker
    assert pending_ids(stream) == set()


async def _nothing_pending() -> int:
    return 0


# -- the sink --------------------------------------------------------------------------------

async def test_the_sink_adds_each_record_with_its_layout_and_reports_refusals(
        stream: str) -> None:
    out = f"{stream}.out"
    sink = RedisSink(SINK.typed({"stream": out}), rt.URL)
    try:
        await sink.send([SinkRecord("t1", b'{"a":1}', "application/json", "k1", {"h": "v"}),
                         SinkRecord("t2", b"\x00raw", "application/octet-stream")])
        one, two = rt.read_all(out, 2)
        assert one.fields == {"h": b"v", "content-type": b"application/json",
                              "sluice-task-id": b"t1", "key": b"k1", "body": b'{"a":1}'}
        assert two.fields["body"] == b"\x00raw" and "key" not in two.fields
        with rt.client() as c:
            c.set(f"{stream}.dlq", "a string, not a stream")
        wrong = RedisSink(SINK.typed({"stream": f"{stream}.dlq"}), rt.URL)
        with pytest.raises(DeliveryError, match="WRONGTYPE") as refused:
            await wrong.send([SinkRecord("t3", b"{}", "application/json")])
        assert refused.value.permanent
        await wrong.close()
    finally:
        await sink.close()
    gone = RedisSink(SINK.typed({"stream": out}), f"redis://127.0.0.1:{closed_port()}/0")
    with pytest.raises(DeliveryError) as down:
        await gone.send([SinkRecord("t4", b"{}", "application/json")])
    assert not down.value.permanent
    await gone.close()


def test_the_sink_defaults_to_the_source_url_and_needs_one_otherwise() -> None:
    from sluice.runtime import context

    text = ("name: p\nsource: {redis: {url: 'redis://127.0.0.1:6379/3', stream: s}}\n"
            "handler: {python: 'tests.helpers.handlers:echo'}\n"
            "dead_letter: {redis: {stream: s.dlq}}\n")
    config = parse_pipeline(text)
    sink = SINK.build(config.dead_letter.config, context(config, None))
    assert isinstance(sink, RedisSink) and sink.url == "redis://127.0.0.1:6379/3"
    other = parse_pipeline(text.replace("{redis: {url: 'redis://127.0.0.1:6379/3', stream: s}}",
                                        "{embedded: {queue: q}}"))
    with pytest.raises(Misconfigured, match="needs a url"):
        SINK.build(other.dead_letter.config, context(other, None))


def test_a_typo_in_the_source_is_reported_at_its_line() -> None:
    text = ("name: p\nsource:\n  redis:\n    url: redis://127.0.0.1:6379/0\n    strem: s\n"
            "handler: {python: 'tests.helpers.handlers:echo'}\n")
    with pytest.raises(ConfigError) as bad:
        parse_pipeline(text, "p.yaml")
    messages = [str(i) for i in bad.value.issues]
    assert any(m.startswith("p.yaml:5:5: source.redis.strem: unknown key 'strem' (did you "
                            "mean 'stream'?)") for m in messages), messages


# -- through the CLI and the gateway ---------------------------------------------------------

PIPELINE = """
name: r-jobs
source: {{redis: {{url: "{url}", stream: {stream}, lease_s: 2}}}}
handler: {{python: "tests.helpers.handlers:behave"}}
consumer: {{concurrency: 4}}
on_success: [{{redis: {{stream: {stream}.out}}}}]
dead_letter: {{redis: {{stream: {stream}.dlq}}}}
"""


def pipeline_file(tmp_path: Path, stream: str, url: str = rt.URL) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(PIPELINE.format(url=url, stream=stream))
    return path


def sluice(*args: str, log: str = "", timeout_s: float = 90,
           **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(SLUICE_TEST_LOG=log, **env), timeout=timeout_s)


def test_cli_submit_adds_to_the_stream_and_the_worker_runs_that_task(
        tmp_path: Path, stream: str) -> None:
    file, data, log = pipeline_file(tmp_path, stream), str(tmp_path / "data"), str(
        tmp_path / "calls.log")
    done = sluice("submit", "r-jobs", "-f", str(file), "--data-dir", data, "--task-id", "cli-1",
                  "--key", "user-1", "--data", '{"n": 1}')
    assert (done.returncode, done.stdout.strip()) == (0, "cli-1"), done.stderr
    (entry,) = rt.read_all(stream, 1)
    assert entry.text["sluice-task-id"] == "cli-1" and entry.text["key"] == "user-1"
    assert json.loads(entry.fields["body"]) == {"n": 1}
    again = sluice("submit", "r-jobs", "-f", str(file), "--data-dir", data, "--task-id",
                   "cli-1", "--data", '{"n": 1}')
    assert again.returncode == 2 and "already used" in again.stderr
    delayed = sluice("submit", "r-jobs", "-f", str(file), "--data-dir", data, "--delay-s", "5",
                     "--data", "{}")
    assert delayed.returncode == 2 and "no delayed delivery" in delayed.stderr
    ran = sluice("run", str(file), "--data-dir", data, "--drain", log=log)
    assert ran.returncode == 0, ran.stderr
    final = json.loads(sluice("tasks", "get", "cli-1", "--data-dir", data, "--json").stdout)
    assert (final["state"], final["attempts"]) == ("SUCCEEDED", 1)
    assert [e[:2] for e in read_log(log)] == [("start", "cli-1"), ("done", "cli-1")]
    (result,) = rt.read_all(f"{stream}.out", 1)
    assert result.text["sluice-task-id"] == "cli-1"


def test_http_trigger_on_a_redis_pipeline(tmp_path: Path, stream: str) -> None:
    file = pipeline_file(tmp_path, stream)
    with running_server(tmp_path, files=(file,), auth=False) as srv:
        post = f"{srv.url}/v1/pipelines/r-jobs/tasks"
        json_type = {"Content-Type": "application/json"}
        status, body = http("POST", post, b'{"n": 2}', {**json_type, "Task-Id": "http-1"})
        assert status == 202, body
        status, body = http("POST", post, b'{"n": 2}', {**json_type, "Task-Id": "http-1"})
        assert status == 409 and body["state"] in ("QUEUED", "RUNNING", "SUCCEEDED")
        deadline = time.monotonic() + DEADLINE_S
        while True:
            status, task = http("GET", f"{srv.url}/v1/tasks/http-1")
            if task.get("state") == "SUCCEEDED" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (task["state"], task["attempts"]) == ("SUCCEEDED", 1)
        assert [e[:2] for e in read_log(srv.log)] == [("start", "http-1"), ("done", "http-1")]


def test_a_submit_to_an_unreachable_server_leaves_no_task(tmp_path: Path,
                                                          stream: str) -> None:
    file = pipeline_file(tmp_path, stream, f"redis://127.0.0.1:{closed_port()}/0")
    data = str(tmp_path / "data")
    done = sluice("submit", "r-jobs", "-f", str(file), "--data-dir", data, "--task-id", "x-1",
                  "--data", "{}")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    gone = sluice("tasks", "get", "x-1", "--data-dir", data, "--json")
    assert gone.returncode != 0  # the same task id may be submitted again


def test_run_against_an_unreachable_server_says_so_in_one_line(tmp_path: Path,
                                                               stream: str) -> None:
    port = closed_port()
    file = pipeline_file(tmp_path, stream, f"redis://:secret@127.0.0.1:{port}/0")
    ran = sluice("run", str(file), "--data-dir", str(tmp_path / "data"), timeout_s=60)
    assert ran.returncode == 1, ran.stderr
    assert "Traceback" not in ran.stderr and "secret" not in ran.stderr
    (line,) = [ln for ln in ran.stderr.splitlines() if ln.startswith("error:")]
    assert f"127.0.0.1:{port}" in line and "start the server or correct url" in line


def test_a_handler_running_past_its_lease_keeps_its_entry_and_runs_once(
        tmp_path: Path, stream: str) -> None:
    file = tmp_path / "slow.yaml"
    file.write_text(PIPELINE.format(url=rt.URL, stream=stream).replace("lease_s: 2",
                                                                       "lease_s: 0.6"))
    rt.publish(stream, [Item("slow", {"sleep_s": 2.5}), *[Item(f"q{i}", {}) for i in range(5)]])
    log = str(tmp_path / "calls.log")
    procs = [subprocess.Popen([*sluice_cmd(), "run", str(file), "--data-dir",
                               str(tmp_path / "data")], cwd=ROOT,
                              env=subprocess_env(SLUICE_TEST_LOG=log),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + DEADLINE_S
        while len({e[1] for e in read_log(log) if e[0] == "done"}) < 6:
            assert time.monotonic() < deadline, read_log(log)
            time.sleep(0.2)
        time.sleep(1.0)  # a second run, had the lease lapsed, would have started by now
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.communicate(timeout=60)
    assert Counter(e[1] for e in read_log(log) if e[0] == "start")["slow"] == 1


def test_a_server_outage_mid_run_loses_nothing_and_runs_nothing_twice(
        tmp_path: Path, stream: str) -> None:
    sent = [Item(f"o{i:04d}", {"sleep_s": 0.02}, key=f"k{i % 7}") for i in range(300)]
    rt.publish(stream, sent)
    file, log = pipeline_file(tmp_path, stream), str(tmp_path / "calls.log")
    worker = subprocess.Popen([*sluice_cmd(), "run", str(file), "--data-dir",
                               str(tmp_path / "data")], cwd=ROOT,
                              env=subprocess_env(SLUICE_TEST_LOG=log),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def done() -> Counter[str]:
        return Counter(e[1] for e in read_log(log) if e[0] == "done")

    try:
        deadline = time.monotonic() + DEADLINE_S
        while len(done()) < 30:
            assert time.monotonic() < deadline, "the worker never got going"
            time.sleep(0.05)
        services("stop")
        try:
            time.sleep(5)
        finally:
            services("start")
        deadline = time.monotonic() + 2 * DEADLINE_S
        while set(done()) != {i.task_id for i in sent}:
            assert time.monotonic() < deadline, f"{len(done())} of {len(sent)} done"
            time.sleep(0.2)
        # Every result reaches the stream, once: written with the acknowledgements, a script
        # whose reply the outage lost is sent again and writes nothing twice; one the outage
        # refused leaves its entries pending, and their results come from the task store.
        while len(results := Counter(e.text["sluice-task-id"] for e in rt.read_all(
                f"{stream}.out", 0))) < len(sent):
            assert time.monotonic() < deadline, f"{len(results)} of {len(sent)} results"
            time.sleep(0.2)
    finally:
        worker.terminate()
        _, errs = worker.communicate(timeout=60)
    assert worker.returncode == 0, errs
    assert max(done().values()) == 1, [t for t, n in done().items() if n > 1]
    assert max(results.values()) == 1, [t for t, n in results.items() if n > 1]
    lines = errs.splitlines()
    for component in (f"redis source of {stream!r}", f"redis sink to '{stream}.out'"):
        down = [ln for ln in lines if f"{component}: broker unreachable" in ln]
        back = [ln for ln in lines if f"{component}: broker reachable again" in ln]
        assert len(down) <= 1 and len(back) == len(down), (component, down, back)
    assert any("redis source" in ln and "unreachable" in ln for ln in lines), errs
    assert "Traceback" not in errs, errs


def services(action: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "services"), action, "redis"], check=True,
                   capture_output=True, timeout=120)


# -- the example pipeline --------------------------------------------------------------------

def test_the_example_pipeline_prices_orders_and_dead_letters_bad_ones(tmp_path: Path) -> None:
    problem = rt.server_problem()
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    streams = ("redis-orders", "redis-orders.priced", "redis-orders.dlq")
    rt.delete(*streams)
    try:
        rt.add("redis-orders", [{"body": '{"item": "book", "qty": 2}', "key": "alice"},
                                {"body": '{"item": "unicorn"}', "key": "bob"}])
        ran = sluice("run", "pipelines/redis_orders.yaml", "--data-dir", str(tmp_path / "d"),
                     "--drain", REDIS_URL=rt.URL)
        assert ran.returncode == 0, ran.stderr
        (priced,) = rt.read_all("redis-orders.priced", 1)
        assert json.loads(priced.fields["body"])["data"]["result"]["total_cents"] == 2500
        (dead,) = rt.read_all("redis-orders.dlq", 1)
        assert dead.text["sluice-error-type"] == "Reject" and dead.text["key"] == "bob"
    finally:
        rt.delete(*streams)
