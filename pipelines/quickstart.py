"""Handler of the quickstart pipeline: resizes (pretends to) an image.

Payload: ``{"image": "cat.png", "width": 128}``. Some inputs misbehave on purpose so the tour
shows retries and a dead letter:

- ``"flaky": N``: the first N attempts raise an error; a later attempt succeeds (retry path).
- ``"width"`` not a positive integer: rejected at once (dead letter, no retry).
"""

from __future__ import annotations

import asyncio
from typing import Any

from sluice import Message, Reject


async def make_thumbnail(message: Message) -> dict[str, Any]:
    payload = message.payload
    if not isinstance(payload, dict) or "image" not in payload:
        raise Reject("payload must be an object with an 'image' key")
    width = payload.get("width", 128)
    if not isinstance(width, int) or width <= 0:
        raise Reject(f"width must be a positive integer, got {width!r}")
    if message.attempt <= int(payload.get("flaky", 0)):
        raise ConnectionError(f"storage timed out (attempt {message.attempt})")
    await asyncio.sleep(0.02)  # the "work"
    name = str(payload["image"]).rsplit(".", 1)[0]
    return {"thumbnail": f"{name}-{width}w.png", "width": width}
