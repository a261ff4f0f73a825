"""Sink: POST each record to an HTTP endpoint (``http: {url, headers}``).

2xx is delivered. 408, 425, 429 and 5xx, timeouts and connection errors are retried (a
``Retry-After`` is honoured); any other 4xx is permanent (the record goes to the dead letter at
once). Redirects are not followed (as webhook senders do not): a 3xx is permanent, and its
error names the ``Location``. One pooled session with keep-alive per destination; the SSRF
guard of :mod:`sluice.sinks.ssrf` on every request and every connection (in a restricted
pipeline, the network policy's guard: :mod:`sluice.netpolicy`, rule 4). A record's W3C trace
context (``traceparent``/``tracestate``, the attempt's that made it: :mod:`sluice.tracing`)
goes with its request, so the receiver joins the task's trace.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import aiohttp

from sluice import registry, tracing
from sluice.config.destinations import SinkSettings, label_field
from sluice.connectors.base import SinkRecord
from sluice.errors import DeliveryError
from sluice.sinks.ssrf import (
    Guard,
    RefusedAddress,
    guarded_session,
    redirect_refused,
    url_problems,
)
from sluice.spec import REQUIRED, Field, ObjectSpec, Settings

RETRYABLE = frozenset({408, 425, 429})

TIMEOUT_S, MAX_ATTEMPTS, CONCURRENCY = "timeout_s", "max_attempts", "concurrency"
INITIAL_BACKOFF_S, MAX_BACKOFF_S, MAX_AGE_S = "initial_backoff_s", "max_backoff_s", "max_age_s"
URL, HEADERS, ALLOW_LINK_LOCAL = "url", "headers", "allow_link_local"

DELIVERY_FIELDS = (
    Field(TIMEOUT_S, "number", "Time limit of one delivery attempt.", default=10.0,
          exclusive_minimum=0),
    Field(MAX_ATTEMPTS, "integer", "Attempts before the record goes to the pipeline's dead "
          "letter (under on_success/on_failure).", default=10, minimum=1),
    Field(INITIAL_BACKOFF_S, "number", "First retry delay bound (full jitter).", default=1.0,
          minimum=0),
    Field(MAX_BACKOFF_S, "number", "Largest retry delay bound.", default=300.0, minimum=0),
    Field(MAX_AGE_S, "number", "A record older than this is not retried again.",
          default=86400.0, exclusive_minimum=0),
    Field(CONCURRENCY, "integer", "Deliveries in flight to this destination.", default=8,
          minimum=1, maximum=1000),
)



@runtime_checkable
class DeliverySettings(Protocol):
    """The delivery keys (:data:`DELIVERY_FIELDS`) of a sink's typed config, read by its
    deliverer under on_success/on_failure (:mod:`sluice.sinks.delivery`)."""

    @property
    def timeout_s(self) -> float: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def initial_backoff_s(self) -> float: ...
    @property
    def max_backoff_s(self) -> float: ...
    @property
    def max_age_s(self) -> float: ...
    @property
    def concurrency(self) -> int: ...


@dataclass(frozen=True, slots=True)
class DeliveryConfig(Settings):
    """The delivery keys alone (:data:`DELIVERY_DEFAULTS`: those of a sink without them)."""

    timeout_s: float
    max_attempts: int
    initial_backoff_s: float
    max_backoff_s: float
    max_age_s: float
    concurrency: int


DELIVERY_DEFAULTS = DeliveryConfig.from_mapping(ObjectSpec(*DELIVERY_FIELDS).apply_defaults({}))

URL_FIELDS = (
    Field(URL, "string", "Where to POST (http:// or https://).", default=REQUIRED),
    Field(HEADERS, "object", "Extra request headers (values may use ${ENV}).", default=None),
    Field(ALLOW_LINK_LOCAL, "boolean", "Allow a URL that is or resolves to a link-local or "
          "cloud-metadata address (refused by default: SSRF guard).", default=False),
)

CONFIG = ObjectSpec(*URL_FIELDS, label_field(URL), *DELIVERY_FIELDS)


@dataclass(frozen=True, slots=True)
class HttpSinkConfig(SinkSettings):
    """The typed ``http`` sink config (the keys of :data:`CONFIG`); the ``webhook`` sink's
    extends it."""

    url: str
    headers: dict[str, str] | None
    allow_link_local: bool
    label: str | None
    timeout_s: float
    max_attempts: int
    initial_backoff_s: float
    max_backoff_s: float
    max_age_s: float
    concurrency: int

    @property
    def target(self) -> str:
        return self.url


def url_check(url: str, allow_link_local: bool) -> list[tuple[tuple[str, ...], str]]:
    """A component ``check`` of a URL (the SSRF guard's problems, at the ``url`` key)."""
    return [((URL,), p) for p in url_problems(url, allow_link_local=allow_link_local)]


def check(config: Any, file: object) -> list[tuple[tuple[str, ...], str]]:
    typed = HttpSinkConfig.from_mapping(config)
    return url_check(typed.url, typed.allow_link_local)


def network_guard(ctx: registry.BuildContext) -> Guard | None:
    """The guard of a restricted pipeline's HTTP component (its network policy's), else
    ``None`` (the SSRF guard)."""
    return None if ctx.network is None else ctx.network.guard()


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


class HttpSink:
    def __init__(self, url: str, headers: Mapping[str, str] | None = None, *,
                 timeout_s: float = 10.0, allow_link_local: bool = False,
                 guard: Guard | None = None) -> None:
        problems = url_problems(url, allow_link_local=allow_link_local)
        if problems:
            raise ValueError(problems[0])
        self.url = url
        self.headers = dict(headers or {})
        self.timeout_s = timeout_s
        self.allow_link_local = allow_link_local
        self.guard = guard  # None: the SSRF guard (allow_link_local decides)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = guarded_session(
                allow_link_local=self.allow_link_local, guard=self.guard,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self._session

    def request_headers(self, record: SinkRecord) -> dict[str, str]:
        if tracing.TRACEPARENT in record.headers:
            trace = tracing.carried(record.headers) or {}
            return {"Content-Type": record.content_type, **trace, **self.headers}
        return {"Content-Type": record.content_type, **self.headers}

    async def send(self, records: Sequence[SinkRecord]) -> None:
        for record in records:
            await self._post(record)

    async def _post(self, record: SinkRecord) -> None:
        try:
            async with self.session().post(self.url, data=record.body, allow_redirects=False,
                                           headers=self.request_headers(record)) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return
                if 300 <= resp.status < 400:
                    raise DeliveryError(redirect_refused(self.url, resp.status,
                                                         resp.headers.get("Location")),
                                        permanent=True)
                wait = retry_after_s(resp.headers.get("Retry-After"))
                permanent = 400 <= resp.status < 500 and resp.status not in RETRYABLE
                raise DeliveryError(f"{self.url} answered HTTP {resp.status}",
                                    permanent=permanent, retry_after_s=wait)
        except RefusedAddress as exc:
            raise DeliveryError(f"{self.url}: {exc}", permanent=True) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise DeliveryError(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def build_sink(config: HttpSinkConfig, ctx: registry.BuildContext) -> HttpSink:
    return HttpSink(config.url, config.headers, timeout_s=float(config.timeout_s),
                    allow_link_local=config.allow_link_local, guard=network_guard(ctx))


registry.register(registry.ComponentSpec(
    family="sink",
    name="http",
    summary="POST each record (a CloudEvent, structured JSON) to a URL.",
    config=CONFIG,
    factory=build_sink,
    settings=HttpSinkConfig.from_mapping,
    check=check,
))
