"""Pipelines defined at runtime: ``PUT``/``GET``/``DELETE /v1/pipelines/{name}``."""

from __future__ import annotations

from aiohttp import web


def add_routes(router: web.UrlDispatcher) -> None:
    """The definition routes (none yet)."""
