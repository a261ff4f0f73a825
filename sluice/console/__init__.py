"""The web console at ``/ui`` (``sluice serve``): server-rendered pages over the gateway's own
data, with its own login (the API key kept in an encrypted session cookie)."""

from __future__ import annotations

from aiohttp import web

PREFIX = "/ui"


def is_console_path(path: str) -> bool:
    """Whether ``path`` is the console's: it authenticates by its session, not a header."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def add_routes(app: web.Application) -> None:
    """The console's pages (none yet)."""
