"""The tenancy key: defaults, and the clear errors of a hosting pipeline the rest of its file
cannot serve."""

from __future__ import annotations

import pytest

from sluice.config.load import parse_pipeline
from sluice.errors import ConfigError

BASE = """name: fns
source: {embedded: {}}
handler: {python: "pipelines.hosted:FUNCTIONS"}
"""


def test_absent_is_a_one_function_pipeline_and_empty_is_hosting_with_defaults() -> None:
    assert parse_pipeline(BASE, check_code=False).tenancy is None
    tenancy = parse_pipeline(BASE + "tenancy: {}\n", check_code=False).tenancy
    assert tenancy is not None
    assert tenancy.isolation.backlog == 1000 and tenancy.isolation.reclaim_after_s == 600
    assert tenancy.function_concurrency == {"initial": 8, "min": 1, "max": 256,
                                            "backoff_ratio": 0.5, "algorithm": "proportional"}
    assert tenancy.tenant("anyone").weight == 1.0


@pytest.mark.parametrize(("text", "where", "says"), [
    (BASE + "tenancy: {isolation: {backlogg: 5}}\n", "4:23: tenancy.isolation.backlogg",
     "did you mean 'backlog'"),
    (BASE.replace('FUNCTIONS"}', 'FUNCTIONS", batch: {max_size: 5}}') + "tenancy: {}\n",
     "handler.batch", "one task at a time"),
    (BASE + "tenancy: {tenants: [{name: a}, {name: a}]}\n", "tenancy.tenants[1].name",
     "listed twice"),
    (BASE + "consumer: {exactly_once: true}\ntenancy: {}\n", "consumer.exactly_once",
     "outbox"),
    (BASE.replace("{embedded: {}}", '{redis: {url: "redis://127.0.0.1", stream: s}}')
     + "tenancy: {}\n", "tenancy.isolation.enabled", "embedded, kafka; this source is redis"),
    (BASE + "tenancy: {tenants: [{name: a, weight: 0}]}\n", "tenancy.tenants[0].weight",
     ">= 0.1"),
])
def test_bad_tenancy_is_named_where_it_is(text: str, where: str, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_pipeline(text, check_code=False)
    message = str(raised.value)
    assert where in message and says in message, message
