"""The NATS JetStream source, sink and submitter on the real server: what is particular to them
(the durable consumer's settings, task ids and keys from headers and subjects, PubAcks and
deduplication by Nats-Msg-Id, results published before the acknowledgement, a lease held past
AckWait, errors at start, submitting, a server restart mid-run, the example pipeline)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice.config.load import parse_pipeline
from sluice.connectors import nats_client
from sluice.connectors.base import Delivery, SinkRecord
from sluice.connectors.nats import SPEC, NatsSource
from sluice.errors import DeliveryError, Misconfigured
from sluice.runtime import build, run_pipelines
from sluice.sinks.nats import SPEC as SINK
from sluice.sinks.nats import NatsSink
from sluice.tasks.state import TaskState
from tests.conformance.conftest import closed_port
from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers import nats as nt
from tests.helpers.handlers import read_log
from tests.helpers.server import running_server
from tests.helpers.waiting import wait_until

DEADLINE_S = 60.0


class Stream:
    """A fresh work-queue stream on ``<subject>`` and ``<subject>.>``."""

    def __init__(self) -> None:
        token = nt.new_name("T")
        self.name = f"SLUICE_{token}"
        self.subject = f"it.{token.lower()}"
        nt.create_stream(self.name, [self.subject, f"{self.subject}.>"])


@pytest.fixture
def stream() -> Iterator[Stream]:
    nt.require_server()
    made = Stream()
    yield made
    nt.delete_streams(made.name)


def source(stream: Stream, **options: Any) -> NatsSource:
    config = SPEC.typed({"url": nt.URL, "stream": stream.name, "subject": stream.subject,
                         **options})
    return NatsSource(config, config.consumer or f"c-{stream.name}")


@pytest.fixture
async def opened() -> AsyncIterator[list[NatsSource]]:
    sources: list[NatsSource] = []
    yield sources
    for src in sources:
        await src.close()


async def started(opened: list[NatsSource], src: NatsSource) -> NatsSource:
    opened.append(src)
    await src.start()
    return src


# -- the source ------------------------------------------------------------------------------------

async def test_the_durable_consumer_follows_the_pipeline(stream: Stream,
                                                         opened: list[NatsSource]) -> None:
    config = parse_pipeline(f"""
