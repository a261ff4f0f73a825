"""Dead letters: list a pipeline's tasks that failed for good, and replay them.

A task that fails for good keeps its message in the task store (``dead_letters`` table, written
in the transaction that records it FAILED), whatever its dead-letter destination is, so a
replay needs no access to that destination.

Invariants:

1. A replay is a **new task**: id ``<old id>.replay-<n>`` (``n`` counts the replays of that
   task, from 1), the same body, content type and key, and the header ``sluice-replay-of``
   naming the old id. The old task stays FAILED (a final state is never left: a finished task
   never runs again), and its dead letter records the replay's id (``replayed_as``).
2. A dead letter already replayed is replayed again only when asked (``again``); replaying
   "all" takes only those not yet replayed.
3. The replay is submitted like any task (:mod:`sluice.intake`); the link is written after the
   submit succeeded. A crash between the two leaves a replay without its link: a second
   replay then picks the next free ``n`` (task ids are never reused).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from sluice.config.model import PipelineConfig
from sluice.datadir import QueuedMessage
from sluice.intake import Intake
from sluice.tasks.store import TaskStore

REPLAY_OF_HEADER = "sluice-replay-of"
MAX_REPLAY_BATCH = 1000  # dead letters replayed by one call with "all"
# Headers the dead letter added to the message; a replay starts without them.
_FAILURE_HEADERS = ("sluice-pipeline", "sluice-task-id", "sluice-error-type",
                    "sluice-error-message", "sluice-attempts", "sluice-reason",
                    "sluice-failed-at", REPLAY_OF_HEADER)


@dataclass(frozen=True, slots=True)
class Replayed:
    task_id: str  # the dead-lettered task
    replay_id: str | None  # the new task; None: not replayed
    skipped: str | None = None  # why not


async def replay(store: TaskStore, intake: Intake, config: PipelineConfig,
                 task_ids: Sequence[str] | None, *, again: bool = False) -> list[Replayed]:
    """Replay the given dead letters (``None``: every one not yet replayed, up to
    ``MAX_REPLAY_BATCH``), submitting through ``intake`` (over ``store``'s database); one
    :class:`Replayed` per task id asked for (or found). List them with
    :meth:`TaskStore.dead_letters`."""
    if task_ids is None:
        found = await store.dead_letters(config.name, limit=MAX_REPLAY_BATCH, replayed=False)
        asked: list[str] = [d.task_id for d in found]
    else:
        asked = list(dict.fromkeys(task_ids))
        found = await store.dead_letters(config.name, asked, limit=len(asked) or 1)
    by_id = {d.task_id: d for d in found}
    out: dict[str, Replayed] = {}
    messages: list[tuple[str, QueuedMessage]] = []
    for task_id in asked:
        letter = by_id.get(task_id)
        if letter is None:
            out[task_id] = Replayed(task_id, None, "no dead letter with this task id")
            continue
        if letter.replayed_as is not None and not again:
            out[task_id] = Replayed(task_id, None, f"already replayed as {letter.replayed_as!r}")
            continue
        replay_id = await _free_id(store, config.name, task_id)
        headers = {k: v for k, v in (letter.message.headers or {}).items()
                   if k not in _FAILURE_HEADERS}
        headers[REPLAY_OF_HEADER] = task_id
        messages.append((task_id, QueuedMessage(replay_id, letter.message.body,
                                                letter.message.content_type,
                                                letter.message.key, headers)))
    if messages:
        created = await intake.submit(config, [m for _, m in messages])
        links = []
        for (task_id, message), record in zip(messages, created, strict=True):
            if record is None:
                out[task_id] = Replayed(task_id, None,
                                        f"task id {message.task_id!r} is already used")
            else:
                out[task_id] = Replayed(task_id, message.task_id)
                links.append((task_id, message.task_id))
        await store.mark_replayed(config.name, links, time.time())
    return [out[t] for t in asked]


async def _free_id(store: TaskStore, pipeline: str, task_id: str) -> str:
    """The first ``<task_id>.replay-<n>`` not used in the pipeline (invariant 3)."""
    n = 1
    while await store.exists(pipeline, f"{task_id}.replay-{n}"):
        n += 1
    return f"{task_id}.replay-{n}"
