"""Pipelines defined at runtime: ``PUT``/``GET``/``DELETE /v1/pipelines/{name}``
(:mod:`sluice.definitions`; the process runs them through :mod:`sluice.supervisor`).

Rules:

1. A body is YAML (``application/yaml``, ``text/yaml``, ``application/x-yaml``) or JSON
   (``application/json``), validated as a pipeline file is
   (:func:`sluice.config.load.parse_pipeline`; its "file" is ``store:<name>``); every issue is
   answered at once, 422 ``application/problem+json`` with ``errors``: each issue's key path,
   line, column and message. The handler's code is not imported here: the workers that run it
   check it (and log what they cannot run).
2. The body's ``name`` is the URL's; a body without one gets the URL's (``name: ...`` put in
   front of a YAML text, a JSON object's first key), so that every worker reads the same name
   from the stored text.
3. An admin key puts any pipeline, unrestricted. A tenant's key puts its own tenant's only (a
   body naming another tenant: 403), restricted (definitions invariant 3): no hosting pipeline,
   no server environment, and nothing that reaches the operator's network
   (:func:`sluice.netpolicy.pipeline_refusals` under the gateway's policy): 422. A name whose
   definition is another tenant's is taken (409, naming no one); ``GET``/``DELETE`` of it read
   as a missing one (404, gateway rule 1).
4. A name one of the process's files defines is the file's (definitions invariant 4): ``PUT``
   and ``DELETE`` 409; ``GET`` answers the file's text, marked ``from: file``. A
   ``trigger.http.path`` another pipeline uses: 409.
5. A ``PUT`` answers once the definition is stored and this process serves it (201 created,
   200 replaced, with the definition's record and version); a ``DELETE`` (204) once this
   process stops taking submits for it. Other processes of the store follow within about a
   second (:mod:`sluice.supervisor` rule 4). The tasks of a deleted pipeline are kept.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import yaml
from aiohttp import web

from sluice.config.load import parse_pipeline
from sluice.config.model import PipelineConfig
from sluice.definitions import JSON, YAML, Definition
from sluice.errors import ConfigError, ConfigIssue
from sluice.gateway import problems
from sluice.supervisor import FILE, definition_file

if TYPE_CHECKING:
    from sluice.gateway.app import Gateway
    from sluice.gateway.auth import Principal

YAML_TYPES = frozenset({"application/yaml", "text/yaml", "application/x-yaml"})
JSON_TYPES = frozenset({"application/json"})
APPLIED_WAIT_S = 5.0  # how long a PUT or DELETE waits for this process to follow it (rule 5)


def add_routes(router: web.UrlDispatcher) -> None:
    """``PUT``, ``GET`` and ``DELETE /v1/pipelines/{pipeline}``."""
    router.add_put("/v1/pipelines/{pipeline}", put_pipeline)
    router.add_get("/v1/pipelines/{pipeline}", get_pipeline)
    router.add_delete("/v1/pipelines/{pipeline}", delete_pipeline)


def _gateway(request: web.Request) -> Gateway:
    from sluice.gateway.app import GATEWAY

    return request.app[GATEWAY]


def _who(request: web.Request) -> Principal:
    from sluice.gateway.app import principal

    return principal(request)


def issue_json(issue: ConfigIssue) -> dict[str, Any]:
    return {"path": issue.path, "line": issue.line, "col": issue.col,
            "message": issue.message, "file": issue.file}


def invalid(issues: list[ConfigIssue], *, status: int = 422,
            slug: str = "invalid-pipeline", title: str = "Invalid pipeline") -> web.Response:
    detail = "; ".join(str(i) for i in issues[:5]) + (" ..." if len(issues) > 5 else "")
    return problems.problem(status, slug, title, detail,
                            errors=[issue_json(i) for i in issues])


def file_pipeline(gw: Gateway, name: str) -> PipelineConfig | None:
    """The pipeline of that name if one of the process's files defines it (rule 4)."""
    supervisor = gw.supervisor
    if supervisor is not None:
        return supervisor.files.get(name) if supervisor.origin(name) == FILE else None
    config: PipelineConfig | None = gw.pipelines.get(name)
    return config if config is not None and config.path is not None and \
        not str(config.path).startswith("store:") else None


def _document(text: str, fmt: str) -> dict[str, Any] | None:
    """The body's top-level mapping (``None``: not one; the loader reports why, at its line)."""
    try:
        doc = json.loads(text) if fmt == JSON else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        return None
    return doc if isinstance(doc, dict) else None


def _named(text: str, fmt: str, doc: dict[str, Any] | None,
           name: str) -> tuple[str, int] | None:
    """The text with the URL's name put in when the document has none (rule 2), and how many
    lines were put in front; ``None``: the text as it is."""
    if doc is None or "name" in doc:
        return None
    if fmt == JSON:
        return json.dumps({"name": name, **doc}, indent=2) + "\n", 0
    return f"name: {json.dumps(name)}\n{text}", 1


def _shifted(issues: list[ConfigIssue], lines: int) -> list[ConfigIssue]:
    """Issues at the caller's lines when ``lines`` were put in front of its text."""
    if not lines:
        return issues
    return [ConfigIssue(i.file, max(1, i.line - lines), i.col, i.path, i.message)
            for i in issues]


