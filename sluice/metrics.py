"""Prometheus metrics (``/metrics``), in one registry of sluice's own.

Counters and histograms are updated where things happen; gauges that describe stored state
(tasks per state, queue depth) are refreshed when ``/metrics`` is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

SUBMITS = Counter(
    "sluice_submits", "Task submissions over HTTP, by outcome "
    "(accepted, duplicate, invalid, refused, throttled (a tenant quota), unavailable).",
    ["pipeline", "status"],
    registry=REGISTRY)
TASKS = Gauge("sluice_tasks", "Tasks in the store, by state.", ["pipeline", "state"],
              registry=REGISTRY)
HANDLER_SECONDS = Histogram(
    "sluice_handler_duration_seconds", "Duration of handler attempts, by outcome "
    "(success, retry, failure).", ["pipeline", "outcome"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
QUEUE_DEPTH = Gauge("sluice_queue_depth", "Messages not yet finished in a pipeline's source.",
                    ["pipeline"], registry=REGISTRY)
IN_FLIGHT = Gauge("sluice_in_flight", "Tasks running in this process.", ["pipeline"],
                  registry=REGISTRY)
LIMIT = Gauge("sluice_concurrency_limit", "The handler's current concurrency limit (AIMD moves "
              "it).", ["pipeline"], registry=REGISTRY)
LIMIT_SIGNALS = Counter("sluice_limit_signals", "Attempt outcomes as the limiter sees them "
                        "(success, overload, error).", ["pipeline", "signal"], registry=REGISTRY)
FILTERED = Counter(
    "sluice_filtered", "Messages the pipeline's filter dropped: acknowledged, never run (their "
    "tasks end FILTERED).", ["pipeline"], registry=REGISTRY)  # exposed as sluice_filtered_total
PAUSED = Gauge("sluice_pipeline_paused", "1 while a pipeline is paused.", ["pipeline"],
               registry=REGISTRY)

# Hosting pipelines (sluice.tenancy): per tenant and function, the function label bounded by
# tenancy.metrics_functions (the rest are "other").
FUNCTION_ATTEMPTS = Counter(
    "sluice_function_attempts", "Attempts of hosted functions, by outcome (success, overload, "
    "error).", ["pipeline", "tenant", "function", "outcome"], registry=REGISTRY)
FUNCTION_LIMIT = Gauge("sluice_function_concurrency_limit", "A hosted function's own "
                       "concurrency limit in this process.", ["pipeline", "tenant", "function"],
                       registry=REGISTRY)
FUNCTION_IN_FLIGHT = Gauge("sluice_function_in_flight", "A hosted function's tasks running in "
                           "this process.", ["pipeline", "tenant", "function"], registry=REGISTRY)
FUNCTION_BACKLOG = Gauge("sluice_function_backlog", "A hosted function's tasks waiting in its "
                         "queue (the shared one or its dedicated one).",
                         ["pipeline", "tenant", "function"], registry=REGISTRY)
ROUTE_CHANGES = Counter("sluice_route_changes", "Hosted functions moved to a dedicated queue "
                        "(isolated), back to the shared one (reclaimed), or pinned by hand.",
                        ["pipeline", "tenant", "function", "action"], registry=REGISTRY)
