"""Group commit for submits to the SQLite store: every write that arrives while a batch is
being written goes into the next batch, one transaction for all of them. A submit is answered
only after its batch committed (so a 202 means durably queued); a failed batch fails each of its
writes, and nothing of it was written.

A :class:`SubmitBatcher` belongs to one event loop (its writer is a task of that loop):
:class:`~sluice.stores.sqlite.SqliteStore` keeps one per loop. SQLite has one writer at a time,
so many small concurrent transactions would queue behind each other; PostgreSQL takes
concurrent ones and needs no batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from sluice.datadir import Database

MAX_BATCH = 1000

T = TypeVar("T")
Write = Callable[[sqlite3.Connection], Any]


def _write_all(writes: list[Write], conn: sqlite3.Connection) -> list[Any]:
    return [write(conn) for write in writes]


class SubmitBatcher:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: list[tuple[Write, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn``'s result once the transaction of its batch committed."""
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_forever(), name="sluice-submit")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((fn, future))
        self._wake.set()
        return await future

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                write_all = functools.partial(_write_all, [write for write, _ in batch])
                try:
                    results = await self.db.run(write_all)
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
