"""The console's pages (GET): the overview, a pipeline, a task, the login form, and the live
event stream the overview's charts read.

Rules (besides the package's):

1. Every page reads the gateway's pipelines afresh (they come and go at runtime).
2. A pipeline or task the visitor may not see reads as a missing one (404), as on the API.
3. The live stream (``text/event-stream``) first sends the history the sampler holds
   (``event: history``), then each tick (``event: tick``) of the pipelines the visitor may
   see, whose figures it is shown (none of a hosting pipeline's for a tenant's key); it ends
   when the visitor's key stops being valid or the server stops.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sluice.config.model import PipelineConfig
from sluice.console import session, timeline
from sluice.console.common import gateway, not_found, render, sampler, url_pipeline, who
from sluice.console.live import Point, tick_json
from sluice.gateway import tenants
from sluice.gateway.auth import Principal
from sluice.tasks.state import TaskState
from sluice.tasks.store import DeadLetterRecord, TaskRecord

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PAGE_TASKS = 25
DEAD_LETTERS_SHOWN = 50
CURSOR_RE = re.compile(r"[0-9]{1,18}")
STATES = [s.value for s in TaskState]
CONTROLS = {"cancel": frozenset({"QUEUED", "RETRYING", "PAUSED", "RUNNING"}),
            "pause": frozenset({"QUEUED", "RETRYING"}),
            "resume": frozenset({"PAUSED"})}


def figures_shown(who: Principal, config: PipelineConfig) -> bool:
    """Whether ``who`` sees a pipeline's totals and live figures (a hosting pipeline's are
    every tenant's: only an admin's)."""
    return who.admin or config.tenancy is None


def may_pause(who: Principal, config: PipelineConfig) -> bool:
    """Only an admin pauses a hosting pipeline (the API's rule 1)."""
    return who.admin or config.tenancy is None


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    config: PipelineConfig
    paused: bool
    counts: dict[str, int]
    point: Point | None
    shown: bool


# -- login ----------------------------------------------------------------------------------

async def login_form(request: web.Request) -> web.Response:
    if gateway(request).keys is None or await session.principal(request) is not None:
        raise web.HTTPSeeOther("/ui/")
    return await render(request, "login.html", {"error": None})


# -- the overview ---------------------------------------------------------------------------

async def overview(request: web.Request) -> web.Response:
    gw, visitor = gateway(request), who(request)
    sampler(request).watched()
    counts = await gw.store.counts()
    rows = []
    for name in gw.visible_names(visitor):
        config = gw.pipelines.get(name)
        if config is None:
            continue
        shown = figures_shown(visitor, config)
        history = sampler(request).history.get(name)
        rows.append(Row(name, config, await gw.store.is_paused(name),
                        {s: counts.get((name, s), 0) for s in STATES} if shown else {},
                        history[-1] if shown and history else None, shown))
    return await render(request, "overview.html", {"rows": rows, "states": STATES})


# -- a pipeline -----------------------------------------------------------------------------

async def pipeline_page(request: web.Request) -> web.Response:
    gw, visitor = gateway(request), who(request)
    name, config = url_pipeline(request)
    if config is None:
        return await not_found(request, f"pipeline {name!r}")
    sampler(request).watched()
    q = request.query
    state = q.get("state", "").upper() or None
    if state not in (None, *STATES):
        state = None
    search = q.get("id", "").strip()[:200]
    cursor = int(q["cursor"]) if CURSOR_RE.fullmatch(q.get("cursor", "")) else None
    tasks, next_cursor = await _tasks(request, config, state, search, cursor)
    shown = figures_shown(visitor, config)
    counts = await gw.store.counts() if shown else {}
    return await render(request, "pipeline.html", {
        "config": config, "name": name, "paused": await gw.store.is_paused(name),
        "may_pause": may_pause(visitor, config), "shown": shown,
        "counts": {s: counts.get((name, s), 0) for s in STATES},
        "states": STATES, "state": state, "search": search, "tasks": tasks,
        "next_cursor": next_cursor, "letters": await _letters(request, config),
        "loop": name in gw.loops})


async def _tasks(request: web.Request, config: PipelineConfig, state: str | None,
                 search: str, cursor: int | None) -> tuple[list[TaskRecord], str | None]:
    """A page of the pipeline's tasks the visitor sees, newest first: those whose id is
    ``search`` (else whose id contains it, among the newest page), else all, of ``state``."""
    gw, visitor = gateway(request), who(request)
    wanted = TaskState(state) if state else None
    if search:
        exact = [r for r in await gw.store.find(search)
                 if r.pipeline == config.name and gw.sees_task(visitor, r)
                 and (wanted is None or r.state == wanted)]
        if exact:
            return exact, None
        page, _ = await _page(request, config, wanted, 1000, None)
        return [r for r in page if search in r.task_id][:PAGE_TASKS], None
    return await _page(request, config, wanted, PAGE_TASKS, cursor)


async def _page(request: web.Request, config: PipelineConfig, state: TaskState | None,
                limit: int, cursor: int | None) -> tuple[list[TaskRecord], str | None]:
    gw, visitor = gateway(request), who(request)
    if config.tenancy is not None and not visitor.admin:  # only its own tasks (rule 1)
        return await tenants.own_tasks(gw, visitor, config.name, state, limit, cursor,
                                       [config.name])
    records = await gw.store.list(config.name, state, limit, cursor, pipelines=[config.name])
    return records, str(records[-1].seq) if len(records) == limit and records else None


async def _letters(request: web.Request, config: PipelineConfig) -> list[DeadLetterRecord]:
    gw, visitor = gateway(request), who(request)
    if config.tenancy is not None and not visitor.admin:
        return await tenants.own_letters(gw, visitor, config, DEAD_LETTERS_SHOWN)
    return await gw.store.dead_letters(config.name, limit=DEAD_LETTERS_SHOWN)


# -- a task ---------------------------------------------------------------------------------

async def find(request: web.Request) -> tuple[PipelineConfig, TaskRecord] | None:
    """The task the URL names, if the visitor may see it (rule 2)."""
    gw, visitor = gateway(request), who(request)
    config = gw.visible(visitor, request.match_info["pipeline"])
    if config is None:
        return None
    found = [r for r in await gw.store.find(request.match_info["task_id"])
             if r.pipeline == config.name and gw.sees_task(visitor, r)]
    return (config, found[0]) if found else None


async def task_page(request: web.Request) -> web.Response:
    gw = gateway(request)
    found = await find(request)
    if found is None:
        return await not_found(request, f"task {request.match_info['task_id']!r} in pipeline "
                                        f"{request.match_info['pipeline']!r}")
    config, record = found
    now = time.time()
    bars, span_s = timeline.segments(record, now)
    letters = await gw.store.dead_letters(config.name, [record.task_id], limit=1)
    notes = (await gw.state.routes.notes(config.name, record.task_id)
             if config.tenancy is not None else [])
    data = record.to_json()
    letter = letters[0] if letters else None
    return await render(request, "task.html", {
        "config": config, "record": record, "bars": bars, "span_s": span_s,
        "letter": letter, **_payload_shown(config, data.get("payload"), letter),
        "result": None if data["result"] is None else _pretty(data["result"]),
        "deliveries": sorted((record.delivered or {}).items()), "notes": notes,
        "controls": [a for a, states in CONTROLS.items() if str(record.state) in states],
        "stages": record.timeline()})


def _pretty(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)


def _payload_shown(config: PipelineConfig, kept: dict[str, Any] | None,
                   letter: DeadLetterRecord | None) -> dict[str, Any]:
    """The payload section's context: the kept payload (``payload``, ``kept``: its JSON as
    the task API shows it), else the dead letter's whole body (``letter`` set), else why
    none is shown (``no_payload``). A dead letter's body wins over a truncated kept one."""
    if kept is not None and not (kept["truncated"] and letter is not None):
        value = kept["value"]
        return {"payload": _pretty(value) if kept["encoding"] == "json" else str(value),
                "kept": kept, "no_payload": None}
    if letter is not None:
        return {"payload": _payload(letter), "kept": None, "no_payload": None}
    if config.consumer.keep_payload_bytes == 0:
        why = ("Not kept: this pipeline keeps no payloads (consumer.keep_payload_bytes is 0); "
               "a task's payload is then kept only with its dead letter when it fails for good.")
    else:
        why = ("Not kept: this task's record has no payload (it was recorded before payloads "
               "were kept, or while consumer.keep_payload_bytes was 0).")
    return {"payload": None, "kept": None, "no_payload": why}


def _payload(letter: DeadLetterRecord) -> str:
    body = letter.message.body
    if "json" in letter.message.content_type:
        try:
            return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        except ValueError:
            pass
    return body.decode("utf-8", errors="replace")


# -- the live stream ------------------------------------------------------------------------

def _live_names(request: web.Request, visitor: Principal) -> list[str]:
    gw = gateway(request)
    asked = request.query.get("pipeline")
    names = [n for n in gw.visible_names(visitor) if asked is None or n == asked]
    return [n for n in names if (c := gw.pipelines.get(n)) is not None
            and figures_shown(visitor, c)]


async def live_events(request: web.Request) -> web.StreamResponse:
    """Rule 3."""
    source = sampler(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    queue = source.subscribe()
    try:
        await response.prepare(request)
        names = _live_names(request, who(request))
        history = {"series": source.series(names), "tick_s": source.tick_s}
        await response.write(_event("history", history, retry_ms=2000))
        while True:
            tick = await queue.get()
            if tick is None:
                break
            visitor = await session.principal(request)
            if visitor is None:  # the key was taken away
                break
            await response.write(_event("tick", tick_json(tick, _live_names(request,
                                                                            visitor))))
    except (ConnectionResetError, RuntimeError):  # the browser went away
        pass
    finally:
        source.unsubscribe(queue)
    return response


def _event(name: str, data: Any, retry_ms: int | None = None) -> bytes:
    head = f"retry: {retry_ms}\n" if retry_ms is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
