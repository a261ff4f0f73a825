"""Attempt timeouts checked by one timer per handler, not one per attempt.

``asyncio.timeout`` arms and disarms an event-loop timer for every attempt; at thousands of
attempts per second that is a good part of the consumer layer's own work. :class:`Deadlines`
keeps each running attempt's deadline in a dict and one timer sweeps it every ``tick_s``.

Invariants:

1. An attempt is cancelled at most ``tick_s`` after its deadline (``tick_s`` is at most a tenth
   of the shortest timeout registered, and at most ``MAX_TICK_S``).
2. Only this module's cancellation becomes a timeout: :meth:`Deadlines.expired` is true only
   for a task this sweeper cancelled, and only when no other cancellation came on top (the
   ``cancelling()`` count, as ``asyncio.timeout`` checks it). Any other cancellation (a stop, a
   cancelled task) propagates as it is.
3. The timer runs only while attempts are registered, on the loop that runs them.
4. While every attempt has had the same timeout (the consumer loop's ``consumer.timeout_s``),
   deadlines are in the order the attempts were added, so a sweep stops at the first one not
   yet due: its cost is the attempts it cancels, not the attempts running.
"""

from __future__ import annotations

import asyncio

MAX_TICK_S = 0.05
MIN_TICK_S = 0.001


class Deadlines:
    def __init__(self) -> None:
        self._due: dict[asyncio.Task[object], float] = {}  # running attempt → deadline
        self._fired: set[asyncio.Task[object]] = set()  # cancelled by the sweep (rule 2)
        self._tick_s = MAX_TICK_S
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeout_s: float | None = None  # the timeout of every attempt so far, if one
        self._in_order = True  # rule 4

    def add(self, task: asyncio.Task[object], timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._due[task] = loop.time() + timeout_s
        if timeout_s != self._timeout_s:
            self._in_order = self._timeout_s is None
            self._timeout_s = timeout_s
        tick_s = min(max(timeout_s / 10, MIN_TICK_S), MAX_TICK_S)
        if tick_s < self._tick_s:
            self._tick_s = tick_s
            self._stop_timer()
        if self._timer is None or self._loop is not loop:  # rule 3
            self._loop = loop
            self._timer = loop.call_later(self._tick_s, self._sweep)

    def discard(self, task: asyncio.Task[object]) -> None:
        """The attempt ended (however): forget it."""
        self._due.pop(task, None)
        if task in self._fired:  # it ended before the cancellation reached it
            self._fired.discard(task)
            task.uncancel()

    def expired(self, task: asyncio.Task[object], cancelling_at_start: int) -> bool:
        """Whether the ``CancelledError`` ``task`` just raised is this sweeper's timeout (rule
        2); if so, the cancellation is withdrawn."""
        if task not in self._fired:
            return False
        self._fired.discard(task)
        return task.uncancel() <= cancelling_at_start

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        self._timer = None
        if not self._due or self._loop is None:
            return
        now = self._loop.time()
        late = []
        for task, at in self._due.items():
            if at <= now:
                late.append(task)
            elif self._in_order:
                break  # rule 4: the rest are due later still
        for task in late:
            del self._due[task]
            self._fired.add(task)
            task.cancel()
        if self._due:
            self._timer = self._loop.call_later(self._tick_s, self._sweep)
