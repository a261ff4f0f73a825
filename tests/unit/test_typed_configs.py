"""Typed component configs: each built-in spec's validated mapping becomes the frozen dataclass
declared beside it (its ``settings`` converter), and back without loss; unknown keys end at the
loader."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from sluice import registry
from sluice.config.destinations import LABEL, LabelField, SinkSettings
from sluice.connectors import kafka_client
from sluice.registry import ComponentSpec, Registry
from sluice.sinks.delivery import delivery_settings
from sluice.sinks.http import DELIVERY_DEFAULTS, HttpSinkConfig
from sluice.spec import ObjectSpec, Settings

# A minimal valid config of each built-in component (the loader applies the defaults).
EXAMPLES: dict[tuple[str, str], Any] = {
    ("source", "embedded"): {"queue": "jobs"},
    ("sink", "embedded"): {"queue": "jobs.dlq"},
    ("sink", "http"): {"url": "https://example.com/hook", "headers": {"x-a": "1"}},
    ("sink", "webhook"): {"url": "https://example.com/hook", "secret_env": "HOOK_SECRET",
                          "label": "hook"},
    ("handler", "http"): {"url": "http://fn.example:8080/", "timeout_s": 5},
    ("handler", "python"): "pipelines.quickstart:handle",
    ("source", "kafka"): {"brokers": "b:1", "topic": "jobs"},
    ("sink", "kafka"): {"topic": "jobs.done", "create_topic": {"partitions": 3}},
    ("source", "rabbitmq"): {"url": "amqp://guest:guest@mq:5672/", "queue": "jobs"},
    ("sink", "rabbitmq"): {"queue": "jobs.done"},
    ("source", "nats"): {"url": "nats://nats:4222", "stream": "JOBS"},
    ("sink", "nats"): {"stream": "JOBS_DONE"},
    ("source", "redis"): {"url": "redis://redis:6379/0", "stream": "jobs"},
    ("sink", "redis"): {"stream": "jobs.done"},
    ("source", "mqtt"): {"topic": "jobs"},
    ("sink", "mqtt"): {"topic": "jobs/done"},
}
# Built-ins whose factories still take the mapping (the registry passes it as it is).
UNTYPED: set[tuple[str, str]] = set()


def builtins() -> list[ComponentSpec[Any, Any]]:
    return Registry(entry_point_group=None).components()


def back(typed: Any) -> Any:
    return typed.to_mapping() if isinstance(typed, Settings) else typed.to_config()


def test_every_builtin_declares_a_typed_config() -> None:
    specs = {(s.family, s.name): s for s in builtins()}
    typed = {key for key, s in specs.items() if s.settings is not registry.as_given}
    assert typed | UNTYPED == set(specs)
    assert typed == set(EXAMPLES)


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_defaults_applied_example_converts_and_back(key: tuple[str, str]) -> None:
    spec = registry.get(*key)
    validated = spec.apply_defaults(EXAMPLES[key])
    typed = spec.typed(validated)
    assert dataclasses.is_dataclass(typed)
    assert back(typed) == validated
    assert spec.typed(typed) is typed  # a typed config is taken as it is
    first = dataclasses.fields(typed)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(typed, first, None)
    assert not hasattr(typed, "__dict__")  # slots: no key but the declared ones


@pytest.mark.parametrize("key", sorted(k for k in EXAMPLES if k[1] != "python"))
def test_fields_are_the_spec_keys(key: tuple[str, str]) -> None:
    spec = registry.get(*key)
    assert isinstance(spec.config, ObjectSpec)
    typed = spec.typed(spec.apply_defaults(EXAMPLES[key]))
    assert type(typed).__slots__  # slots: nothing but the declared fields
    assert set(type(typed).keys()) == {f.name for f in spec.config.fields_}


@pytest.mark.parametrize("key", sorted(k for k in EXAMPLES if k[0] == "sink"))
def test_a_sink_reads_its_label_and_target_typed(key: tuple[str, str]) -> None:
    spec = registry.get(*key)
    assert isinstance(spec.config, ObjectSpec)
    validated = spec.apply_defaults(EXAMPLES[key])
    typed = spec.typed(validated)
    assert isinstance(typed, SinkSettings)
    (label_field,) = [f for f in spec.config.fields_ if isinstance(f, LabelField)]
    assert label_field.target is not None
    assert typed.target == validated[label_field.target]
    assert typed.label == validated[LABEL]


@pytest.mark.parametrize("key", sorted(k for k in EXAMPLES if k[1] != "python"))
def test_unknown_and_missing_keys_are_refused(key: tuple[str, str]) -> None:
    spec = registry.get(*key)
    validated = spec.apply_defaults(EXAMPLES[key])
    with pytest.raises(ValueError, match=r"unknown key.*nope"):
        spec.typed({**validated, "nope": 1})
    required = sorted(EXAMPLES[key])[0]
    with pytest.raises((ValueError, TypeError)):
        spec.settings({k: v for k, v in validated.items() if k != required})


def test_python_handler_takes_only_its_shorthand() -> None:
    spec = registry.get("handler", "python")
    with pytest.raises(TypeError):
        spec.typed({"target": "a:b"})


def test_a_third_party_spec_without_a_converter_gets_the_mapping() -> None:
    made: list[Any] = []
    spec: ComponentSpec[Any, Any] = ComponentSpec(
        family="sink", name="toy", summary="", config=ObjectSpec(),
        factory=lambda config, ctx: made.append(config))
    spec.build({}, registry.BuildContext("p"))
    assert made == [{}]


def test_kafka_create_topic_is_typed_and_absent_means_none() -> None:
    source = registry.source("kafka")
    absent = source.apply_defaults(EXAMPLES[("source", "kafka")])
    assert absent[kafka_client.CREATE_TOPIC] == {"replication_factor": 1}
    typed = source.typed(absent)
    assert typed.create_topic == kafka_client.CreateTopicConfig(None, 1)
    assert kafka_client.wanted_partitions(typed.create_topic) is None
    assert back(typed) == absent  # partitions stays absent, not None
    sink = registry.sink("kafka").typed(EXAMPLES[("sink", "kafka")])
    assert sink.create_topic == kafka_client.CreateTopicConfig(3, 1)
    assert kafka_client.wanted_partitions(sink.create_topic) == 3


def test_the_webhook_config_extends_the_http_one() -> None:
    http = registry.sink("http")
    webhook = registry.sink("webhook")
    typed = webhook.typed(EXAMPLES[("sink", "webhook")])
    assert isinstance(typed, HttpSinkConfig)
    assert set(type(typed).keys()) == set(http.settings(http.apply_defaults(
        EXAMPLES[("sink", "http")])).keys()) | {"secret_env"}


@pytest.mark.parametrize("key", sorted(k for k in EXAMPLES if k[0] == "sink"))
def test_a_deliverer_reads_the_typed_delivery_keys(key: tuple[str, str]) -> None:
    spec = registry.get(*key)
    typed = spec.typed(spec.apply_defaults(EXAMPLES[key]))
    settings = delivery_settings(typed)
    if key[1] == "embedded":  # no delivery keys: the defaults
        assert settings == DELIVERY_DEFAULTS
    else:
        assert settings is typed
    assert delivery_settings({"timeout_s": 2.5}) == dataclasses.replace(DELIVERY_DEFAULTS,
                                                                         timeout_s=2.5)
