"""The web console at ``/ui`` (``sluice serve``): server-rendered pages over the gateway's own
data, with its own login (the API key kept in an encrypted session cookie).

Rules:

1. It sees what the API shows the same key (:mod:`sluice.gateway.app` rule 1): a tenant's
   key its own pipelines and the hosting ones, of a hosting pipeline only its own tasks and
   dead letters and none of its totals or live figures. With no keys configured it is open,
   as the API is.
2. Who a visitor is comes from the session (:mod:`.session`), checked on every request; the
   key never travels in a URL. Pages that are not the login form, its stylesheet and the
   vendored chart library need a session.
3. Its buttons change things through the functions the API's handlers call
   (:func:`sluice.gateway.app.control`, :func:`~sluice.gateway.app.set_paused`, replays in
   :mod:`sluice.dead_letters` and :func:`sluice.gateway.tenants.replay_own`), each a POST
   form with the session's CSRF token, answered with a redirect (303) to the page to show.
4. Nothing is loaded from another origin (a Content-Security-Policy says so): the chart
   library (uPlot) is vendored under ``static/`` (``scripts/vendor-console``).
5. The live figures come from one sampler per gateway (:mod:`.live`), started with the app and
   stopped when it shuts down, which ends the open event streams.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp_session import get_session, session_middleware

from sluice.console import actions, live, session, views
from sluice.console.common import SAMPLER, WHO, filters

PREFIX = "/ui"
HERE = Path(__file__).resolve().parent
OPEN_PATHS = frozenset({"/ui/login"})
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; "
                                "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                "connect-src 'self'; frame-ancestors 'none'; "
                                "form-action 'self'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def is_console_path(path: str) -> bool:
    """Whether ``path`` is the console's: it authenticates by its session, not a header."""
    return path == PREFIX or path.startswith(PREFIX + "/")


@web.middleware
async def guard(request: web.Request, handler: views.Handler) -> web.StreamResponse:
    """Rules 2 and 3: a session for every page but the open ones; a CSRF token on every POST."""
    if request.path in OPEN_PATHS or request.path.startswith(PREFIX + "/static/"):
        response = await handler(request)
    else:
        who = await session.principal(request)
        if who is None:
            if (await get_session(request)).get(session.KEY) is not None:
                await session.forget(request)  # a key no longer valid ends its session
            if request.method == "GET" and request.path != PREFIX + "/live":
                raise web.HTTPSeeOther(PREFIX + "/login")
            return web.Response(status=401, text="log in first: " + PREFIX + "/login\n")
        if request.method == "POST":
            form = await request.post()
            if not await session.csrf_ok(request, form.get("csrf")):
                return web.Response(status=403, text="this form has expired (no valid CSRF "
                                    "token): reload the page and try again\n")
        request[WHO] = who
        response = await handler(request)
    if not response.prepared:  # the event stream sets its own before it starts
        response.headers.update(SECURITY_HEADERS)
        if not request.path.startswith(PREFIX + "/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
    return response


async def _redirect_home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(PREFIX + "/")


def add_routes(app: web.Application) -> None:
    """Mount the console on the gateway's app, under ``/ui``, with its sampler."""
    from sluice.gateway.app import GATEWAY

    ui = web.Application(middlewares=[session_middleware(session.storage()), guard])
    env = aiohttp_jinja2.setup(ui, loader=jinja2.FileSystemLoader(HERE / "templates"),
                               autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters.update(filters())
    r = ui.router
    r.add_get("/", views.overview)
    r.add_get("/login", views.login_form)
    r.add_post("/login", actions.login)
    r.add_post("/logout", actions.logout)
    r.add_get("/live", views.live_events)
    r.add_get("/pipelines/{pipeline}", views.pipeline_page)
    r.add_post("/pipelines/{pipeline}/{action:pause|resume}", actions.control_pipeline)
    r.add_post("/pipelines/{pipeline}/dead-letters/replay", actions.replay)
    r.add_get("/pipelines/{pipeline}/tasks/{task_id:[^/]+}", views.task_page)
    r.add_post("/pipelines/{pipeline}/tasks/{task_id:[^/]+}/{action:cancel|pause|resume}",
               actions.control_task)
    static = r.add_static("/static", HERE / "static", append_version=True)
    env.globals["static"] = lambda file: str(static.url_for(filename=file))
    app.router.add_get(PREFIX, _redirect_home)
    app.add_subapp(PREFIX, ui)

    app[SAMPLER] = live.Sampler(app[GATEWAY])

    async def start(app: web.Application) -> None:
        app[SAMPLER].start()

    async def stop(app: web.Application) -> None:
        await app[SAMPLER].stop()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
