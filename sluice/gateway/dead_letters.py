"""Dead-letter routes: ``GET /v1/pipelines/{p}/dead-letters`` lists a pipeline's tasks that
failed for good (newest first, with why and whether replayed); ``POST .../dead-letters/replay``
replays some (``{"task_ids": [...]}``) or all not yet replayed (``{"all": true}``), each as a
new task (see :mod:`sluice.dead_letters`). The app's rules hold: another tenant's pipeline is a
404, every error a problem document."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from sluice import dead_letters
from sluice.config.model import PipelineConfig
from sluice.gateway import problems

MAX_LIMIT = 1000


def _pipeline(request: web.Request) -> PipelineConfig | web.Response:
    from sluice.gateway.app import GATEWAY, principal

    name = request.match_info["pipeline"]
    config = request.app[GATEWAY].visible(principal(request), name)
    return config if config is not None else problems.not_found(f"no pipeline named {name!r}")


async def list_dead_letters(request: web.Request) -> web.Response:
    from sluice.gateway.app import GATEWAY, json_response

    config = _pipeline(request)
    if isinstance(config, web.Response):
        return config
    raw = request.query.get("limit", "100")
    limit = int(raw) if raw.isdigit() and len(raw) <= 4 else 0
    if not 1 <= limit <= MAX_LIMIT:
        return problems.bad_request(f"query limit: expected an integer from 1 to {MAX_LIMIT}, "
                                    f"got {raw[:40]!r}")
    found = await request.app[GATEWAY].store.dead_letters(config.name, limit=limit)
    return json_response({"items": [d.to_json() for d in found]})


def _replay_request(body: Any) -> tuple[list[str] | None, bool] | str:
    """(task ids or None for all, again) from the request body, or what is wrong with it."""
    if not isinstance(body, dict):
        return "expected a JSON object: {\"task_ids\": [...]} or {\"all\": true}"
    unknown = sorted(set(body) - {"task_ids", "all", "again"})
    if unknown:
        return f"unknown key {unknown[0]!r}; expected task_ids, all, again"
    again = body.get("again", False)
    if not isinstance(again, bool):
        return "again: expected true or false"
    if body.get("all") is True and "task_ids" not in body:
        return None, again
    ids = body.get("task_ids")
    if ("all" in body and body["all"] is not False) or ids is None:
        return "give task_ids (a list of task ids) or all: true, not both"
    if (not isinstance(ids, list) or not ids or len(ids) > MAX_LIMIT
            or not all(isinstance(i, str) and 0 < len(i) <= 200 for i in ids)):
        return f"task_ids: expected a list of 1 to {MAX_LIMIT} task ids (strings)"
    return ids, again


async def replay_dead_letters(request: web.Request) -> web.Response:
    from sluice.gateway.app import GATEWAY, json_response

    config = _pipeline(request)
    if isinstance(config, web.Response):
        return config
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError as exc:
        return problems.bad_request(f"the body is not valid JSON: {exc}")
    asked = _replay_request(body)
    if isinstance(asked, str):
        return problems.bad_request(asked)
    task_ids, again = asked
    gw = request.app[GATEWAY]
    done = await dead_letters.replay(gw.store, gw.intake, config, task_ids, again=again)
    return json_response({"items": [
        {"task_id": r.task_id, "replay_id": r.replay_id, "skipped": r.skipped} for r in done]})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/pipelines/{pipeline}/dead-letters", list_dead_letters)
    router.add_post("/v1/pipelines/{pipeline}/dead-letters/replay", replay_dead_letters)
