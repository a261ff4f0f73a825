"""What the Kafka source and sink share: the lazy import of confluent-kafka, client settings,
the topic check (a missing topic is a clear error, or created when asked), and the one place
confluent-kafka's errors become sluice's (:func:`map_kafka_errors`).

confluent-kafka is an optional dependency (``pip install 'sluice[kafka]'``): nothing here imports
it at module import, so the schema and ``sluice connectors`` cover Kafka on every install.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from sluice.connectors.outage import OutageLog
from sluice.errors import Misconfigured, MissingDependency, SourceError, Unavailable
from sluice.spec import REQUIRED, Field, ObjectSpec, Settings

log = logging.getLogger("sluice.kafka")

METADATA_TIMEOUT_S = 10.0

CREATE_TOPIC, EXTRA_CONFIG = "create_topic", "config"  # keys of both the source and the sink
BROKERS = "brokers"
PARTITIONS, REPLICATION_FACTOR = "partitions", "replication_factor"

CREATE_TOPIC_SPEC = ObjectSpec(
    Field(PARTITIONS, "integer", "Partitions of the topic to create.", default=REQUIRED,
          minimum=1),
    Field(REPLICATION_FACTOR, "integer", "Replicas of each partition.", default=1, minimum=1),
)

CT = TypeVar("CT", bound="CreateTopicConfig")


@dataclass(frozen=True, slots=True)
class CreateTopicConfig(Settings):
    """The typed ``create_topic`` of a Kafka source or sink (the keys of
    :data:`CREATE_TOPIC_SPEC`). The defaults turn an absent ``create_topic`` into
    ``{replication_factor: 1}``: ``partitions`` is then ``None``, and nothing is created."""

    partitions: int | None
    replication_factor: int

    @classmethod
    def from_mapping(cls: type[CT], value: Mapping[str, Any] | CT) -> CT:
        if isinstance(value, Mapping) and PARTITIONS not in value:
            value = {PARTITIONS: None, **value}
        # (the slots dataclass is a new class: super() needs it named)
        return super(CreateTopicConfig, cls).from_mapping(value)

    def to_mapping(self) -> dict[str, Any]:
        """The mapping it was made from: without ``partitions`` when none was given."""
        out = {REPLICATION_FACTOR: self.replication_factor}
        return out if self.partitions is None else {PARTITIONS: self.partitions, **out}


K = TypeVar("K", bound="WithCreateTopic")


class WithCreateTopic(Settings):
    """Base of a Kafka component's typed config (a frozen dataclass declaring ``create_topic``
    among its fields): its ``create_topic`` mapping becomes a :class:`CreateTopicConfig`."""

    __slots__ = ()
    create_topic: CreateTopicConfig

    @classmethod
    def from_mapping(cls: type[K], value: Mapping[str, Any] | K) -> K:
        if isinstance(value, Mapping) and isinstance(value.get(CREATE_TOPIC), Mapping):
            value = {**value,
                     CREATE_TOPIC: CreateTopicConfig.from_mapping(value[CREATE_TOPIC])}
        return super().from_mapping(value)

    def to_mapping(self) -> dict[str, Any]:
        return {**super().to_mapping(), CREATE_TOPIC: self.create_topic.to_mapping()}


BROKERS_PATTERN = r"^\s*[^,\s]+(\s*,\s*[^,\s]+)*\s*$"  # host:port, host:port ...
TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"


def create_topic_field(what: str) -> Field:
    return Field(CREATE_TOPIC, "object", f"Create the {what} topic with these settings when "
                 "it does not exist (without it, a missing topic is an error).",
                 fields=CREATE_TOPIC_SPEC)


def extra_config_field() -> Field:
    return Field(EXTRA_CONFIG, "object", "Extra librdkafka properties (e.g. security.protocol, "
                 "sasl.mechanisms); they override sluice's own settings.", default=None)


# The librdkafka properties a restricted pipeline may set in ``config`` (sluice.netpolicy): the
# rest may name local files, libraries or other hosts (plugin.library.paths, ssl.*.location,
# bootstrap.servers, sasl.oauthbearer.token.endpoint.url, ...).
TENANT_PROPERTIES = frozenset({
    "security.protocol", "sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.password",
    "client.id", "compression.type", "compression.codec", "acks", "batch.size",
    "batch.num.messages", "message.max.bytes", "fetch.min.bytes", "fetch.max.bytes",
    "fetch.wait.max.ms", "max.partition.fetch.bytes", "queued.max.messages.kbytes"})


def endpoints(brokers: str | None,
              extra: Mapping[str, Any] | None) -> list[tuple[tuple[str, ...], str]]:
    """The registry's ``endpoints`` hook of a Kafka component: each bootstrap broker, and a
    ``bootstrap.servers`` of ``config`` (it overrides them)."""
    found: list[tuple[tuple[str, ...], str]] = [
        ((BROKERS,), b.strip()) for b in (brokers or "").split(",") if b.strip()]
    override = (extra or {}).get("bootstrap.servers")
    if isinstance(override, str):
        found.extend(((EXTRA_CONFIG, "bootstrap.servers"), b.strip())
                     for b in override.split(",") if b.strip())
    return found


def restricted_check(extra: Mapping[str, Any] | None) -> list[tuple[tuple[str, ...], str]]:
    """The registry's ``restricted_check`` hook of a Kafka component: a restricted pipeline
    may set only :data:`TENANT_PROPERTIES` in ``config``."""
    return [((EXTRA_CONFIG, key), f"a pipeline put with a tenant's key may not set the "
             f"librdkafka property {key!r} (allowed: {', '.join(sorted(TENANT_PROPERTIES))})")
            for key in (extra or {}) if key not in TENANT_PROPERTIES]


def same_brokers(a: str, b: str) -> bool:
    """Whether two bootstrap lists name the same brokers (order and spaces aside)."""
    return {x.strip() for x in a.split(",")} == {x.strip() for x in b.split(",")}


def confluent() -> ModuleType:
    """The confluent_kafka module, or :class:`MissingDependency` naming the ``kafka`` extra."""
    try:
        import confluent_kafka
        import confluent_kafka.admin  # ck.admin below
    except ImportError:
        raise MissingDependency("confluent-kafka", "kafka") from None
    return confluent_kafka


# KafkaError codes that retrying cannot cure: the settings, the credentials, the ACLs or the
# request must change. Every other error (brokers down, timeouts, a leader moving) is an outage.
PERMANENT_KAFKA_ERRORS = (
    "_INVALID_ARG", "INVALID_CONFIG", "_UNKNOWN_PROTOCOL", "_UNSUPPORTED_FEATURE",
    "_NOT_IMPLEMENTED", "UNSUPPORTED_VERSION", "_AUTHENTICATION", "_SSL",
    "SASL_AUTHENTICATION_FAILED", "UNSUPPORTED_SASL_MECHANISM", "ILLEGAL_SASL_STATE",
    "TOPIC_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED", "INVALID_REPLICATION_FACTOR", "INVALID_PARTITIONS",
    "POLICY_VIOLATION", "TOPIC_EXCEPTION",
)


def kafka_error(what: str, error: Any) -> SourceError:
    """A KafkaError (or a KafkaException carrying one) as sluice's error, prefixed by ``what``
    (which client, topic and brokers): ``Misconfigured`` when it is fatal or its code is in
    :data:`PERMANENT_KAFKA_ERRORS`, else ``Unavailable``."""
    ck = confluent()
    if isinstance(error, ck.KafkaException) and error.args:
        error = error.args[0]
    permanent = False
    text = str(error)
    if isinstance(error, ck.KafkaError):
        codes = {getattr(ck.KafkaError, name, None) for name in PERMANENT_KAFKA_ERRORS}
        permanent = error.fatal() or error.code() in codes
        text = f"{error.str()} ({error.name()})"  # e.g. No such configuration property: "x"
    kind = Misconfigured if permanent else Unavailable
    return kind(f"{what}: {text}")


@contextmanager
def map_kafka_errors(what: str) -> Iterator[None]:
    """Run a block of confluent-kafka calls; a KafkaException out of it becomes
    :func:`kafka_error` (the one place the library's errors are mapped)."""
    ck = confluent()
    try:
        yield
    except ck.KafkaException as exc:
        raise kafka_error(what, exc) from None


def client_config(brokers: str, extra: Mapping[str, Any] | None, *,
                  outage: OutageLog | None = None, **own: Any) -> dict[str, Any]:
    """sluice's settings for one client, then the user's ``config`` over them. The client's
    errors and librdkafka's log go through ``outage`` (one line per outage, not one per
    reconnect attempt: :mod:`sluice.connectors.outage`); without one, a client of its own."""
    outage = outage or OutageLog(f"kafka client of {brokers}", log)
    config: dict[str, Any] = {
        "bootstrap.servers": ",".join(b.strip() for b in brokers.split(",")),
        "error_cb": ErrorReport(outage),
        "logger": LibrdkafkaLog(outage),
        **own,
    }
    config.update(extra or {})
    return config


# Errors that mean "the brokers cannot be reached right now" (librdkafka retries them itself).
OUTAGE_ERRORS = ("_TRANSPORT", "_ALL_BROKERS_DOWN", "_RESOLVE", "_TIMED_OUT",
                 "_TIMED_OUT_QUEUE", "_WAIT_COORD", "COORDINATOR_NOT_AVAILABLE",
                 "NOT_COORDINATOR", "_DESTROY_BROKER", "LEADER_NOT_AVAILABLE",
                 "NOT_LEADER_FOR_PARTITION", "NETWORK_EXCEPTION")


def is_outage(error: Any) -> bool:
    """Whether a KafkaError (or a KafkaException carrying one) is the brokers being away."""
    ck = confluent()
    if isinstance(error, ck.KafkaException) and error.args:
        error = error.args[0]
    if not isinstance(error, ck.KafkaError):
        return False
    return error.code() in {getattr(ck.KafkaError, name, None) for name in OUTAGE_ERRORS}


class ErrorReport:
    """A client's ``error_cb``: the brokers being away is an outage (one line, however many
    reconnect attempts); any other error is logged as it comes."""

    def __init__(self, outage: OutageLog) -> None:
        self.outage = outage

    def __call__(self, error: Any) -> None:
        if is_outage(error):
            self.outage.down(error.str() if hasattr(error, "str") else error)
        else:
            log.warning("%s: %s", self.outage.what, error)


class LibrdkafkaLog:
    """A client's ``logger``: librdkafka's own lines. Those about failing connections (the
    ``FAIL`` facility) repeat what the ``error_cb`` reports as an outage: kept at debug level."""

    def __init__(self, outage: OutageLog) -> None:
        self.outage = outage
        self.logger = logging.getLogger("sluice.kafka.librdkafka")

    def log(self, level: int, msg: str, *args: Any) -> None:
        if args and args[0] == "FAIL":
            level = logging.DEBUG
        self.logger.log(level, msg, *args)


def wanted_partitions(create_topic: CreateTopicConfig | None) -> int | None:
    """``create_topic.partitions`` if creating was asked for (the spec fills in defaults, so an
    absent ``create_topic`` has no ``partitions``)."""
    return None if create_topic is None else create_topic.partitions


CREATE_HINT = "create it, or set create_topic: {partitions: N} to have sluice create it"


def ensure_topic(client: Any, brokers: str, topic: str, create_topic: CreateTopicConfig | None,
                 admin_config: Mapping[str, Any], missing_hint: str = CREATE_HINT) -> int:
    """Check that ``topic`` exists (creating it if ``create_topic`` says so); its partitions.

    ``client`` is a Consumer or Producer (for metadata). Raises :class:`Misconfigured` naming
    the topic and the brokers when the topic is missing, :class:`Unavailable` when the brokers
    cannot be reached.
    """
    ck = confluent()
    meta = _topic_metadata(client, brokers, topic)
    if meta is not None:
        return len(meta.partitions)
    partitions = wanted_partitions(create_topic)
    if partitions is None:
        raise Misconfigured(
            f"kafka topic {topic!r} does not exist on brokers {brokers}; {missing_hint}")
    assert create_topic is not None
    new = ck.admin.NewTopic(topic, num_partitions=partitions,
                            replication_factor=create_topic.replication_factor)
    with map_kafka_errors(f"cannot create kafka topic {topic!r} on brokers {brokers}"):
        admin = ck.admin.AdminClient(dict(admin_config))
        try:
            admin.create_topics([new], operation_timeout=METADATA_TIMEOUT_S)[topic].result(
                timeout=METADATA_TIMEOUT_S)
            log.info("created kafka topic %s (%d partitions) on %s", topic, partitions, brokers)
        except ck.KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if getattr(error, "code", lambda: None)() != ck.KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    deadline = time.monotonic() + METADATA_TIMEOUT_S
    while time.monotonic() < deadline:  # metadata catches up with the creation, and every
        meta = _topic_metadata(client, brokers, topic)  # partition has its leader elected
        if meta is not None and meta.partitions and all(
                p.leader >= 0 and p.error is None for p in meta.partitions.values()):
            return len(meta.partitions)
        time.sleep(0.1)
    raise Unavailable(f"kafka topic {topic!r} was created on brokers {brokers} but its "
                      f"partitions have no leader in their metadata after "
                      f"{METADATA_TIMEOUT_S:g}s")


def _topic_metadata(client: Any, brokers: str, topic: str) -> Any:
    ck = confluent()
    with map_kafka_errors(f"cannot reach kafka brokers {brokers} (for topic {topic!r})"):
        cluster = client.list_topics(topic, timeout=METADATA_TIMEOUT_S)
    meta = cluster.topics.get(topic)
    if meta is None:
        return None
    if meta.error is not None:
        if meta.error.code() in (ck.KafkaError.UNKNOWN_TOPIC_OR_PART,
                                 ck.KafkaError.LEADER_NOT_AVAILABLE):
            return None
        raise kafka_error(f"kafka topic {topic!r} on brokers {brokers}", meta.error)
    return meta


def headers_dict(raw: Any) -> dict[str, str]:
    """Kafka record headers as text (a repeated header keeps its last value)."""
    if not raw:
        return {}
    items = raw.items() if isinstance(raw, Mapping) else raw
    return {str(k): (v.decode("utf-8", errors="replace") if isinstance(v, bytes) else
                     "" if v is None else str(v)) for k, v in items}
