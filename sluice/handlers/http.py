"""HTTP function handlers: ``handler: {http: {url, mode, timeout_s, headers, ce_type}}``.

Each attempt POSTs the task as a CloudEvent (HTTP binding, made with the ``cloudevents``
library): ``binary`` mode puts the attributes in ``ce-*`` headers and the task's body as it is;
``structured`` mode sends one ``application/cloudevents+json`` document. ``ce-id`` is the task
id, ``ce-source`` the pipeline, ``ce-type`` configurable; the ``partitionkey`` extension carries
the task's key and ``sluiceattempt`` the attempt number. ``Idempotency-Key`` is the task id, so
a function can drop a repeat after a failover.

Outcomes: 2xx succeeds (the body is the result); 429 and 503 retry and tell the limiter the
backend is overloaded (their ``Retry-After`` holds new attempts); any other 4xx fails at once;
other 5xx, connection errors and timeouts retry (a timeout is an overload signal too).
Redirects are not followed: a 3xx fails at once, its error naming the ``Location``. One pooled
session with keep-alive per handler; the SSRF guard on every request and every connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.v1.event import CloudEvent

from sluice import registry
from sluice.message import Message, Outcome, is_json
from sluice.sinks.http import retry_after_s, url_check
from sluice.sinks.ssrf import (
    RefusedAddress,
    guarded_session,
    redirect_refused,
    url_problems,
)
from sluice.spec import REQUIRED, Field, ObjectSpec, Settings

URL, MODE, TIMEOUT_S, HEADERS = "url", "mode", "timeout_s", "headers"
CE_TYPE, ALLOW_LINK_LOCAL = "ce_type", "allow_link_local"

CONFIG = ObjectSpec(
    Field(URL, "string", "The function's URL (http:// or https://).", default=REQUIRED),
    Field(MODE, "string", "CloudEvents HTTP binding: binary (ce-* headers, the body as is) "
          "or structured (one JSON document).", default="binary",
          enum=("binary", "structured")),
    Field(TIMEOUT_S, "number", "Time limit of one call; default: consumer.timeout_s.",
          default=None, exclusive_minimum=0),
    Field(HEADERS, "object", "Extra request headers (values may use ${ENV}).", default=None),
    Field(CE_TYPE, "string", "The CloudEvent type attribute.", default="sluice.task"),
    Field(ALLOW_LINK_LOCAL, "boolean", "Allow a URL that is or resolves to a link-local or "
          "cloud-metadata address (refused by default: SSRF guard).", default=False),
)



@dataclass(frozen=True, slots=True)
class HttpHandlerConfig(Settings):
    """The typed ``http`` handler config (the keys of :data:`CONFIG`)."""

    url: str
    mode: str
    timeout_s: float | None
    headers: dict[str, str] | None
    ce_type: str
    allow_link_local: bool


def check(config: Any, file: object) -> list[tuple[tuple[str, ...], str]]:
    typed = HttpHandlerConfig.from_mapping(config)
    return url_check(typed.url, typed.allow_link_local)


OVERLOAD_STATUSES = frozenset({429, 503})


class HttpHandler:
    def __init__(self, url: str, *, mode: str = "binary", timeout_s: float | None = None,
                 headers: dict[str, str] | None = None, ce_type: str = "sluice.task",
                 allow_link_local: bool = False) -> None:
        problems = url_problems(url, allow_link_local=allow_link_local)
        if problems:
            raise ValueError(problems[0])
        self.url = url
        self.mode = mode
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})
        self.ce_type = ce_type
        self.allow_link_local = allow_link_local
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = guarded_session(allow_link_local=self.allow_link_local, limit=0,
                                            keepalive_timeout_s=30)
        return self._session

    def request(self, message: Message) -> tuple[dict[str, str], bytes]:
        """The CloudEvent of one attempt, as HTTP headers and body."""
        attributes: dict[str, Any] = {
            "id": message.task_id, "source": message.pipeline, "type": self.ce_type,
            "specversion": "1.0", "time": datetime.now(UTC),
            "datacontenttype": message.content_type, "sluiceattempt": message.attempt,
        }
        if message.key is not None:
            attributes["partitionkey"] = message.key
        data: Any = message.body
        if self.mode == "structured" and is_json(message.content_type):
            data = message.payload
        event = CloudEvent(attributes=attributes, data=data)
        http_message = (ce_http.to_structured_event(event) if self.mode == "structured"
                        else ce_http.to_binary_event(event))
        headers = {**http_message.headers, **self.headers, "Idempotency-Key": message.task_id}
        return headers, http_message.body

    async def invoke(self, message: Message, timeout_s: float) -> Outcome:
        limit_s = self.timeout_s or timeout_s
        headers, body = self.request(message)
        started = time.perf_counter()
        try:
            async with self._client().post(
                    self.url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=limit_s)) as resp:
                payload = await resp.read()
                status = resp.status
                content_type = resp.headers.get("Content-Type", "application/octet-stream")
                wait = retry_after_s(resp.headers.get("Retry-After"))
                location = resp.headers.get("Location")
        except TimeoutError:
            return Outcome("retry", error_type="Timeout", overload=True,
                           error_message=f"{self.url} did not answer within {limit_s:g}s",
                           duration_s=time.perf_counter() - started)
        except RefusedAddress as exc:
            return Outcome("failure", error_type="RefusedAddress",
                           error_message=f"{self.url}: {exc}",
                           duration_s=time.perf_counter() - started)
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome("retry", error_type="ConnectionError",
                           error_message=f"{self.url}: {type(exc).__name__}: {exc}",
                           duration_s=time.perf_counter() - started)
        duration = time.perf_counter() - started
        if 200 <= status < 300:
            return _success(payload, content_type, duration)
        if 300 <= status < 400:
            return Outcome("failure", error_type=f"HTTP{status}", duration_s=duration,
                           error_message=redirect_refused(self.url, status, location))
        detail = payload[:200].decode("utf-8", errors="replace")
        error = f"{self.url} answered HTTP {status}: {detail}".rstrip(": ")
        if status in OVERLOAD_STATUSES:
            return Outcome("retry", error_type=f"HTTP{status}", error_message=error,
                           delay_s=wait, duration_s=duration, overload=True,
                           retry_after_s=wait)
        if 400 <= status < 500:
            return Outcome("failure", error_type=f"HTTP{status}", error_message=error,
                           duration_s=duration)
        return Outcome("retry", error_type=f"HTTP{status}", error_message=error,
                       duration_s=duration)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)


def _success(payload: bytes, content_type: str, duration_s: float) -> Outcome:
    if not payload:
        return Outcome("success", duration_s=duration_s)
    if is_json(content_type):
        try:
            json.loads(payload)
            return Outcome("success", result=payload, result_type="application/json",
                           duration_s=duration_s)
        except ValueError:
            pass
    return Outcome("success", result=payload, result_type="application/octet-stream",
                   duration_s=duration_s)


def build_handler(config: HttpHandlerConfig, ctx: registry.BuildContext) -> HttpHandler:
    timeout = config.timeout_s
    return HttpHandler(config.url, mode=config.mode,
                       timeout_s=float(timeout) if timeout else None,
                       headers=config.headers, ce_type=config.ce_type,
                       allow_link_local=config.allow_link_local)


registry.register(registry.ComponentSpec(
    family="handler",
    name="http",
    summary="A function behind an HTTP URL, called with each task as a CloudEvent.",
    config=CONFIG,
    factory=build_handler,
    settings=HttpHandlerConfig.from_mapping,
    check=check,
))
