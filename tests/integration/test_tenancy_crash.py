"""A worker killed (SIGKILL) in the middle of moving a function's backlog to its dedicated
queue: the move is one transaction with the route change, so after the kill the route and
every message are as before it; the next worker isolates the function again and every task
runs to success exactly once. On the data directory's SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from sluice import runtime
from sluice.stores import open_store
from sluice.tasks.state import TaskState
from tests.conftest import ROOT, subprocess_env
from tests.integration import test_tenancy as hosted
from tests.integration.test_tenancy import store_url  # noqa: F401  (a fixture)

# The child moves the backlog inside the store's own transaction, then waits before the
# commit (SQLite: in Database._transaction; PostgreSQL: its event insert is a long sleep).
CHILD = """
import asyncio, sys, time
from sluice import runtime
from sluice.stores import open_store
from sluice.stores.sqlite_routes import change_in
from sluice.tenancy.routes import Change
url = sys.argv[1]
change = Change("fns", "x", "flood", "dedicated", "fns.fn.x.flood", "isolated", "test", 0,
                move_from="fns", move_to="fns.fn.x.flood")
store = open_store(url)
if url.startswith("sqlite"):
    def move(conn):
        change_in(conn, change, time.time())
        print("moved", flush=True)
        time.sleep(60)
    store.db.run_sync(move)
else:
    from sluice.stores import postgres_routes
    # (a short sleep: the server notices the client gone, and rolls back, once it ends)
    postgres_routes.EVENT = ("SELECT pg_sleep(4), $1::text, $2::text, $3::text, $4::text,"
                             " $5::text, $6::text, $7::int, $8::float8")
    async def main():
        print("moved", flush=True)
        await store.routes.change(change)
    asyncio.run(main())
"""


def test_a_kill_in_the_middle_of_a_move_loses_and_repeats_nothing(
        store_url: str, tmp_path: Path) -> None:  # noqa: F811
    text = hosted.pipeline("""  isolation: {backlog: 200, check_interval_s: 0.2}""")

    async def before() -> list[str]:
        store = open_store(store_url)
        ids = await hosted.submit(store, [(t, f) for i in range(400) for t, f in (
            ("x", "flood"), ("y", "calm")) if f == "flood" or i % 4 == 0])
        await store.close()
        return ids

    ids = asyncio.run(before())
    child = subprocess.Popen([sys.executable, "-c", CHILD, store_url], cwd=ROOT,
                             env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"moved", child.stderr
        time.sleep(1.0)  # PostgreSQL: the move statement has run; the transaction is open
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()

    async def after() -> None:
        store = open_store(store_url)
        assert await store.routes.routes("fns") == []  # the route change did not happen
        assert await store.routes.events("fns") == []
        assert await store.routes.backlog("fns") == {("x", "flood"): 400, ("y", "calm"): 100}
        assert await store.routes.backlog("fns.fn.x.flood") == {}
        loop = hosted.build(text, store_url, tmp_path)
        stop = asyncio.Event()
        runner = asyncio.create_task(runtime.run_pipelines([loop], stop))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(hosted.RUNS) < len(ids):
            await asyncio.sleep(0.2)
        stop.set()
        await runner
        found = await hosted.states(store)
        assert Counter(found.values()) == {TaskState.SUCCEEDED: 500}
        assert set(hosted.RUNS) == set(ids) and set(hosted.RUNS.values()) == {1}
        events = await store.routes.events("fns")
        assert [e.action for e in events] == ["isolated"] and events[0].moved > 0, events
        await store.close()

    asyncio.run(after())
