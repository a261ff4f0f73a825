"""What is particular to the MQTT connector, on the real broker (Mosquitto 2): the PUBACK held
until the consumer acknowledges, the session resumed by a restarted worker, a resent message
bound to the delivery already held after a reconnect, a retry's delay, Receive Maximum as the
bound of what a worker holds, shared subscriptions, the takeover of a stopped worker's session,
task ids, the sink's confirms, submitting (CLI and HTTP), a typo'd key, and the example
pipeline."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice.config.load import parse_pipeline
from sluice.connectors import mqtt_client as mc
from sluice.connectors.base import Delivery, SinkRecord
from sluice.connectors.mqtt import MqttSource
from sluice.errors import DeliveryError
from sluice.runtime import build_source
from sluice.sinks.mqtt import SPEC as SINK_SPEC
from sluice.sinks.mqtt import MqttSink
from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers import mqtt as hm
from tests.helpers.handlers import read_log
from tests.helpers.server import running_server

PIPELINE = """
name: m-jobs
source: {source}
handler: {{python: "tests.helpers.handlers:behave"}}
consumer: {{concurrency: 4}}
"""
WAIT_S = 20.0


@pytest.fixture
def topic() -> Iterator[str]:
    problem = hm.broker_problem()
    if problem is not None:
        pytest.fail(problem)
    yield hm.new_topic()


def source_config(topic: str, **extra: Any) -> dict[str, Any]:
    group = topic.replace("/", "-").replace("+", "").replace("#", "")
    return {"url": hm.URL, "topic": topic, "group": group, **extra}


def pipeline_text(topic: str, **extra: Any) -> str:
    return PIPELINE.format(source=json.dumps({"mqtt": source_config(topic, **extra)}))


@pytest.fixture
async def sources(topic: str, data_dir: Path) -> AsyncIterator[Callable[..., Awaitable[
        MqttSource]]]:
    """Start a source of the test topic (each call: one more worker on the data directory)."""
    opened: list[MqttSource] = []
    ids = hm.worker_ids(source_config(topic), "m-jobs")

    async def start(**extra: Any) -> MqttSource:
        text = pipeline_text(extra.pop("topic", topic), **extra)
        src = build_source(parse_pipeline(text), data_dir)
        assert isinstance(src, MqttSource)
        opened.append(src)
        await src.start()
        return src

    yield start
    for src in opened:
        await src.close()
    await hm.wipe_async(*ids)


async def fetch_n(src: MqttSource, n: int, timeout_s: float = WAIT_S) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n:
        assert time.monotonic() < deadline, f"fetched {len(got)} of {n}"
        got.extend(await src.fetch(n - len(got), 0.2))
    return got


async def publish(topic: str, n: int, prefix: str = "m") -> list[str]:
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    await hm.publish_async(topic, [hm.Out(json.dumps({"n": i}).encode(), task_id)
                                   for i, task_id in enumerate(ids)])
    return ids


async def test_unacknowledged_messages_come_back_to_the_restarted_worker_acknowledged_ones_not(
        topic: str, sources: Callable[..., Awaitable[MqttSource]]) -> None:
    first = await sources()
    sent = await publish(topic, 4)
    got = await fetch_n(first, 4)
    await first.ack(got[:2])
    await first.close()  # a stop (or a crash): the other two were never acknowledged
    second = await sources()
    assert second.client_id == first.client_id  # the same slot: the same session
    again = await fetch_n(second, 2)
    assert sorted(d.task_id for d in again) == sent[2:]
    assert all(d.deliveries == 2 for d in again)  # resent by the broker (DUP)
    await second.ack(again)
    assert await second.fetch(10, 0.5) == []
    assert await second.pending() == 0


def services(action: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "services"), action, "mqtt"], check=True,
                   capture_output=True, timeout=120)


async def test_after_a_reconnect_a_resent_message_is_not_handed_out_twice(
        topic: str, sources: Callable[..., Awaitable[MqttSource]]) -> None:
    src = await sources()
    await publish(topic, 3)
    held = await fetch_n(src, 3)
    conn = src.conn
    assert conn is not None
    epoch = conn.epoch
    # The broker goes away under the source (its sessions are persisted) and comes back.
    services("stop")
    try:
        deadline = time.monotonic() + WAIT_S
        while conn.connected.is_set():
            assert time.monotonic() < deadline, "the lost connection was not noticed"
            await asyncio.sleep(0.01)
        await src.ack(held[:1])  # while it is down: acknowledged when the broker resends it
    finally:
        services("start")
    deadline = time.monotonic() + WAIT_S
    while conn.epoch == epoch or not conn.connected.is_set():
        assert time.monotonic() < deadline, "no reconnect"
        await asyncio.sleep(0.05)
    # The broker resends all three (DUP); none is handed out again: the two still held are
    # bound to the new connection, the acknowledged one is acknowledged at once.
    assert await src.fetch(10, 1.0) == []
    await src.ack(held[1:])
    await src.close()
    again = await sources()
    assert await again.fetch(10, 1.0) == [] and await again.pending() == 0


async def test_retry_later_hands_out_again_after_its_delay_within_20_percent(
        topic: str, sources: Callable[..., Awaitable[MqttSource]]) -> None:
    src = await sources()
    await publish(topic, 1)
    (first,) = await fetch_n(src, 1)
    asked = time.monotonic()
    await src.retry_later([(first, 1.0)])
    (back,) = await fetch_n(src, 1)
    waited = time.monotonic() - asked
    assert 0.8 <= waited <= 1.2, waited
    assert back.task_id == first.task_id and back.deliveries == 2
    await src.ack([back])


async def test_receive_maximum_bounds_what_the_broker_sends(
        topic: str, sources: Callable[..., Awaitable[MqttSource]]) -> None:
    src = await sources(receive_maximum=5)
    await publish(topic, 12)
    await asyncio.sleep(0.5)
    assert await src.pending() == 5  # the rest wait at the broker
    # (Mosquitto 2.0.11 sends the rest of the session's queue at the first acknowledgements,
    # beyond the Receive Maximum: only the first bound is the broker's to keep.)
    got: list[Delivery] = []
    while len(got) < 12:
        batch = await fetch_n(src, 1)
        await src.ack(batch)
        got.extend(batch)
    assert len({d.task_id for d in got}) == 12 and await src.pending() == 0


async def test_two_workers_share_the_topic_and_a_stopped_ones_session_is_taken_over(
        topic: str, sources: Callable[..., Awaitable[MqttSource]], data_dir: Path) -> None:
    one = await sources()
    two = await sources()
    assert one.client_id != two.client_id
    sent = await publish(topic, 20, "a")
    # Round-robin between the two sessions (every message to one of them).
    await asyncio.sleep(0.5)
    assert await one.pending() == 10 and await two.pending() == 10
    taken = await fetch_n(two, 10)
    await two.ack(taken[:4])
    await two.close()  # six held unacknowledged; its session stays, and gets half of the rest
    more = await publish(topic, 10, "b")
    got: list[Delivery] = []
    deadline = time.monotonic() + WAIT_S
    while len(got) < 26:  # 10 of its own, 5 of the later, the 6 and 5 of the stopped one
        assert time.monotonic() < deadline, f"{len(got)} of 26"
        batch = await one.fetch(100, 0.2)
        await one.ack(batch)
        got.extend(batch)
    assert {d.task_id for d in got} == set(sent + more) - {d.task_id for d in taken[:4]}
    deadline = time.monotonic() + WAIT_S
    while mc.other_slots(mc.slot_dir(data_dir), one.base) != [0]:  # the slot is freed
        assert time.monotonic() < deadline, mc.other_slots(mc.slot_dir(data_dir), one.base)
        await asyncio.sleep(0.1)
    assert await one.pending() == 0


async def test_task_ids_content_types_and_keys(
        topic: str, sources: Callable[..., Awaitable[MqttSource]]) -> None:
    src = await sources(payload_format="raw")
    await hm.publish_async(topic, [
        hm.Out(b"\x00same", content_type="image/png", key="k1"),
        hm.Out(b"\x00same"),  # the same topic and payload: the same task id
        hm.Out(b"{}", task_id="given", headers={"x-trace": "t1"}),
    ])
    a, b, c = await fetch_n(src, 3)
    assert a.task_id == b.task_id and a.task_id.startswith("mqtt-")
    assert (a.content_type, a.key) == ("image/png", "k1")
    assert b.content_type == "application/octet-stream"  # payload_format: raw
    assert (c.task_id, c.headers["x-trace"]) == ("given", "t1")
    await src.ack([a, b, c])


async def test_key_from_a_topic_level(
        topic: str, sources: Callable[..., Awaitable[MqttSource]]) -> None:
    src = await sources(topic=f"{topic}/+", key_topic_level=2)
    await hm.publish_async(f"{topic}/alice", [hm.Out(b"{}", "t1")])
    (d,) = await fetch_n(src, 1)
    assert d.key == "alice"
    await src.ack([d])


async def test_the_sink_waits_for_pubacks_and_refuses_a_topic_nobody_reads(topic: str) -> None:
    reader = f"sluice-test-reader-{os.getpid()}"
    await hm.subscribe_async(reader, f"{topic}/out/#")
    sink = MqttSink(SINK_SPEC.typed({"topic": f"{topic}/out/{{key}}"}), hm.URL)
    try:
        await sink.send([SinkRecord("r1", b'{"a": 1}', "application/json", "k1",
                                    {"x-h": "v"}),
                         SinkRecord("r2", b"\xff", "application/octet-stream", "k2")])
        got = await hm.read_async(reader, 2)
        assert sorted((m.topic, m.properties["sluice-task-id"], m.content_type) for m in got) \
            == [(f"{topic}/out/k1", "r1", "application/json"),
                (f"{topic}/out/k2", "r2", "application/octet-stream")]
        assert got[0].properties["x-h"] == "v" or got[1].properties.get("x-h") == "v"
        nobody = MqttSink(SINK_SPEC.typed({"topic": f"{topic}/nobody"}), hm.URL)
        try:
            with pytest.raises(DeliveryError, match="no session subscribes") as caught:
                await nobody.send([SinkRecord("r3", b"{}", "application/json")])
            assert not caught.value.permanent  # retried once someone subscribes
        finally:
            await nobody.close()
        with pytest.raises(DeliveryError) as keyless:
            await sink.send([SinkRecord("r4", b"{}", "application/json")])
        assert keyless.value.permanent
    finally:
        await sink.close()
        await hm.wipe_async(reader)


def sluice(*args: str, log: str = "", timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(SLUICE_TEST_LOG=log), timeout=timeout_s)


def test_cli_submit_publishes_and_the_worker_runs_that_task_a_delay_included(
        tmp_path: Path, topic: str) -> None:
    file, data, log = tmp_path / "m.yaml", str(tmp_path / "data"), str(tmp_path / "calls.log")
    file.write_text(pipeline_text(topic))
    ids = hm.worker_ids(source_config(topic), "m-jobs")
    try:
        refused = sluice("submit", "m-jobs", "-f", str(file), "--data-dir", data, "--task-id",
                         "nobody-1", "--data", "{}")
        assert refused.returncode == 1 and "no session subscribes" in refused.stderr
        hm.subscribe(ids[0], f"$share/{topic.replace('/', '-')}/{topic}")
        done = sluice("submit", "m-jobs", "-f", str(file), "--data-dir", data, "--task-id",
                      "cli-1", "--key", "user-1", "--data", '{"n": 1}')
        assert (done.returncode, done.stdout.strip()) == (0, "cli-1"), done.stderr
        delayed = sluice("submit", "m-jobs", "-f", str(file), "--data-dir", data,
                         "--task-id", "cli-2", "--delay-s", "2", "--data", "{}")
        assert delayed.returncode == 0, delayed.stderr
        submitted_at = time.time()
        again = sluice("submit", "m-jobs", "-f", str(file), "--data-dir", data, "--task-id",
                       "cli-1", "--data", '{"n": 1}')
        assert again.returncode == 2 and "already used" in again.stderr
        ran = sluice("run", str(file), "--data-dir", data, "--drain", log=log)
        assert ran.returncode == 0, ran.stderr
        calls = read_log(log)
        assert [e[:2] for e in calls if e[1] == "cli-1"] == [("start", "cli-1"),
                                                             ("done", "cli-1")]
        (start,) = [e for e in calls if e[1] == "cli-2" and e[0] == "start"]
        final = json.loads(sluice("tasks", "get", "cli-2", "--data-dir", data,
                                  "--json").stdout)
        assert final["state"] == "SUCCEEDED"
        started = next(s["at"] for s in final["timeline"] if s["stage"] == "started")
        assert started >= submitted_at + 1.5, (started - submitted_at, start)
        gone = json.loads(sluice("tasks", "get", "nobody-1", "--data-dir", data,
                                 "--json").stdout or "null")
        assert gone is None or gone.get("state") is None
    finally:
        hm.wipe(*ids)


def http(method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_http_trigger_on_an_mqtt_pipeline(tmp_path: Path, topic: str) -> None:
    file = tmp_path / "m.yaml"
    file.write_text(pipeline_text(topic))
    ids = hm.worker_ids(source_config(topic), "m-jobs")
    try:
        with running_server(tmp_path, files=(file,), auth=False) as srv:
            post = f"{srv.url}/v1/pipelines/m-jobs/tasks"
            json_type = {"Content-Type": "application/json"}
            deadline = time.monotonic() + 60
            while True:  # the worker's session subscribes as the server starts its worker
                status, body = http("POST", post, b'{"n": 2}', {**json_type,
                                                                "Task-Id": "http-1"})
                if status != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert status == 202, body
            status, body = http("POST", post, b'{"n": 2}', {**json_type, "Task-Id": "http-1"})
            assert status == 409
            while True:
                status, task = http("GET", f"{srv.url}/v1/tasks/http-1")
                if task.get("state") == "SUCCEEDED" or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert (task["state"], task["attempts"]) == ("SUCCEEDED", 1)
            assert [e[:2] for e in read_log(srv.log)] == [("start", "http-1"),
                                                          ("done", "http-1")]
    finally:
        hm.wipe(*ids)


def test_a_typo_in_the_source_is_reported_at_its_line(tmp_path: Path) -> None:
    file = tmp_path / "typo.yaml"
    file.write_text("name: t\nsource:\n  mqtt:\n    topic: a/b\n    recieve_maximum: 5\n"
                    "handler: {python: \"tests.helpers.handlers:behave\"}\n")
    done = sluice("validate", str(file))
    assert done.returncode == 2
    assert f"{file}:5:5" in done.stderr and "recieve_maximum" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_example_pipeline_prices_orders(tmp_path: Path, topic: str) -> None:
    data = str(tmp_path / "data")
    env_file = ROOT / "pipelines" / "mqtt_orders.yaml"
    reader = f"sluice-test-shop-{os.getpid()}"
    worker = f"sluice-pricing-{socket.gethostname()}-0"
    hm.wipe(worker, reader)
    hm.subscribe(worker, "$share/pricing/shop/orders/+")
    hm.subscribe(reader, "shop/priced")
    hm.subscribe(reader, "shop/rejected")
    try:
        hm.publish("shop/orders/alice", [hm.Out(b'{"item": "book", "qty": 2}', "ex-1"),
                                         hm.Out(b'{"item": "unicorn"}', "ex-2")])
        ran = sluice("run", str(env_file), "--data-dir", data, "--drain")
        assert ran.returncode == 0, ran.stderr
        got = {m.topic: m for m in hm.read(reader, 2)}
        assert set(got) == {"shop/priced", "shop/rejected"}
        event = json.loads(got["shop/priced"].body)
        assert event["data"]["result"] == {"customer": "alice", "item": "book", "qty": 2,
                                           "total_cents": 2500}
        assert got["shop/rejected"].properties["sluice-task-id"] == "ex-2"
    finally:
        hm.wipe(worker, reader)