name: orders.eu
source: {{nats: {{url: "{nt.URL}", stream: {stream.name}, lease_s: 7, max_ack_pending: 99}}}}
handler: {{python: "tests.helpers.handlers:behave"}}
""")
    from sluice.runtime import build_source

    src = build_source(config, None)
    assert isinstance(src, NatsSource)
    await started(opened, src)
    assert src.consumer == "sluice-orders_eu"
    info = await src.conn.js.consumer_info(stream.name, "sluice-orders_eu")
    assert (info.config.ack_wait, info.config.max_deliver, info.config.max_ack_pending) == (
        7.0, -1, 99)
    assert info.config.durable_name == "sluice-orders_eu"


async def test_task_ids_keys_and_deliveries(stream: Stream, opened: list[NatsSource]) -> None:
    nt.publish(stream.subject, [
        nt.Out(b'{"n": 1}', task_id="by-header", key="user-1"),
        nt.Out(b'{"n": 2}', key="user.2", headers={"Nats-Msg-Id": "by-msg-id"}),
        nt.Out(b'{"n": 3}', headers={"sluice-key": "exact key *"}),
    ])
    src = await started(opened, source(stream))
    got: list[Delivery] = []
    deadline = time.monotonic() + DEADLINE_S
    while len(got) < 3 and time.monotonic() < deadline:
        got += await src.fetch(3 - len(got), 1.0)
    assert [(d.task_id, d.key, d.deliveries) for d in got] == [
        ("by-header", "user-1", 1), ("by-msg-id", "user.2", 1),
        (f"{stream.name}/3", "exact key *", 1)]
    # Handed out again (a NAK at once): the same task ids, one more delivery each.
    await src.retry_later([(d, 0.0) for d in got])
    again: list[Delivery] = []
    while len(again) < 3 and time.monotonic() < deadline:
        again += await src.fetch(3 - len(again), 1.0)
    assert sorted((d.task_id, d.deliveries) for d in again) == [
        (f"{stream.name}/3", 2), ("by-header", 2), ("by-msg-id", 2)]
    await src.ack(again)
    assert await src.pending() == 0


async def test_pulls_ahead_only_at_the_loops_pace_and_sends_back_what_waits(
        stream: Stream, opened: list[NatsSource]) -> None:
    total = 3000
    nt.publish(stream.subject, [nt.Out(b"{}", f"p{i:04d}") for i in range(total)])
    src = await started(opened, source(stream, lease_s=4.0, consumer="c"))
    # A first fetch, no pace known: the server hands out exactly what was asked for.
    first = await src.fetch(3, 1.0)
    assert len(first) == 3 and nt.consumer_counts(stream.name, "c")[1] == 3
    await src.ack(first)
    # A fast loop: it takes 10 at a time for a while; the source pulls ahead of it.
    taken = 0
    until = time.monotonic() + 0.5
    while time.monotonic() < until:
        got = await src.fetch(10, 1.0)
        assert len(got) <= 10
        taken += len(got)
        await src.ack(got)
        await asyncio.sleep(0.01)  # about 1,000 a second
    held = nt.consumer_counts(stream.name, "c")[1]
    assert 0 < held <= 500, held  # pulled ahead, bounded
    # The loop stops fetching: within lease_s / 2 what was pulled ahead goes back (NAK), and
    # another worker of the consumer gets it before its AckWait (lease_s) would have lapsed.
    stopped = time.monotonic()
    await asyncio.sleep(2.3)
    other = await started(opened, source(stream, lease_s=4.0, consumer="c"))
    rest: list[Delivery] = []
    while len(rest) < total - 3 - taken and time.monotonic() < stopped + 3.8:
        rest += await other.fetch(1000, 0.2)
    await other.ack(rest)
    assert len({d.task_id for d in rest}) == total - 3 - taken
    assert sum(1 for d in rest if d.deliveries == 2) == held


async def test_a_missing_stream_is_an_error_unless_it_is_created(
        opened: list[NatsSource]) -> None:
    nt.require_server()
    missing = Stream.__new__(Stream)
    missing.name, missing.subject = f"SLUICE_{nt.new_name('M')}", "it.missing"
    with pytest.raises(Misconfigured, match=f"nats stream '{missing.name}' does not exist on "
                       "nats://127.0.0.1:4222; create it, or set create_stream: true"):
        await started(opened, source(missing))
    try:
        await started(opened, source(missing, create_stream=True))
        assert nt.stream_exists(missing.name)
    finally:
        nt.delete_streams(missing.name)


# -- the sink --------------------------------------------------------------------------------------

def sink(stream: str, **options: Any) -> NatsSink:
    return NatsSink(SINK.typed({"stream": stream, **options}), nt.URL)


async def test_the_sink_publishes_with_pubacks_and_each_task_once(stream: Stream) -> None:
    out = sink(stream.name, subject=stream.subject)
    records = [SinkRecord("r1", b'{"a": 1}', "application/json", "user-1", {"x-extra": "1"}),
               SinkRecord("r2", b"raw", "application/octet-stream", "two words"),
               SinkRecord("r3", b"{}", "application/json")]
    try:
        await out.send(records)
        await out.send(records[:2])  # published again (a lost PubAck): stored once
    finally:
        await out.close()
    stored = nt.read_all(stream.name, 3)
    assert [m.subject for m in stored] == [
        f"{stream.subject}.user-1", nats_client.key_subject(stream.subject, "two words"),
        stream.subject]
    assert nats_client.key_subject(stream.subject, "two words").startswith(
        f"{stream.subject}.~")
    first = stored[0].headers
    assert (first["sluice-task-id"], first["Nats-Msg-Id"], first["sluice-key"],
            first["content-type"], first["x-extra"]) == (
        "r1", "r1", "user-1", "application/json", "1")
    assert stored[1].headers["sluice-key"] == "two words" and stored[1].body == b"raw"
    assert "sluice-key" not in stored[2].headers


async def test_the_sink_fails_clearly(stream: Stream) -> None:
    record = SinkRecord("r1", b"{}", "application/json")
    missing = sink(f"SLUICE_{nt.new_name('X')}")
    with pytest.raises(DeliveryError, match=r"does not exist .*set create_stream: true"):
        await missing.send([record])
    await missing.close()
    # A subject no stream stores: not acknowledged (the expected stream is named).
    astray = sink(stream.name, subject="it.nowhere", timeout_s=2)
    with pytest.raises(DeliveryError, match=r"no stream stores subject 'it\.nowhere'"):
        await astray.send([record])
    await astray.close()
    created = f"SLUICE_{nt.new_name('C')}"
    made = sink(created, create_stream={"max_age_s": 60})
    try:
        await made.send([record])
        assert [m.headers["sluice-task-id"] for m in nt.read_all(created, 1)] == ["r1"]
    finally:
        await made.close()
        nt.delete_streams(created)


# -- through the consumer loop ---------------------------------------------------------------------

def pipeline(stream: Stream, *, lease_s: float = 30.0, outbox: bool = False,
             retry: str = "{max_attempts: 3, initial_backoff_s: 0.05}") -> str:
    return f"""
