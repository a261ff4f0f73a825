"""A backend simulator for tests and benchmarks: an aiohttp "function" that serves at most
``capacity`` requests at once, each taking ``service_s``; above capacity it answers 429 at
once (with ``Retry-After`` if ``retry_after_s`` is set). Capacity can be changed while it runs:
``POST /control {"capacity": N}``; ``GET /stats`` returns counters and a per-second history,
its seconds counted from the first request (so the first second is a whole one), each with the
capacity integrated over it (the ideal goodput of a second is ``capacity_s / service_s``).

Run alone: ``python -m bench.backend --port 8090 --capacity 64 --service-ms 100``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

from aiohttp import web

from sluice.cli_common import run_async


@dataclass
class Backend:
    capacity: int = 64
    service_s: float = 0.1
    retry_after_s: float | None = None
    in_flight: int = 0
    served: int = 0
    rejected: int = 0
    max_in_flight: int = 0
    seen_ids: set[str] = field(default_factory=set)
    # One entry per second from the first request to /fn (seconds without requests included):
    # served, rejected, capacity (at the second's end) and capacity_s (capacity integrated over
    # the second: a second with a change of capacity counts each part at its own capacity).
    history: list[dict[str, float]] = field(default_factory=list)
    _started: float | None = None  # time.monotonic() of the first request
    _served_now: int = 0
    _rejected_now: int = 0
    _capacity_s_now: float = 0.0
    _capacity_since: float = 0.0  # since when capacity has held, within the current second

    def _tick(self) -> None:
        """Close every second that has ended since the last call."""
        if self._started is None:
            return
        now = time.monotonic()
        while now - self._started >= len(self.history) + 1:
            end = self._started + len(self.history) + 1
            self._capacity_s_now += self.capacity * (end - self._capacity_since)
            self.history.append({"t": len(self.history), "served": self._served_now,
                                 "rejected": self._rejected_now, "capacity": self.capacity,
                                 "capacity_s": round(self._capacity_s_now, 4)})
            self._served_now = self._rejected_now = 0
            self._capacity_s_now, self._capacity_since = 0.0, end

    def set_capacity(self, capacity: int) -> None:
        self._tick()
        if self._started is not None:
            now = time.monotonic()
            self._capacity_s_now += self.capacity * (now - self._capacity_since)
            self._capacity_since = now
        self.capacity = capacity

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self._started is None:
            self._started = self._capacity_since = time.monotonic()
        self._tick()
        if self.in_flight >= self.capacity:
            self.rejected += 1
            self._rejected_now += 1
            headers = {"Retry-After": f"{self.retry_after_s:g}"} if self.retry_after_s else None
            return web.Response(status=429, text="over capacity", headers=headers)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.service_s)
        finally:
            self.in_flight -= 1
        self.served += 1
        self._served_now += 1
        self._tick()
        return web.json_response({"echo_bytes": len(body),
                                  "id": request.headers.get("ce-id")})

    async def control(self, request: web.Request) -> web.Response:
        change = await request.json()
        if "capacity" in change:
            self.set_capacity(int(change["capacity"]))
        if "service_ms" in change:
            self.service_s = float(change["service_ms"]) / 1000
        if "retry_after_s" in change:
            self.retry_after_s = change["retry_after_s"]
        return web.json_response({"capacity": self.capacity, "service_s": self.service_s})

    async def stats(self, request: web.Request) -> web.Response:
        self._tick()
        return web.json_response({"served": self.served, "rejected": self.rejected,
                                  "in_flight": self.in_flight, "capacity": self.capacity,
                                  "max_in_flight": self.max_in_flight,
                                  "history": self.history})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/fn", self.handle)
        app.router.add_post("/control", self.control)
        app.router.add_get("/stats", self.stats)
        return app


async def start(backend: Backend, port: int) -> web.AppRunner:
    runner = web.AppRunner(backend.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--capacity", type=int, default=64)
    parser.add_argument("--service-ms", type=float, default=100.0)
    parser.add_argument("--retry-after-s", type=float, default=None)
    args = parser.parse_args()
    backend = Backend(args.capacity, args.service_ms / 1000, args.retry_after_s)

    async def serve() -> None:
        await start(backend, args.port)
        print(json.dumps({"listening": args.port}), flush=True)
        await asyncio.Event().wait()

    run_async(serve())  # uvloop, as sluice itself: the simulator's own overhead stays small


if __name__ == "__main__":
    main()
