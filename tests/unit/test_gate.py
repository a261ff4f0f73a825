"""The gate before the handler (sluice/consumer/gate.py): JMESPath truthiness, headers and key,
schema errors as `<json path>: <message>`, bodies that do not decode, schema before filter, and
no gate at all for a pipeline with neither key."""

from __future__ import annotations

import json
from typing import Any

import jmespath
import pytest
from prometheus_client import generate_latest

from sluice import metrics
from sluice.config.load import parse_pipeline
from sluice.config.payload_rules import reads_payload
from sluice.consumer.gate import DROP, RUN, Gate, Verdict, gate_for, truthy

JSON = "application/json"
BASE = "name: p\nsource: {embedded: {}}\nhandler: {python: tests.helpers.handlers:echo}\n"
ORDER = {
    "type": "object",
    "required": ["kind", "amount"],
    "properties": {
        "kind": {"enum": ["order", "refund"]},
        "amount": {"type": "number", "minimum": 0},
        "lines": {"type": "array", "items": {"type": "object", "required": ["sku"]}},
    },
}


def check(gate: Gate, payload: Any, *, key: str | None = None,
          headers: dict[str, str] | None = None) -> Verdict:
    return gate.check(json.dumps(payload).encode(), JSON, key, headers or {})


# -- filter: JMESPath truthiness --------------------------------------------------------------

@pytest.mark.parametrize(("value", "runs"), [
    (False, False), (None, False), ("", False), ([], False), ({}, False),
    (True, True), (0, True), (0.0, True), ("0", True), ("false", True), ([0], True),
    ({"a": None}, True), (-1, True),
])
def test_a_message_runs_when_the_filter_is_truthy_in_jmespaths_sense(value: Any,
                                                                     runs: bool) -> None:
    gate = Gate("payload.v", None)
    assert check(gate, {"v": value}) == (RUN if runs else DROP)
    assert truthy(value) is runs


def test_a_missing_field_is_null_and_drops() -> None:
    assert check(Gate("payload.kind", None), {"other": 1}) == DROP
    assert check(Gate("payload.kind == 'order'", None), {"kind": "order"}) == RUN
    assert check(Gate("payload.kind == 'order'", None), {"kind": "refund"}) == DROP
    assert check(Gate("payload.kind == 'order'", None), [1, 2]) == DROP  # not an object


def test_headers_and_key() -> None:
    gate = Gate("headers.\"x-region\" == 'eu' && payload.amount > `100`", None)
    assert check(gate, {"amount": 150}, headers={"x-region": "eu"}) == RUN
    assert check(gate, {"amount": 50}, headers={"x-region": "eu"}) == DROP
    assert check(gate, {"amount": 150}, headers={"x-region": "us"}) == DROP
    assert check(gate, {"amount": 150}) == DROP  # no such header: null
    keyed = Gate("key == 'alice'", None)
    assert check(keyed, {}, key="alice") == RUN
    assert check(keyed, {}, key="bob") == DROP
    assert check(keyed, {}, key=None) == DROP
    assert check(Gate("key == null", None), {}, key=None) == RUN
    assert check(Gate("starts_with(key, 'eu-')", None), {}, key="eu-1") == RUN


def test_headers_may_be_any_mapping() -> None:
    class Headers(dict[str, str]):
        pass

    from types import MappingProxyType

    gate = Gate("contains(keys(headers), 'trace')", None)
    assert gate.check(b"{}", JSON, None, MappingProxyType({"trace": "1"})) == RUN
    assert gate.check(b"{}", JSON, None, Headers(trace="1")) == RUN
    assert gate.check(b"{}", JSON, None, {}) == DROP


def test_an_ordering_comparison_of_mixed_types_is_null_and_drops() -> None:
    """The JMESPath specification makes `"150" > 100` null; the library raises: not here."""
    gate = Gate("payload.amount > `100`", None)
    assert check(gate, {"amount": "150"}) == DROP
    assert check(gate, {"amount": None}) == DROP
    assert check(gate, {"amount": True}) == DROP
    assert check(gate, {"amount": 100.5}) == RUN
    assert check(Gate("payload.a < payload.b", None), {"a": "x", "b": "y"}) == RUN  # strings


def test_an_expression_that_fails_on_a_message_makes_it_invalid() -> None:
    verdict = check(Gate("length(payload.n) > `2`", None), {"n": 12345})
    assert not verdict.run
    assert verdict.invalid is not None
    assert verdict.invalid.startswith("filter: cannot be evaluated on this message: "
                                      "In function length(), invalid type for value: 12345")
    assert check(Gate("length(payload.n) > `2`", None), {"n": "12345"}) == RUN


# -- decoding -------------------------------------------------------------------------------

def test_a_body_that_is_not_json_is_invalid_when_the_payload_is_read() -> None:
    for gate in (Gate("payload.kind == 'order'", None), Gate(None, ORDER)):
        verdict = gate.check(b'{"kind": ', JSON, None, {})
        assert verdict == Verdict(False, "the body is not valid JSON (application/json): "
                                         "Expecting value: line 1 column 10 (char 9)")
    assert Gate("payload", None).check(b"", "application/cloudevents+json", None, {}).invalid


def test_a_filter_on_headers_and_key_alone_never_decodes_the_body() -> None:
    gate = Gate("headers.kind == 'order' || key == 'k'", None)
    assert gate.check(b"{not json", JSON, None, {"kind": "order"}) == RUN  # the handler says
    assert gate.check(b"{not json", JSON, "k", {}) == RUN
    assert gate.check(b"{not json", JSON, None, {}) == DROP


