"""Handlers used by the benchmarks."""

from __future__ import annotations

from sluice import Message


async def noop(message: Message) -> None:
    return None


def noop_sync(message: Message) -> None:
    return None
