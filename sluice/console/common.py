"""What the console's pages and forms share: the request's gateway, visitor and sampler, the
page renderer, and the templates' filters (times, durations, numbers, URL parts)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp_jinja2
from aiohttp import web
from aiohttp_session import get_session

from sluice.console import live, session
from sluice.gateway.auth import Principal

if TYPE_CHECKING:
    from sluice.config.model import PipelineConfig
    from sluice.gateway.app import Gateway

WHO = "sluice.console.who"
SAMPLER = web.AppKey("sluice.console.sampler", live.Sampler)
FLASH = "flash"


def gateway(request: web.Request) -> Gateway:
    from sluice.gateway.app import GATEWAY

    return request.config_dict[GATEWAY]


def who(request: web.Request) -> Principal:
    visitor: Principal = request[WHO]
    return visitor


def sampler(request: web.Request) -> live.Sampler:
    return request.config_dict[SAMPLER]


async def flash(request: web.Request, message: str, kind: str = "ok") -> None:
    """A message for the next page shown to this session (after a form's redirect)."""
    (await get_session(request))[FLASH] = [kind, message]


async def render(request: web.Request, template: str, context: dict[str, Any], *,
                 status: int = 200) -> web.Response:
    """A page: ``template`` with the visitor, the CSRF token and any flashed message."""
    s = await get_session(request)
    flashed = s.pop(FLASH, None)
    visitor = request.get(WHO)
    base = {"who": visitor, "auth": gateway(request).keys is not None,
            "csrf": await session.csrf_token(request), "flash": flashed, "path": request.path}
    return aiohttp_jinja2.render_template(template, request, {**base, **context},
                                          status=status)


async def not_found(request: web.Request, what: str) -> web.Response:
    return await render(request, "missing.html", {"what": what}, status=404)


def url_pipeline(request: web.Request) -> tuple[str, PipelineConfig | None]:
    """The URL's pipeline name, and its config if the visitor may see it (the API's rule 1)."""
    name = request.match_info["pipeline"]
    return name, gateway(request).visible(who(request), name)


def _when(at: float | None) -> str:
    if at is None:
        return "—"
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _clock(at: float | None) -> str:
    if at is None:
        return "—"
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%H:%M:%S")


def seconds_text(s: float | None) -> str:
    """A duration for people: 850 ms, 2.4 s, 3 min 5 s, 2 h 10 min."""
    if s is None or not math.isfinite(s):
        return "—"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _part(value: str) -> str:
    """A pipeline's name or a task's id as one URL path segment ('/' too: %2F)."""
    return quote(value, safe="")


def filters() -> dict[str, Callable[..., str]]:
    return {"when": _when, "clock": _clock, "duration": seconds_text, "number": _number,
            "share": _share, "part": _part}