def test_text_is_a_string_and_binary_is_null_to_the_filter() -> None:
    assert Gate("payload == 'hello'", None).check(b"hello", "text/plain", None, {}) == RUN
    assert Gate("payload == null", None).check(b"\x00\x01", "application/octet-stream",
                                               None, {}) == RUN


@pytest.mark.parametrize(("expression", "reads"), [
    ("payload.kind", True),
    ("headers.a == 'b'", False),
    ("key", False),
    ("headers.a == 'b' && key == 'k'", False),
    ("headers.a == 'b' || payload.x", True),
    ("@", True),
    ("*", True),
    ("keys(@)", True),
    ("values(@)[0]", True),
    ("headers.*", False),
    ("headers | payload", False),  # payload here is a field of the headers
    ("payload | headers", True),
    ("[headers.a, key]", False),
    ("{a: headers.a, p: payload}", True),
    ("headers.list[?payload == 'x']", False),  # @ inside the filter is a header element
    ("length(headers) > `1`", False),
    ("`1`", False),
    ("not_null(payload.a, headers.b)", True),
    ("!payload.off", True),
])
def test_only_a_filter_that_may_read_the_payload_decodes_it(expression: str,
                                                           reads: bool) -> None:
    assert reads_payload(jmespath.compile(expression).parsed) is reads


# -- schema ---------------------------------------------------------------------------------

def test_schema_errors_are_json_path_and_message_up_to_three() -> None:
    gate = Gate(None, ORDER)
    assert check(gate, {"kind": "order", "amount": 3}) == RUN
    assert check(gate, {"kind": "order", "amount": "3"}) == Verdict(
        False, "schema: $.amount: '3' is not of type 'number'")
    assert check(gate, {"kind": "gift", "amount": -1, "lines": [{"sku": "a"}, {}]}) == Verdict(
        False, "schema: $.kind: 'gift' is not one of ['order', 'refund']; $.amount: -1 is less "
               "than the minimum of 0; $.lines[1]: 'sku' is a required property")
    assert check(gate, {"kind": "gift", "amount": -1, "lines": [{}, {}]}) == Verdict(
        False, "schema: $.kind: 'gift' is not one of ['order', 'refund']; $.amount: -1 is less "
               "than the minimum of 0; $.lines[0]: 'sku' is a required property; ...")
    assert check(gate, []) == Verdict(False, "schema: $: [] is not of type 'object'")


def test_a_long_schema_error_is_cut() -> None:
    verdict = check(Gate(None, {"type": "string"}), {"text": "x" * 5000})
    assert verdict.invalid is not None
    assert verdict.invalid.startswith("schema: $: {'text': 'xxx")
    assert len(verdict.invalid) < 300


def test_schema_references_inside_the_schema_are_followed() -> None:
    schema = {"$defs": {"sku": {"type": "string", "pattern": "^[A-Z]{3}$"}},
              "properties": {"sku": {"$ref": "#/$defs/sku"}}}
    gate = Gate(None, schema)
    assert check(gate, {"sku": "ABC"}) == RUN
    assert check(gate, {"sku": "abc"}) == Verdict(
        False, "schema: $.sku: 'abc' does not match '^[A-Z]{3}$'")


def test_format_is_an_annotation() -> None:
    assert check(Gate(None, {"format": "email"}), "not an address") == RUN


def test_a_binary_body_fails_any_schema_and_text_is_a_string() -> None:
    gate = Gate(None, {"type": "string", "maxLength": 3})
    assert gate.check(b"abc", "text/plain", None, {}) == RUN
    assert gate.check(b"abcd", "text/plain; charset=utf-8", None, {}) == Verdict(
        False, "schema: $: 'abcd' is too long")
    assert gate.check(b"abc", "application/octet-stream", None, {}) == Verdict(
        False, "schema: $: the body is binary (application/octet-stream), not JSON; a schema "
               "checks JSON payloads (send them as application/json)")


def test_schema_applies_before_the_filter() -> None:
    """An invalid payload is dead-lettered even when the filter would have dropped it."""
    gate = Gate("payload.kind == 'order'", ORDER)
    assert check(gate, {"kind": "refund", "amount": 1}) == DROP
    assert check(gate, {"kind": "order", "amount": 1}) == RUN
    assert check(gate, {"kind": "refund"}) == Verdict(
        False, "schema: $: 'amount' is a required property")


# -- gate_for -------------------------------------------------------------------------------

def test_no_gate_for_a_pipeline_with_neither_filter_nor_schema() -> None:
    config = parse_pipeline(BASE)
    assert (config.filter, config.schema) == (None, None)
    assert gate_for(config) is None


def test_a_gate_for_a_filter_or_a_schema() -> None:
    filtered = parse_pipeline(BASE + "filter: payload.kind == 'order'\n")
    gate = gate_for(filtered)
    assert gate is not None
    assert check(gate, {"kind": "order"}) == RUN
    schema = parse_pipeline(BASE + "schema: {type: object, required: [kind]}\n")
    assert schema.schema == {"type": "object", "required": ["kind"]}
    gate = gate_for(schema)
    assert gate is not None
    assert check(gate, {}) == Verdict(False, "schema: $: 'kind' is a required property")


def test_the_filtered_counter_is_exposed_as_sluice_filtered_total() -> None:
    metrics.FILTERED.labels("gate-test").inc()
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'sluice_filtered_total{pipeline="gate-test"} 1.0' in text
