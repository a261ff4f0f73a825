"""Group commit for HTTP submits: every submit that arrives while a batch is being written goes
into the next batch, one transaction for all of them. A submit is answered only after its
batch committed (so a 202 means durably queued); a failed batch fails each of its submits,
and nothing of it was written."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time

from sluice.connectors.embedded import Submission, submit_in
from sluice.datadir import Database
from sluice.tasks.store import TaskRecord

MAX_BATCH = 1000


def _write(items: list[Submission], conn: sqlite3.Connection) -> list[TaskRecord | None]:
    return submit_in(conn, items, time.time())


class SubmitBatcher:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: list[tuple[Submission, asyncio.Future[TaskRecord | None]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: Submission) -> TaskRecord | None:
        """The created task, or ``None`` if its id was already used in its pipeline."""
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_forever(), name="sluice-submit")
        future: asyncio.Future[TaskRecord | None] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._wake.set()
        return await future

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                write = functools.partial(_write, [item for item, _ in batch])
                try:
                    results = await self.db.run(write)
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
