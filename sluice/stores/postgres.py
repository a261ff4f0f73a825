"""The PostgreSQL store: :class:`~sluice.stores.base.Store` on one PostgreSQL database, shared
by every worker and gateway of a deployment, on any number of machines.

Invariants (beside those of :mod:`sluice.stores.base`):

1. Every time the store writes is the database's clock (postgres_schema invariant 2); only a
   store made with ``caller_clock`` (the conformance suite) writes the caller's times.
2. :meth:`PostgresStore.submit` is one transaction: the tasks first, then the messages of those
   created (each on the queue its function's route names, read in the transaction), so a task
   id already used (the unique constraint decides, across every process) puts no message.
   Consecutive items of one pipeline and tenant are created in one statement, consecutive
   created ones with the same queue and delay put in one, in the items' order.
3. Control changes arrive through ``LISTEN`` on
   :data:`~sluice.stores.postgres_schema.CONTROL_CHANNEL`; a payload that is not a control
   change's JSON is logged and dropped, never raised into the listener.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

from sluice.stores import postgres_tasks
from sluice.stores.base import ControlEvent, ControlListener
from sluice.stores.patient import PatientSource
from sluice.stores.postgres_db import CONNECTED, DISCONNECTED, PgDatabase
from sluice.stores.postgres_definitions import PgDefinitions
from sluice.stores.postgres_messages import put_in
from sluice.stores.postgres_outbox import PgOutbox
from sluice.stores.postgres_outbox import stranded as stranded_in
from sluice.stores.postgres_queue import PgQueueSource
from sluice.stores.postgres_queue import wake as wake_in
from sluice.stores.postgres_routes import PgRoutes, queue_in
from sluice.stores.postgres_schema import CONTROL_CHANNEL

if TYPE_CHECKING:
    from sluice.connectors.base import Source
    from sluice.datadir import QueuedMessage
    from sluice.registry import Submission
    from sluice.tasks.store import Outbox, OutboxEntry, TaskRecord

log = logging.getLogger(__name__)

CONTROL_ACTIONS = frozenset({"cancel", "pause", "resume"})
PATIENCE_S = 300.0  # workers wait out a server restart or failover this long (stores.patient)


def parse_control(payload: str) -> ControlEvent | None:
    """The control change a :data:`CONTROL_CHANNEL` payload announces; ``None`` for the
    reconnection's ``""`` and for anything else that is not one (logged)."""
    if not payload:
        return None
    try:
        data = json.loads(payload)
        pipeline, action, task_id = data["pipeline"], data["action"], data.get("task_id")
    except (ValueError, TypeError, KeyError, AttributeError):
        log.warning("ignoring a malformed control notification: %.200r", payload)
        return None
    if (not isinstance(pipeline, str) or action not in CONTROL_ACTIONS
            or not (task_id is None or isinstance(task_id, str))):
        log.warning("ignoring a malformed control notification: %.200r", payload)
        return None
    return ControlEvent(pipeline, action, task_id)


class PostgresStore:
    """:class:`~sluice.stores.base.Store` on a PostgreSQL database (see the invariants)."""

    shared = True

    def __init__(self, url: str, *, caller_clock: bool = False,
                 patience_s: float = PATIENCE_S) -> None:
        self.db = PgDatabase(url)
        self.caller_clock = caller_clock
        self.patience_s = patience_s
        self._tasks = postgres_tasks.PostgresTaskStore(self.db, caller_clock=caller_clock)
        self.routes = PgRoutes(self.db, self._now)
        self.definitions = PgDefinitions(self.db, self._now)

    @property
    def url(self) -> str:
        return self.db.display_url

    @property
    def tasks(self) -> postgres_tasks.PostgresTaskStore:
        return self._tasks

    def _now(self) -> float | None:
        """The caller's time with ``caller_clock``; ``None``: the database's (invariant 1)."""
        return time.time() if self.caller_clock else None

    def source(self, queue: str, lease_s: float, poll_interval_s: float,
               ordered_keys: bool = False) -> Source:
        source = PgQueueSource(self.db, queue, lease_s, poll_interval_s, ordered_keys)
        if not self.patience_s:
            return source
        return PatientSource(source, self.patience_s, f"queue {queue} of the store {self.url}")

    def outbox(self, pipeline: str, label: str, lease_s: float,
               legacy: Sequence[str] = ()) -> Outbox:
        return PgOutbox(self.db, pipeline, label, lease_s, legacy=legacy)

    async def put(self, queue: str, messages: Sequence[QueuedMessage],
                  delay_s: float = 0.0) -> None:
        if messages:
            async with self.db.transaction() as conn:
                await put_in(conn, queue, messages, self._now(), delay_s)

    async def submit(self, queue: str, items: Sequence[Submission],
                     ) -> list[TaskRecord | None]:
        if not items:
            return []
        now = self._now()
        created: list[TaskRecord | None] = []
        async with self.db.transaction() as conn:
            for (pipeline, tenant), run in itertools.groupby(
                    items, key=lambda i: (i.pipeline, i.tenant)):
                tasks = [i.new_task() for i in run]
                created.extend(await postgres_tasks.create_in(conn, pipeline, tenant, tasks,
                                                              now))
            fresh = [i for i, record in zip(items, created, strict=True) if record is not None]
            # A hosted function's route, read in this transaction (tenancy.routes invariant 3).
            routed: dict[tuple[str, str, str], str] = {}
            for i in fresh:
                if i.function is not None and (i.pipeline, i.tenant, i.function) not in routed:
                    routed[i.pipeline, i.tenant, i.function] = await queue_in(
                        conn, i.pipeline, i.tenant, i.function) or queue
            for (target, delay_s), same in itertools.groupby(fresh, key=lambda i: (
                    routed.get((i.pipeline, i.tenant, i.function or ""), queue), i.delay_s)):
                await put_in(conn, target, [i.message for i in same], now, delay_s)
        return created

    async def wake(self, queue: str, task_id: str) -> None:
        await wake_in(self.db, queue, task_id)

    async def put_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        if entries:
            async with self.db.transaction() as conn:
                await postgres_tasks.put_outbox_in(conn, entries, self._now())

    async def stranded(self, pipeline: str, taken: Collection[str]) -> dict[str, int]:
        return await stranded_in(self.db, pipeline, taken)

    async def watch_control(self, listener: ControlListener) -> Callable[[], None]:
        def on_payload(payload: str) -> None:
            if payload in (CONNECTED, DISCONNECTED):
                listener(ControlEvent("", "listening" if payload == CONNECTED else "deaf"))
                return
            event = parse_control(payload)
            if event is not None:
                listener(event)

        return await self.db.listen(CONTROL_CHANNEL, on_payload)

    async def migrate(self) -> tuple[int, int]:
        return await self.db.migrate()

    async def close(self) -> None:
        await self.db.close()
