"""One line when a component loses its broker, one when it has it back: never a line per retry.

Broker clients retry by themselves (librdkafka, nats-py, aio-pika's robust connection) or in
sluice's own reconnect loops, many times a second; each attempt's error is not news to an
operator. A :class:`OutageLog` per component turns them into two lines per outage:

1. :meth:`OutageLog.down` logs a warning the first time it is called after the component was
   up (with the first reason); later calls until :meth:`OutageLog.up` only count.
2. :meth:`OutageLog.up` logs one line (how long it lasted, how many errors) if the component
   was down; otherwise it costs one attribute read.
3. While :attr:`OutageLog.quiet` (a component still starting), nothing is logged: a start that
   fails says so itself, once, in the error it raises (the CLI's ``error:`` line).
4. It may be called from any thread (client callbacks run on the client's threads).
5. A component that retries by itself asks :meth:`OutageLog.failed` how long to wait: capped
   exponential backoff (``FIRST_BACKOFF_S`` doubling to ``MAX_BACKOFF_S``), from the start
   again after each outage.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("sluice.outage")

FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0


class OutageLog:
    """The outage state of one component (see the module rules)."""

    def __init__(self, what: str, logger: logging.Logger = log) -> None:
        self.what = what
        self.logger = logger
        self.quiet = False
        self.down_since: float | None = None
        self.errors = 0
        self._backoff_s = FIRST_BACKOFF_S
        self._lock = threading.Lock()

    @property
    def is_down(self) -> bool:
        return self.down_since is not None

    def down(self, reason: object) -> None:
        """An error that says the broker cannot be reached (rule 1)."""
        with self._lock:
            self.errors += 1
            if self.down_since is not None:
                return
            self.down_since = time.monotonic()
            self.errors = 1
        if not self.quiet:
            self.logger.warning("%s: broker unreachable, retrying until it is back: %s",
                                self.what, reason)

    def failed(self, reason: object) -> float:
        """A failed try (rule 1); the seconds to wait before the next one (rule 5)."""
        if self.down_since is None:
            self._backoff_s = FIRST_BACKOFF_S
        self.down(reason)
        wait_s = self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)
        return wait_s

    def up(self) -> None:
        """The broker answered (rule 2)."""
        if self.down_since is None:
            return
        with self._lock:
            since, self.down_since = self.down_since, None
            errors = self.errors
        if since is not None and not self.quiet:
            self.logger.info("%s: broker reachable again after %.1fs (%d error(s) meanwhile)",
                                self.what, time.monotonic() - since, errors)
