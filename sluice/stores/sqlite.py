"""The SQLite store: :class:`~sluice.stores.base.Store` on one machine's data directory
(:mod:`sluice.datadir`: one database file, WAL), the default.

Several processes on one machine may share it (the file's locks order their writes); processes
on other machines may not (``shared`` is False): use a PostgreSQL store for that. Control
changes are not pushed (store invariant 4): workers see a cancel at their next lease extension
and a pause within their pause poll.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

from sluice.connectors.embedded import EmbeddedSource, put_in, submit_in, wake_in
from sluice.datadir import Database
from sluice.stores.base import ControlListener
from sluice.stores.group_commit import SubmitBatcher
from sluice.stores.sqlite_definitions import SqliteDefinitions
from sluice.stores.sqlite_routes import SqliteRoutes
from sluice.tasks.sqlite import SqliteTaskStore, put_outbox
from sluice.tasks.sqlite_outbox import SqliteOutbox, stranded_in

if TYPE_CHECKING:
    from sluice.connectors.base import Source
    from sluice.datadir import QueuedMessage
    from sluice.registry import Submission
    from sluice.tasks.store import Outbox, OutboxEntry, TaskRecord


class SqliteStore:
    """:class:`~sluice.stores.base.Store` on a :class:`~sluice.datadir.Database`."""

    shared = False
    patience_s = 0.0

    def __init__(self, db: Database) -> None:
        self.db = db
        self._tasks = SqliteTaskStore(db)
        self.routes = SqliteRoutes(db)
        self.definitions = SqliteDefinitions(db)
        self._batchers: dict[asyncio.AbstractEventLoop, SubmitBatcher] = {}

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db.path}"

    @property
    def tasks(self) -> SqliteTaskStore:
        return self._tasks

    def source(self, queue: str, lease_s: float, poll_interval_s: float,
               ordered_keys: bool = False) -> Source:
        return EmbeddedSource(self.db, queue, lease_s, poll_interval_s, ordered_keys)

    def outbox(self, pipeline: str, label: str, lease_s: float,
               legacy: Sequence[str] = ()) -> Outbox:
        return SqliteOutbox(self.db, pipeline, label, lease_s, legacy=legacy)

    async def put(self, queue: str, messages: Sequence[QueuedMessage],
                  delay_s: float = 0.0) -> None:
        await self.db.run(lambda c: put_in(c, queue, messages, time.time(), delay_s))

    async def submit(self, queue: str, items: Sequence[Submission],
                     ) -> list[TaskRecord | None]:
        return await self._batcher().run(lambda c: submit_in(c, queue, items, time.time()))

    def _batcher(self) -> SubmitBatcher:
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            for old in [lp for lp in self._batchers if lp.is_closed()]:
                del self._batchers[old]  # a CLI command's finished event loop
            batcher = self._batchers[loop] = SubmitBatcher(self.db)
        return batcher

    async def wake(self, queue: str, task_id: str) -> None:
        await self.db.run(lambda c: wake_in(c, queue, task_id, time.time()))

    async def put_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        await self.db.run(lambda c: put_outbox(c, entries, time.time()))

    async def stranded(self, pipeline: str, taken: Collection[str]) -> dict[str, int]:
        return await self.db.read(lambda c: stranded_in(c, pipeline, taken))

    async def watch_control(self, listener: ControlListener) -> Callable[[], None]:
        return _nothing

    async def migrate(self) -> tuple[int, int]:
        return await self.db.run(self.db.migrate_in)

    async def close(self) -> None:
        batcher = self._batchers.pop(asyncio.get_running_loop(), None)
        if batcher is not None:
            await batcher.close()


def _nothing() -> None:
    return None
