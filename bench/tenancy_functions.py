"""The function server of bench/tenancy.py: every tenant's HTTP function in one aiohttp process.

``POST /fn/{tenant}/{function}`` answers 200 after the function's current delay (20 ms unless
changed). ``POST /fn/any`` is the same for a pipeline whose URL names no function: the tenant
and function are read from the task's JSON body (``{"tenant": ..., "function": ...}``; the
HTTP handler's binary mode sends the body as it is). A body that names a tenant and function
different from the path's is counted as a mismatch (a check of the handler's URL placeholders).

``POST /control {"tenant": "t19", "function": "fn19", "delay_ms": 2000}`` sets one function's
delay (a delay past the pipeline's timeout is a hang: the caller gives up first; the request
is answered, to nobody, when the delay ends). ``GET /stats`` gives per function the requests
started and answered, the most in flight at once, and per second (from the first request)
the answers of each function that had any.

Run alone: ``python -m bench.tenancy_functions --port 8091``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sluice.cli_common import run_async

DEFAULT_DELAY_S = 0.020


@dataclass
class Function:
    delay_s: float = DEFAULT_DELAY_S
    started: int = 0
    answered: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    per_second: dict[int, int] = field(default_factory=dict)  # second → answers


@dataclass
class Functions:
    functions: dict[str, Function] = field(default_factory=dict)
    mismatches: int = 0
    unnamed: int = 0  # /fn/any without tenant and function in the body
    changes: list[dict[str, Any]] = field(default_factory=list)
    _first: float | None = None  # time.time() of the first request

    def get(self, key: str) -> Function:
        fn = self.functions.get(key)
        if fn is None:
            fn = self.functions[key] = Function()
        return fn

    async def serve(self, tenant: str, function: str) -> web.Response:
        now = time.time()
        if self._first is None:
            self._first = now
        fn = self.get(f"{tenant}/{function}")
        fn.started += 1
        fn.in_flight += 1
        fn.max_in_flight = max(fn.max_in_flight, fn.in_flight)
        try:
            await asyncio.sleep(fn.delay_s)
        finally:
            fn.in_flight -= 1
        fn.answered += 1
        second = int(time.time() - self._first)
        fn.per_second[second] = fn.per_second.get(second, 0) + 1
        return web.json_response({"tenant": tenant, "function": function})

    async def named(self, request: web.Request) -> web.Response:
        tenant, function = request.match_info["tenant"], request.match_info["function"]
        body = await request.read()
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            doc = {}
        if isinstance(doc, dict) and (doc.get("tenant"), doc.get("function")) != (tenant,
                                                                                    function):
            self.mismatches += 1
        return await self.serve(tenant, function)

    async def any(self, request: web.Request) -> web.Response:
        try:
            doc = json.loads(await request.read())
            tenant, function = str(doc["tenant"]), str(doc["function"])
        except (ValueError, KeyError, TypeError):
            self.unnamed += 1
            return web.json_response({"error": "no tenant/function in the body"}, status=422)
        return await self.serve(tenant, function)

    async def control(self, request: web.Request) -> web.Response:
        change = await request.json()
        fn = self.get(f"{change['tenant']}/{change['function']}")
        fn.delay_s = float(change["delay_ms"]) / 1000
        self.changes.append({**change, "at": time.time()})
        return web.json_response({"delay_s": fn.delay_s})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({
            "first_request_at": self._first, "mismatches": self.mismatches,
            "unnamed": self.unnamed, "changes": self.changes,
            "functions": {k: {"started": f.started, "answered": f.answered,
                              "in_flight": f.in_flight, "max_in_flight": f.max_in_flight,
                              "delay_s": f.delay_s,
                              "per_second": {str(s): n for s, n in sorted(f.per_second.items())}}
                          for k, f in sorted(self.functions.items())}})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/fn/any", self.any)
        app.router.add_post("/fn/{tenant}/{function}", self.named)
        app.router.add_post("/control", self.control)
        app.router.add_get("/stats", self.stats)
        return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8091)
    args = parser.parse_args()
    functions = Functions()

    async def serve() -> None:
        runner = web.AppRunner(functions.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port, backlog=2048).start()
        print(json.dumps({"listening": args.port}), flush=True)
        await asyncio.Event().wait()

    run_async(serve())  # uvloop, as sluice itself


if __name__ == "__main__":
    main()
