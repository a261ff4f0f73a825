"""The functions of the hosting pipeline (pipelines/hosting.yaml): several tenants' functions,
by name, in one module. Each task names its function (the gateway's URL
``/v1/pipelines/hosted/functions/<name>/tasks``, or ``sluice submit --function``); the
handler's target is this mapping, so each task runs the function it names.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sluice import Message, Reject


async def resize(message: Message) -> dict[str, Any]:
    payload = message.payload
    if not isinstance(payload, dict) or "image" not in payload:
        raise Reject("payload must be an object with an 'image' key")
    await asyncio.sleep(0.02)  # the "work"
    return {"resized": payload["image"], "for": message.tenant}


def word_count(message: Message) -> dict[str, Any]:
    """A sync function: it runs in the handler's thread pool."""
    text = message.payload.get("text", "") if isinstance(message.payload, dict) else ""
    return {"words": len(str(text).split())}


async def broken(message: Message) -> None:
    """A function whose backend is down: every attempt fails (and is retried), so it hurts
    its neighbours on the shared queue and is isolated to a queue of its own."""
    await asyncio.sleep(0.01)
    raise ConnectionError("the function's backend is down")


FUNCTIONS = {"resize": resize, "word-count": word_count, "broken": broken}
