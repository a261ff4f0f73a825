"""Kafka components without a broker: their keys, and the missing extra."""

from __future__ import annotations

import sys

import pytest

from sluice.config.load import parse_pipeline
from sluice.connectors import kafka_client
from sluice.connectors.kafka import SPEC
from sluice.errors import ConfigError, MissingDependency

PIPELINE = """
name: images
source:
  kafka: {{brokers: "{brokers}", topic: images{extra}}}
handler: {{python: "tests.helpers.handlers:echo"}}
dead_letter: {{kafka: {{topic: images.dlq}}}}
"""


def test_defaults_and_no_topic_creation_unless_asked() -> None:
    config = parse_pipeline(PIPELINE.format(brokers="localhost:9092", extra=""))
    source = SPEC.typed(config.source.config)
    assert (source.group, source.task_id_header, source.auto_offset_reset) == (
        None, "sluice-task-id", "earliest")
    assert source.group_of(config.name) == "sluice.images"
    assert kafka_client.wanted_partitions(source.create_topic) is None
    created = SPEC.typed({"brokers": "b:1", "topic": "t", "create_topic": {"partitions": 6}})
    assert created.create_topic == kafka_client.CreateTopicConfig(
        partitions=6, replication_factor=1)
    assert kafka_client.wanted_partitions(created.create_topic) == 6


def test_bad_keys_are_reported_with_their_place() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_pipeline(PIPELINE.format(brokers="a:1,,b:2",
                                       extra=", create_topic: {}, max_poll_records: 0"), "p.yaml")
    found = [str(i) for i in caught.value.issues]
    assert any(i.startswith("p.yaml:4:") and "source.kafka.brokers: expected a string "
               "matching" in i for i in found), found
    assert any("source.kafka.create_topic: missing required key 'partitions'" in i
               for i in found), found
    assert any("source.kafka.max_poll_records: expected an integer >= 1 <= 100000, got 0" in i
               for i in found), found


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # import fails
    with pytest.raises(MissingDependency, match=r"pip install 'sluice\[kafka\]'"):
        kafka_client.confluent()
    from sluice.connectors.kafka import build_source
    from sluice.registry import BuildContext

    with pytest.raises(MissingDependency):
        build_source(SPEC.typed({"brokers": "b:1", "topic": "t"}), BuildContext("images"))


def test_headers_as_text() -> None:
    assert kafka_client.headers_dict([("a", b"1"), ("b", None), ("a", b"2")]) == {
        "a": "2", "b": ""}
    assert kafka_client.headers_dict(None) == {}


def test_brokers_may_have_spaces() -> None:
    config = parse_pipeline(PIPELINE.format(brokers="a:1, b:2", extra=""))
    assert kafka_client.client_config(SPEC.typed(config.source.config).brokers, None)[
        "bootstrap.servers"] == "a:1,b:2"


def eos_issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_pipeline(text, "eos.yaml")
    return [str(i) for i in caught.value.issues]


def test_exactly_once_needs_a_kafka_source_and_destination_on_its_brokers() -> None:
    assert eos_issues("""\
name: e
source: {embedded: {queue: q}}
handler: {python: "tests.helpers.handlers:echo"}
consumer: {exactly_once: true}
on_success: [{kafka: {topic: out, brokers: "h:1"}}]
""") == ["eos.yaml:4:26: consumer.exactly_once: exactly_once needs a kafka source (its offsets "
         "are committed in the results' transaction); this source is embedded"]
    assert eos_issues("""\
name: e
source: {kafka: {brokers: "a:1, b:2", topic: t}}
handler: {python: "tests.helpers.handlers:echo"}
consumer: {exactly_once: true}
on_success: [{http: {url: "http://example.com/"}}]
""") == ["eos.yaml:4:26: consumer.exactly_once: exactly_once has nothing to write: add a kafka "
         "destination to on_success or on_failure (other destinations are at least once)"]
    found = eos_issues("""\
name: e
source: {kafka: {brokers: "a:1, b:2", topic: t}}
handler: {python: "tests.helpers.handlers:echo"}
consumer: {exactly_once: true}
on_success: [{kafka: {topic: ok, brokers: "b:2,a:1"}}]
on_failure:
  - kafka: {topic: bad, brokers: "c:3"}
""")
    assert found == ["eos.yaml:7:34: on_failure[0].kafka.brokers: with consumer.exactly_once, "
                     "a kafka destination must be on the source's brokers (one transaction "
                     "covers both): a:1, b:2"]
    config = parse_pipeline("""\
name: e
source: {kafka: {brokers: "a:1", topic: t}}
handler: {python: "tests.helpers.handlers:echo"}
consumer: {exactly_once: true}
on_success: [{kafka: {topic: ok}}]
""")
    assert config.consumer.exactly_once
    assert not parse_pipeline(PIPELINE.format(brokers="a:1", extra="")).consumer.exactly_once


def test_track_tasks_false_needs_a_kafka_source_and_no_trigger() -> None:
    assert eos_issues("""\
name: e
source: {embedded: {queue: q}}
handler: {python: "tests.helpers.handlers:echo"}
consumer: {track_tasks: false}
trigger: {http: {path: /e}}
""") == ["eos.yaml:4:25: consumer.track_tasks: track_tasks: false needs a kafka source (its "
         "committed offsets record what is finished); this source is embedded",
         "eos.yaml:5:17: trigger.http: a pipeline with track_tasks: false has no task to submit "
         "to: remove trigger, or track tasks"]
    config = parse_pipeline(PIPELINE.format(brokers="a:1", extra="").replace(
        "handler:", "consumer: {track_tasks: false}\nhandler:"))
    assert not config.consumer.track_tasks
