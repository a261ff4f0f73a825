"""The aiohttp application: trigger URLs, the task API, pipeline control, health and metrics.

Rules every handler keeps:

1. A caller sees only its tenant's pipelines and tasks; anything else is a 404 that reads the
   same as a missing one (admins see all). A hosting pipeline (one with ``tenancy``) is seen
   by every tenant, but of its tasks each tenant sees only its own (:meth:`Gateway.sees_task`);
   only an admin pauses it (a tenant's key: 403). Its routes are in :mod:`.tenants`.
2. A submit answers 202 only after the task and its message are committed together; a store
   that cannot be written answers 503 with Retry-After, and nothing of that submit is kept.
3. Every error is ``application/problem+json`` (RFC 9457) naming what was wrong.
4. A submit to a hosting pipeline is for a tenant (the key's; an admin's ``Tenant`` header, else
   the pipeline's) and a function (the URL's, else ``default``), and passes that tenant's
   quotas first (:mod:`sluice.tenancy.quotas`): beyond them 429 with ``Retry-After``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import yaml
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sluice import console, intake, metrics, metrics_server, tracing
from sluice.config.model import PipelineConfig
from sluice.consumer.loop import ConsumerLoop
from sluice.datadir import QueuedMessage
from sluice.errors import IllegalTransition, Misconfigured, SourceError, TaskNotFound
from sluice.gateway import definitions, problems, tenants
from sluice.gateway.auth import ADMIN, KeyRing, Principal
from sluice.intake import Intake
from sluice.message import is_json
from sluice.netpolicy import NetworkPolicy
from sluice.stores.base import Store
from sluice.tasks.state import TaskState
from sluice.tasks.store import TaskRecord, TaskStore
from sluice.tenancy.config import DEFAULT_FUNCTION
from sluice.tenancy.quotas import SubmitQuotas

if TYPE_CHECKING:
    from sluice.supervisor import Supervisor

log = logging.getLogger(__name__)

# Shipped inside the package (schemas/openapi.yaml in the repository links here).
OPENAPI_FILE = Path(__file__).resolve().parent / "openapi.yaml"
TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=/-]{0,199}$")
CURSOR_RE = re.compile(r"[0-9]{1,18}")  # a task's sequence number (openapi.yaml: listTasks)
LIMIT_RE = re.compile(r"[0-9]{1,4}")
MAX_DELAY_S = 366 * 86400.0
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Gateway:
    """What the routes work on: the served pipelines, the store, and this process's loops."""

    pipelines: dict[str, PipelineConfig]
    state: Store  # the process's store (--store): tasks, queues, outboxes
    keys: KeyRing | None = None
    loops: dict[str, ConsumerLoop] = field(default_factory=dict)
    max_body_bytes: int = 1 << 20
    # What a tenant's pipelines (PUT with a tenant's key) may reach (sluice.netpolicy).
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    # The process's running loops (sluice.supervisor): told of each PUT and DELETE.
    supervisor: Supervisor | None = None
    # Deleted definitions: name -> tenant, so that their tasks stay readable (rule 1).
    retired: dict[str, str] = field(default_factory=dict)
    store: TaskStore = field(init=False)  # the state's task records
    intake: Intake = field(init=False)  # the submit service
    quotas: dict[str, SubmitQuotas] = field(init=False)  # of each hosting pipeline (rule 4)

    def __post_init__(self) -> None:
        self.store = self.state.tasks
        self.intake = Intake(self.state)
        self.quotas = {name: SubmitQuotas(name, c.tenancy, self.state.routes)
                       for name, c in self.pipelines.items() if c.tenancy is not None}

    async def close(self) -> None:
        await self.intake.close()

    def visible(self, who: Principal, name: str) -> PipelineConfig | None:
        """The pipeline if ``who`` may see it: its tenant's, or a hosting one (rule 1)."""
        config = self.pipelines.get(name)
        if config is None or not (config.tenancy is not None or who.sees(config.tenant)):
            return None
        return config

    def visible_names(self, who: Principal) -> list[str]:
        return [n for n in self.pipelines if self.visible(who, n) is not None]

    def sees_task(self, who: Principal, record: TaskRecord) -> bool:
        """Whether ``who`` may see and control a task: of a hosting pipeline only its own
        tenant's (rule 1)."""
        config = self.visible(who, record.pipeline)
        if config is None:  # a deleted definition's tasks: its tenant's, still (rule 1)
            tenant = self.retired.get(record.pipeline)
            return tenant is not None and record.pipeline not in self.pipelines and \
                who.sees(tenant)
        return who.admin or config.tenancy is None or record.tenant == who.tenant


