"""Tracing with OpenTelemetry: one trace from the producer through sluice to the function and
the result. Off by default, and then free: the OpenTelemetry packages are not even imported.

Knobs (read once, by :func:`setup`, when ``sluice run`` or ``sluice serve`` starts):

- ``--tracing otlp|console|none`` (``sluice run`` and ``sluice serve``): the exporter; it wins
  over the environment (``none``: off whatever the environment says).
- ``OTEL_TRACES_EXPORTER``: without ``--tracing``, ``otlp`` or ``console`` (or both,
  comma-separated) turns tracing on; unset, ``none`` or anything else leaves it off (an
  exporter sluice does not ship is logged and ignored).
- ``OTEL_SDK_DISABLED=true``: off, unless ``--tracing`` names an exporter.
- ``otlp`` exports over OTLP/HTTP (protobuf) with ``opentelemetry-exporter-otlp-proto-http``,
  configured as that exporter reads it: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (default
  ``http://localhost:4318``; spans go to its ``/v1/traces``), or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (the full URL), ``OTEL_EXPORTER_OTLP_HEADERS``,
  ``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_EXPORTER_OTLP_COMPRESSION``, the certificate ones.
- ``console`` writes each finished span as JSON on stderr (stdout is the commands' own).
- ``OTEL_SERVICE_NAME`` (default ``sluice``) and ``OTEL_RESOURCE_ATTRIBUTES``: the resource;
  ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: the sampler (default: parent-based,
  always on); ``OTEL_BSP_*``: the batch span processor (queue size, delay, export timeout).
- The packages: ``pip install 'sluice[tracing]'`` (``opentelemetry-api``, ``-sdk``,
  ``-exporter-otlp-proto-http``); a missing one is named when tracing is asked for.

What is traced (span names; attributes are ``sluice.*``):

1. ``submit <pipeline>`` (SERVER): a submit over HTTP (the gateway's submit helper), a child of
   the request's W3C ``traceparent``/``tracestate`` headers, else the root of a new trace. The
   task's message carries the submit span's context in its headers ``traceparent`` and
   ``tracestate``.
2. ``attempt <pipeline>`` (CONSUMER): each handler attempt in the consumer loop, a child of the
   message's ``traceparent`` header (a broker's message headers, or what the submit wrote);
   current while the handler runs and its outcome is recorded. Attributes: pipeline, task id,
   attempt, tenant and function when set, outcome (``success``/``retry``/``failure``/
   ``cancelled``/``error``), the error type. The handler's message carries the attempt span's
   ``traceparent`` in its headers; an HTTP function gets it as the CloudEvents distributed
   tracing extension (attributes ``traceparent``/``tracestate``: ``ce-traceparent`` in binary
   mode) and as the plain W3C ``traceparent``/``tracestate`` headers.
3. ``deliver <destination label>`` (PRODUCER): the outbox deliverer sending a result record to a
   destination, a child of the record's ``traceparent`` header. A result record's headers carry
   the context of the attempt that made it.

Off, the only work is copying a valid ``traceparent`` (and its ``tracestate``) that is already
there: from a submit's request onto its message, from the message to an HTTP function and onto
its result records. Nothing else is allocated; each hook is one check of :data:`ENABLED`.
A batch handler call (``handler.batch``) gives each of its messages an attempt span of its
own (a child of that message's ``traceparent``); none is current during the call, which is one
for all, and each message of the call carries its own span's ``traceparent``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sluice.errors import MissingDependency

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from sluice.connectors.base import SinkRecord
    from sluice.message import Outcome

log = logging.getLogger(__name__)

TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
EXPORTERS = ("otlp", "console")  # what OTEL_TRACES_EXPORTER / --tracing may name
DEFAULT_SERVICE_NAME = "sluice"
MAX_TRACESTATE_CHARS = 512  # a longer tracestate is not copied (W3C: vendors keep 512)
NO_HEADERS: Mapping[str, str] = MappingProxyType({})  # shared: what a record has without one

# The constant every hook checks: True only after setup() turned tracing on.
ENABLED = False

_TRACEPARENT_RE = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})-[0-9a-f]{2}"
    r"(?P<rest>-[\x21-\x7e]*)?")
_TRACESTATE_RE = re.compile(r"[\x20-\x7e]*")
_provider: TracerProvider | None = None
_tracer: Tracer | None = None
_global_set = False


class _Answer(Protocol):
    """An HTTP answer (an aiohttp response): what a submit span notes of it."""

    @property
    def status(self) -> int: ...


A = TypeVar("A", bound=_Answer)


def enabled() -> bool:
    """Whether tracing is on (hot paths read :data:`ENABLED` directly)."""
    return ENABLED


# -- setup ------------------------------------------------------------------------------------

def exporters_asked(choice: str | None, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The exporters to use: ``choice`` (``--tracing``), else ``OTEL_TRACES_EXPORTER`` (unless
    ``OTEL_SDK_DISABLED`` is true). Unknown names are logged and left out."""
    if choice is None:
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return []
        choice = environ.get("OTEL_TRACES_EXPORTER", "")
    names = [n.strip().lower() for n in choice.split(",") if n.strip()]
    unknown = [n for n in names if n not in (*EXPORTERS, "none")]
    if unknown:
        log.warning("tracing: exporter %s not supported (sluice ships %s); ignored",
                    ", ".join(map(repr, unknown)), " and ".join(EXPORTERS))
    return list(dict.fromkeys(n for n in names if n in EXPORTERS))


