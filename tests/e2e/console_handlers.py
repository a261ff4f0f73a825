"""The console test's handler: a backend that takes :data:`CAPACITY` calls at once and answers
the rest with :class:`~sluice.Overloaded`, so an AIMD limit saws below and above it (the
overview's concurrency chart), and whose payload may ask it to fail (``fail``: always;
``fail_attempts``: its first that many attempts) or to sleep (``sleep_s``)."""

from __future__ import annotations

import asyncio
from typing import Any

from sluice import Message, Overloaded

CAPACITY = 6
_running = 0


async def capped(message: Message) -> Any:
    global _running
    payload = message.payload
    if payload.get("fail") or message.attempt <= int(payload.get("fail_attempts", 0)):
        raise RuntimeError(f"failing attempt {message.attempt} as asked")
    if _running >= CAPACITY:
        raise Overloaded(f"more than {CAPACITY} calls at once")
    _running += 1
    try:
        await asyncio.sleep(float(payload.get("sleep_s", 0.1)))
    finally:
        _running -= 1
    return {"attempt": message.attempt, "done": True}
