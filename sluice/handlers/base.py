"""The handler seam: one attempt of one task in, one :class:`~sluice.message.Outcome` out.

A handler never raises: every error of the attempt becomes an outcome (``retry`` or
``failure``), so the consumer layer has one path for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from sluice.message import Message, Outcome


class Handler(Protocol):
    async def invoke(self, message: Message, timeout_s: float) -> Outcome: ...

    async def close(self) -> None: ...


@runtime_checkable
class BatchHandler(Protocol):
    """A handler that also takes lists (``handler.batch``): one outcome per message, in
    order; never raises (an error of the whole call is every message's outcome)."""

    async def invoke(self, message: Message, timeout_s: float) -> Outcome: ...

    async def invoke_batch(self, messages: Sequence[Message],
                           timeout_s: float) -> list[Outcome]: ...

    async def close(self) -> None: ...
