"""The result record: one JSON shape for every destination, a CloudEvent (structured mode) of
type ``sluice.task.succeeded`` or ``sluice.task.failed``. Its schema is
``schemas/result-record.schema.json``.

A dead letter carries the headers of :func:`dead_letter_headers`, whatever failed.

The request payload is inlined (JSON as JSON, anything else base64) up to
``MAX_INLINE_BYTES``; a larger one is referenced by its size and SHA-256 digest. A JSON body (or
result) is embedded byte for byte when it is strict JSON (RFC 8259 in UTF-8), else inlined as
base64 (``NaN``, a UTF-16 body), so a record always parses. Records are encoded with orjson
(one per finished task: a hot path).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from sluice.message import is_json

MAX_INLINE_BYTES = 256 * 1024
CONTENT_TYPE = "application/cloudevents+json"
TYPES = {"SUCCEEDED": "sluice.task.succeeded", "FAILED": "sluice.task.failed"}
DEFAULT_DEAD_LETTER_REASON = "rejected by the handler"


class TaskOutcome(NamedTuple):
    """What a record is made of (known to the consumer loop when a task ends). A named tuple:
    one is made per finished task, and a tuple is made several times faster than a frozen
    dataclass."""

    pipeline: str
    tenant: str
    task_id: str
    state: str  # SUCCEEDED or FAILED
    attempts: int
    key: str | None
    request_body: bytes
    request_type: str
    result: bytes | None
    result_type: str | None
    error_type: str | None
    error_message: str | None
    received_at: float | None
    queued_at: float | None
    started_at: float | None
    finished_at: float


def _json(body: bytes) -> orjson.Fragment | None:
    """``body`` to embed as it is, if it is strict JSON (RFC 8259, UTF-8); else ``None``.
    Embedded, not parsed and encoded again: faster, and integers beyond 64 bits stay exact."""
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return orjson.Fragment(body)


def _request(body: bytes, content_type: str) -> dict[str, Any]:
    if len(body) > MAX_INLINE_BYTES:
        return {"content_type": content_type, "size_bytes": len(body),
                "sha256": hashlib.sha256(body).hexdigest()}
    if is_json(content_type) and (value := _json(body)) is not None:
        return {"content_type": content_type, "json": value}
    return {"content_type": content_type, "base64": base64.b64encode(body).decode()}


def _result(body: bytes | None, content_type: str | None) -> Any:
    if body is None:
        return None
    if content_type == "application/json" and (value := _json(body)) is not None:
        return value
    return {"content_type": content_type, "base64": base64.b64encode(body).decode()}


@functools.lru_cache(maxsize=8)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _iso(at: float) -> str:
    """``at`` (Unix time) as RFC 3339 in UTC, as ``datetime.isoformat`` writes it (microseconds
    when not zero). The second's text is cached: records end thousands per second."""
    second = math.floor(at)
    micros = round((at - second) * 1e6)
    if micros >= 1_000_000:
        second, micros = second + 1, 0
    text = _iso_second(second)
    return f"{text}.{micros:06d}Z" if micros else f"{text}Z"


def build(o: TaskOutcome) -> dict[str, Any]:
    stages = [("received", o.received_at), ("queued", o.queued_at), ("started", o.started_at),
              ("finished", o.finished_at)]
    return {
        "specversion": "1.0",
        "id": o.task_id,
        "source": f"/sluice/pipelines/{o.pipeline}",
        "type": TYPES[o.state],
        "subject": o.task_id,
        "time": _iso(o.finished_at),
        "datacontenttype": "application/json",
        "data": {
            "task_id": o.task_id,
            "pipeline": o.pipeline,
            "tenant": o.tenant,
            "state": o.state,
            "attempts": o.attempts,
            "key": o.key,
            "request": _request(o.request_body, o.request_type),
            "result": _result(o.result, o.result_type),
            "error": ({"type": o.error_type, "message": o.error_message}
                      if o.error_type else None),
            "timeline": [{"stage": s, "at": at} for s, at in stages],
        },
    }


def encode(o: TaskOutcome) -> bytes:
    """The record as compact JSON (UTF-8)."""
    return orjson.dumps(build(o))


def dead_letter_headers(headers: Mapping[str, str], *, pipeline: str, task_id: str,
                        attempts: int, reason: str, error_type: str | None,
                        error_message: str | None, destination: str | None = None,
                        failed_at: float | None = None) -> dict[str, str]:
    """``headers`` with why a record is a dead letter: a task that failed for good (its
    message), or a result record whose delivery failed for good (``destination``: the label
    of that destination). One set of names for both."""
    out = {
        **headers,
        "sluice-pipeline": pipeline,
        "sluice-task-id": task_id,
        "sluice-error-type": error_type or "",
        "sluice-error-message": error_message or "",
        "sluice-attempts": str(attempts),
        "sluice-reason": reason or DEFAULT_DEAD_LETTER_REASON,
        "sluice-failed-at": f"{time.time() if failed_at is None else failed_at:.6f}",
    }
    if destination is not None:
        out["sluice-destination"] = destination
    return out
