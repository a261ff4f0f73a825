"""Handlers used by the benchmarks."""

from __future__ import annotations

from sluice import Message


async def noop(message: Message) -> None:
    return None


def noop_sync(message: Message) -> None:
    return None


# bench/flow.py key_order: the sequence number each key is at, and order violations seen.
KEY_SEEN: dict[str, int] = {}
KEYS_RUNNING: set[str] = set()
ORDER_VIOLATIONS: list[str] = []


async def ordered_sleep(message: Message) -> None:
    """Sleep 20 ms; check that this key's messages run one at a time, in their sequence
    (``seq`` in the payload)."""
    import asyncio

    seq = int(message.payload["seq"])
    key = message.key or ""
    if key in KEYS_RUNNING:
        ORDER_VIOLATIONS.append(f"{key}: {seq} started while another of its key ran")
    if KEY_SEEN.get(key, -1) != seq - 1:
        ORDER_VIOLATIONS.append(f"{key}: {seq} after {KEY_SEEN.get(key)}")
    KEY_SEEN[key] = seq
    KEYS_RUNNING.add(key)
    try:
        await asyncio.sleep(0.02)
    finally:
        KEYS_RUNNING.discard(key)


async def noop_batch(messages: list[Message]) -> list[None]:
    """A batch handler that does nothing: one ``None`` result per message."""
    return [None] * len(messages)
