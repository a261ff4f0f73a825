"""The baseline of bench/gateway.py: a bare aiohttp handler that answers 202 with a small JSON
body and does nothing else (no storage, no validation)."""

from __future__ import annotations

import argparse
import uuid

from aiohttp import web


async def accept(request: web.Request) -> web.Response:
    await request.read()
    task_id = request.headers.get("Task-Id") or uuid.uuid4().hex
    return web.json_response({"task_id": task_id, "state": "QUEUED"}, status=202)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/v1/pipelines/{pipeline}/tasks", accept)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None,
                backlog=1024)


if __name__ == "__main__":
    main()
