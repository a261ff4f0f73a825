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
With ``handler.batch`` one call carries many tasks: a ``POST`` with ``Content-Type:
application/cloudevents-batch+json`` whose body is a JSON array of structured-mode events. The
function answers 2xx with a JSON array of one item per event, in any order::

    [{"id": "<the event's id>", "status": 200, "body": <any JSON: the task's result>},
     {"id": "...", "status": 429, "retry_after_s": 2}, {"id": "...", "status": 422,
      "body": "why it failed"}]

``status`` (default 200) means for that task what an HTTP status means for a single call; an
event missing from the answer is retried. A non-2xx answer to the whole request is every
task's outcome.

A hosting pipeline (``tenancy:``) may call one URL per function: the URL's path may use the
placeholders ``{function}`` and ``{tenant}`` (``http://fns.internal/{function}``), filled per
task with its function and tenant (``default`` when it has none), percent-encoded as a path
segment; the events then carry the extensions ``sluicetenant`` and ``sluicefunction``. A batch
is split by the URL its tasks make: one call per URL, the outcomes in the batch's order. A URL
without a placeholder is used as it is, with no work per task.

Redirects are not followed: a 3xx fails at once, its error naming the ``Location``. One pooled
session with keep-alive per handler; the SSRF guard on every request and every connection (in
a restricted pipeline, the network policy's guard: :mod:`sluice.netpolicy`, rule 4).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from sluice import registry, tracing
from sluice.errors import InvalidPayload
from sluice.message import Message, Outcome, is_json
from sluice.sinks.http import retry_after_s, url_check
from sluice.sinks.ssrf import (
    Guard,
    RefusedAddress,
    guarded_session,
    redirect_refused,
    url_problems,
)
from sluice.spec import REQUIRED, Field, ObjectSpec, Settings
from sluice.tenancy.config import DEFAULT_FUNCTION

URL, MODE, TIMEOUT_S, HEADERS = "url", "mode", "timeout_s", "headers"
CE_TYPE, ALLOW_LINK_LOCAL = "ce_type", "allow_link_local"

CONFIG = ObjectSpec(
    Field(URL, "string", "The function's URL (http:// or https://). For a hosting pipeline "
          "its path may use {function} and {tenant}: each task's call goes to the URL made "
          "with its function and tenant ('default' when it has none; percent-encoded), and "
          "a batch (handler.batch) makes one call per URL.", default=REQUIRED),
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


PLACEHOLDERS = ("function", "tenant")
DEFAULT_TENANT = "default"  # the tenant of a task that names none
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_MARK = "sluice-placeholder-"  # where a placeholder was, in the URL checked for its place
_URLS_KEPT = 4096  # filled templates remembered (then forgotten all at once)


def template_problems(url: str) -> list[str]:
    """What is wrong with the placeholders of ``url`` (empty: nothing, or none there): only
    ``{function}`` and ``{tenant}``, and only in the path."""
    names = _PLACEHOLDER.findall(url)
    unknown = [n for n in names if n not in PLACEHOLDERS]
    if unknown:
        return [f"unknown placeholder {{{unknown[0]}}} in the URL; a URL may use "
                f"{' and '.join('{' + n + '}' for n in PLACEHOLDERS)}"]
    marked = _PLACEHOLDER.sub(lambda m: _MARK + m.group(1), url)
    if "{" in marked or "}" in marked:
        return ["the URL has an unmatched { or }; a placeholder is {function} or {tenant}"]
    if not names:
        return []
    try:
        parts = urlsplit(marked)
    except ValueError:
        return []  # url_problems says what is wrong
    if _MARK in parts.scheme + parts.netloc + parts.query + parts.fragment:
        return ["a placeholder ({function}, {tenant}) may appear only in the URL's path, "
                f"not in its scheme, host, port, query or fragment: {url!r}"]
    return []


def sample_url(url: str) -> str:
    """``url`` with each placeholder replaced by a plain word (what the load-time check of a
    templated URL checks)."""
    return _PLACEHOLDER.sub(lambda m: m.group(1), url)


def url_template_check(url: str, allow_link_local: bool) -> list[tuple[tuple[str, ...], str]]:
    """The load-time check of a handler URL that may be a template."""
    problems = template_problems(url)
    if problems:
        return [((URL,), p) for p in problems]
    return url_check(sample_url(url), allow_link_local)


def check(config: Any, file: object) -> list[tuple[tuple[str, ...], str]]:
    typed = HttpHandlerConfig.from_mapping(config)
    return url_template_check(typed.url, typed.allow_link_local)


def endpoints(config: HttpHandlerConfig) -> list[tuple[tuple[str, ...], str]]:
    """Where the handler connects (its URL, a template's host being the same for every task):
    the registry's ``endpoints`` hook (:mod:`sluice.netpolicy`)."""
    return [((URL,), sample_url(config.url))]


OVERLOAD_STATUSES = frozenset({429, 503})
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
_JSON_FORMAT = JSONFormat()


class HttpHandler:
    def __init__(self, url: str, *, mode: str = "binary", timeout_s: float | None = None,
                 headers: dict[str, str] | None = None, ce_type: str = "sluice.task",
                 allow_link_local: bool = False, guard: Guard | None = None) -> None:
        problems = template_problems(url) or url_problems(
            sample_url(url), allow_link_local=allow_link_local)
        if problems:
            raise ValueError(problems[0])
        self.url = url  # the configured URL: a template if it has placeholders
        self.templated = _PLACEHOLDER.search(url) is not None
        self._urls: dict[tuple[str, str], str] = {}  # (function, tenant) → its URL
        self.mode = mode
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})
        self.ce_type = ce_type
        self.allow_link_local = allow_link_local
        self.guard = guard  # None: the SSRF guard (allow_link_local decides)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = guarded_session(allow_link_local=self.allow_link_local,
                                            guard=self.guard, limit=0, keepalive_timeout_s=30)
        return self._session

    def url_for(self, message: Message) -> str:
        """The URL of ``message``'s call: the configured one, or the template filled with the
        message's function and tenant (``default`` for none), each percent-encoded as a path
        segment. ``ValueError`` for a name that is ``.`` or ``..`` (it would leave the
        path)."""
        if not self.templated:
            return self.url
        key = (message.function or DEFAULT_FUNCTION, message.tenant or DEFAULT_TENANT)
        url = self._urls.get(key)
        if url is None:
            function, tenant = (quote(name, safe="") for name in key)
            for name in (function, tenant):
                if name in (".", ".."):
                    raise ValueError(f"{name!r} cannot name a function or tenant in a URL")
            if len(self._urls) >= _URLS_KEPT:
                self._urls.clear()
            url = self._urls[key] = self.url.format(function=function, tenant=tenant)
        return url

    def _event(self, message: Message, *, structured: bool) -> CloudEvent:
        attributes: dict[str, Any] = {
            "id": message.task_id, "source": message.pipeline, "type": self.ce_type,
            "specversion": "1.0", "time": datetime.now(UTC),
            "datacontenttype": message.content_type, "sluiceattempt": message.attempt,
        }
        if message.key is not None:
            attributes["partitionkey"] = message.key
        if message.tenant is not None:
            attributes["sluicetenant"] = message.tenant
        if message.function is not None:
            attributes["sluicefunction"] = message.function
        # Tracing (issue 17 item 3): the CloudEvents distributed tracing extension, from the
        # message's trace context (the attempt span's when tracing is on; ce-traceparent in
        # binary mode). No traceparent: one lookup.
        context = tracing.context_of(message.headers)
        if context is not None:
            attributes["traceparent"] = context[0]
            if context[1]:
                attributes["tracestate"] = context[1]
        data: Any = message.body
        if structured and is_json(message.content_type):
            data = message.payload
        return CloudEvent(attributes=attributes, data=data)

    def request(self, message: Message) -> tuple[dict[str, str], bytes]:
        """The CloudEvent of one attempt, as HTTP headers and body."""
        event = self._event(message, structured=self.mode == "structured")
        http_message = (ce_http.to_structured_event(event) if self.mode == "structured"
                        else ce_http.to_binary_event(event))
        headers = {**http_message.headers, **self.headers, "Idempotency-Key": message.task_id}
        context = event.get_extension("traceparent")  # tracing: also the plain W3C headers
        if context is not None:
            headers["traceparent"] = str(context)
            state = event.get_extension("tracestate")
            if state is not None:
                headers["tracestate"] = str(state)
        return headers, http_message.body

    async def invoke(self, message: Message, timeout_s: float) -> Outcome:
        try:
            url = self.url if not self.templated else self.url_for(message)
        except ValueError as exc:
            return Outcome("failure", error_type="InvalidName", error_message=str(exc))
        try:
            headers, body = self.request(message)
        except InvalidPayload as exc:  # structured mode reads the payload
            return Outcome("failure", error_type="InvalidPayload", error_message=exc.reason)
        answer = await self._post(url, headers, body, self.timeout_s or timeout_s)
        if isinstance(answer, Outcome):
            return answer
        return self._outcome(url, answer)

    def batch_request(self, messages: Sequence[Message]) -> tuple[dict[str, str], bytes]:
        """One ``application/cloudevents-batch+json`` request: a JSON array of the messages'
        events, each as the structured mode writes it."""
        events = [self._event(m, structured=True) for m in messages]
        body = b"[" + b",".join(_JSON_FORMAT.write(e) for e in events) + b"]"
        return {"Content-Type": BATCH_CONTENT_TYPE, **self.headers}, body

    async def invoke_batch(self, messages: Sequence[Message],
                           timeout_s: float) -> list[Outcome]:
        """POST one CloudEvents batch; the 2xx answer is one item per event (see the module
        docstring). A non-2xx answer, or a transport error, is every message's outcome; an
        event the answer leaves out (or a malformed item) is retried. With a templated URL,
        one batch per URL (all at once), the outcomes in the order of ``messages``."""
        if not self.templated:
            return await self._invoke_batch(self.url, messages, timeout_s)
        outcomes: list[Outcome | None] = [None] * len(messages)
        groups: dict[str, list[int]] = {}
        for i, message in enumerate(messages):
            try:
                groups.setdefault(self.url_for(message), []).append(i)
            except ValueError as exc:
                outcomes[i] = Outcome("failure", error_type="InvalidName",
                                      error_message=str(exc))
        answers = await asyncio.gather(*(
            self._invoke_batch(url, [messages[i] for i in group], timeout_s)
            for url, group in groups.items()))
        for group, group_outcomes in zip(groups.values(), answers, strict=True):
            for i, outcome in zip(group, group_outcomes, strict=True):
                outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    async def _invoke_batch(self, url: str, messages: Sequence[Message],
                            timeout_s: float) -> list[Outcome]:
        """One CloudEvents batch of ``messages`` to ``url``."""
        # A message whose JSON body does not decode is not sent: it fails alone.
        outcomes: list[Outcome | None] = [_undecodable(m) for m in messages]
        sent = [m for m, o in zip(messages, outcomes, strict=True) if o is None]
        if sent:
            headers, body = self.batch_request(sent)
            answer = await self._post(url, headers, body, self.timeout_s or timeout_s)
            answers = ([answer] * len(sent) if isinstance(answer, Outcome) else
                       [self._outcome(url, answer)] * len(sent)
                       if not 200 <= answer.status < 300
                       else _batch_outcomes(url, sent, answer))
            slots = iter(answers)
            outcomes = [o if o is not None else next(slots) for o in outcomes]
        return [o for o in outcomes if o is not None]

    async def _post(self, url: str, headers: dict[str, str], body: bytes,
                    limit_s: float) -> _Answer | Outcome:
        """The function's answer from ``url``, or the outcome of a call that got none."""
        started = time.perf_counter()
        try:
            async with self._client().post(
                    url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=limit_s)) as resp:
                payload = await resp.read()
                return _Answer(
                    resp.status, payload,
                    resp.headers.get("Content-Type", "application/octet-stream"),
                    retry_after_s(resp.headers.get("Retry-After")),
                    resp.headers.get("Location"), time.perf_counter() - started)
        except TimeoutError:
            return Outcome("retry", error_type="Timeout", overload=True,
                           error_message=f"{url} did not answer within {limit_s:g}s",
                           duration_s=time.perf_counter() - started)
        except RefusedAddress as exc:
            return Outcome("failure", error_type="RefusedAddress",
                           error_message=f"{url}: {exc}",
                           duration_s=time.perf_counter() - started)
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome("retry", error_type="ConnectionError",
                           error_message=f"{url}: {type(exc).__name__}: {exc}",
                           duration_s=time.perf_counter() - started)

    def _outcome(self, url: str, answer: _Answer) -> Outcome:
        """The outcome of ``url``'s answer (the module docstring's table)."""
        status, duration = answer.status, answer.duration_s
        if 200 <= status < 300:
            return _success(answer.payload, answer.content_type, duration)
        if 300 <= status < 400:
            return Outcome("failure", error_type=f"HTTP{status}", duration_s=duration,
                           error_message=redirect_refused(url, status, answer.location))
        detail = answer.payload[:200].decode("utf-8", errors="replace")
        error = f"{url} answered HTTP {status}: {detail}".rstrip(": ")
        return _error_outcome(status, error, duration, answer.retry_after_s)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)