GATEWAY = web.AppKey("gateway", Gateway)


def _dumps(value: Any) -> str:
    return json.dumps(value) + "\n"  # a final newline: friendlier to curl and shell pipes


def json_response(data: Any, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)
PRINCIPAL = "sluice.principal"


def status_url(record_pipeline: str, task_id: str) -> str:
    return f"/v1/tasks/{quote(task_id, safe='')}?pipeline={quote(record_pipeline, safe='')}"


def task_json(record: TaskRecord) -> dict[str, Any]:
    return {**record.to_json(), "status_url": status_url(record.pipeline, record.task_id)}


# -- middleware -----------------------------------------------------------------------------

@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[GATEWAY].max_body_bytes
        return problems.problem(413, "too-large", "Request body too large",
                                f"the body is larger than {limit} bytes "
                                "(the server's --max-body-bytes)")
    except web.HTTPNotFound:
        return problems.not_found(f"no route for {request.method} {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        return problems.problem(405, "method-not-allowed", "Method not allowed",
                                f"{request.method} is not allowed on {request.path}",
                                headers={"Allow": ", ".join(sorted(exc.allowed_methods))})
    except SourceError as exc:
        return source_problem(exc)


def source_problem(exc: SourceError) -> web.Response:
    """A source's or the store's refusal as a problem: a transient one 503 with Retry-After
    (the same request may succeed later), a permanent one 422 (it never will)."""
    if exc.retriable:
        log.warning("unavailable: %s", exc)
        retry_after_s = max(1, math.ceil(exc.retry_after_s or 1))
        return problems.unavailable(f"unavailable, retry later: {exc}", retry_after_s)
    if isinstance(exc, Misconfigured):
        return problems.problem(422, "misconfigured", "Misconfigured",
                                f"refused by the configuration, retrying will not help: {exc}")
    return problems.problem(422, "unsupported", "Not supported",
                            f"not supported, retrying will not help: {exc}")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    if gw.keys is None or request.path in PUBLIC_PATHS:
        request[PRINCIPAL] = ADMIN
        return await handler(request)
    if console.is_console_path(request.path):
        return await handler(request)  # the console's own login (a session, not a header)
    who = gw.keys.principal(request.headers.get("Authorization"))
    if who is None:
        return problems.problem(401, "unauthorized", "Unauthorized",
                                "send a valid API key as 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": 'Bearer realm="sluice"'})
    if request.path == "/metrics" and not who.admin:
        return problems.problem(403, "forbidden", "Forbidden", "/metrics needs an admin key")
    request[PRINCIPAL] = who
    return await handler(request)


def principal(request: web.Request) -> Principal:
    who: Principal = request[PRINCIPAL]
    return who


# -- submit ---------------------------------------------------------------------------------

async def submit_task(request: web.Request, pipeline: str | None = None) -> web.Response:
    gw = request.app[GATEWAY]
    name = pipeline or request.match_info["pipeline"]
    config = gw.visible(principal(request), name)
    if config is None:
        return problems.not_found(f"no pipeline named {name!r}")
    return await submit_to(request, config)