name: nats-it
source: {{nats: {{url: "{nt.URL}", stream: {stream.name}, subject: {stream.subject},
                 lease_s: {lease_s}}}}}
handler: {{python: "tests.helpers.handlers:behave"}}
consumer: {{concurrency: 4, retry: {retry}}}
on_success: [{{nats: {{stream: {stream.name}_OUT, create_stream: true,
                       outbox: {json.dumps(outbox)}}}}}]
dead_letter: {{nats: {{stream: {stream.name}_DLQ, create_stream: true}}}}
"""


async def drain(text: str, data_dir: Path) -> None:
    loop = build(parse_pipeline(text), data_dir)
    await asyncio.wait_for(run_pipelines([loop], asyncio.Event(), drain=True), DEADLINE_S)


@pytest.mark.parametrize("outbox", [False, True], ids=["with-the-ack", "outbox"])
async def test_results_and_dead_letters(stream: Stream, data_dir: Path, run_log: str,
                                        outbox: bool) -> None:
    nt.publish(stream.subject, [
        nt.Out(json.dumps({"n": i}).encode(), f"ok-{i}", key=f"k{i % 2}") for i in range(5)])
    nt.publish(stream.subject, [nt.Out(b'{"reject": "no"}', "bad"),
                                nt.Out(b"\xff\xfe not json", "poison")])
    try:
        await drain(pipeline(stream, outbox=outbox), data_dir)
        results = {m.headers["sluice-task-id"]: m for m in nt.read_all(f"{stream.name}_OUT", 5)}
        assert sorted(results) == [f"ok-{i}" for i in range(5)]
        assert results["ok-1"].subject == f"{stream.name}_OUT.k1"
        assert results["ok-1"].payload["data"]["result"] == {"attempt": 1}
        letters = {m.headers["sluice-task-id"]: m for m in nt.read_all(f"{stream.name}_DLQ", 2)}
        assert sorted(letters) == ["bad", "poison"]
        assert letters["poison"].body == b"\xff\xfe not json"
        assert letters["poison"].headers["sluice-error-type"] == "InvalidPayload"
        # With the acknowledgement, no outbox row: the task's deliveries list no destination.
        from sluice.stores import open_store

        task = await open_store(None, data_dir).tasks.get("ok-0", "nats-it")
        assert bool(task.delivered) == outbox
        assert nt.consumer_counts(stream.name, "sluice-nats-it") == (0, 0)
    finally:
        nt.delete_streams(f"{stream.name}_OUT", f"{stream.name}_DLQ")


async def test_a_handler_running_past_its_lease_keeps_its_message(
        stream: Stream, data_dir: Path, run_log: str) -> None:
    nt.publish(stream.subject, [nt.Out(b'{"sleep_s": 3.5}', "slow"),
                                nt.Out(b"{}", "quick")])
    try:
        await drain(pipeline(stream, lease_s=1.0), data_dir)
    finally:
        nt.delete_streams(f"{stream.name}_OUT", f"{stream.name}_DLQ")
    runs = Counter(e[1] for e in read_log(run_log) if e[0] == "start")
    assert runs == {"slow": 1, "quick": 1}


# -- the CLI and the gateway -----------------------------------------------------------------------

def sluice(*args: str, log: str = "", timeout_s: float = 90,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(SLUICE_TEST_LOG=log, **(env or {})),
                          timeout=timeout_s)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "n.yaml"
    path.write_text(text)
    return path


SMALL = """
name: n-jobs
source: {{nats: {{url: "{url}", stream: {stream}, subject: {subject}}}}}
handler: {{python: "tests.helpers.handlers:behave"}}
consumer: {{concurrency: 4}}
"""


def test_errors_at_start_are_one_line(tmp_path: Path) -> None:
    nt.require_server()
    down = write(tmp_path, SMALL.format(url=f"nats://127.0.0.1:{closed_port()}",
                                        stream="NOWHERE", subject="nowhere"))
    ran = sluice("run", str(down), "--data-dir", str(tmp_path / "d"))
    assert ran.returncode == 1 and "Traceback" not in ran.stderr, ran.stderr
    assert "error: nats source of stream 'NOWHERE': cannot connect to NATS at " \
           "nats://127.0.0.1:" in ran.stderr
    missing = write(tmp_path, SMALL.format(url=nt.URL, stream="SLUICE_NO_SUCH_STREAM",
                                           subject="nowhere"))
    ran = sluice("run", str(missing), "--data-dir", str(tmp_path / "d"))
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr
    assert "error: nats stream 'SLUICE_NO_SUCH_STREAM' does not exist" in ran.stderr


def test_refused_credentials_are_a_permanent_error(tmp_path: Path) -> None:
    server = shutil.which("nats-server")
    if server is None:
        pytest.skip("no nats-server binary (scripts/services start nats installs it)")
    port = closed_port()
    proc = subprocess.Popen([server, "-a", "127.0.0.1", "-p", str(port), "--user", "alice",
                             "--pass", "secret"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        file = write(tmp_path, SMALL.format(url=f"nats://alice:wrong-pw@127.0.0.1:{port}",
                                            stream="S", subject="s"))
        ran = sluice("run", str(file), "--data-dir", str(tmp_path / "d"))
    finally:
        proc.terminate()
        proc.wait(10)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr
    assert "the server refused the connection" in ran.stderr
    assert "check the credentials" in ran.stderr and "wrong-pw" not in ran.stderr


def test_a_typo_in_the_source_is_an_error_at_its_line(tmp_path: Path) -> None:
    file = tmp_path / "n.yaml"
    file.write_text("name: n\nsource:\n  nats:\n    url: nats://localhost:4222\n"
                    "    stream: S\n    lease: 4\nhandler: {python: m:f}\n")
    done = sluice("validate", str(file))
    assert done.returncode == 2
    assert f"{file}:6:5: source.nats.lease: unknown key 'lease'" in done.stderr, done.stderr


def test_cli_submit_publishes_to_the_stream_and_the_worker_runs_that_task(
        tmp_path: Path, stream: Stream) -> None:
    file = write(tmp_path, SMALL.format(url=nt.URL, stream=stream.name, subject=stream.subject))
    data, log = str(tmp_path / "data"), str(tmp_path / "calls.log")
    done = sluice("submit", "n-jobs", "-f", str(file), "--data-dir", data, "--task-id", "cli-1",
                  "--key", "user-1", "--data", '{"n": 1}')
    assert (done.returncode, done.stdout.strip()) == (0, "cli-1"), done.stderr
    (message,) = nt.read_all(stream.name, 1)
    assert message.subject == f"{stream.subject}.user-1"
    assert (message.headers["sluice-task-id"], message.headers["Nats-Msg-Id"]) == (
        "cli-1", "cli-1")
    again = sluice("submit", "n-jobs", "-f", str(file), "--data-dir", data, "--task-id",
                   "cli-1", "--data", '{"n": 1}')
    assert again.returncode == 2 and "already used" in again.stderr
    delayed = sluice("submit", "n-jobs", "-f", str(file), "--data-dir", data, "--delay-s", "5",
                     "--data", "{}")
    assert delayed.returncode == 2 and "no delayed delivery" in delayed.stderr
    ran = sluice("run", str(file), "--data-dir", data, "--drain", log=log)
    assert ran.returncode == 0, ran.stderr
    final = json.loads(sluice("tasks", "get", "cli-1", "--data-dir", data, "--json").stdout)
    assert (final["state"], final["attempts"], final["key"]) == ("SUCCEEDED", 1, "user-1")
    assert [e[:2] for e in read_log(log)] == [("start", "cli-1"), ("done", "cli-1")]


def test_submit_to_a_missing_stream_leaves_nothing(tmp_path: Path) -> None:
    nt.require_server()
    file = write(tmp_path, SMALL.format(url=nt.URL, stream="SLUICE_NO_SUCH_STREAM",
                                        subject="nowhere"))
    done = sluice("submit", "n-jobs", "-f", str(file), "--data-dir", str(tmp_path / "d"),
                  "--task-id", "lost-1", "--data", "{}")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "'SLUICE_NO_SUCH_STREAM' does not exist" in done.stderr
    assert "a submit never creates streams" in done.stderr


def http(method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_http_trigger_on_a_nats_pipeline(tmp_path: Path, stream: Stream) -> None:
    file = write(tmp_path, SMALL.format(url=nt.URL, stream=stream.name, subject=stream.subject))
    with running_server(tmp_path, files=(file,), auth=False) as srv:
        post = f"{srv.url}/v1/pipelines/n-jobs/tasks"
        json_type = {"Content-Type": "application/json"}
        status, body = http("POST", post, b'{"n": 2}', {**json_type, "Task-Id": "http-1"})
        assert status == 202, body
        status, body = http("POST", post, b'{"n": 2}', {**json_type, "Task-Id": "http-1"})
        assert status == 409
        status, body = http("POST", post, b"{}", {**json_type, "Delay-S": "3"})
        assert status == 400 and "no delayed delivery" in body["detail"]
        deadline = time.monotonic() + DEADLINE_S
        while True:
            status, task = http("GET", f"{srv.url}/v1/tasks/http-1")
            if task.get("state") == "SUCCEEDED" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (task["state"], task["attempts"]) == ("SUCCEEDED", 1)
        assert [e[:2] for e in read_log(srv.log)] == [("start", "http-1"), ("done", "http-1")]


# -- the example pipeline --------------------------------------------------------------------------

def test_the_example_pipeline_prices_orders(tmp_path: Path) -> None:
    nt.require_server()
    token = nt.new_name("O")
    env = {"ORDERS_STREAM": f"SLUICE_{token}", "ORDERS_SUBJECT": token.lower()}
    example, data = "pipelines/nats_orders.yaml", str(tmp_path / "data")
    streams = [f"SLUICE_{token}", f"SLUICE_{token}_PRICED", f"SLUICE_{token}_DLQ"]
    try:
        ran = sluice("run", example, "--data-dir", data, "--drain", env=env)  # makes streams
        assert ran.returncode == 0, ran.stderr
        for key, task_id, body in [("alice", "order-1", '{"item": "book", "qty": 2}'),
                                   ("bob", "order-2", '{"item": "lamp"}'),
                                   ("bob", "order-3", '{"item": "unicorn"}')]:
            done = sluice("submit", "nats-pricing", "-f", example, "--data-dir", data, "--key",
                          key, "--task-id", task_id, "--data", body, env=env)
            assert done.returncode == 0, done.stderr
        ran = sluice("run", example, "--data-dir", data, "--drain", env=env)
        assert ran.returncode == 0, ran.stderr
        priced = {m.headers["sluice-task-id"]: m for m in nt.read_all(streams[1], 2)}
        assert sorted(priced) == ["order-1", "order-2"]
        assert priced["order-1"].payload["data"]["result"]["total_cents"] == 2500
        assert priced["order-2"].subject == f"{token.lower()}-priced.bob"
        (letter,) = nt.read_all(streams[2], 1)
        assert (letter.headers["sluice-task-id"], letter.headers["sluice-reason"]) == (
            "order-3", "rejected by the handler")
    finally:
        nt.delete_streams(*streams)


# -- a server restart mid-run ----------------------------------------------------------------------

def services(*args: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "services"), *args], check=True,
                   capture_output=True, timeout=120)


@pytest.mark.slow
async def test_a_server_restart_loses_nothing_and_logs_two_lines(
        tmp_path: Path, stream: Stream, data_dir: Path, run_log: str) -> None:
    file = write(tmp_path, pipeline(stream, lease_s=5.0))
    sent = [f"r{i:04d}" for i in range(300)]
    nt.publish(stream.subject, [nt.Out(b'{"sleep_s": 0.02}', t, key=f"k{i % 7}")
                                for i, t in enumerate(sent)])
    worker = subprocess.Popen([*sluice_cmd(), "run", str(file), "--data-dir", str(data_dir)],
                              cwd=ROOT, env=subprocess_env(SLUICE_TEST_LOG=run_log),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done: Counter[str] = Counter()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while len({e[1] for e in read_log(run_log) if e[0] == "done"}) < 50:
            assert time.monotonic() < deadline and worker.poll() is None
            await asyncio.sleep(0.05)
        services("stop", "nats")
        await asyncio.sleep(5)
        services("start", "nats")
        deadline = time.monotonic() + 2 * DEADLINE_S
        while True:
            done = Counter(e[1] for e in read_log(run_log) if e[0] == "done")
            if set(done) == set(sent):
                break
            assert time.monotonic() < deadline, f"{len(done)} of {len(sent)} done"
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the last results and acknowledgements
    finally:
        services("start", "nats")
        worker.send_signal(signal.SIGTERM)
        _, errs = worker.communicate(timeout=DEADLINE_S)
        stderr = errs.decode(errors="replace")
    try:
        assert worker.returncode == 0, stderr
        assert max(done.values()) == 1, [t for t, n in done.items() if n > 1]
        from sluice.stores import open_store

        states = Counter(str(r.state) for r in await open_store(None, data_dir).tasks.stats())
        assert states == {str(TaskState.SUCCEEDED): len(sent)}
        results = [m.headers["sluice-task-id"] for m in nt.read_all(f"{stream.name}_OUT",
                                                                    len(sent))]
        assert sorted(results) == sent  # each once: republished ones were deduplicated
        lost = [line for line in stderr.splitlines() if "lost the connection to NATS" in line]
        back = [line for line in stderr.splitlines() if "to NATS at" in line
                and "again after" in line]
        assert len(lost) == 1 and "WARNING" in lost[0], stderr
        assert len(back) == 1 and "INFO" in back[0], stderr
        # A result publish may fail a moment before the lost connection is noticed: that one
        # line may come too (the results are published again), nothing per retry.
        noisy = [line for line in stderr.splitlines()
                 if ("WARNING" in line or "ERROR" in line) and line not in lost]
        raced = [line for line in noisy if "results not acknowledged" in line]
        assert len(raced) <= 1 and len(noisy) == len(raced), stderr
        assert "Traceback" not in stderr
    finally:
        nt.delete_streams(f"{stream.name}_OUT", f"{stream.name}_DLQ")


async def test_results_not_acknowledged_are_published_again(
        stream: Stream, data_dir: Path, run_log: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "sluice.connectors.nats")
    out = f"{stream.name}_OUT"
    loop = build(parse_pipeline(pipeline(stream)), data_dir)
    stop = asyncio.Event()
    running = asyncio.create_task(run_pipelines([loop], stop))
    try:
        await wait_until(lambda: nt.stream_exists(out))  # made by the source at its start
        nt.delete_streams(out)  # its results cannot be stored now
        nt.publish(stream.subject, [nt.Out(b"{}", "once", key="k")])
        await wait_until(lambda: "results not acknowledged" in caplog.text)
        nt.create_stream(out, [out, f"{out}.>"])
        await wait_until(lambda: len(nt.read_all(out, 0)) == 1)
    finally:
        stop.set()
        await asyncio.wait_for(running, DEADLINE_S)
        nt.delete_streams(out, f"{stream.name}_DLQ")
    assert "results published again" in caplog.text
    assert [e[:2] for e in read_log(run_log)] == [("start", "once"), ("done", "once")]
    assert nt.consumer_counts(stream.name, "sluice-nats-it") == (0, 0)
