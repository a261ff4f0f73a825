"""The console's forms (POST): log in and out, pause or resume a pipeline, cancel, pause or
resume a task, replay dead letters.

Rules (besides the package's):

1. Each change goes through the function the API's handler calls, with the API's checks
   (the package's rule 3): what the visitor may not see is a 404 page, a hosting pipeline is
   paused only by an admin (403).
2. Each answers with a redirect (303) to the page that shows the outcome, with a message for
   it in the session (a refusal such as an illegal transition too).
"""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web

from sluice import dead_letters
from sluice.console import session, views
from sluice.console.common import flash, gateway, not_found, render, url_pipeline, who
from sluice.errors import IllegalTransition
from sluice.gateway import tenants

DONE = {"cancel": "cancelled", "pause": "paused", "resume": "resumed"}


def _pipeline_url(name: str) -> str:
    return f"/ui/pipelines/{quote(name, safe='')}"


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    if gateway(request).keys is None:
        raise web.HTTPSeeOther("/ui/")
    if not await session.csrf_ok(request, form.get("csrf")):
        return await render(request, "login.html",
                            {"error": "The form had expired; please try again."}, status=403)
    key = form.get("key")
    if not isinstance(key, str) or await session.log_in(request, key) is None:
        return await render(request, "login.html",
                            {"error": "That key is not valid here."}, status=401)
    raise web.HTTPSeeOther("/ui/")


async def logout(request: web.Request) -> web.Response:
    await session.forget(request)
    raise web.HTTPSeeOther("/ui/login")


async def control_pipeline(request: web.Request) -> web.Response:
    from sluice.gateway.app import set_paused

    gw, visitor = gateway(request), who(request)
    name, config = url_pipeline(request)
    if config is None:
        return await not_found(request, f"pipeline {name!r}")
    action = request.match_info["action"]
    if not views.may_pause(visitor, config):
        await flash(request, f"Pipeline {name} hosts many tenants' functions: only an admin "
                             f"key pauses or resumes it.", "error")
    else:
        await set_paused(gw, name, action == "pause")
        await flash(request, f"Pipeline {name} {'paused' if action == 'pause' else 'resumed'}.")
    raise web.HTTPSeeOther(_pipeline_url(name))


async def control_task(request: web.Request) -> web.Response:
    from sluice.gateway.app import control

    found = await views.find(request)
    if found is None:
        return await not_found(request, f"task {request.match_info['task_id']!r}")
    _, record = found
    action = request.match_info["action"]
    try:
        await control(gateway(request), record, action)
    except IllegalTransition as exc:
        await flash(request, f"Task {record.task_id} is {exc.current}; it cannot be "
                             f"{DONE[action]}.", "error")
    else:
        await flash(request, f"Task {record.task_id} {DONE[action]}.")
    raise web.HTTPSeeOther(f"{_pipeline_url(record.pipeline)}/tasks/"
                           f"{quote(record.task_id, safe='')}")


async def replay(request: web.Request) -> web.Response:
    """Replay one dead letter (``task_id``; ``again`` to replay it once more) or all not yet
    replayed (``all``)."""
    gw, visitor = gateway(request), who(request)
    name, config = url_pipeline(request)
    if config is None:
        return await not_found(request, f"pipeline {name!r}")
    form = await request.post()
    task_id = form.get("task_id")
    ids = [task_id] if isinstance(task_id, str) and 0 < len(task_id) <= 200 else None
    if ids is None and form.get("all") != "1":
        await flash(request, "Nothing to replay: no task id given.", "error")
        raise web.HTTPSeeOther(_pipeline_url(name) + "#dead-letters")
    again = form.get("again") == "1"
    if config.tenancy is not None and not visitor.admin:  # only its own (the API's rule 1)
        done = await tenants.replay_own(gw, visitor, config, ids, again)
    else:
        done = await dead_letters.replay(gw.store, gw.intake, config, ids, again=again)
    replayed = [r for r in done if r.replay_id is not None]
    skipped = [r for r in done if r.replay_id is None]
    if not done:
        await flash(request, "No dead letters left to replay.")
    elif len(done) == 1:
        (one,) = done
        await flash(request, f"Replayed {one.task_id} as {one.replay_id}." if one.replay_id
                    else f"{one.task_id} not replayed: {one.skipped}.",
                    "ok" if one.replay_id else "error")
    else:
        await flash(request, f"Replayed {len(replayed)} dead letters"
                             f"{f', skipped {len(skipped)}' if skipped else ''}.")
    raise web.HTTPSeeOther(_pipeline_url(name) + "#dead-letters")