async def submit_to(request: web.Request, config: PipelineConfig,
                    function: str | None = None) -> web.Response:
    """Submit the request's task to ``config`` (a hosting pipeline's: for ``function``, else
    ``default``; rules 2 and 4). The caller has checked that the pipeline is visible."""
    gw = request.app[GATEWAY]
    name = config.name
    if not intake.submittable(config):
        return problems.problem(501, "not-implemented", "Not implemented",
                                f"submitting to a {config.source.type!r} source over HTTP is "
                                "not supported yet")
    tenant = None
    if config.tenancy is not None:  # rule 4: whose task, and within its quotas
        function = function or DEFAULT_FUNCTION
        admitted = await tenants.admit(request, gw.quotas[name], config)
        if isinstance(admitted, web.Response):
            return admitted
        tenant = admitted
    task_id = request.headers.get("Task-Id")
    if task_id is not None and not TASK_ID_RE.fullmatch(task_id):
        metrics.SUBMITS.labels(name, "invalid").inc()
        return problems.bad_request(
            "header Task-Id: expected 1-200 characters of letters, digits and ._:@+=/- "
            f"starting with a letter or digit, got {task_id[:60]!r}")
    delay_s = 0.0
    if "Delay-S" in request.headers:
        raw = request.headers["Delay-S"]
        try:
            delay_s = float(raw)
        except ValueError:
            delay_s = -1.0
        if not (0 <= delay_s <= MAX_DELAY_S) or not math.isfinite(delay_s):
            metrics.SUBMITS.labels(name, "invalid").inc()
            return problems.bad_request(f"header Delay-S: expected a number of seconds from 0 "
                                        f"to {MAX_DELAY_S:.0f}, got {raw[:40]!r}")
        if delay_s and not intake.delays(config):
            metrics.SUBMITS.labels(name, "invalid").inc()
            return problems.bad_request(f"header Delay-S: a {config.source.type} source has no "
                                        "delayed delivery; submit without Delay-S")
    content_type = request.headers.get("Content-Type", "application/octet-stream")
    body = await request.read()
    if is_json(content_type):
        try:
            json.loads(body)
        except ValueError as exc:
            metrics.SUBMITS.labels(name, "invalid").inc()
            return problems.bad_request(f"the body is declared {content_type} but is not valid "
                                        f"JSON: {exc}")
    tid = task_id or intake.new_task_id()
    # Tracing (issue 17 item 3, sluice.tracing): the message carries the trace context in its
    # headers traceparent/tracestate: with tracing on, the submit span's (a child of the
    # request's traceparent, else a new trace's root); off (NO_SPAN), a copy of the request's.
    with (tracing.submit_span(request.headers, name, tid, tenant, function) if tracing.ENABLED
          else tracing.NO_SPAN) as span:
        message = QueuedMessage(tid, body, content_type, request.headers.get("Task-Key"),
                                span.carry(request.headers))
        try:
            (created,) = await gw.intake.submit(config, [message], delay_s=delay_s,
                                                received_at=time.time(), tenant=tenant,
                                                function=function)
        except SourceError as exc:
            if not exc.retriable:  # refused for good (e.g. a pipeline that tracks no tasks)
                metrics.SUBMITS.labels(name, "refused").inc()
                return span.answered(source_problem(exc))
            metrics.SUBMITS.labels(name, "unavailable").inc()
            return span.answered(problems.unavailable(
                f"the queue is unavailable; nothing was submitted: {exc}"))
        url = status_url(config.name, tid)
        if created is None:
            metrics.SUBMITS.labels(name, "duplicate").inc()
            try:
                existing = await gw.store.get(tid, config.name)
                # Another tenant's task in a hosting pipeline: not the caller's to see.
                state = (str(existing.state) if gw.sees_task(principal(request), existing)
                         else "UNKNOWN")
            except TaskNotFound:
                state = "UNKNOWN"
            return span.answered(problems.problem(
                409, "duplicate-task", "Task id already used",
                f"task id {tid!r} is already used in pipeline {config.name!r}",
                task_id=tid, state=state, status_url=url))
        metrics.SUBMITS.labels(name, "accepted").inc()
        accepted = {"task_id": tid, "pipeline": config.name, "state": "QUEUED",
                    "status_url": url}
        if tenant is not None:
            accepted.update(tenant=tenant, function=function or DEFAULT_FUNCTION)
        return span.answered(json_response(accepted, status=202, headers={"Location": url}))


