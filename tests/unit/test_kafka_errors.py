"""Kafka's errors at the client boundary: a bad setting is permanent (``Misconfigured``), an
unreachable broker transient (``Unavailable``), for the source, its result producer and the sink;
the transactional producer aborts what it can abort and stops on what it cannot.

The components are built from pipeline YAML as the runtime builds them; none of these tests needs
a running broker (the unreachable one is a local port nobody listens on)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from sluice.config.load import parse_pipeline
from sluice.connectors import kafka_client
from sluice.connectors.base import SinkRecord
from sluice.connectors.kafka import SPEC
from sluice.connectors.kafka_output import OutputProducer
from sluice.consumer.loop import ConsumerLoop
from sluice.errors import DeliveryError, Misconfigured, Unavailable
from sluice.runtime import build

ck = pytest.importorskip("confluent_kafka")

BOUNDED_S = 1.0  # how long a metadata request to the unreachable broker may take


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def pipeline(tmp_path: Path, brokers: str, config: dict[str, Any] | None = None,
             exactly_once: bool = False) -> ConsumerLoop:
    """A pipeline whose source, results and dead letter are Kafka with this client ``config``
    (the results are written by the source's own producer)."""
    extra = f", config: {config!r}" if config else ""
    text = f"""
name: errors
source:
  kafka: {{brokers: "{brokers}", topic: jobs{extra}}}
handler:
  http: {{url: "http://127.0.0.1:1/"}}
consumer: {{exactly_once: {str(exactly_once).lower()}}}
on_success:
  - kafka: {{topic: jobs.done}}
dead_letter:
  kafka: {{brokers: "{brokers}", topic: jobs.dlq{extra}}}
"""
    return build(parse_pipeline(text), tmp_path / "data")


async def started_source(loop: ConsumerLoop) -> None:
    try:
        await loop.source.start()
    finally:
        await loop.source.close()


async def started_sink(loop: ConsumerLoop) -> None:
    sink = cast(Any, loop.dead_letter)
    try:
        await sink.start()
    finally:
        await sink.close()


async def test_an_unknown_client_property_is_misconfigured(tmp_path: Path) -> None:
    loop = pipeline(tmp_path, "127.0.0.1:9092", {"no.such.property": "1"})
    with pytest.raises(Misconfigured, match=r"kafka source for 'jobs'.*no\.such\.property"):
        await started_source(loop)
    with pytest.raises(Misconfigured, match=r"kafka sink to 'jobs.dlq'.*no\.such\.property"):
        await started_sink(loop)


@pytest.mark.parametrize(("config", "named"), [
    ({"security.protocol": "sasl_plaintext", "sasl.mechanisms": "NO-SUCH"}, "NO-SUCH"),
    ({"security.protocol": "sasl_plaintext", "sasl.mechanisms": "PLAIN"}, "sasl.username"),
    ({"security.protocol": "no-such"}, "security.protocol"),
], ids=["mechanism", "no_credentials", "protocol"])
async def test_bad_sasl_settings_are_misconfigured(tmp_path: Path, config: dict[str, Any],
                                                   named: str) -> None:
    loop = pipeline(tmp_path, "127.0.0.1:9092", config)
    with pytest.raises(Misconfigured, match=named):
        await started_source(loop)
    with pytest.raises(Misconfigured, match=named):
        await started_sink(loop)


async def test_an_unreachable_broker_is_unavailable(tmp_path: Path, closed_port: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_client, "METADATA_TIMEOUT_S", BOUNDED_S)
    brokers = f"127.0.0.1:{closed_port}"
    loop = pipeline(tmp_path, brokers)
    with pytest.raises(Unavailable, match=f"cannot reach kafka brokers {brokers}") as caught:
        await started_source(loop)
    assert caught.value.retriable
    with pytest.raises(Unavailable, match=f"cannot reach kafka brokers {brokers}"):
        await started_sink(loop)
    # A send to it fails for now, not for good: the record is tried again later.
    sink = pipeline(tmp_path / "again", brokers).dead_letter
    try:
        with pytest.raises(DeliveryError, match=brokers) as failed:
            await sink.send([SinkRecord("t1", b"{}", "application/json")])
        assert not failed.value.permanent
    finally:
        await sink.close()


async def test_settings_the_result_producer_refuses_are_misconfigured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source's ``config`` also goes to its result producer, which may refuse what its
    consumer takes (a producer property the consumer ignores)."""
    monkeypatch.setattr(kafka_client, "ensure_topic", lambda *_args, **_kwargs: 1)
    loop = pipeline(tmp_path, "127.0.0.1:9092", {"enable.idempotence": False},
                    exactly_once=True)
    with pytest.raises(Misconfigured, match=r"'jobs': cannot create its producer: .*"
                                            r"enable\.idempotence"):
        await started_source(loop)


# -- the transactional producer (exactly once) ------------------------------------------------

class Producer:
    """A transactional producer whose calls fail as told (``fail``: method name → error)."""

    def __init__(self, **fail: Any) -> None:
        self.fail = fail
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        def call(*_args: Any, **_kwargs: Any) -> None:
            self.calls.append(name)
            if name in self.fail:
                raise ck.KafkaException(self.fail[name])
        return call


def transaction(producer: Producer) -> bool:
    config = SPEC.typed({"brokers": "b:1", "topic": "jobs"})
    out = OutputProducer(config.topic, config.brokers, config, "g", exactly_once=True)
    out._producer = producer
    consumer = type("Consumer", (), {"consumer_group_metadata": lambda self: None})()
    return out.commit([], [], consumer, lambda: None)


def error(code: int, **flags: bool) -> Any:
    return ck.KafkaError(code, "from the broker", **flags)


def test_an_abortable_transaction_is_aborted_and_made_again() -> None:
    producer = Producer(send_offsets_to_transaction=error(
        ck.KafkaError.CONCURRENT_TRANSACTIONS, txn_requires_abort=True))
    assert transaction(producer) is False  # nothing committed: the next commit makes it again
    assert producer.calls[-1] == "abort_transaction"


@pytest.mark.parametrize("code", [ck.KafkaError._FENCED,
                                  ck.KafkaError.PRODUCER_FENCED])
def test_a_fenced_producer_stops_for_good(code: int) -> None:
    producer = Producer(commit_transaction=error(code, fatal=True))
    with pytest.raises(Misconfigured, match="'jobs': the transactional producer failed for good"):
        transaction(producer)
    assert "abort_transaction" not in producer.calls


def test_a_failed_abort_says_whether_to_retry() -> None:
    producer = Producer(
        commit_transaction=error(ck.KafkaError._TIMED_OUT, retriable=True),
        abort_transaction=error(ck.KafkaError._TRANSPORT))
    with pytest.raises(Unavailable, match="'jobs': cannot abort a transaction"):
        transaction(producer)
    assert producer.calls.count("commit_transaction") == 3  # retriable: tried again first
