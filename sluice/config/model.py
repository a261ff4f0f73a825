"""The pipeline file's keys (one spec, from which the JSON Schema is generated) and its typed model.

A pipeline binds one source to one handler, with the consumer policy in between and a dead-letter
destination for tasks that fail for good. Components are one-key objects named by type::

    source: {embedded: {queue: jobs}}
    handler: {python: pipelines.quickstart:handle}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sluice.config.yamlmarks import Marks, PathKey
from sluice.errors import ConfigIssue
from sluice.spec import REQUIRED, Field, ObjectSpec

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"

RETRY_SPEC = ObjectSpec(
    Field("max_attempts", "integer", "Attempts in all, the first included, before the task "
          "fails and goes to the dead letter.", default=3, minimum=1),
    Field("initial_backoff_s", "number", "Upper bound of the first retry delay; each retry's "
          "delay is drawn uniformly from 0 to the bound (full jitter).", default=1.0, minimum=0),
    Field("max_backoff_s", "number", "Largest bound a retry delay can reach.", default=60.0,
          minimum=0),
    Field("backoff_multiplier", "number", "Growth of the bound per attempt.", default=2.0,
          minimum=1),
    Field("max_age_s", "number", "A task older than this (from when it was received) is not "
          "retried again; it fails and goes to the dead letter.", default=21600.0,
          exclusive_minimum=0),
)

ADAPTIVE_SPEC = ObjectSpec(
    Field("initial", "integer", "The limit to start from.", default=8, minimum=1,
          maximum=10000),
    Field("min", "integer", "The limit never goes below this.", default=1, minimum=1,
          maximum=10000),
    Field("max", "integer", "The limit never goes above this.", default=256, minimum=1,
          maximum=10000),
    Field("backoff_ratio", "number", "Multiplier of the limit on an overload signal (HTTP 429 "
          "or 503, a timeout, Overloaded).", default=0.5, exclusive_minimum=0, maximum=1),
    Field("algorithm", "string", "aimd: additive increase, multiplicative decrease; gradient: "
          "also scales down as latency rises over its no-load baseline.", default="aimd",
          enum=("aimd", "gradient")),
)

CONSUMER_SPEC = ObjectSpec(
    Field("concurrency", ("integer", "object"), "Tasks in flight at once in one worker process: "
          "an integer is a fixed limit; a mapping makes it adaptive (AIMD between min and max).",
          default=8, variants=(
              Field("concurrency", "integer", "A fixed limit.", minimum=1, maximum=10000),
              Field("concurrency", "object", "An adaptive limit.", fields=ADAPTIVE_SPEC),
          )),
    Field("ordering", "string", "key: tasks with one key run one at a time, in order (others "
          "in parallel); partition: one at a time per partition; unordered: all in parallel.",
          default="key", enum=("key", "partition", "unordered")),
    Field("timeout_s", "number", "Time limit of one handler attempt; a timed-out attempt "
          "counts as failed and is retried.", default=30.0, exclusive_minimum=0),
    Field("retry", "object", "Retries with exponential backoff and full jitter.",
          fields=RETRY_SPEC),
    Field("exactly_once", "boolean", "Kafka to Kafka: the results for the kafka destinations in "
          "on_success/on_failure are written in one transaction with the source's offsets, so "
          "readers with isolation.level=read_committed see each result exactly once, across "
          "crashes and rebalances. Needs a kafka source; its kafka destinations must be on "
          "the source's brokers.", default=False),
    Field("track_tasks", "boolean", "false: tasks are not recorded in the task store (Kafka "
          "source only; the committed offsets say what is finished). Saves two store writes "
          "per message; there is no task API, per-task cancel or pause, submit, or dedup by "
          "task id across workers for this pipeline. Retries, dead letters and results work "
          "as before.", default=True),
)

TRIGGER_SPEC = ObjectSpec(
    Field("http", "object", "An extra URL on `sluice serve` that submits to this pipeline "
          "(the same as POST /v1/pipelines/<name>/tasks).", fields=ObjectSpec(
              Field("path", "string", "The URL path, e.g. /thumbnails; not under /v1/.",
                    default=REQUIRED, pattern=r"^/(?!v1/|v1$|healthz$|readyz$|metrics$|"
                    r"openapi\.json$)[A-Za-z0-9._~/-]*$"),
          )),
)

PIPELINE_SPEC = ObjectSpec(
    Field("name", "string", "Pipeline name, unique per deployment; names the default dead-letter "
          "queue and the task namespace.", default=REQUIRED, pattern=NAME_PATTERN),
    Field("tenant", "string", "Tenant that owns this pipeline and its tasks.", default="default",
          pattern=NAME_PATTERN),
    Field("description", "string", "Free text.", default=None),
    Field("source", "object", "Where tasks come from (one component).", default=REQUIRED,
          family="source"),
    Field("handler", "object", "What runs each task (one component).", default=REQUIRED,
          family="handler"),
    Field("consumer", "object", "The consumer policy between source and handler.",
          fields=CONSUMER_SPEC),
    Field("dead_letter", "object", "Where a task that failed for good goes, with the reason. "
          "Default: the embedded queue '<name>.dlq'.", default=None, family="sink"),
    Field("on_success", "array", "Where each succeeded task's result record goes (sinks; "
          "delivered durably, with retries, after the task is recorded).", default=None,
          items=Field("sink", "object", "A sink.", family="sink")),
    Field("on_failure", "array", "Where each failed task's result record goes (as on_success).",
          default=None, items=Field("sink", "object", "A sink.", family="sink")),
    Field("trigger", "object", "How tasks arrive besides the source itself.", default=None,
          fields=TRIGGER_SPEC),
)


@dataclass(frozen=True)
class ComponentConfig:
    """One component slot: its type name and its (defaulted) config."""

    type: str
    config: Any


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 3
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    backoff_multiplier: float = 2.0
    max_age_s: float = 21600.0


@dataclass(frozen=True)
class ConsumerConfig:
    concurrency: int = 8  # the starting (or fixed) limit
    timeout_s: float = 30.0
    retry: RetryConfig = RetryConfig()
    adaptive: dict[str, Any] | None = None  # consumer.concurrency as a mapping
    ordering: str = "key"
    exactly_once: bool = False
    track_tasks: bool = True

    @property
    def limit_config(self) -> int | dict[str, Any]:
        return self.adaptive if self.adaptive is not None else self.concurrency


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    tenant: str
    source: ComponentConfig
    handler: ComponentConfig
    consumer: ConsumerConfig
    dead_letter: ComponentConfig
    description: str | None = None
    path: Path | None = None
    trigger_path: str | None = None  # trigger.http.path
    on_success: tuple[ComponentConfig, ...] = ()
    on_failure: tuple[ComponentConfig, ...] = ()
    # Where each key and value is in the file, for errors found after loading.
    marks: Marks | None = field(default=None, compare=False, repr=False)

    def issue(self, path: PathKey, message: str) -> ConfigIssue:
        """An issue at the value of ``path`` in this pipeline's file (``("handler", "python")``
        → ``p.yaml:5:11: handler.python: message``)."""
        marks = self.marks or Marks(str(self.path) if self.path else "<string>")
        return marks.issue(path, message)

    def with_concurrency(self, concurrency: int) -> PipelineConfig:
        """A fixed limit instead of the configured one (``--concurrency``)."""
        consumer = dataclasses.replace(self.consumer, concurrency=concurrency, adaptive=None)
        return dataclasses.replace(self, consumer=consumer)


def _component(value: dict[str, Any]) -> ComponentConfig:
    ((type_name, config),) = value.items()
    return ComponentConfig(type_name, config)


def build_model(doc: dict[str, Any], path: Path | None,
                marks: Marks | None = None) -> PipelineConfig:
    """Turn a validated, defaulted document into the typed model (with its ``dead_letter``:
    :func:`sluice.config.load.parse_pipeline` fills in the registry's default)."""
    consumer = doc["consumer"]
    dead_letter = doc["dead_letter"]  # the loader fills in the default (the registry's)
    return PipelineConfig(
        name=doc["name"],
        tenant=doc["tenant"],
        description=doc.get("description"),
        source=_component(doc["source"]),
        handler=_component(doc["handler"]),
        consumer=ConsumerConfig(
            concurrency=(int(consumer["concurrency"]["initial"])
                         if isinstance(consumer["concurrency"], dict)
                         else int(consumer["concurrency"])),
            adaptive=consumer["concurrency"] if isinstance(consumer["concurrency"], dict)
            else None,
            timeout_s=float(consumer["timeout_s"]),
            retry=RetryConfig(**{k: v for k, v in consumer["retry"].items()}),
            ordering=str(consumer["ordering"]),
            exactly_once=bool(consumer["exactly_once"]),
            track_tasks=bool(consumer["track_tasks"]),
        ),
        dead_letter=_component(dead_letter),
        path=path,
        trigger_path=((doc.get("trigger") or {}).get("http") or {}).get("path"),
        on_success=tuple(_component(c) for c in doc.get("on_success") or ()),
        on_failure=tuple(_component(c) for c in doc.get("on_failure") or ()),
        marks=marks,
    )
