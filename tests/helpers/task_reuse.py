"""Handlers for tests/integration/test_attempt_tasks.py: which asyncio task ran each attempt."""

from __future__ import annotations

import asyncio
from typing import Any

from sluice import Message

# task id -> the asyncio task that ran its attempt (kept: an id() could be reused)
TASKS: dict[str, asyncio.Task[Any] | None] = {}


async def note_task(message: Message) -> Any:
    TASKS[message.task_id] = asyncio.current_task()
    if message.payload.get("sleep_s"):
        await asyncio.sleep(message.payload["sleep_s"])
    return {"ok": True}
