"""Values that cross the seams: what a handler receives (:class:`Message`) and what one attempt
came to (:class:`Outcome`)."""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from sluice.errors import InvalidPayload

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


_UNDECODED: Any = object()


class Message:
    """One task as its handler sees it.

    ``payload`` is the body decoded (JSON to Python values, ``text/*`` to ``str``, anything
    else the bytes), on first read: a handler that reads only ``body`` never pays for the
    decoding. Reading the payload of a body that does not decode raises
    :class:`~sluice.errors.InvalidPayload` (a ``Reject``: the task fails without retries).

    ``tenant`` and ``function`` name the tenant and the function of a hosting pipeline's task
    (``tenancy:``); both are ``None`` for a one-function pipeline's task.
    """

    __slots__ = ("_payload", "attempt", "body", "content_type", "function", "headers", "key",
                 "pipeline", "task_id", "tenant")

    def __init__(self, task_id: str, pipeline: str, payload: Any = _UNDECODED,
                 body: bytes = b"", content_type: str = "application/json",
                 key: str | None = None, headers: Mapping[str, str] | None = None,
                 attempt: int = 1, tenant: str | None = None,
                 function: str | None = None) -> None:
        self.task_id = task_id
        self.pipeline = pipeline
        self._payload = payload
        self.body = body
        self.content_type = content_type
        self.key = key
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        self.attempt = attempt  # 1 for the first attempt
        self.tenant = tenant  # a hosting pipeline's task: its tenant, else None
        self.function = function  # and its function, else None

    @property
    def payload(self) -> Any:
        """The decoded body: JSON value, ``str`` for text/*, else bytes."""
        if self._payload is _UNDECODED:
            try:
                self._payload = decode_payload(self.body, self.content_type)
            except ValueError as exc:
                raise InvalidPayload(f"the body is not valid JSON ({self.content_type}): "
                                     f"{exc}") from None
        return self._payload

    def __repr__(self) -> str:
        hosted = (f"tenant={self.tenant!r}, function={self.function!r}, "
                  if self.tenant is not None or self.function is not None else "")
        return (f"Message(task_id={self.task_id!r}, pipeline={self.pipeline!r}, "
                f"key={self.key!r}, attempt={self.attempt}, {hosted}body={self.body[:60]!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.task_id, self.pipeline, self.body, self.content_type, self.key,
                dict(self.headers), self.attempt, self.tenant, self.function) == (
            other.task_id, other.pipeline, other.body, other.content_type, other.key,
            dict(other.headers), other.attempt, other.tenant, other.function)

    __hash__ = None  # type: ignore[assignment]


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
