"""Where each function's tasks go: the route table, in the store, one truth for the whole
deployment (every worker and gateway of a store reads the same rows).

A function with no row, or a row of tier ``shared``, goes to its pipeline's shared queue (the
source's own queue or topic); a row of tier ``dedicated`` names the function's own queue.

Invariants:

1. A route changes only by compare-and-set on its ``version`` (a function's first row: by an
   insert that fails if one exists), so of two workers that decide to move one function at
   once exactly one moves it; the other reads the winner's row.
2. On the embedded queue a move is one transaction with the route change: the function's
   messages change queue with it, keeping their rows (task ids, delivery counts, delays) and
   their tasks (attempts, timelines), so a crash (kill -9) leaves them all on one side. A
   message in flight keeps its lease: its worker settles it by row id and lease token, which
   do not change; if the lease lapses it is visible on its new queue.
3. An embedded submit reads the route in its own transaction (``queue_in`` of each store's
   routes module), so a submit and a move are ordered: a task is on the side its route
   named when it was committed.
4. Every change writes a :class:`RouteEvent`: what happened, why, how many tasks moved; and
   each task it moves gets a note on its timeline (:func:`note_text`), in the same
   transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

DEDICATED, SHARED = "dedicated", "shared"
TIERS = (DEDICATED, SHARED, "auto")  # what a pin may ask for ("auto": back to the rules)
ISOLATED, RECLAIMED, PINNED = "isolated", "reclaimed", "pinned"



@dataclass(frozen=True, slots=True)
class Route:
    pipeline: str
    tenant: str
    function: str
    tier: str  # DEDICATED or SHARED
    queue: str | None  # the dedicated queue (None: the shared one)
    pinned: bool  # set by hand: the rules leave it alone
    reason: str | None
    version: int
    changed_at: float

    def to_json(self) -> dict[str, Any]:
        return {"tier": self.tier, "queue": self.queue, "pinned": self.pinned,
                "reason": self.reason, "since": self.changed_at}


@dataclass(frozen=True, slots=True)
class RouteEvent:
    pipeline: str
    tenant: str
    function: str
    action: str  # ISOLATED, RECLAIMED or PINNED
    tier: str
    reason: str
    moved: int  # tasks moved between queues with the change
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "tenant": self.tenant, "function": self.function,
                "action": self.action, "tier": self.tier, "reason": self.reason,
                "moved": self.moved, "at": self.at}


@dataclass(frozen=True, slots=True)
class Change:
    """A route change to make by compare-and-set (invariant 1)."""

    pipeline: str
    tenant: str
    function: str
    tier: str
    queue: str | None  # the dedicated queue
    action: str
    reason: str
    expect_version: int  # 0: no row yet
    pinned: bool = False
    # Embedded queues: move the function's waiting messages from this queue to the other
    # (invariant 2); None where the queues are a broker's.
    move_from: str | None = None
    move_to: str | None = None


class RouteStore(Protocol):
    """The route table of one store (see the module invariants)."""

    async def routes(self, pipeline: str) -> list[Route]: ...

    async def change(self, change: Change) -> tuple[Route, int] | None:
        """Make ``change`` if its route is still at ``expect_version``: (the new route, tasks
        moved); None if another change came first (invariant 1)."""
        ...

    async def backlog(self, queue: str) -> dict[tuple[str, str], int]:
        """Messages on an embedded ``queue`` (waiting or in flight), by (tenant, function)."""
        ...

    async def queued(self, pipeline: str) -> dict[str, int]:
        """Tasks of ``pipeline`` waiting to run (QUEUED or RETRYING), by tenant."""
        ...

    async def events(self, pipeline: str, limit: int = 100) -> list[RouteEvent]:
        """The latest route changes, newest first."""
        ...

    async def note(self, pipeline: str, task_ids: Sequence[str], note: str) -> None:
        """Add a note to these tasks' timelines (a forwarded task: invariant 4)."""
        ...

    async def notes(self, pipeline: str, task_id: str) -> list[tuple[float, str]]:
        """A task's notes, oldest first: (when, what)."""
        ...


def note_text(change: Change) -> str:
    """The note a moved task gets (invariant 4)."""
    where = f"to its function's own queue {change.queue}" if change.tier == DEDICATED else \
        "back to the shared queue"
    return f"{change.action}: moved {where} ({change.reason})"


def dedicated_queue(pipeline: str, tenant: str, function: str) -> str:
    """The name of a function's dedicated queue (or topic): pipeline names are unique in a
    deployment, tenant and function names are ``[A-Za-z0-9][A-Za-z0-9_.-]*``."""
    return f"{pipeline}.fn.{tenant}.{function}"
