"""What is particular to the RabbitMQ connector, on the real broker: quorum queues declared or
only checked, a prefetch that follows the fetch budget, retries through per-delay TTL queues,
task ids from the header, the message_id or neither, key shards on single-active-consumer
queues, the sink's confirms, submitting by the CLI and over HTTP (with a delay), a typo in the
YAML, and the example pipelines (RabbitMQ to RabbitMQ, RabbitMQ to Kafka) end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from sluice.config.load import parse_pipeline
from sluice.connectors.base import Delivery, SinkRecord
from sluice.connectors.rabbitmq import RabbitSource
from sluice.errors import DeliveryError, Misconfigured, Unavailable
from sluice.registry import BuildContext
from sluice.runtime import build_source
from sluice.sinks import rabbitmq as rabbit_sink
from tests.conformance.conftest import closed_port
from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers import kafka as kt
from tests.helpers import rabbitmq as rt
from tests.helpers.handlers import read_log
from tests.helpers.server import running_server

PIPELINE = """
name: r-jobs
source: {{rabbitmq: {{url: "{url}", queue: {queue}{extra}}}}}
handler: {{python: "tests.helpers.handlers:behave"}}
consumer: {{concurrency: 4{consumer}}}
"""


def require_broker() -> None:
    problem = rt.broker_problem()
    if problem is not None:
        pytest.fail(problem, pytrace=False)


@pytest.fixture
def queue() -> Iterator[str]:
    require_broker()
    name = rt.new_queue("sluice-rmq")
    yield name
    rt.delete(name, f"{name}.dlq", *(f"{name}.k{i}" for i in range(4)))


def pipeline(queue: str, extra: str = "", consumer: str = "") -> str:
    return PIPELINE.format(url=rt.URL, queue=queue, extra=extra, consumer=consumer)


Open = Callable[..., Awaitable[RabbitSource]]


@pytest.fixture
async def opened(data_dir: Path) -> AsyncIterator[Open]:
    sources: list[RabbitSource] = []

    async def start(text: str) -> RabbitSource:
        src = build_source(parse_pipeline(text), data_dir)
        assert isinstance(src, RabbitSource)
        sources.append(src)
        await src.start()
        return src

    yield start
    for src in sources:
        await src.close()


async def fetch_n(src: RabbitSource, n: int, timeout_s: float = 20.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += await src.fetch(n - len(got), 0.2)
    return got


def publish(queue: str, messages: list[rt.Out]) -> Awaitable[None]:
    return asyncio.to_thread(rt.publish, queue, messages)


# -- the source -------------------------------------------------------------------------------

async def test_declares_a_quorum_queue_and_check_finds_a_missing_one(queue: str,
                                                                     opened: Open) -> None:
    with pytest.raises(Misconfigured) as missing:
        await opened(pipeline(queue, ", topology: check"))
    assert f"'{queue}'" in str(missing.value) and "set topology: declare" in str(missing.value)
    await opened(pipeline(queue))  # declare (the default): a quorum queue
    with pytest.raises(Misconfigured) as other_type:  # declared again as classic: refused
        await opened(pipeline(queue, ", queue_type: classic"))
    assert "x-queue-type" in str(other_type.value)
    await opened(pipeline(queue, ", topology: check"))  # it exists now: fine


async def test_unreachable_broker_is_one_clear_error(opened: Open) -> None:
    port = closed_port()
    text = PIPELINE.format(url=f"amqp://guest:secret@127.0.0.1:{port}/", queue="q",
                           extra="", consumer="")
    with pytest.raises(Unavailable) as unreachable:
        await opened(text)
    assert f"127.0.0.1:{port}" in str(unreachable.value)
    assert "secret" not in str(unreachable.value)


async def test_wrong_credentials_are_misconfigured(opened: Open) -> None:
    require_broker()
    text = PIPELINE.format(url="amqp://guest:wrong@127.0.0.1:5672/", queue="q", extra="",
                           consumer="")
    with pytest.raises(Misconfigured, match="refused the credentials"):
        await opened(text)


async def test_prefetch_follows_the_fetch_budget(queue: str, opened: Open) -> None:
    # Without ordering (with it, the consumer is never replaced: its prefetch is max_prefetch).
    src = await opened(pipeline(queue, consumer=", ordering: unordered"))
    await publish(queue, [rt.Out(b"{}", f"p{i}") for i in range(60)])
    first = await fetch_n(src, 5)
    await asyncio.sleep(0.5)  # what the broker would send beyond the prefetch, it would by now
    assert len(first) == 5 and len(src._buffer) == 0
    assert await asyncio.to_thread(rt.count, queue) == 55  # the rest is there for other workers
    more = await fetch_n(src, 20)  # a larger budget: the prefetch follows
    await asyncio.sleep(0.5)
    assert len(more) == 20 and len(src._buffer) == 0
    assert await asyncio.to_thread(rt.count, queue) == 35
    await src.ack(first + more)  # acknowledged in one multiple ack, and gone
    assert await src.pending() == 35


async def test_retry_later_waits_in_a_delay_queue_and_comes_back_on_time(
        queue: str, opened: Open) -> None:
    src = await opened(pipeline(queue, consumer=", ordering: unordered"))
    await publish(queue, [rt.Out(b'{"n": 1}', "again", key="k1")])
    (first,) = await fetch_n(src, 1)
    assert first.deliveries == 1
    asked = time.monotonic()
    await src.retry_later([(first, 1.0)])
    delay_queue = f"{queue}.delay.1000"
    assert await asyncio.to_thread(rt.count, delay_queue) == 1  # the copy waits there
    (back,) = await fetch_n(src, 1)
    waited = time.monotonic() - asked
    assert 0.8 <= waited <= 1.2, waited
    assert (back.task_id, back.key, back.body, back.deliveries) == ("again", "k1", b'{"n": 1}', 2)
    await src.ack([back])
    assert await src.pending() == 0
    rt.delete(delay_queue)


async def test_a_retry_in_an_ordering_lane_keeps_its_place(queue: str, opened: Open) -> None:
    src = await opened(pipeline(queue))  # ordering: key (the default), keyed messages
    await publish(queue, [rt.Out(b"{}", f"k{i}", key="one") for i in range(3)])
    first, *rest = await fetch_n(src, 3)
    asked = time.monotonic()
    await src.retry_later([(first, 1.0)])
    with pytest.raises(Exception, match="NOT_FOUND"):  # no copy made: no delay queue
        await asyncio.to_thread(rt.count, f"{queue}.delay.1000")
    (back,) = await fetch_n(src, 1)
    assert 0.8 <= time.monotonic() - asked <= 1.2
    assert (back.task_id, back.deliveries) == ("k0", 2)
    await src.ack([back, *rest])
    assert await src.pending() == 0


async def test_task_ids_from_the_header_else_the_message_id_stable_on_redelivery(
        queue: str, opened: Open) -> None:
    src = await opened(pipeline(queue))
    await publish(queue, [rt.Out(b"a", "by-header", message_id="ignored"),
                          rt.Out(b"b", None, message_id="by-message-id")])
    got = await fetch_n(src, 2)
    assert [d.task_id for d in got] == ["by-header", "by-message-id"]
    await src.retry_later([(d, 0.0) for d in got])  # requeued at once (basic.nack)
    again = await fetch_n(src, 2)
    assert sorted(d.task_id for d in again) == ["by-header", "by-message-id"]
    assert [d.deliveries for d in again] == [2, 2]  # the quorum queue's x-delivery-count
    await src.ack(again)


async def test_a_message_without_any_id_gets_one_stable_across_redeliveries(
        queue: str, opened: Open) -> None:
    import aiormq
    from aiormq.abc import ChannelFrame
    from pamqp.body import ContentBody
    from pamqp.commands import Basic
    from pamqp.header import ContentHeader

    async def raw_publish() -> None:  # its frames as they are: basic_publish adds a message_id
        connection = await aiormq.connect(rt.URL)
        try:
            channel = await connection.channel()
            properties = Basic.Properties(delivery_mode=2)
            frames = [Basic.Publish(exchange="", routing_key=queue),
                      ContentHeader(0, len(b"anonymous"), properties), ContentBody(b"anonymous")]
            await channel.write_queue.put(ChannelFrame.marshall(  # type: ignore[attr-defined]
                frames=frames, channel_number=channel.number))  # type: ignore[arg-type]
            deadline = time.monotonic() + 10
            while await asyncio.to_thread(rt.count, queue) < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            await connection.close()

    await opened(pipeline(queue))  # declares the queue
    await raw_publish()
    first_src = await opened(pipeline(queue))
    (first,) = await fetch_n(first_src, 1)
    await first_src.close()  # unacknowledged: the broker hands it out again
    second_src = await opened(pipeline(queue))
    (second,) = await fetch_n(second_src, 1)
    assert first.task_id == second.task_id and first.task_id.startswith("amqp-")
    await second_src.ack([second])


async def test_shards_are_single_active_consumer_queues_routed_by_key(
        queue: str, opened: Open) -> None:
    sink = rabbit_sink.build_sink(rabbit_sink.SPEC.typed(
        {"queue": queue, "url": rt.URL, "shards": 4}), BuildContext(pipeline="p"))
    try:
        await sink.send([SinkRecord(f"s{i}", b"{}", "application/json", key=f"user-{i % 3}")
                         for i in range(12)])
    finally:
        await sink.close()
    shards: dict[int, list[int]] = {}  # shard → the users whose messages it holds
    for i in range(3):
        shards.setdefault(zlib.crc32(f"user-{i}".encode()) % 4, []).append(i)
    for shard, users in shards.items():
        got = await asyncio.to_thread(rt.read_all, f"{queue}.k{shard}", 4 * len(users), 5.0)
        assert sorted(m.headers["sluice-task-id"] for m in got) == sorted(
            f"s{j}" for j in range(12) if j % 3 in users)
    text = pipeline(queue, ", shards: 4")
    active = await opened(text)
    standby = await opened(text)
    await publish(f"{queue}.k0", [rt.Out(b"{}", f"o{i}", key="x") for i in range(5)])
    taken = await fetch_n(active, 5)
    assert [d.task_id for d in taken] == [f"o{i}" for i in range(5)]
    assert {d.partition for d in taken} == {0}
    assert await standby.fetch(10, 0.5) == []  # one consumer at a time per shard
    await active.close()  # its deliveries go back, to the next consumer, in order
    assert [d.task_id for d in await fetch_n(standby, 5)] == [f"o{i}" for i in range(5)]


# -- the sink ---------------------------------------------------------------------------------

async def test_sink_publishes_confirmed_records_with_their_headers(queue: str) -> None:
    source = parse_pipeline(pipeline(queue)).source
    sink = rabbit_sink.build_sink(rabbit_sink.SPEC.typed({"queue": f"{queue}.dlq"}),
                                  BuildContext(pipeline="r-jobs", source=source))
    try:
        await sink.send([SinkRecord("t1", b'{"x": 1}', "application/json", "k",
                                    {"sluice-reason": "why"})])
    finally:
        await sink.close()
    (m,) = await asyncio.to_thread(rt.read_all, f"{queue}.dlq", 1)
    assert (m.body, m.message_id) == (b'{"x": 1}', "t1")
    assert m.headers == {"sluice-task-id": "t1", "sluice-key": "k", "sluice-reason": "why"}


async def test_sink_to_a_missing_queue_under_check_fails_its_send(queue: str) -> None:
    sink = rabbit_sink.build_sink(rabbit_sink.SPEC.typed(
        {"queue": f"{queue}.nowhere", "url": rt.URL, "topology": "check"}),
        BuildContext(pipeline="p"))
    try:
        with pytest.raises(DeliveryError, match="unroutable"):
            await sink.send([SinkRecord("t1", b"{}", "application/json")])
    finally:
        await sink.close()


def test_sink_without_a_rabbitmq_source_needs_a_url() -> None:
    with pytest.raises(Misconfigured, match="needs a url"):
        rabbit_sink.build_sink(rabbit_sink.SPEC.typed({"queue": "q"}),
                               BuildContext(pipeline="p"))


# -- the CLI, the gateway, the examples -------------------------------------------------------

def sluice(*args: str, log: str = "", env: dict[str, str] | None = None,
           timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(SLUICE_TEST_LOG=log, **(env or {})),
                          timeout=timeout_s)


def test_cli_submit_publishes_and_the_worker_runs_that_task(tmp_path: Path, queue: str) -> None:
    file = tmp_path / "r.yaml"
    file.write_text(pipeline(queue))
    data, log = str(tmp_path / "data"), str(tmp_path / "calls.log")
    done = sluice("submit", "r-jobs", "-f", str(file), "--data-dir", data, "--task-id", "cli-1",
                  "--key", "user-1", "--data", '{"n": 1}')
    assert (done.returncode, done.stdout.strip()) == (0, "cli-1"), done.stderr
    (m,) = rt.read_all(queue, 1)
    assert (m.headers["sluice-task-id"], m.headers["sluice-key"]) == ("cli-1", "user-1")
    rt.publish(queue, [rt.Out(b'{"n": 1}', "cli-1", key="user-1")])  # put it back
    again = sluice("submit", "r-jobs", "-f", str(file), "--data-dir", data, "--task-id",
                   "cli-1", "--data", "{}")
    assert again.returncode == 2 and "already used" in again.stderr
    delayed = sluice("submit", "r-jobs", "-f", str(file), "--data-dir", data, "--task-id",
                     "cli-2", "--delay-s", "2", "--data", "{}")
    assert delayed.returncode == 0, delayed.stderr
    assert rt.count(queue) == 1 and rt.count(f"{queue}.delay.2000") == 1
    deadline = time.monotonic() + 30  # back in the queue after its delay (a worker's --drain
    while rt.count(queue) < 2:        # counts only the delay queues it used itself)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ran = sluice("run", str(file), "--data-dir", data, "--drain", log=log)
    assert ran.returncode == 0, ran.stderr
    for task_id in ("cli-1", "cli-2"):
        final = json.loads(sluice("tasks", "get", task_id, "--data-dir", data, "--json").stdout)
        assert (final["state"], final["attempts"]) == ("SUCCEEDED", 1)
    assert sorted(e[1] for e in read_log(log) if e[0] == "done") == ["cli-1", "cli-2"]
    rt.delete(f"{queue}.delay.2000")


def test_http_trigger_on_a_rabbitmq_pipeline(tmp_path: Path, queue: str) -> None:
    from tests.integration.test_kafka_submit import http

    file = tmp_path / "r.yaml"
    file.write_text(pipeline(queue))
    with running_server(tmp_path, files=(file,), auth=False) as srv:
        post = f"{srv.url}/v1/pipelines/r-jobs/tasks"
        json_type = {"Content-Type": "application/json"}
        status, body = http("POST", post, b'{"n": 2}', {**json_type, "Task-Id": "http-1"})
        assert status == 202, body
        status, body = http("POST", post, b'{"n": 2}', {**json_type, "Task-Id": "http-1"})
        assert status == 409
        status, body = http("POST", post, b"{}", {**json_type, "Task-Id": "http-2",
                                                  "Delay-S": "1"})
        assert status == 202, body
        deadline = time.monotonic() + 60
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = {t: http("GET", f"{srv.url}/v1/tasks/{t}")[1].get("state")
                      for t in ("http-1", "http-2")}
            if set(states.values()) == {"SUCCEEDED"}:
                break
            time.sleep(0.2)
        assert states == {"http-1": "SUCCEEDED", "http-2": "SUCCEEDED"}
        assert sorted(e[1] for e in read_log(srv.log) if e[0] == "done") == ["http-1", "http-2"]
    rt.delete(f"{queue}.delay.1000")


def test_a_typo_in_the_source_is_an_error_at_its_line(tmp_path: Path) -> None:
    file = tmp_path / "r.yaml"
    file.write_text("name: r\nsource:\n  rabbitmq:\n    url: amqp://localhost/\n"
                    "    queue: q\n    shard: 4\nhandler: {python: m:f}\n")
    done = sluice("validate", str(file))
    assert done.returncode == 2
    assert f"{file}:6:5: source.rabbitmq.shard: unknown key 'shard' (did you mean 'shards'?)" \
        in done.stderr, done.stderr


ORDERS = [("alice", "order-1", '{"item": "book", "qty": 2}'),
          ("alice", "order-2", '{"item": "pen", "qty": 10}'),
          ("bob", "order-3", '{"item": "lamp"}'),
          ("bob", "order-4", '{"item": "unicorn"}')]


def submit_orders(example: str, name: str, data: str, env: dict[str, str]) -> None:
    for key, task_id, body in ORDERS:
        done = sluice("submit", name, "-f", example, "--data-dir", data, "--key", key,
                      "--task-id", task_id, "--data", body, env=env)
        assert done.returncode == 0, done.stderr


def test_the_example_pipeline_prices_orders(tmp_path: Path) -> None:
    require_broker()
    orders = rt.new_queue("orders")
    env = {"ORDERS_QUEUE": orders}
    data = str(tmp_path / "data")
    try:
        submit_orders("pipelines/rabbitmq_orders.yaml", "rabbit-pricing", data, env)
        ran = sluice("run", "pipelines/rabbitmq_orders.yaml", "--data-dir", data, "--drain",
                     env=env)
        assert ran.returncode == 0, ran.stderr
        priced = {json.loads(m.body)["data"]["task_id"]: json.loads(m.body)["data"]
                  for m in rt.read_all(f"{orders}.priced", 3)}
        assert set(priced) == {"order-1", "order-2", "order-3"}
        assert priced["order-1"]["result"]["total_cents"] == 2500
        (letter,) = rt.read_all(f"{orders}.dlq", 1)
        assert letter.headers["sluice-task-id"] == "order-4"
        assert letter.headers["sluice-reason"] == "rejected by the handler"
    finally:
        rt.delete(*(f"{orders}.k{i}" for i in range(4)), f"{orders}.priced", f"{orders}.dlq")


def test_rabbitmq_to_kafka_through_the_outbox(tmp_path: Path) -> None:
    require_broker()
    kt.require_broker()
    orders, topic = rt.new_queue("orders"), f"sluice-priced-{os.urandom(6).hex()}"
    env = {"ORDERS_QUEUE": orders, "PRICED_TOPIC": topic, "KAFKA_BROKERS": kt.BROKERS}
    data = str(tmp_path / "data")
    try:
        submit_orders("pipelines/rabbitmq_to_kafka.yaml", "rabbit-to-kafka", data, env)
        ran = sluice("run", "pipelines/rabbitmq_to_kafka.yaml", "--data-dir", data, "--drain",
                     env=env)
        assert ran.returncode == 0, ran.stderr
        records = kt.read_all(topic, 3)
        assert sorted(r.headers["sluice-task-id"] for r in records) == [
            "order-1", "order-2", "order-3"]
        by_id = {r.headers["sluice-task-id"]: json.loads(r.value)["data"] for r in records}
        assert by_id["order-3"]["result"] == {"customer": "bob", "item": "lamp", "qty": 1,
                                              "total_cents": 3400}
        assert [m.headers["sluice-task-id"] for m in rt.read_all(f"{orders}.dlq", 1)] == [
            "order-4"]
        task = json.loads(sluice("tasks", "get", "order-1", "--data-dir", data, "--json").stdout)
        assert task["state"] == "SUCCEEDED"
    finally:
        rt.delete(orders, f"{orders}.dlq")
        kt.delete_topics(topic)
