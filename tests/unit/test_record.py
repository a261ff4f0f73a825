"""The result record's encoding (sluice/sinks/record.py)."""

from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest

from sluice import dead_letters
from sluice.sinks import record

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schemas"
                     / "result-record.schema.json").read_text())


def outcome(body: bytes, content_type: str = "application/json", result: bytes | None = None,
            result_type: str | None = None, at: float = 1795555870.919071) -> record.TaskOutcome:
    return record.TaskOutcome("orders", "default", "orders/0/7", "SUCCEEDED", 1, "k", body,
                              content_type, result, result_type, None, None, at, at, at, at)


def test_a_json_request_and_result_are_embedded_byte_for_byte() -> None:
    body = b'{"id": 123456789012345678901234567890, "name": "caf\xc3\xa9"}'
    result = b'{"total":98765432109876543210987654321}'
    encoded = record.encode(outcome(body, result=result, result_type="application/json"))
    assert body in encoded and result in encoded  # not parsed and written again
    value = json.loads(encoded)
    jsonschema.validate(value, SCHEMA)
    # integers beyond 64 bits stay exact (a float would round them)
    assert value["data"]["request"]["json"]["id"] == 123456789012345678901234567890
    assert value["data"]["result"] == {"total": 98765432109876543210987654321}


@pytest.mark.parametrize("body", [b'{"x": NaN}', b"{not json", '{"a": 1}'.encode("utf-16")])
def test_a_body_that_is_not_strict_json_goes_as_base64(body: bytes) -> None:
    value = json.loads(record.encode(outcome(body)))  # the record itself always parses
    assert value["data"]["request"] == {"content_type": "application/json",
                                        "base64": base64.b64encode(body).decode()}


def test_a_result_labelled_json_that_does_not_parse_goes_as_base64() -> None:
    value = json.loads(record.encode(outcome(b"{}", result=b"<html>",
                                             result_type="application/json")))
    assert value["data"]["result"] == {"content_type": "application/json",
                                       "base64": base64.b64encode(b"<html>").decode()}


def test_times_are_written_as_datetime_isoformat_writes_them() -> None:
    rng = random.Random(7)
    stamps = [rng.uniform(1.6e9, 1.9e9) for _ in range(20_000)]
    stamps += [float(int(s)) for s in stamps[:100]] + [1795555870.9999996, 1795555870.0000004]
    for at in stamps:
        expected = datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")
        assert record._iso(at) == expected, at


def test_dead_letter_headers_say_why_with_one_set_of_names() -> None:
    """One function makes the headers of every dead letter: a task's message (failed for good)
    and a result record (its delivery failed for good), which also names the destination."""
    task = record.dead_letter_headers(
        {"trace": "abc", "sluice-reason": "stale"}, pipeline="orders", task_id="t1",
        attempts=2, reason="", error_type="Reject", error_message="no", failed_at=1.5)
    assert task == {"trace": "abc", "sluice-pipeline": "orders", "sluice-task-id": "t1",
                    "sluice-error-type": "Reject", "sluice-error-message": "no",
                    "sluice-attempts": "2", "sluice-reason": "rejected by the handler",
                    "sluice-failed-at": "1.500000"}
    result = record.dead_letter_headers(
        {}, pipeline="orders", task_id="t1", attempts=10, reason="delivery failed: max_attempts",
        error_type="DeliveryError", error_message="HTTP 503", destination="on_success:http:x")
    assert set(result) == (set(task) - {"trace"}) | {"sluice-destination"}
    # A replay of a dead-lettered task starts without them.
    assert set(task) - {"trace"} <= set(dead_letters._FAILURE_HEADERS)