def _undecodable(message: Message) -> Outcome | None:
    """The failure of a message whose JSON body does not decode (structured events carry the
    decoded payload), else None."""
    if not is_json(message.content_type):
        return None
    try:
        message.payload  # noqa: B018 - decoded (and kept) here, to fail it alone
    except InvalidPayload as exc:
        return Outcome("failure", error_type="InvalidPayload", error_message=exc.reason)
    return None


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    payload: bytes
    content_type: str
    retry_after_s: float | None
    location: str | None
    duration_s: float


def _error_outcome(status: int, error: str, duration_s: float,
                   wait_s: float | None) -> Outcome:
    """A non-2xx, non-3xx status: 429/503 overload, other 4xx final, else retried."""
    if status in OVERLOAD_STATUSES:
        return Outcome("retry", error_type=f"HTTP{status}", error_message=error,
                       delay_s=wait_s, duration_s=duration_s, overload=True,
                       retry_after_s=wait_s)
    if 400 <= status < 500:
        return Outcome("failure", error_type=f"HTTP{status}", error_message=error,
                       duration_s=duration_s)
    return Outcome("retry", error_type=f"HTTP{status}", error_message=error,
                   duration_s=duration_s)


def _batch_outcomes(url: str, messages: Sequence[Message], answer: _Answer) -> list[Outcome]:
    """Each message's outcome from a batch answer: a JSON array of ``{"id", "status", "body"
    , "retry_after_s"}`` items (see the module docstring)."""
    duration = answer.duration_s
    try:
        items = json.loads(answer.payload) if answer.payload else None
    except ValueError as exc:
        items, problem = None, f"the answer is not JSON: {exc}"
    else:
        problem = "the answer is not a JSON array of results"
    if not isinstance(items, list):
        return [Outcome("retry", error_type="InvalidBatchAnswer",
                        error_message=f"{url}: {problem}", duration_s=duration)] * len(messages)
    by_id: dict[str, Any] = {}
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            by_id[item["id"]] = item
    outcomes = []
    for message in messages:
        item = by_id.get(message.task_id)
        status = item.get("status", 200) if item is not None else None
        if not isinstance(status, int) or isinstance(status, bool):
            outcomes.append(Outcome("retry", error_type="InvalidBatchAnswer", duration_s=duration,
                                    error_message=f"{url}: no valid result for event "
                                    f"{message.task_id!r} in the batch answer"))
            continue
        assert item is not None
        body = item.get("body")
        if 200 <= status < 300:
            result = None if body is None else json.dumps(body, separators=(",", ":")).encode()
            outcomes.append(Outcome("success", result=result,
                                    result_type="application/json" if result else None,
                                    duration_s=duration))
            continue
        wait = item.get("retry_after_s")
        detail = body if isinstance(body, str) else json.dumps(body)
        error = f"{url} answered {status} for this event: {detail}"[:300]
        outcomes.append(_error_outcome(
            status, error, duration,
            float(wait) if isinstance(wait, int | float) and not isinstance(wait, bool)
            else None))
    return outcomes


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
                       allow_link_local=config.allow_link_local,
                       guard=None if ctx.network is None else ctx.network.guard())


registry.register(registry.ComponentSpec(
    family="handler",
    name="http",
    summary="A function behind an HTTP URL, called with each task as a CloudEvent.",
    config=CONFIG,
    factory=build_handler,
    settings=HttpHandlerConfig.from_mapping,
    check=check,
    endpoints=endpoints,
))