@web.middleware
async def alias_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A POST to a pipeline's ``trigger.http.path`` that no route takes: a submit to that
    pipeline. The aliases are those of the pipelines served now (pipelines defined at runtime
    come and go), so they are looked up per request, never added as routes."""
    if request.method == "POST" and request.match_info.http_exception is not None:
        gw = request.app[GATEWAY]
        for name, config in gw.pipelines.items():
            if config.trigger_path == request.path:
                return await submit_task(request, name)
    return await handler(request)


# -- tasks ----------------------------------------------------------------------------------

async def find_task(request: web.Request) -> TaskRecord | web.Response:
    gw = request.app[GATEWAY]
    task_id = request.match_info["task_id"]
    who = principal(request)
    wanted = request.query.get("pipeline")
    found = [r for r in await gw.store.find(task_id) if gw.sees_task(who, r)]
    if wanted is not None:
        found = [r for r in found if r.pipeline == wanted]
    if not found:
        return problems.not_found(f"no task with id {task_id!r}")
    if len(found) > 1:
        return problems.problem(
            409, "ambiguous-task", "Task id used in several pipelines",
            f"task id {task_id!r} is used in pipelines "
            f"{', '.join(r.pipeline for r in found)}; add ?pipeline=",
            status_urls=[status_url(r.pipeline, r.task_id) for r in found])
    return found[0]


async def get_task(request: web.Request) -> web.Response:
    found = await find_task(request)
    if isinstance(found, web.Response):
        return found
    data = task_json(found)
    config = request.app[GATEWAY].pipelines.get(found.pipeline)
    if config is not None and config.tenancy is not None:  # a hosted task's moves, noted
        notes = await request.app[GATEWAY].state.routes.notes(found.pipeline, found.task_id)
        data["timeline"] = sorted(
            [*data["timeline"], *({"stage": "note", "at": at, "note": note}
                                  for at, note in notes)], key=lambda e: e["at"] or 0)
    return json_response(data)


async def list_tasks(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    who = principal(request)
    visible = gw.visible_names(who)
    q = request.query
    pipeline = q.get("pipeline")
    if pipeline is not None and pipeline not in visible:
        return problems.not_found(f"no pipeline named {pipeline!r}")
    state = None
    if "state" in q:
        try:
            state = TaskState(q["state"].upper())
        except ValueError:
            return problems.bad_request(f"query state: expected one of "
                                        f"{', '.join(s.value for s in TaskState)}, "
                                        f"got {q['state'][:40]!r}")
    raw_limit = q.get("limit", "50")
    limit = int(raw_limit) if LIMIT_RE.fullmatch(raw_limit) else 0
    if not 1 <= limit <= 1000:
        return problems.bad_request(f"query limit: expected an integer from 1 to 1000, "
                                    f"got {q.get('limit', '')[:40]!r}")
    cursor = None
    if "cursor" in q:
        if not CURSOR_RE.fullmatch(q["cursor"]):
            return problems.bad_request("query cursor: expected the next_cursor of a previous "
                                        f"page (1-18 digits), got {q['cursor'][:40]!r}")
        cursor = int(q["cursor"])
    hosting = [n for n in ([pipeline] if pipeline else visible)
               if gw.pipelines[n].tenancy is not None]
    if hosting and not who.admin:  # only the caller's tasks of a hosting pipeline (rule 1)
        records, next_cursor = await tenants.own_tasks(gw, who, pipeline, state, limit, cursor,
                                                       visible)
    else:
        records = await gw.store.list(pipeline, state, limit, cursor, pipelines=visible)
        next_cursor = str(records[-1].seq) if len(records) == limit and records else None
    return json_response({"tasks": [task_json(r) for r in records],
                              "next_cursor": next_cursor})


CONTROL = {"cancel": TaskState.CANCELLED, "pause": TaskState.PAUSED, "resume": TaskState.QUEUED}
DONE_WORDS = {"cancel": "cancelled", "pause": "paused", "resume": "resumed"}


async def control_task(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    found = await find_task(request)
    if isinstance(found, web.Response):
        return found
    action = request.match_info["action"]
    try:
        record = await control(gw, found, action)
    except IllegalTransition as exc:
        return problems.problem(409, "illegal-transition", "Illegal transition",
                                f"task {found.task_id!r} is {exc.current}; it cannot be "
                                f"{DONE_WORDS[action]}",
                                state=exc.current, task_id=found.task_id)
    return json_response(task_json(record))


async def control(gw: Gateway, found: TaskRecord, action: str) -> TaskRecord:
    """Cancel, pause or resume (``action``, a key of :data:`CONTROL`) the task ``found``, which
    the caller may see: the store's transition (:class:`IllegalTransition` when its state has
    none), then this process's running attempt cancelled, or a resumed task's message woken.
    The API and the console (:mod:`sluice.console`) both control tasks through this."""
    record = await gw.store.transition(found.pipeline, found.task_id, CONTROL[action],
                                       time.time())
    if action == "cancel" and found.state == TaskState.RUNNING:
        loop = gw.loops.get(found.pipeline)
        if loop is not None:
            loop.cancel_attempt(found.task_id)
    config = gw.pipelines.get(found.pipeline)
    if action == "resume" and config is not None:  # (a deleted pipeline's: when it is back)
        await gw.intake.wake(config, found.task_id)
    return record


# -- pipelines ------------------------------------------------------------------------------

async def list_pipelines(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    out = []
    counts = await gw.store.counts()
    who = principal(request)
    pipelines = gw.pipelines  # as they are now: definitions come and go while this awaits
    for name in gw.visible_names(who):
        config = pipelines[name]
        # A hosting pipeline's counts are every tenant's: a tenant's key is not shown them.
        shown = who.admin or config.tenancy is None
        out.append({"name": name, "tenant": config.tenant, "source": config.source.type,
                    "paused": await gw.store.is_paused(name),
                    "counts": {str(state): counts[name, str(state)] for state in TaskState
                               if shown and counts.get((name, str(state)))},
                    "submit_url": f"/v1/pipelines/{name}/tasks",
                    "trigger_path": config.trigger_path})
    return json_response({"pipelines": out})


async def control_pipeline(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    name = request.match_info["pipeline"]
    who = principal(request)
    config = gw.visible(who, name)
    if config is None:
        return problems.not_found(f"no pipeline named {name!r}")
    if config.tenancy is not None and not who.admin:
        return problems.problem(403, "forbidden", "Forbidden",
                                f"pipeline {name!r} hosts many tenants' functions: only an "
                                "admin key pauses or resumes it")
    paused = request.match_info["action"] == "pause"
    await set_paused(gw, name, paused)
    return json_response({"name": name, "paused": paused})


async def set_paused(gw: Gateway, name: str, paused: bool) -> None:
    """Pause or resume the pipeline ``name`` (the caller checked that it may, rule 1) in the
    store; this process's workers hold it from their next fetch (the loop's rule 7). The API
    and the console (:mod:`sluice.console`) both pause and resume through this."""
    await gw.store.set_paused(name, paused, time.time())
    loop = gw.loops.get(name)
    if loop is not None:
        loop.set_paused(paused)


# -- operations -----------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    problems_found = []
    try:
        await gw.store.ping()
    except Exception as exc:
        problems_found.append(f"task store: {exc}")
    for name, loop in gw.loops.items():
        try:
            await loop.source.pending()
        except Exception as exc:
            problems_found.append(f"source of {name}: {exc}")
    if problems_found:
        return problems.unavailable("not ready: " + "; ".join(problems_found), 5)
    return json_response({"status": "ready"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body = await metrics_server.refresh(gw.store, gw.pipelines, gw.loops)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


_openapi_cache: dict[str, Any] = {}


async def openapi(request: web.Request) -> web.Response:
    if not _openapi_cache:
        _openapi_cache.update(yaml.safe_load(OPENAPI_FILE.read_text(encoding="utf-8")))
    return json_response(_openapi_cache)


# -- the app --------------------------------------------------------------------------------

def make_app(gateway: Gateway) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, auth_middleware, alias_middleware],
                          client_max_size=gateway.max_body_bytes)
    app[GATEWAY] = gateway
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_endpoint)
    r.add_get("/openapi.json", openapi)
    r.add_get("/v1/pipelines", list_pipelines)
    r.add_post("/v1/pipelines/{pipeline}/tasks", submit_task)
    r.add_post("/v1/pipelines/{pipeline}/{action:pause|resume}", control_pipeline)
    tenants.add_routes(r)  # functions, routes and events; dead letters (one tenant's, rule 1)
    r.add_get("/v1/tasks", list_tasks)
    # A task id is one path segment ('/' inside it travels as %2F, as status_url writes it):
    # /v1/tasks/{id}/cancel is then never also a GET of a task named "{id}/cancel", and a
    # 405 there allows exactly POST.
    r.add_post("/v1/tasks/{task_id:[^/]+}/{action:cancel|pause|resume}", control_task)
    r.add_get("/v1/tasks/{task_id:[^/]+}", get_task)
    definitions.add_routes(r)  # PUT/GET/DELETE /v1/pipelines/{name}
    console.add_routes(app)  # /ui
    # Trigger aliases (trigger.http.path): alias_middleware, as pipelines come and go.
    return app


def alias_conflicts(pipelines: Sequence[PipelineConfig]) -> list[str]:
    seen: dict[str, str] = {}
    out = []
    for config in pipelines:
        path = config.trigger_path
        if path is None:
            continue
        if path in seen:
            out.append(f"trigger.http.path {path!r} is used by both {seen[path]!r} and "
                       f"{config.name!r}")
        seen[path] = config.name
    return out
