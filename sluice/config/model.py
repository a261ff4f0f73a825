"""The pipeline file's keys (one spec, from which the JSON Schema is generated) and its typed model.

A pipeline binds one source to one handler, with the consumer policy in between and a dead-letter
destination for tasks that fail for good. Components are one-key objects named by type::

    source: {embedded: {queue: jobs}}
    handler: {python: pipelines.quickstart:handle}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sluice.config.yamlmarks import Marks, PathKey
from sluice.errors import ConfigIssue
from sluice.spec import REQUIRED, Field, ObjectSpec
from sluice.tenancy.config import TenancyConfig, build_tenancy, tenancy_spec

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
    Field("backoff_ratio", "number", "The deepest cut of one round of overload signals (HTTP "
          "429 or 503, a timeout, Overloaded): the limit goes no lower than this times the "
          "limit before them. aimd and gradient cut by exactly this; proportional by one slot "
          "per overload signal, down to it.", default=0.5, exclusive_minimum=0, maximum=1),
    Field("algorithm", "string", "proportional: additive increase; each overload signal takes "
          "one slot off, and the limit then holds for 3 rounds (it settles at what the backend "
          "takes); aimd: additive increase, multiplicative decrease (backoff_ratio per round "
          "with overloads); gradient: aimd that also scales down as latency rises over its "
          "no-load baseline.", default="proportional",
          enum=("proportional", "aimd", "gradient")),
)

CONSUMER_SPEC = ObjectSpec(
    Field("concurrency", ("integer", "object"), "Tasks in flight at once in one worker process: "
          "an integer is a fixed limit; a mapping makes it adaptive (between min and max; see "
          "algorithm).",
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
    Field("prefetch", "integer", "Most messages one worker holds at once: running, ready, "
          "waiting in an ordering lane, or finished and waiting to be recorded. Fetching runs "
          "ahead of the handlers up to this, so store writes and acknowledgements go in large "
          "batches; a full worker stops fetching (backpressure). At least 3 x concurrency "
          "(x handler.batch.max_size for a batch handler) is used whatever is set. Held tasks "
          "are claimed: a crash counts an attempt for each that had a free ordering lane (as a "
          "queue's receive count does). Default: 1000; where the source is a queue that "
          "workers on several machines share (the embedded queue on a PostgreSQL store), what "
          "the worker finishes in about a quarter second, at most 1000, so a slow handler's "
          "backlog is shared out instead of taken by the first worker.", default=None,
          minimum=1, maximum=1_000_000),
    Field("prefetch_bytes", "integer", "Most message body bytes one worker holds at once "
          "(with prefetch, whichever is reached first).", default=64 * 1024 * 1024,
          minimum=1024),
    Field("track_tasks", "boolean", "false: tasks are not recorded in the task store (Kafka "
          "source only; the committed offsets say what is finished). Saves two store writes "
          "per message; there is no task API, per-task cancel or pause, submit, or dedup by "
          "task id across workers for this pipeline. Retries, dead letters and results work "
          "as before.", default=True),
    Field("keep_payload_bytes", "integer", "How many bytes of each task's message body the "
          "task store keeps with its record (with the content type and full size), for the "
          "task API and the console's task page; a longer body is kept truncated. Written "
          "with the task record, so it costs no extra store write. 0 keeps none.",
          default=4096, minimum=0, maximum=1024 * 1024),
)

BATCH_SPEC = ObjectSpec(
    Field("max_size", "integer", "Most messages in one call of the handler.", default=100,
          minimum=1, maximum=100_000),
    Field("max_wait_ms", "number", "How long a batch that is not full waits for more "
          "messages before the call (none wait once the worker holds no more).", default=20.0,
          minimum=0, maximum=60_000),
)

HANDLER_EXTRA_SPEC = ObjectSpec(
    Field("batch", "object", "Call the handler with a list of messages instead of one: it "
          "returns one outcome per message, in order (see Batch handlers in the README). "
          "consumer.concurrency then counts calls in flight, and consumer.timeout_s bounds "
          "one call. A batch never holds two messages of one ordering lane.",
          fields=BATCH_SPEC, default=None),
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
    Field("handler", "object", "What runs each task (one component; `batch` beside it makes "
          "it a batch handler).", default=REQUIRED, family="handler", extra=HANDLER_EXTRA_SPEC),
    Field("filter", "string", "A JMESPath expression over {payload, headers, key}, e.g. "
          "payload.kind == 'order': a message runs only when it is truthy (false, null, \"\", "
          "[] and {} are not); any other is acknowledged without running, its task FILTERED. "
          "Applied after schema.", default=None),
    Field("schema", ("object", "string"), "A JSON Schema (Draft 2020-12) every payload must "
          "satisfy: inline, or the path of a .json/.yaml file relative to this file. A "
          "payload that fails it (or does not decode) is dead-lettered without running "
          "(error type InvalidPayload, the validation errors as the reason).", default=None,
          variants=(Field("schema", "object", "The schema, inline."),
                    Field("schema", "string", "The path of a .json, .yaml or .yml file holding "
                          "the schema, relative to this pipeline file."))),
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
    Field("tenancy", "object", "Make this a hosting pipeline: many tenants' functions on "
          "one source, with fair shares between tenants, a limiter per function, and a "
          "function that hurts its neighbours moved to a dedicated queue automatically "
          "(docs/tenancy.md). Absent: a one-function pipeline.", default=None,
          fields=tenancy_spec(ADAPTIVE_SPEC)),
)


@dataclass(frozen=True)
class ComponentConfig:
    """One component slot: its type name and its (defaulted) config."""

    type: str
    config: Any


@dataclass(frozen=True)
class BatchConfig:
    """``handler.batch``: the handler takes lists of up to ``max_size`` messages."""

    max_size: int = 100
    max_wait_ms: float = 20.0


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
    prefetch: int | None = None  # None: 1000, or paced on a shared backlog (consumer loop)
    prefetch_bytes: int = 64 * 1024 * 1024
    keep_payload_bytes: int = 4096  # of each task's body, kept with its record (0: none)

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
    filter: str | None = None  # a JMESPath expression (sluice.consumer.gate)
    schema: Mapping[str, Any] | None = None  # the payload schema (inline, or its file's)
    on_success: tuple[ComponentConfig, ...] = ()
    on_failure: tuple[ComponentConfig, ...] = ()
    batch: BatchConfig | None = None  # handler.batch
    tenancy: TenancyConfig | None = None  # a hosting pipeline (sluice.tenancy)
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


def _component(value: dict[str, Any], *extras: str) -> ComponentConfig:
    ((type_name, config),) = ((k, v) for k, v in value.items() if k not in extras)
    return ComponentConfig(type_name, config)


HANDLER_EXTRAS = tuple(f.name for f in HANDLER_EXTRA_SPEC.fields_)


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
        handler=_component(doc["handler"], *HANDLER_EXTRAS),
        batch=(BatchConfig(int(doc["handler"]["batch"]["max_size"]),
                           float(doc["handler"]["batch"]["max_wait_ms"]))
               if doc["handler"].get("batch") is not None else None),
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
            prefetch=None if consumer["prefetch"] is None else int(consumer["prefetch"]),
            prefetch_bytes=int(consumer["prefetch_bytes"]),
            keep_payload_bytes=int(consumer["keep_payload_bytes"]),
        ),
        dead_letter=_component(dead_letter),
        path=path,
        trigger_path=((doc.get("trigger") or {}).get("http") or {}).get("path"),
        filter=doc.get("filter"),
        schema=doc.get("schema"),  # the loader has read a schema file's mapping in
        on_success=tuple(_component(c) for c in doc.get("on_success") or ()),
        on_failure=tuple(_component(c) for c in doc.get("on_failure") or ()),
        tenancy=build_tenancy(doc.get("tenancy")),
        marks=marks,
    )
