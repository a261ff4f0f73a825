"""Hosting pipelines' routes (pipelines with ``tenancy``: many tenants' functions on one source).

- ``POST /v1/pipelines/{p}/functions/{f}/tasks``: submit a task of function ``f`` (as
  ``POST /v1/pipelines/{p}/tasks``, which submits the function ``default``).
- ``GET /v1/tenants/{t}/functions[?pipeline=]``: the tenant's functions: tier, queue, backlog,
  in flight, limit, error share, p99 (:func:`sluice.tenancy.status.functions`).
- ``POST /v1/tenants/{t}/functions/{f}/pin``: ``{"tier": "dedicated"|"shared"|"auto",
  "pipeline": p}`` moves a function by hand (``auto``: back to the rules).
- ``GET /v1/tenants/{t}/events[?pipeline=&limit=]``: the tenant's route changes, newest first.
- The dead-letter routes, which show a tenant's key only its own dead letters of a hosting
  pipeline (and replay only those); other callers get :mod:`.dead_letters` as it is.

The app's rules hold (:mod:`.app`): a tenant's key reaches only its own tenant (another is a
404 like a missing one), an admin key every tenant; every error is a problem document. Whose
a submit is, and its quotas, are decided here too (:func:`admit`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sluice import dead_letters as replays
from sluice.config.model import PipelineConfig
from sluice.gateway import dead_letters, problems
from sluice.gateway.auth import Principal
from sluice.intake import TENANT_RE
from sluice.tasks.state import TaskState
from sluice.tasks.store import DeadLetterRecord, TaskRecord
from sluice.tenancy.config import FUNCTION_PATTERN, TENANT_HEADER
from sluice.tenancy.quotas import SubmitQuotas

if TYPE_CHECKING:
    from sluice.gateway.app import Gateway

FUNCTION_RE = re.compile(FUNCTION_PATTERN)
TIERS = ("dedicated", "shared", "auto")
SCAN_PAGE = 1000  # tasks read at a time when a tenant's own are picked out of a hosting pipeline
SCAN_PAGES = 10  # pages read for one page of a tenant's tasks (then next_cursor continues)


def _gateway(request: web.Request) -> tuple[Gateway, Principal]:
    from sluice.gateway.app import GATEWAY, principal

    return request.app[GATEWAY], principal(request)


def _json(data: Any, status: int = 200) -> web.Response:
    from sluice.gateway.app import json_response

    return json_response(data, status=status)


# -- submits --------------------------------------------------------------------------------

async def admit(request: web.Request, quotas: SubmitQuotas,
                config: PipelineConfig) -> str | web.Response:
    """The tenant a submit to the hosting pipeline ``config`` is for (a tenant's key: its own;
    an admin: the ``Tenant`` header, else the pipeline's), once its quotas let it in; else the
    problem to answer (400, 403, 429 with ``Retry-After``)."""
    from sluice import metrics

    _, who = _gateway(request)
    asked = request.headers.get("Tenant")
    if asked is not None and not TENANT_RE.fullmatch(asked):
        metrics.SUBMITS.labels(config.name, "invalid").inc()
        return problems.bad_request(f"header Tenant: expected 1-63 lowercase letters, digits "
                                    f"and ._- starting with a letter or digit, got "
                                    f"{asked[:64]!r}")
    if who.admin:
        tenant = asked or config.tenant
    elif asked is not None and asked != who.tenant:
        return problems.problem(403, "forbidden", "Forbidden",
                                f"header Tenant: this key submits for tenant {who.tenant!r} "
                                f"only, not {asked!r}")
    else:
        tenant = str(who.tenant)
    refusal = await quotas.refusal(tenant)
    if refusal is not None:
        metrics.SUBMITS.labels(config.name, "throttled").inc()
        wait_s = max(1, math.ceil(refusal.retry_after_s))
        return problems.problem(429, "too-many-requests", "Too many requests",
                                f"{refusal.detail}; nothing was submitted, retry after "
                                f"{wait_s} s", headers={"Retry-After": str(wait_s)},
                                tenant=tenant, limit=refusal.limit)
    return tenant


def _hosting(gw: Gateway, who: Principal, name: str) -> PipelineConfig | web.Response:
    config = gw.visible(who, name)
    if config is None:
        return problems.not_found(f"no pipeline named {name!r}")
    if config.tenancy is None:
        return problems.not_found(f"pipeline {name!r} hosts no functions (it has no tenancy "
                                  f"key); submit to /v1/pipelines/{name}/tasks")
    return config


def _bad_function(function: str) -> web.Response | None:
    if FUNCTION_RE.fullmatch(function):
        return None
    return problems.bad_request(f"function {function[:80]!r}: expected 1-63 letters, digits "
                                "and ._- starting with a letter or digit")


async def submit_function(request: web.Request) -> web.Response:
    from sluice.gateway.app import submit_to

    gw, who = _gateway(request)
    config = _hosting(gw, who, request.match_info["pipeline"])
    if isinstance(config, web.Response):
        return config
    function = request.match_info["function"]
    bad = _bad_function(function)
    if bad is not None:
        return bad
    return await submit_to(request, config, function)


# -- a tenant's tasks -----------------------------------------------------------------------

async def own_tasks(gw: Gateway, who: Principal, pipeline: str | None, state: TaskState | None,
                    limit: int, cursor: int | None,
                    visible: Sequence[str]) -> tuple[list[TaskRecord], str | None]:
    """A page of the tasks ``who`` sees (of a hosting pipeline only its own tenant's), newest
    first, and the cursor of the next page: read :data:`SCAN_PAGE` at a time, at most
    :data:`SCAN_PAGES` pages for one answer (then the page may be short, its cursor goes on)."""
    out: list[TaskRecord] = []
    before = cursor
    for _ in range(SCAN_PAGES):
        page = await gw.store.list(pipeline, state, SCAN_PAGE, before, pipelines=visible)
        for record in page:
            if gw.sees_task(who, record):
                out.append(record)
                if len(out) == limit:
                    return out, str(record.seq)
        if len(page) < SCAN_PAGE:
            return out, None
        before = page[-1].seq
    return out, None if before is None else str(before)


async def _tenant_of(gw: Gateway, letter: DeadLetterRecord) -> str | None:
    tenant = (letter.message.headers or {}).get(TENANT_HEADER)
    if tenant is not None:
        return tenant
    found = [r for r in await gw.store.find(letter.task_id) if r.pipeline == letter.pipeline]
    return found[0].tenant if found else None


async def _own_letters(gw: Gateway, who: Principal, config: PipelineConfig,
                       task_ids: Sequence[str] | None = None,
                       replayed: bool = True) -> list[DeadLetterRecord]:
    """The caller's dead letters of a hosting pipeline, newest first: of ``task_ids``, else
    of the newest :data:`~.dead_letters.MAX_LIMIT` (without those replayed unless
    ``replayed``)."""
    limit = len(task_ids) if task_ids else dead_letters.MAX_LIMIT
    found = await gw.store.dead_letters(config.name, task_ids, limit=limit, replayed=replayed)
    return [d for d in found if await _tenant_of(gw, d) == who.tenant]


def _one_tenant(gw: Gateway, who: Principal, name: str) -> PipelineConfig | None:
    """The hosting pipeline ``name`` when a tenant's key asks for its dead letters (only its
    own are shown); None: the plain dead-letter routes answer."""
    config = gw.visible(who, name)
    return config if config is not None and config.tenancy is not None and not who.admin \
        else None


async def list_dead_letters(request: web.Request) -> web.Response:
    gw, who = _gateway(request)
    config = _one_tenant(gw, who, request.match_info["pipeline"])
    if config is None:
        return await dead_letters.list_dead_letters(request)
    raw = request.query.get("limit", "100")
    limit = int(raw) if raw.isdigit() and len(raw) <= 4 else 0
    if not 1 <= limit <= dead_letters.MAX_LIMIT:
        return problems.bad_request(f"query limit: expected an integer from 1 to "
                                    f"{dead_letters.MAX_LIMIT}, got {raw[:40]!r}")
    mine = await own_letters(gw, who, config, limit)
    return _json({"items": [d.to_json() for d in mine]})


async def replay_dead_letters(request: web.Request) -> web.Response:
    gw, who = _gateway(request)
    config = _one_tenant(gw, who, request.match_info["pipeline"])
    if config is None:
        return await dead_letters.replay_dead_letters(request)
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError as exc:
        return problems.bad_request(f"the body is not valid JSON: {exc}")
    asked = dead_letters._replay_request(body)
    if isinstance(asked, str):
        return problems.bad_request(asked)
    task_ids, again = asked
    done = await replay_own(gw, who, config, task_ids, again)
    return _json({"items": [{"task_id": r.task_id, "replay_id": r.replay_id,
                             "skipped": r.skipped} for r in done]})


async def replay_own(gw: Gateway, who: Principal, config: PipelineConfig,
                     task_ids: Sequence[str] | None, again: bool) -> list[replays.Replayed]:
    """Replay a tenant's own dead letters of the hosting pipeline ``config``: ``task_ids``
    (another tenant's: skipped as if missing), else all of its own not yet replayed. The API
    and the console (:mod:`sluice.console`) both replay a tenant's dead letters through this."""
    asked_ids = None if task_ids is None else list(dict.fromkeys(task_ids))
    mine = [d.task_id for d in await _own_letters(gw, who, config, asked_ids,
                                                  replayed=task_ids is not None)]
    done = {r.task_id: r for r in (await replays.replay(gw.store, gw.intake, config, mine,
                                                        again=again) if mine else [])}
    return [done.get(task_id) or replays.Replayed(task_id, None, "no dead letter with this "
                                                  "task id")
            for task_id in (mine if asked_ids is None else asked_ids)]


async def own_letters(gw: Gateway, who: Principal, config: PipelineConfig,
                      limit: int) -> list[DeadLetterRecord]:
    """A tenant's own dead letters of the hosting pipeline ``config``, newest first (what
    ``GET .../dead-letters`` shows its key), at most ``limit``."""
    return (await _own_letters(gw, who, config))[:limit]


# -- functions, pins, events ----------------------------------------------------------------

def _tenant(request: web.Request) -> tuple[Gateway, Principal, str] | web.Response:
    gw, who = _gateway(request)
    tenant = request.match_info["tenant"]
    if not who.admin and tenant != who.tenant:
        return problems.not_found(f"no tenant named {tenant!r}")
    return gw, who, tenant


def _pipelines(gw: Gateway, who: Principal,
               asked: str | None) -> list[PipelineConfig] | web.Response:
    """The hosting pipelines a tenant's view covers: ``asked``, else every one served."""
    if asked is not None:
        config = _hosting(gw, who, asked)
        return config if isinstance(config, web.Response) else [config]
    return [c for c in gw.pipelines.values() if c.tenancy is not None]


async def list_functions(request: web.Request) -> web.Response:
    from sluice.tenancy import status

    found = _tenant(request)
    if isinstance(found, web.Response):
        return found
    gw, who, tenant = found
    configs = _pipelines(gw, who, request.query.get("pipeline"))
    if isinstance(configs, web.Response):
        return configs
    rows: list[dict[str, Any]] = []
    for config in configs:
        loop = gw.loops.get(config.name)
        hosting = loop.hosting if loop is not None else None
        rows.extend(await status.functions(gw.state, config, tenant, hosting))
    return _json({"tenant": tenant, "functions": rows})


async def pin_function(request: web.Request) -> web.Response:
    from sluice.tenancy import status

    found = _tenant(request)
    if isinstance(found, web.Response):
        return found
    gw, who, tenant = found
    function = request.match_info["function"]
    bad = _bad_function(function)
    if bad is not None:
        return bad
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError as exc:
        return problems.bad_request(f"the body is not valid JSON: {exc}")
    if not isinstance(body, dict) or set(body) - {"tier", "pipeline"} or "tier" not in body:
        return problems.bad_request('expected a JSON object {"tier": "dedicated" | "shared" | '
                                    '"auto", "pipeline": "<name>"} (pipeline optional when '
                                    "the server hosts one pipeline of functions)")
    tier, asked = body["tier"], body.get("pipeline")
    if tier not in TIERS:
        return problems.bad_request(f"tier: expected one of {', '.join(TIERS)}, got "
                                    f"{str(tier)[:40]!r}")
    if asked is not None and not isinstance(asked, str):
        return problems.bad_request("pipeline: expected a pipeline's name (a string)")
    configs = _pipelines(gw, who, asked)
    if isinstance(configs, web.Response):
        return configs
    if not configs:
        return problems.not_found("this server hosts no functions (no pipeline has a "
                                  "tenancy key)")
    if len(configs) > 1:
        return problems.bad_request("pipeline: give the pipeline, one of "
                                    f"{', '.join(sorted(c.name for c in configs))}")
    try:
        route = await status.pin(gw.state, configs[0], tenant, function, tier)
    except ValueError as exc:
        return problems.bad_request(str(exc))
    return _json(route)


async def list_events(request: web.Request) -> web.Response:
    from sluice.tenancy import status

    found = _tenant(request)
    if isinstance(found, web.Response):
        return found
    gw, who, tenant = found
    raw = request.query.get("limit", "100")
    limit = int(raw) if raw.isdigit() and len(raw) <= 4 else 0
    if not 1 <= limit <= 1000:
        return problems.bad_request(f"query limit: expected an integer from 1 to 1000, got "
                                    f"{raw[:40]!r}")
    configs = _pipelines(gw, who, request.query.get("pipeline"))
    if isinstance(configs, web.Response):
        return configs
    events: list[dict[str, Any]] = []
    for config in configs:
        events.extend(await status.events(gw.state, config, tenant, limit))
    events.sort(key=lambda e: float(e.get("at") or 0), reverse=True)
    return _json({"tenant": tenant, "events": events[:limit]})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/pipelines/{pipeline}/functions/{function}/tasks", submit_function)
    router.add_get("/v1/pipelines/{pipeline}/dead-letters", list_dead_letters)
    router.add_post("/v1/pipelines/{pipeline}/dead-letters/replay", replay_dead_letters)
    router.add_get("/v1/tenants/{tenant}/functions", list_functions)
    router.add_post("/v1/tenants/{tenant}/functions/{function}/pin", pin_function)
    router.add_get("/v1/tenants/{tenant}/events", list_events)
