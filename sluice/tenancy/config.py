"""The ``tenancy`` key of a pipeline (a hosting pipeline: many tenants' functions on one
source) and its typed form. A pipeline without it is a one-function pipeline, as before.

::

    tenancy:
      tenants:
        - {name: acme, weight: 2, max_concurrency: 50, max_queued: 10000, submit_rate_per_s: 100}
      function_concurrency: {initial: 4, max: 64}
      isolation: {backlog: 1000, error_share: 0.5, reclaim_after_s: 600}

Where a task's tenant and function come from: a submit through the gateway or the CLI sets
them (the API key's tenant, the URL's function) in the message headers ``sluice-tenant`` and
``sluice-function``; a message that arrived on a broker has them where ``tenant_from`` and
``function_from`` say (a header, or a field of its JSON payload).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sluice.spec import REQUIRED, Field, ObjectSpec

TENANT_HEADER = "sluice-tenant"
FUNCTION_HEADER = "sluice-function"
FUNCTION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
FROM_PATTERN = r"^(header|payload):[^\s]{1,200}$"
DEFAULT_FUNCTION = "default"  # a message that names no function

TENANT_SPEC = ObjectSpec(
    Field("name", "string", "The tenant (as API keys name it).", default=REQUIRED,
          pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$"),
    Field("weight", "number", "Its share of the worker's concurrency against other tenants "
          "with work waiting (deficit round robin); idle share goes to whoever has work.",
          default=1.0, minimum=0.1, maximum=1000),
    Field("max_concurrency", ("integer", "null"), "Most of its tasks running at once in "
          "one worker (null: no cap beyond its share).", default=None, minimum=1,
          maximum=100_000),
    Field("max_queued", ("integer", "null"), "Most of its tasks waiting (QUEUED) in the "
          "pipeline; a submit beyond it is answered 429 with Retry-After (null: no cap).",
          default=None, minimum=1),
    Field("submit_rate_per_s", ("number", "null"), "Submits per second it may make (a "
          "token bucket, per gateway process); beyond it 429 with Retry-After (null: no cap).",
          default=None, exclusive_minimum=0),
    Field("submit_burst", ("integer", "null"), "The token bucket's size: submits it may "
          "make at once (default: one second's worth of submit_rate_per_s, at least 1).",
          default=None, minimum=1),
)

ISOLATION_SPEC = ObjectSpec(
    Field("enabled", "boolean", "Move a function that hurts its neighbours on the shared "
          "queue to a dedicated queue of its own, automatically (and back when it is quiet).",
          default=True),
    Field("window_s", "number", "The window the rules look at: attempts that ended in the "
          "last window_s seconds.", default=30.0, exclusive_minimum=0, maximum=3600),
    Field("min_tasks", "integer", "Attempts a function must have ended in the window before "
          "error_share or p99_s can isolate it.", default=20, minimum=1),
    Field("error_share", ("number", "null"), "Isolate a function whose share of failed "
          "or timed-out attempts in the window reaches this (null: off).", default=0.5,
          exclusive_minimum=0, maximum=1),
    Field("p99_s", ("number", "null"), "Isolate a function whose 99th percentile attempt "
          "duration in the window reaches this many seconds (null: off).", default=10.0,
          exclusive_minimum=0),
    Field("backlog", ("integer", "null"), "Isolate a function with this many tasks waiting in the "
          "shared queue (null: off).", default=1000, minimum=1),
    Field("reclaim_after_s", "number", "A dedicated queue that has been empty this long, with "
          "nothing of its function in flight, is deleted and its function routed back to the "
          "shared queue.", default=600.0, exclusive_minimum=0),
    Field("check_interval_s", "number", "How often each worker looks at the rules and the "
          "routes.", default=1.0, minimum=0.05, maximum=60),
)

DEFAULT_TENANT_SPEC = ObjectSpec(*(f for f in TENANT_SPEC.fields_ if f.name != "name"))


def tenancy_spec(adaptive: ObjectSpec) -> ObjectSpec:
    """The ``tenancy`` key's spec; ``adaptive``: consumer.concurrency's mapping keys."""
    return ObjectSpec(
        Field("tenant_from", "string", "Where a broker message's tenant is: header:<name> or "
              "payload:<field>. Submits set the header sluice-tenant themselves; a message "
              "without one belongs to the pipeline's tenant.",
              default=f"header:{TENANT_HEADER}", pattern=FROM_PATTERN),
        Field("function_from", "string", "Where a broker message's function is: header:<name> "
              "or payload:<field> (a top-level field of a JSON payload). A message without one "
              "runs as the function 'default'.", default=f"header:{FUNCTION_HEADER}",
              pattern=FROM_PATTERN),
        Field("tenants", "array", "Settings per tenant; a tenant not listed gets the defaults "
              "(weight 1, no caps).", default=None,
              items=Field("tenant", "object", "One tenant's settings.", fields=TENANT_SPEC)),
        Field("default", "object", "The settings of every tenant not listed in tenants.",
              fields=DEFAULT_TENANT_SPEC),
        Field("function_concurrency", ("integer", "object"), "Each function's own limit of tasks "
              "in flight in one worker, within consumer.concurrency: an integer is fixed; a "
              "mapping is adaptive, as consumer.concurrency's (so a function whose backend "
              "answers 429 slows only itself).",
              default=None, variants=(
                  Field("function_concurrency", "integer", "A fixed limit.", minimum=1,
                        maximum=10000),
                  Field("function_concurrency", "object", "An adaptive limit (the keys of "
                        "consumer.concurrency's mapping).", fields=adaptive),
              )),
        Field("isolation", "object", "When a function gets a dedicated queue, and when it goes "
              "back to the shared one.", fields=ISOLATION_SPEC),
        Field("metrics_functions", "integer", "Functions with their own Prometheus series per "
              "pipeline (the first seen); the rest are counted under function=\"other\".",
              default=50, minimum=0, maximum=10000),
    )


@dataclass(frozen=True)
class TenantConfig:
    name: str | None = None
    weight: float = 1.0
    max_concurrency: int | None = None
    max_queued: int | None = None
    submit_rate_per_s: float | None = None
    submit_burst: int | None = None

    @property
    def burst(self) -> int:
        """The token bucket's size (``submit_burst``, else a second's worth)."""
        if self.submit_burst is not None:
            return self.submit_burst
        return max(1, int(self.submit_rate_per_s or 1))


@dataclass(frozen=True)
class IsolationConfig:
    enabled: bool = True
    window_s: float = 30.0
    min_tasks: int = 20
    error_share: float | None = 0.5
    p99_s: float | None = 10.0
    backlog: int | None = 1000
    reclaim_after_s: float = 600.0
    check_interval_s: float = 1.0


DEFAULT_FUNCTION_CONCURRENCY: dict[str, Any] = {
    "initial": 8, "min": 1, "max": 256, "backoff_ratio": 0.5, "algorithm": "proportional"}


@dataclass(frozen=True)
class TenancyConfig:
    tenant_from: str = f"header:{TENANT_HEADER}"
    function_from: str = f"header:{FUNCTION_HEADER}"
    tenants: tuple[TenantConfig, ...] = ()
    default: TenantConfig = TenantConfig()
    function_concurrency: int | dict[str, Any] = field(
        default_factory=lambda: dict(DEFAULT_FUNCTION_CONCURRENCY))
    isolation: IsolationConfig = IsolationConfig()
    metrics_functions: int = 50

    def tenant(self, name: str) -> TenantConfig:
        """The settings of tenant ``name`` (its entry, else the defaults)."""
        for t in self.tenants:
            if t.name == name:
                return t
        return self.default


def _tenant(value: dict[str, Any]) -> TenantConfig:
    return TenantConfig(**{k: v for k, v in value.items()})


def build_tenancy(doc: dict[str, Any] | None) -> TenancyConfig | None:
    """The typed form of a validated, defaulted ``tenancy`` mapping (None: no tenancy)."""
    if doc is None:
        return None
    concurrency = doc.get("function_concurrency")
    if isinstance(concurrency, dict):
        concurrency = {**DEFAULT_FUNCTION_CONCURRENCY, **concurrency}
    elif concurrency is None:
        concurrency = dict(DEFAULT_FUNCTION_CONCURRENCY)
    return TenancyConfig(
        tenant_from=str(doc["tenant_from"]),
        function_from=str(doc["function_from"]),
        tenants=tuple(_tenant(t) for t in doc.get("tenants") or ()),
        default=_tenant(doc["default"]),
        function_concurrency=concurrency,
        isolation=IsolationConfig(**doc["isolation"]),
        metrics_functions=int(doc["metrics_functions"]),
    )
