"""``sluice run``'s live status in a terminal: one row per pipeline (tasks done per second,
succeeded, failed, retried, in flight, its concurrency limit, its backlog), redrawn every
second on stderr with rich, above which log lines keep scrolling.

Rules:

1. Only when stderr is a terminal, the log format is ``text`` and ``TERM`` is not ``dumb``;
   otherwise nothing is drawn (a service's or a pipe's output stays its log lines).
2. The backlog is the source's own count (``Source.pending``), asked once a second; a source
   that cannot answer shows ``?``, and the status goes on.
3. The status is transient: it is cleared when the run ends, leaving the log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table

if TYPE_CHECKING:
    from sluice.consumer.loop import ConsumerLoop

REFRESH_S = 1.0


def wanted(log_format: str) -> bool:
    """Rule 1."""
    return (sys.stderr.isatty() and log_format == "text"
            and os.environ.get("TERM", "") != "dumb")


class LiveStatus:
    """The live table of one ``sluice run`` (see the module rules)."""

    def __init__(self, loops: Sequence[ConsumerLoop]) -> None:
        self.loops = list(loops)
        self._last: dict[str, tuple[float, int]] = {}

    async def table(self) -> Table:
        table = Table(box=None, pad_edge=False)
        for column in ("pipeline", "done/s", "succeeded", "failed", "retried", "in flight",
                       "limit", "backlog"):
            table.add_column(column, justify="left" if column == "pipeline" else "right")
        now = time.monotonic()
        for lp in self.loops:
            s = lp.stats
            done = s.succeeded + s.failed
            at, before = self._last.get(lp.config.name, (now, done))
            rate = (done - before) / (now - at) if now > at else 0.0
            self._last[lp.config.name] = (now, done)
            try:
                backlog = str(await lp.source.pending())
            except Exception:  # rule 2: the status never stops the run
                backlog = "?"
            table.add_row(lp.config.name, f"{rate:,.0f}", f"{s.succeeded:,}", f"{s.failed:,}",
                          f"{s.retried:,}", f"{lp.limiter.in_flight:,}",
                          f"{lp.limiter.limit:,.0f}", backlog)
        return table

    async def run(self) -> None:
        """Draw until cancelled (rule 3: the status is then cleared)."""
        console = Console(stderr=True)
        with Live(await self.table(), console=console, transient=True,
                  auto_refresh=False) as live, _logs_above(console):
            while True:
                await asyncio.sleep(REFRESH_S)
                live.update(await self.table(), refresh=True)


@contextlib.contextmanager
def _logs_above(console: Console) -> Iterator[None]:
    """Log lines written while the table is drawn go above it (through the console's file,
    which rich's Live redirects), not over it."""
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and h.stream in (sys.__stderr__,
                                                                         console.file)]
    before = [h.stream for h in handlers]
    for h in handlers:
        h.setStream(sys.stderr)
    try:
        yield
    finally:
        for h, stream in zip(handlers, before, strict=True):
            h.setStream(stream)
