"""Batch handlers the batch tests run in-process (``handler.batch``): each call is recorded in
:data:`CALLS`, and each message's payload says what becomes of it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sluice import Message, Reject, Retry


@dataclass(frozen=True)
class Seen:
    """One message as a batch call got it."""

    task_id: str
    attempt: int
    key: str | None
    payload: Any


@dataclass(frozen=True)
class Call:
    at: float  # time.monotonic() when the call began
    items: tuple[Seen, ...]
    thread: str


CALLS: list[Call] = []  # every call, in the order they began (a test clears it first)


def outcomes(messages: Sequence[Message]) -> list[Any]:
    """What the payloads ask for: ``explode_once`` (the call raises on the item's first
    attempt), ``short_once`` (the call returns one item too few then), ``reject`` (a Reject
    item), ``retry_once`` (a Retry item on the first attempt); else the item's result."""
    assert isinstance(messages, list), type(messages)
    CALLS.append(Call(time.monotonic(), tuple(
        Seen(m.task_id, m.attempt, m.key, m.payload) for m in messages),
        threading.current_thread().name))
    first = [m.payload for m in messages if m.attempt == 1]
    if any(p.get("explode_once") for p in first):
        raise RuntimeError("the whole batch fails")
    out: list[Any] = []
    for m in messages:
        p = m.payload
        if p.get("reject"):
            out.append(Reject(str(p["reject"])))
        elif p.get("retry_once") and m.attempt == 1:
            out.append(Retry("once more"))
        else:
            out.append({"task": m.task_id, "attempt": m.attempt, "batch": len(messages)})
    if any(p.get("short_once") for p in first):
        return out[:-1]
    return out


async def handle(messages: list[Message]) -> list[Any]:
    await asyncio.sleep(0.005)  # calls overlap
    return outcomes(messages)


def handle_sync(messages: list[Message]) -> list[Any]:
    time.sleep(0.005)
    return outcomes(messages)


def seen(task_id: str) -> list[int]:
    """The attempts of ``task_id`` the handler got, in call order."""
    return [s.attempt for c in CALLS for s in c.items if s.task_id == task_id]


def batch_of(task_id: str, attempt: int) -> set[str]:
    """The task ids of the call that got ``task_id``'s ``attempt``."""
    (call,) = [c for c in CALLS
               if any((s.task_id, s.attempt) == (task_id, attempt) for s in c.items)]
    return {s.task_id for s in call.items}


def keys_per_call_unique() -> None:
    """No call held two messages of one key."""
    for call in CALLS:
        keys = [s.key for s in call.items if s.key is not None]
        assert len(keys) == len(set(keys)), f"one batch holds a key twice: {keys}"
