"""Values that cross the seams: what a handler receives (:class:`Message`) and what one attempt
came to (:class:`Outcome`)."""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

JSON_TYPES = ("application/json", "text/json")


def is_json(content_type: str) -> bool:
    base = content_type.split(";", 1)[0].strip().lower()
    return base in JSON_TYPES or base.endswith("+json")


# orjson reads an integer beyond 64 bits as a float: a body with a run of 19 digits or more is
# read by the standard library instead, which keeps it exact. (Found by mapping every digit to
# "0" and everything else to "." and looking for 19 zeros: several times faster than a regex.)
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= i <= 0x39 else 0x2E for i in range(256))
_LONG_RUN = b"0" * 19


def loads_json(body: bytes) -> Any:
    """Parse a JSON body as ``json.loads`` does (same values, same bodies accepted), faster:
    orjson, else the standard library (long integers; ``NaN``; a UTF-16 body)."""
    if _LONG_RUN not in body.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body)


def decode_payload(body: bytes, content_type: str) -> Any:
    """JSON bodies decode to Python values, ``text/*`` to ``str``, anything else stays bytes.

    Raises ``ValueError`` for a JSON body that does not parse.
    """
    if is_json(content_type):
        return loads_json(body)
    if content_type.lower().startswith("text/"):
        return body.decode("utf-8", errors="replace")
    return body


@dataclass(frozen=True, slots=True)
class Message:
    """One task as its handler sees it."""

    task_id: str
    pipeline: str
    payload: Any  # decoded body: JSON value, str for text/*, else bytes
    body: bytes
    content_type: str = "application/json"
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    attempt: int = 1  # 1 for the first attempt


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one handler attempt came to.

    ``success`` carries the result (encoded, with its content type); ``retry`` asks for another
    attempt (after ``delay_s`` if given, else the backoff); ``failure`` ends the task at once.
    """

    status: Literal["success", "retry", "failure"]
    result: bytes | None = None
    result_type: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    delay_s: float | None = None
    duration_s: float = 0.0
    overload: bool = False  # a load signal for the limiter: 429/503, a timeout, Overloaded
    retry_after_s: float | None = None  # hold new attempts this long (the backend asked)
    traceback: str | None = None  # of the exception the handler raised (format_traceback)


TRACEBACK_MAX_CHARS = 8192  # a task keeps at most this much of its last attempt's traceback


def format_traceback(exc: BaseException, max_chars: int = TRACEBACK_MAX_CHARS) -> str:
    """The traceback of ``exc`` as Python prints it, cut in the middle to ``max_chars`` (the
    head says where it began, the tail where it was raised)."""
    text = "".join(traceback.format_exception(exc))
    if len(text) <= max_chars:
        return text
    keep = max_chars // 2
    return f"{text[:keep]}\n... ({len(text) - 2 * keep} characters left out) ...\n{text[-keep:]}"


def encode_result(value: Any) -> tuple[bytes | None, str | None]:
    """A handler's return value as stored bytes and a content type; ``None`` stores nothing.

    Raises ``TypeError``/``ValueError`` for a value JSON cannot encode.
    """
    if value is None:
        return None, None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), "application/octet-stream"
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode(), "application/json"
