"""Errors as RFC 9457 problem details (``application/problem+json``)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

PROBLEM_TYPE = "application/problem+json"
_BASE = "https://sluice.dev/problems/"


def problem(status: int, slug: str, title: str, detail: str, *,
            headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    body = {"type": _BASE + slug, "title": title, "status": status, "detail": detail, **extra}
    return web.Response(status=status, text=json.dumps(body) + "\n", content_type=PROBLEM_TYPE,
                        headers=headers)


def not_found(what: str) -> web.Response:
    return problem(404, "not-found", "Not found", what)


def bad_request(detail: str, **extra: Any) -> web.Response:
    return problem(400, "bad-request", "Bad request", detail, **extra)


def unavailable(detail: str, retry_after_s: int = 1) -> web.Response:
    return problem(503, "unavailable", "Service unavailable", detail,
                   headers={"Retry-After": str(retry_after_s)})