async def put_pipeline(request: web.Request) -> web.Response:
    gw = _gateway(request)
    who = _who(request)
    name = request.match_info["pipeline"]
    where = definition_file(name)
    media = request.content_type.lower()
    if media in YAML_TYPES:
        fmt = YAML
    elif media in JSON_TYPES:
        fmt = JSON
    else:
        return problems.problem(415, "unsupported-media-type", "Unsupported media type",
                                f"send the pipeline as application/yaml (or text/yaml) or "
                                f"application/json, not {media or 'no Content-Type'}")
    try:
        text = (await request.read()).decode("utf-8")
    except UnicodeDecodeError:
        return problems.bad_request("the body is not UTF-8 text")
    if file_pipeline(gw, name) is not None:
        return problems.problem(409, "pipeline-of-a-file", "Pipeline defined by a file",
                                f"pipeline {name!r} is defined by a file of the server; "
                                "change the file (a file wins over a definition)")
    defs = gw.state.definitions
    existing: Definition | None = await defs.get(name)
    if (existing is not None and not who.sees(existing.tenant)) or (
            existing is None and name in gw.pipelines and not who.sees(
                gw.pipelines[name].tenant)):
        return problems.problem(409, "name-taken", "Name taken",
                                f"the pipeline name {name!r} is taken; choose another "
                                "(pipeline names are global in a store)")
    restricted = not who.admin
    doc = _document(text, fmt)
    named = _named(text, fmt, doc, name)
    stored_text, shift = named if named is not None else (text, 0)
    try:
        config = parse_pipeline(stored_text, where, check_code=False,
                                trusted=not restricted)
    except ConfigError as exc:
        return invalid(_shifted(exc.issues, shift))
    if config.name != name:
        return invalid(_shifted([config.issue(("name",), f"the body names pipeline "
                                               f"{config.name!r}, the URL {name!r}: they "
                                               "must be the same")], shift))
    tenant = config.tenant
    if restricted:
        declared = doc.get("tenant") if doc is not None else None
        if declared is not None and declared != who.tenant:
            return invalid(_shifted([config.issue(("tenant",), f"a key of tenant "
                                                  f"{who.tenant!r} puts pipelines of its own "
                                                  "tenant only")], shift),
                           status=403, slug="forbidden", title="Forbidden")
        assert who.tenant is not None  # not an admin: a tenant's key
        tenant = who.tenant
        refusals: list[ConfigIssue] = []
        if config.tenancy is not None:
            refusals.append(config.issue(("tenancy",), "only an admin key puts a hosting "
                                         "pipeline (one with tenancy)"))
        from sluice.netpolicy import pipeline_refusals

        refusals.extend(await pipeline_refusals(config, gw.network))
        if refusals:
            return invalid(_shifted(refusals, shift), slug="refused-pipeline",
                           title="Pipeline refused")
    if config.trigger_path is not None:
        for other, each in gw.pipelines.items():
            if other != name and each.trigger_path == config.trigger_path:
                return problems.problem(
                    409, "trigger-path-taken", "Trigger path taken",
                    f"trigger.http.path {config.trigger_path!r} is used by pipeline "
                    f"{other!r}" if who.sees(each.tenant) else
                    f"trigger.http.path {config.trigger_path!r} is used by another pipeline")
    stored = await defs.put(name, tenant, stored_text, fmt,
                            put_by="admin" if who.admin else str(who.tenant),
                            restricted=restricted)
    supervisor = gw.supervisor
    if supervisor is not None:
        supervisor.poke()
        await _until(lambda: supervisor.done.get(name, 0) >= stored.version)
    url = f"/v1/pipelines/{quote(name, safe='')}"
    data = {**stored.to_json(), "from": "store"}
    if existing is None:
        return _json(data, status=201, headers={"Location": url})
    return _json(data)


async def get_pipeline(request: web.Request) -> web.StreamResponse:
    gw = _gateway(request)
    who = _who(request)
    name = request.match_info["pipeline"]
    as_json = "application/json" in request.headers.get("Accept", "")
    config = file_pipeline(gw, name)
    if config is not None:
        if not who.sees(config.tenant):
            return problems.not_found(f"no pipeline named {name!r}")
        try:
            text = config.path.read_text(encoding="utf-8") if config.path else ""
        except OSError as exc:
            return problems.unavailable(f"the file of pipeline {name!r} cannot be read: "
                                        f"{exc.strerror or exc}", 5)
        if as_json:
            return _json({"name": name, "tenant": config.tenant, "from": "file",
                          "file": str(config.path), "body": text})
        return web.Response(text=text, content_type="application/yaml")
    definition = await gw.state.definitions.get(name)
    if definition is None or not who.sees(definition.tenant):
        return problems.not_found(f"no pipeline named {name!r}")
    if as_json:
        return _json({**definition.to_json(), "from": "store", "body": definition.body})
    # A JSON text is YAML too: one media type for the text, whatever was put.
    return web.Response(text=definition.body, content_type="application/yaml")


async def delete_pipeline(request: web.Request) -> web.Response:
    gw = _gateway(request)
    who = _who(request)
    name = request.match_info["pipeline"]
    config = file_pipeline(gw, name)
    if config is not None and who.sees(config.tenant):
        return problems.problem(409, "pipeline-of-a-file", "Pipeline defined by a file",
                                f"pipeline {name!r} is defined by a file of the server; "
                                "remove the file and restart to remove it")
    defs = gw.state.definitions
    definition = await defs.get(name)
    if definition is None or not who.sees(definition.tenant):
        return problems.not_found(f"no pipeline named {name!r}")
    if await defs.delete(name) is None:
        return problems.not_found(f"no pipeline named {name!r}")
    supervisor = gw.supervisor
    if supervisor is not None:
        supervisor.poke()
        await _until(lambda: name not in gw.pipelines)
    return web.Response(status=204)


async def _until(done: Any, timeout_s: float = APPLIED_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _json(data: Any, *, status: int = 200,
          headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers,
                             dumps=lambda v: json.dumps(v) + "\n")