def setup(exporter: str | None = None, *, span_exporter: SpanExporter | None = None,
          environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on if asked (see the module docstring); whether it is on. ``exporter``:
    ``--tracing`` (``otlp``, ``console``, ``none``), else the environment decides.
    ``span_exporter``: export to that exporter instead, each span as it ends (tests, or a
    program embedding sluice). Asked for nothing, nothing is imported."""
    global ENABLED, _provider, _tracer, _global_set
    names = [] if span_exporter is not None else exporters_asked(exporter, environ)
    if span_exporter is None and not names:
        return ENABLED
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError:
        raise MissingDependency("opentelemetry-sdk", "tracing") from None
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    for name in names:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
            continue
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise MissingDependency("opentelemetry-exporter-otlp-proto-http",
                                    "tracing") from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    shutdown()  # a provider set up before (tests set up several times)
    _provider, _tracer = provider, provider.get_tracer("sluice")
    if not _global_set:  # a handler's own spans (the global API) export with sluice's
        trace.set_tracer_provider(provider)
        _global_set = True
    ENABLED = True
    log.info("tracing on: %s", ", ".join(names) or type(span_exporter).__name__)
    return True


def shutdown() -> None:
    """Export what is pending and turn tracing off (the SDK also does this at exit)."""
    global ENABLED, _provider, _tracer
    provider, _provider, _tracer, ENABLED = _provider, None, None, False
    if provider is not None:
        provider.shutdown()


# -- headers (the only part that runs with tracing off) -------------------------------------

def context_of(headers: Mapping[str, str]) -> tuple[str, str | None] | None:
    """The valid W3C ``traceparent`` of ``headers`` with its ``tracestate`` (``None`` if
    absent or too long), or ``None``. One lookup when there is none."""
    traceparent = headers.get(TRACEPARENT)
    if traceparent is None:
        return None
    found = _TRACEPARENT_RE.fullmatch(traceparent)
    if (found is None or found["version"] == "ff" or (found["version"] == "00" and found["rest"])
            or not found["trace"].strip("0") or not found["span"].strip("0")):
        return None
    state = headers.get(TRACESTATE)
    if state is not None and (len(state) > MAX_TRACESTATE_CHARS
                              or not _TRACESTATE_RE.fullmatch(state)):
        state = None
    return traceparent, state


def carried(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The message headers that carry ``headers``' trace context (a copy), or ``None``."""
    found = context_of(headers)
    if found is None:
        return None
    traceparent, state = found
    return {TRACEPARENT: traceparent, TRACESTATE: state} if state else {TRACEPARENT: traceparent}


def record_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    """A result record's headers: the current attempt span's context when tracing is on, else
    (off, or made outside an attempt) the task message's ``headers``' trace context, if any."""
    if ENABLED:
        current = _current_headers()
        if current is not None:
            return current
    elif TRACEPARENT not in headers:
        return NO_HEADERS  # the common case off: one lookup
    found = carried(headers)
    return found if found is not None else NO_HEADERS


def handler_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    """(Tracing on.) A message's ``headers`` for its handler: with the current (attempt)
    span's ``traceparent``/``tracestate`` in place of the message's."""
    current = _current_headers()
    if current is None:
        return headers
    return {**{k: v for k, v in headers.items() if k not in (TRACEPARENT, TRACESTATE)},
            **current}


def inject(headers: MutableMapping[str, str]) -> None:
    """(Tracing on.) Write the current span's context into ``headers`` (W3C trace context)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    TraceContextTextMapPropagator().inject(headers)


def _current_headers() -> dict[str, str] | None:
    from opentelemetry import trace

    if not trace.get_current_span().get_span_context().is_valid:
        return None
    out: dict[str, str] = {}
    inject(out)
    return out


def _parent(headers: Mapping[str, str]) -> Context:
    """The context of a valid ``traceparent`` in ``headers`` (else an empty one: a root)."""
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    found = carried(headers)
    if found is None:
        return Context()
    return TraceContextTextMapPropagator().extract(found, context=Context())


def _attributes(pairs: Mapping[str, Any]) -> dict[str, Any]:
    return {f"sluice.{k}": v for k, v in pairs.items() if v is not None}


# -- spans (called only when ENABLED) -------------------------------------------------------

class SubmitSpan:
    """The span of one submit over HTTP (see the module docstring, 1)."""

    __slots__ = ("_span",)

    def __init__(self, request_headers: Mapping[str, str], pipeline: str, task_id: str,
                 tenant: str | None, function: str | None) -> None:
        from opentelemetry.trace import SpanKind

        assert _tracer is not None, "tracing.setup() first"
        self._span: Span = _tracer.start_span(
            f"submit {pipeline}", context=_parent(request_headers), kind=SpanKind.SERVER,
            attributes=_attributes({"pipeline": pipeline, "task_id": task_id,
                                    "tenant": tenant, "function": function}))

    def __enter__(self) -> SubmitSpan:
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        if error is not None:
            _failed(self._span, error)
        self._span.end()

    def carry(self, request_headers: Mapping[str, str]) -> dict[str, str]:
        """The message's headers: this span's context."""
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        out: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(out, context=trace.set_span_in_context(self._span))
        return out

    def answered(self, response: A) -> A:
        """``response`` (the submit's answer), its status noted on the span."""
        from opentelemetry.trace import StatusCode

        status = int(response.status)
        self._span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self._span.set_status(StatusCode.ERROR, f"HTTP {status}")
        return response


class _NoSpan:
    """The submit span when tracing is off: carries a copy of the request's context, if any."""

    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        return None

    def carry(self, request_headers: Mapping[str, str]) -> dict[str, str] | None:
        return carried(request_headers)

    def answered(self, response: A) -> A:
        return response


NO_SPAN = _NoSpan()


def submit_span(request_headers: Mapping[str, str], pipeline: str, task_id: str,
                tenant: str | None = None, function: str | None = None) -> SubmitSpan:
    """(Tracing on.) A submit's span: ``with`` it; :meth:`SubmitSpan.carry` gives the headers
    for the message."""
    return SubmitSpan(request_headers, pipeline, task_id, tenant, function)


class AttemptSpan:
    """The span of one handler attempt, current from its start until :meth:`end` (see the
    module docstring, 2)."""

    __slots__ = ("_context", "_span", "_token")

    def __init__(self, headers: Mapping[str, str], fields: Mapping[str, Any], *,
                 current: bool = True) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind

        assert _tracer is not None, "tracing.setup() first"
        parent = _parent(headers)
        self._span: Span = _tracer.start_span(
            f"attempt {fields.get('pipeline')}", context=parent, kind=SpanKind.CONSUMER,
            attributes=_attributes(fields))
        self._context = trace.set_span_in_context(self._span, parent)
        self._token = context.attach(self._context) if current else None

    @contextmanager
    def active(self) -> Iterator[None]:
        """This span current in the ``with`` block (a batch's span: not current otherwise)."""
        from opentelemetry import context

        token = context.attach(self._context)
        try:
            yield
        finally:
            context.detach(token)

    def end(self, outcome: Outcome | None) -> None:
        """End the span with the attempt's ``outcome`` (``None``: cancelled); an exception
        being raised through the caller's ``finally`` is recorded."""
        from opentelemetry import context
        from opentelemetry.trace import StatusCode

        span = self._span
        error = sys.exc_info()[1]
        if outcome is not None:
            span.set_attribute("sluice.outcome", outcome.status)
            if outcome.status != "success":
                if outcome.error_type:
                    span.set_attribute("sluice.error_type", outcome.error_type)
                span.set_status(StatusCode.ERROR, f"{outcome.error_type}: "
                                f"{outcome.error_message}"[:200])
        elif error is None or _cancelled(error):
            span.set_attribute("sluice.outcome", "cancelled")
        else:
            span.set_attribute("sluice.outcome", "error")
            _failed(span, error)
        if self._token is not None:
            context.detach(self._token)
        span.end()


def attempt_span(headers: Mapping[str, str], fields: Mapping[str, Any], *,
                 current: bool = True) -> AttemptSpan:
    """(Tracing on.) Start an attempt's span as a child of the message ``headers``' context,
    with ``fields`` (pipeline, task_id, attempt, tenant, function) as its attributes (a log
    line's ``trace_id`` is the span's own, not an attribute). ``current=False`` (a batch's
    spans): current only inside :meth:`AttemptSpan.active`."""
    return AttemptSpan(headers, {k: v for k, v in fields.items() if k != "trace_id"},
                       current=current)


@contextmanager
def delivery_span(pipeline: str, label: str, records: Sequence[SinkRecord],
                  attempt: int | None = None) -> Iterator[None]:
    """(Tracing on.) One span per record sent to destination ``label`` in the ``with`` block
    (each a child of its record's ``traceparent``); an exception out of it marks them failed.
    (See the module docstring, 3.)"""
    from opentelemetry.trace import SpanKind

    assert _tracer is not None, "tracing.setup() first"
    spans = [_tracer.start_span(
        f"deliver {label}", context=_parent(r.headers), kind=SpanKind.PRODUCER,
        attributes=_attributes({"pipeline": pipeline, "task_id": r.task_id,
                                "destination": label, "delivery_attempt": attempt}))
        for r in records]
    try:
        yield
    except BaseException as exc:
        for span in spans:
            _failed(span, exc)
        raise
    finally:
        for span in spans:
            span.end()


def _cancelled(error: BaseException) -> bool:
    import asyncio

    return isinstance(error, asyncio.CancelledError)


def _failed(span: Span, error: BaseException) -> None:
    from opentelemetry.trace import StatusCode

    span.record_exception(error)
    span.set_status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200])
