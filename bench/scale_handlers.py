"""Handlers of bench/scale.py beside bench/handlers.py's no-op."""

from __future__ import annotations

import asyncio

from sluice import Message


async def sleep20(message: Message) -> None:
    """Wait 20 ms (an I/O-bound task: a call to another service)."""
    await asyncio.sleep(0.02)
