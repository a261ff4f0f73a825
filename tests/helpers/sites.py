"""A real HTTP server on one loopback address that records what it was asked for (the SSRF and
network policy tests: which requests reached which address)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Site:
    """Answers every path with ``answer`` as JSON (or a 307 to ``redirect_to``), recording the
    paths it was asked for in ``hits``."""

    host: str
    redirect_to: str | None = None  # answer every request with 307 to this URL
    answer: Any = field(default_factory=lambda: {"ok": True})
    hits: list[str] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        await request.read()
        if self.redirect_to is not None:
            return web.Response(status=307, headers={"Location": self.redirect_to})
        return web.json_response(self.answer)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
