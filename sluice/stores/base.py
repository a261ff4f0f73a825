"""The store seam: :class:`Store`, everything a process keeps in its state database.

One store holds the embedded queues, the task records, the result outboxes, the dead letters
and the pause flags; it is chosen by URL (:mod:`sluice.stores`): ``sqlite:///path/sluice.db``
(one machine, the default: ``<data-dir>/sluice.db``) or ``postgresql://user:pw@host/db``
(shared by every worker and gateway of a deployment).

Generic code (runtime, gateway, CLI, the embedded source and sink, submitters) talks to a
:class:`Store` and never to a database driver. ``tests/conformance/test_task_store.py`` runs
the :class:`~sluice.tasks.store.TaskStore` contract over every store; the connector suites run
the embedded source over every store.

Invariants:

1. :meth:`Store.submit` creates the tasks and puts their messages on the queue in one
   transaction: a 202 means both are committed, and a task id already used in its pipeline
   puts nothing (the unique constraint decides, across every process of the store).
2. A store that cannot be reached raises :class:`~sluice.errors.Unavailable` (the gateway
   answers 503 + Retry-After, workers retry); one that cannot be used until its settings or
   schema change raises :class:`~sluice.errors.Misconfigured`.
3. The schema is created on first use; a store whose schema is newer than this sluice refuses
   to run (:class:`~sluice.errors.Misconfigured`), one that is older is migrated forward
   (``sluice store migrate`` does it ahead of time; idempotent).
4. Control changes (a task cancelled, a pipeline paused or resumed) are announced to every
   process of the store through :meth:`Store.watch_control` where the store can push them
   (PostgreSQL ``NOTIFY``); a store that cannot (SQLite) leaves them to the workers' lease
   extensions and pause polls, which see them within a lease third and 0.25 s.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sluice.connectors.base import Source
    from sluice.datadir import QueuedMessage
    from sluice.definitions import DefinitionStore
    from sluice.registry import Submission
    from sluice.tasks.store import Outbox, OutboxEntry, TaskRecord, TaskStore
    from sluice.tenancy.routes import RouteStore


@dataclass(frozen=True, slots=True)
class ControlEvent:
    """A control change announced to every process of a store (invariant 4)."""

    pipeline: str  # "" for the two below
    # "cancel" (a task), "pause" or "resume" (the whole pipeline); "listening": changes are
    # announced from now on, "deaf": they may be missed until "listening" comes again.
    action: str
    task_id: str | None = None


ControlListener = Callable[[ControlEvent], None]


class Store(Protocol):
    """One state database (see the module invariants)."""

    @property
    def url(self) -> str:
        """Where it is, for logs and messages (a password is never shown)."""
        ...

    @property
    def shared(self) -> bool:
        """Whether processes on other machines may use it (PostgreSQL: yes; SQLite: no)."""
        ...

    @property
    def patience_s(self) -> float:
        """How long workers wait out an outage of the store before they stop
        (:mod:`sluice.stores.patient`); 0: they stop at once (a local file that cannot be
        written is not an outage that passes)."""
        ...

    @property
    def tasks(self) -> TaskStore:
        """The task records (:class:`~sluice.tasks.store.TaskStore`)."""
        ...

    @property
    def routes(self) -> RouteStore:
        """Where hosted functions' tasks go (:mod:`sluice.tenancy.routes`)."""
        ...

    @property
    def definitions(self) -> DefinitionStore:
        """The pipelines defined at runtime (:mod:`sluice.definitions`)."""
        ...

    def source(self, queue: str, lease_s: float, poll_interval_s: float,
               ordered_keys: bool = False) -> Source:
        """The embedded source of one named queue: a visibility-timeout queue (the semantics
        are numbered in :mod:`sluice.connectors.embedded`), waiting out an outage of the store
        for ``patience_s``."""
        ...

    def outbox(self, pipeline: str, label: str, lease_s: float,
               legacy: Sequence[str] = ()) -> Outbox:
        """The result records waiting for one destination (by its label) of a pipeline."""
        ...

    async def put(self, queue: str, messages: Sequence[QueuedMessage],
                  delay_s: float = 0.0) -> None:
        """Put messages on a queue (the embedded sink: results, dead letters)."""
        ...

    async def submit(self, queue: str, items: Sequence[Submission],
                     ) -> list[TaskRecord | None]:
        """Create each task QUEUED and put its message on ``queue``, in one transaction
        (invariant 1); ``None`` where the task id was already used in its pipeline."""
        ...

    async def wake(self, queue: str, task_id: str) -> None:
        """Make the message of a resumed task, held back while it was paused, visible now."""
        ...

    async def put_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        """Put result records in their outboxes without a task (an untracked pipeline)."""
        ...

    async def stranded(self, pipeline: str, taken: Collection[str]) -> dict[str, int]:
        """Outboxes of ``pipeline`` with records waiting that no destination in ``taken``
        reads (:func:`sluice.tasks.sqlite_outbox.stranded_in`), with their record counts."""
        ...

    async def watch_control(self, listener: ControlListener) -> Callable[[], None]:
        """Call ``listener`` for each control change announced by any process (invariant 4);
        returns the function that stops it. A store that cannot push returns at once."""
        ...

    async def migrate(self) -> tuple[int, int]:
        """Bring the schema to this sluice's version (invariant 3): (version before, after)."""
        ...

    async def close(self) -> None: ...
