"""The handler seam: one attempt of one task in, one :class:`~sluice.message.Outcome` out.

A handler never raises: every error of the attempt becomes an outcome (``retry`` or
``failure``), so the consumer layer has one path for all of them.
"""

from __future__ import annotations

from typing import Protocol

from sluice.message import Message, Outcome


class Handler(Protocol):
    async def invoke(self, message: Message, timeout_s: float) -> Outcome: ...

    async def close(self) -> None: ...
