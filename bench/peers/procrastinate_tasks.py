"""bench/scale.py's procrastinate rows: a no-op task and a 20 ms sleep, for procrastinate's
worker at its defaults.

The worker is ``procrastinate --app=bench.peers.procrastinate_tasks.app worker --one-shot``
(exit once no job is left; everything else procrastinate's default: concurrency 1, LISTEN/NOTIFY
on, jobs kept after they finish). ``SLUICE_BENCH_PROCRASTINATE_DSN`` is the libpq connection
string, its own schema set with ``options=-c search_path=...``; bench/scale.py defers with the
same app through :meth:`procrastinate.App.replace_connector`.
"""

from __future__ import annotations

import asyncio
import os

from procrastinate import App, PsycopgConnector

DSN_ENV = "SLUICE_BENCH_PROCRASTINATE_DSN"
DSN = os.environ.get(DSN_ENV, "postgresql://sluice:sluice@127.0.0.1:5432/sluice")

app = App(connector=PsycopgConnector(conninfo=DSN))




async def _noop() -> None:
    return None


async def _sleep20() -> None:
    await asyncio.sleep(0.02)


# Registered by a call rather than as a decorator: without procrastinate installed mypy sees
# Any, and an untyped decorator is an error under --strict.
noop = app.task(name="noop")(_noop)
sleep20 = app.task(name="sleep20")(_sleep20)
