"""The consumer loop of one pipeline in one process: fetch → claim → start → run → record →
settle.

Invariants, in the order they happen to a message:

1. Hold at most ``consumer.prefetch`` deliveries and ``consumer.prefetch_bytes`` of bodies
   (and room for at least ``HELD_PER_SLOT`` (3) per slot of the concurrency limit, times the
   batch size) (running, ready, waiting in an ordering lane, or finished and not yet
   recorded); fetch only what fits: a full layer stops fetching, which is the backpressure to
   the source. Fetching runs ahead of the handlers so that claims and records go in large
   batches; while every slot is busy and tasks wait for one, it waits until a quarter of what
   it may hold is free, so that a slow handler's worker claims in batches too, not a task or
   two at a time. On a backlog shared with other machines' workers, without
   ``consumer.prefetch``, it holds about what it finishes in ``SHARED_HOLD_S`` (rising at
   once with its pace, falling by halves), so none takes more than its share. (A retry that
   holds its lane may come back beyond that: rule 4 of the dispatcher.)
2. Claim every fetched task in the task store (one write per fetched batch) before running
   it. A task already final is settled (acknowledged) without running; one RUNNING under
   another live lease is handed back to the source until that lease ends; a PAUSED one is held
   back. Only a successful claim runs. The claim starts the attempt (counts it, sets the start
   time) only of a task whose ordering lane is free at that moment; one that will wait in its
   lane is only reserved (under this worker's lease: nobody else claims it) until rule 12.
3. While a task runs, its source lease and its task-store lease are extended every
   ``lease_s / 3``; a worker that dies stops extending, and both lapse together.
4. An attempt's end is recorded in the task store (compare-and-set from RUNNING under this
   worker) *before* its message is settled at the source. A crash between the two leaves a
   message whose task is final: rule 2 acknowledges it and skips it. So a finished task never
   runs again, and an unrecorded one always does. A settlement that meets its broker away
   (:class:`~sluice.errors.Unavailable`) is the same case: the broker hands the message out
   again, and rule 2 settles it then (the source logs the outage, once).
5. A task that fails for good is sent to the dead letter *before* it is recorded FAILED (a crash
   between the two may send it twice; it is never lost).
6. Records and settlements are batched: every attempt that ends while a batch is being written
   goes into the next batch (group commit).
7. A paused pipeline fetches nothing (in-flight work finishes): a pause through this process
   (its gateway) holds from the next fetch; one from elsewhere (another process's CLI or
   gateway on the same store) as soon as the store announces it (PostgreSQL), else within
   ``PAUSE_RECHECK_S``; what is fetched meanwhile runs. A task cancelled while running has its
   attempt cancelled (async handlers stop at their next await; a sync handler's thread runs
   on, its outcome discarded) as soon as this worker learns of it: at once when the cancel
   came through this process or the store announces it, else at the next lease extension.
8. On stop: no new fetches, nothing new starts; tasks in flight get ``timeout_s`` to finish; any
   still running are cancelled and handed back (their leases released, so another worker
   claims them at once).
9. Result records are routed by the pipeline's :class:`~sluice.consumer.results.ResultRouter`:
   through the outbox (written with the attempt's end, rule 4), or with the acknowledgement
   (a :class:`~sluice.connectors.base.ProducingSource` writes them before it commits the
   message's offset; in one transaction with it under ``consumer.exactly_once``). A message
   whose task is already final (its end recorded, then a crash before the commit) gets its
   result record made again from the task store, so the result is written either way (exactly
   once under ``exactly_once``).
10. Under ``ordering: key`` or ``partition``, a lane's next task starts only once its
    predecessor's end is recorded (rule 4), not merely returned. A crash can then repeat only
    attempts that had started and whose end was not yet recorded, never a task that a later
    one of its lane ran after.
11. A task handed back without having run (waiting in its lane or ready at a stop) is
    un-claimed: QUEUED again with its attempt count as before the claim, its start unset.
12. A reserved task whose lane admits it (rule 10) has its start written to the task store
    (attempts + 1, the start time) in the flush after the one that recorded its predecessor's
    end (step 5), and its handler runs only once that write returned: an attempt counts when
    it starts, and a start is durable before the handler runs, so a worker that dies while
    tasks wait in its lanes has counted nothing for them, and one that dies mid-attempt has.
    (A task whose lane is free is started by its claim, rule 2: the hot path writes nothing
    more; if the crash comes while it waits only for a concurrency permit, its count stands.)
13. With a batch handler (``handler.batch``) one permit runs one call with up to
    ``max_size`` ready tasks; a call that is not full waits at most ``max_wait_ms`` for more
    (none once the worker holds all it may). Ready tasks are those their lanes admitted
    (rule 10), so a batch never holds two tasks of one lane. Each task's outcome is then
    recorded, retried or dead-lettered as its own attempt's (rules 4-6): one bad item fails
    alone; an error of the whole call is every item's. A cancelled task's call runs on; its
    end is refused by the store (the task is final) and its message settled.
14. A pipeline's ``schema`` and ``filter`` (:mod:`sluice.consumer.gate`) are applied to a
    claimed message before it is offered to its lane: one the filter drops is recorded
    FILTERED and acknowledged (counted in ``sluice_filtered_total``); one the schema refuses
    fails at once (dead letter first, rule 5) without calling the handler.
15. Fetched deliveries are claimed without holding up the next fetch: one claim write at a
    time, and what is fetched while it is written goes in the next one (group commit), in
    fetch order; each batch is offered to its lanes once its claim returned (rule 2).
16. Without a batch handler, each attempt takes a permit of its own, and an asyncio task that
    ends one attempt takes the next ready task while the limiter has room (no task created
    per message); cancelling a task's running attempt (rule 7) ends that attempt only.
17. A delivery of a task this loop already holds (a broker handing a message out again after
    a reconnect or a lapsed lease, or two messages with one task id) is not claimed: the
    store's claim would let this loop, the task's owner, run it a second time beside the
    first. It is handed back with a delay of ``DUPLICATE_DELAY_S`` and comes back once the
    attempt under way has ended, when its claim settles it (rule 2).
18. A hosting pipeline's (``tenancy``) ready tasks start in fair order, each with a permit of
    the worker's limiter and one of its function's own (:mod:`sluice.tenancy.scheduler`), and
    its attempt's load signal goes to its function's limiter; a task first seen at the
    consumer is created under its delivery's tenant. Its source is the shared queue and its
    functions' dedicated ones (:mod:`sluice.tenancy.source`), whose routes its hosting
    controller looks after while the loop runs (:mod:`sluice.tenancy.hosting`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sluice import metrics, tracing
from sluice.config.model import BatchConfig, PipelineConfig
from sluice.connectors.base import Delivery, Output, ProducingSource, Sink, Source
from sluice.consumer.dispatcher import Dispatcher
from sluice.consumer.gate import gate_for
from sluice.consumer.limiter import Permit, Signal, make_limiter
from sluice.consumer.results import ResultRouter
from sluice.consumer.retry import RetryPolicy
from sluice.errors import Unavailable
from sluice.handlers.base import BatchHandler, Handler
from sluice.message import Message, Outcome
from sluice.tasks.state import TaskState
from sluice.tasks.store import (
    Claim,
    ClaimResult,
    ClaimStatus,
    Completion,
    DeadLetter,
    TaskStore,
)
from sluice.tenancy.scheduler import FairReady

if TYPE_CHECKING:
    from sluice.sinks.delivery import Deliverer
    from sluice.tenancy.hosting import Hosting

log = logging.getLogger(__name__)

HOLD_RECHECK_S = 5.0  # a PAUSED task's message comes back this often to see if it was resumed
PAUSE_RECHECK_S = 0.25  # how often a paused pipeline's workers look whether it was resumed
# ... where the store pushes pauses to them (sluice.stores.base invariant 4): a look only
# covers a notification lost while the store's listening connection was being remade.
PUSHED_PAUSE_RECHECK_S = 5.0
DEFAULT_PREFETCH = 1000  # consumer.prefetch when the pipeline sets none
# On a backlog that workers on several machines share (a source's ``shares_backlog``), a worker
# without consumer.prefetch holds what it finishes in this long, so a slow handler's backlog is
# shared out among them while a fast one is still fetched in large batches (rule 1).
SHARED_HOLD_S = 0.25
RATE_WINDOW_S = 0.1
FLUSH_ERROR_PAUSE_S = 0.5
DEAD_LETTER_RETRY_S = 5.0
FETCH_WAIT_S = 0.25  # how long one fetch waits for work; bounds how late a stop is noticed
# How long a full layer waits for room before it looks again (rule 1). Room made by an attempt
# or by a group commit wakes it at once; this only bounds the wait for a retry falling due.
ROOM_WAIT_S = 0.25
YIELD_EVERY = 64  # attempts run back to back in one task before it yields (rule 16)
# A busy worker refills when this fraction of what it may hold is free (rule 1).
REFILL_FRACTION = 4
# Deliveries held per slot of the limit (rule 1): one running, one ready or waiting in its
# lane, one finished and waiting for its group commit.
DUPLICATE_DELAY_S = 1.0  # a second delivery of a task held here comes back after this (rule 17)
HELD_PER_SLOT = 3


Item = tuple[Delivery, ClaimResult]


class _Ready(Protocol):
    """Tasks whose lanes are theirs, waiting for a permit: a deque, or a hosting pipeline's
    :class:`~sluice.tenancy.scheduler.FairReady`."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Item]: ...

    def append(self, item: Item, /) -> None: ...

    def popleft(self) -> Item: ...

    def clear(self) -> None: ...


def _function_key(item: Item) -> tuple[str, str]:
    delivery = item[0]
    return delivery.tenant or "default", delivery.function or "default"


def _traceback_tail(outcome: Outcome) -> str:
    """The handler's traceback for a log line about its failed attempt ("" if none)."""
    return f"\n{outcome.traceback.rstrip()}" if outcome.traceback else ""


def _signal(outcomes: Sequence[Outcome]) -> Signal:
    """The limiter's load signal of one call's outcomes (one, or a batch's): overload if any
    was one, success if all succeeded, else an error."""
    if any(o.overload for o in outcomes):
        return Signal.OVERLOAD
    return Signal.SUCCESS if all(o.status == "success" for o in outcomes) else Signal.ERROR


@dataclass(slots=True)
class _Settle:
    delivery: Delivery
    completion: Completion | None = None  # None: settle only (the task is not ours to record)
    delay_s: float | None = None  # requeue after this delay instead of acknowledging
    outputs: tuple[Output, ...] = ()  # written with the acknowledgement (rule 9)


@dataclass
class LoopStats:
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    skipped: int = 0  # messages whose task was already final
    filtered: int = 0  # messages the pipeline's filter dropped (rule 14)
    in_flight: int = 0
    started_at: float = field(default_factory=time.monotonic)


class ConsumerLoop:
    def __init__(self, config: PipelineConfig, source: Source, store: TaskStore,
                 handler: Handler, dead_letter: Sink, *, worker_id: str | None = None,
                 deliverers: Sequence[Deliverer] = (),
                 results: ResultRouter | None = None) -> None:
        self.config = config
        self.source = source
        self.store = store
        self.handler = handler
        self.dead_letter = dead_letter
        self.owner = worker_id or uuid.uuid4().hex[:16]
        self.policy = RetryPolicy(config.consumer.retry)
        self.stats = LoopStats()
        self.deliverers = list(deliverers)  # they drain the outbox while the loop runs
        self.prefetch = (config.consumer.prefetch if config.consumer.prefetch is not None
                         else DEFAULT_PREFETCH)
        # Rule 1: on a backlog shared with other machines' workers (and no prefetch set),
        # hold what this worker finishes in about SHARED_HOLD_S, measured as it runs.
        self._paced = (config.consumer.prefetch is None
                       and bool(getattr(source, "shares_backlog", False)))
        self._finished = 0
        self._rate_per_s = 0.0
        self._rate_since = time.monotonic()
        self.pause_recheck_s = PAUSE_RECHECK_S  # PUSHED_PAUSE_RECHECK_S: see control_pushed
        self.results = results or ResultRouter(config)  # rule 9
        self._producing: ProducingSource | None = None
        if self.results.writes_with_ack:
            if not isinstance(source, ProducingSource):
                raise TypeError(f"pipeline {config.name!r}: the source cannot write results "
                                "with its commits")
            self._producing = source
        self.limiter = make_limiter(config.name, config.consumer.limit_config)
        self.dispatcher: Dispatcher[tuple[Delivery, ClaimResult]] = Dispatcher(
            config.consumer.ordering,
            source_orders_keys=bool(getattr(source, "orders_keys", False)))
        # A hosting pipeline's fair shares (sluice.tenancy.scheduler) and its routes and
        # rules (sluice.tenancy.hosting: the runtime sets it).
        self._fair: FairReady[Item] | None = None
        if config.tenancy is not None:
            self._fair = FairReady(config.name, config.tenancy, self.limiter, _function_key)
        self.hosting: Hosting | None = None
        self._ready: _Ready = self._fair if self._fair is not None else deque()
        # Reserved tasks their lanes admitted, whose starts the flusher writes (rule 12); and
        # those of the start write under way (the heartbeat keeps their leases too).
        self._to_start: list[tuple[Delivery, ClaimResult]] = []
        self._starting: list[tuple[Delivery, ClaimResult]] = []
        self._starts_idle = asyncio.Event()  # no start write under way
        self._starts_idle.set()
        self._stopping = False  # stop path under way: nothing new starts (rule 8)
        # Each attempt in flight (a batch handler's call: the deliveries of its batch).
        self._running: dict[asyncio.Task[None], tuple[Delivery, ...]] = {}
        self._held: dict[int, Delivery] = {}  # every delivery not yet settled, by id()
        self._held_bytes = 0  # the body bytes of those (rule 1)
        self._held_ids: dict[str, int] = {}  # their task ids, with how many of each (rule 17)
        self.batch = config.batch  # handler.batch: the handler takes lists (rule 13)
        if self.batch is not None and not isinstance(handler, BatchHandler):
            raise TypeError(f"pipeline {config.name!r}: this handler type takes no batches")
        self._batch_since: float | None = None  # when the oldest ready task became ready
        self._batch_timer: asyncio.TimerHandle | None = None
        self.gate = gate_for(config)  # rule 14; None: no filter, no schema
        # Rule 15: the claim writer (while it runs) and what it claims next.
        self._claiming: asyncio.Task[None] | None = None
        self._to_claim: list[Delivery] = []
        self._filtered = metrics.FILTERED.labels(config.name)
        self._pending: list[_Settle] = []
        self._pending_event = asyncio.Event()
        self._closing = False
        self._cancelled: set[str] = set()  # task ids whose running attempt was cancelled
        self._paused_until_check = 0.0
        self._paused = False
        self._histograms: dict[str, Any] = {}
        self._slot_freed = asyncio.Event()
        self._unrecorded: set[int] = set()  # deliveries settled here, not yet flushed, by id()
        # Lanes to move on once their attempt's end is flushed (rule 10), by id(delivery).
        self._lane_ends: dict[int, tuple[Hashable, str, bool, float]] = {}

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, drain: bool = False) -> LoopStats:
        """Consume until ``stop`` is set (or, with ``drain``, until the source is empty)."""
        await self.source.start()
        flusher = asyncio.create_task(self._flush_forever(), name="sluice-flush")
        heartbeat = asyncio.create_task(self._heartbeat_forever(), name="sluice-heartbeat")
        deliver_stop, upstream_done = asyncio.Event(), asyncio.Event()
        delivering = [asyncio.create_task(d.run(deliver_stop, upstream_done))
                      for d in self.deliverers]
        if self.hosting is not None:
            delivering.append(asyncio.create_task(self.hosting.run(deliver_stop)))
        try:
            await self._fetch_until(stop, drain)
            await self._finish_in_flight()
        finally:
            self._closing = True  # the flusher writes what is pending, then returns
            self._pending_event.set()
            await flusher
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            # Deliveries drain their outboxes with --drain; else they stop with the loop (what
            # is left waits, durably, for the next run).
            upstream_done.set()
            if not drain or stop.is_set():
                deliver_stop.set()
            await asyncio.gather(*delivering, return_exceptions=True)
        return self.stats

    def _fetch_budget(self) -> int:
        """How many deliveries to fetch now (rule 1): none while a Retry-After holds; else up
        to HELD_PER_SLOT x the limit, minus every delivery held here (running, ready, waiting
        in a lane, or finished and waiting to be recorded)."""
        if self.limiter.held_for_s() > 0:
            return 0
        if self._held_bytes >= self.config.consumer.prefetch_bytes:
            free = 0
        else:
            capacity = self._capacity()
            free = capacity - len(self._held)
            if free < capacity // REFILL_FRACTION and self._ready and \
                    self.limiter.available() <= 0:
                free = 0  # every slot busy and work waiting: refill in a larger batch
        # Room for every retry that holds its lane and is due, whatever waits behind it
        # (rule 4 of the dispatcher): sources hand out due redeliveries before new messages.
        return max(free, self.dispatcher.due_retries())

    @property
    def fair_shares(self) -> FairReady[Item] | None:
        """A hosting pipeline's ready tasks (sluice.tenancy.scheduler); None otherwise."""
        return self._fair

    def capacity(self) -> int:
        """How many deliveries this worker may hold now (rule 1)."""
        return self._capacity()

    def _capacity(self) -> int:
        """How many deliveries may be held (rule 1): ``consumer.prefetch`` (on a shared
        backlog without one: what this worker finishes in ``SHARED_HOLD_S``, at most
        DEFAULT_PREFETCH), and at least HELD_PER_SLOT batches (of one, without a batch
        handler) per slot of the limit."""
        per_call = self.batch.max_size if self.batch is not None else 1
        prefetch = self.prefetch
        if self._paced:
            prefetch = min(prefetch, int(self._finish_rate() * SHARED_HOLD_S))
        return max(prefetch, HELD_PER_SLOT * math.floor(self.limiter.limit) * per_call)

    def _finish_rate(self) -> float:
        """Deliveries this worker finishes (records and settles) per second: a moving average
        over windows of RATE_WINDOW_S."""
        now = time.monotonic()
        elapsed = now - self._rate_since
        if elapsed >= RATE_WINDOW_S:
            latest = self._finished / elapsed
            self._rate_per_s = latest if latest > self._rate_per_s else (
                self._rate_per_s + latest) / 2
            self._finished, self._rate_since = 0, now
        return self._rate_per_s

    def _hold(self, delivery: Delivery) -> None:
        self._held[id(delivery)] = delivery
        self._held_bytes += len(delivery.body)
        self._held_ids[delivery.task_id] = self._held_ids.get(delivery.task_id, 0) + 1

    def _unhold(self, delivery: Delivery) -> None:
        if self._held.pop(id(delivery), None) is not None:
            self._held_bytes -= len(delivery.body)
            left = self._held_ids.pop(delivery.task_id, 1) - 1
            if left:
                self._held_ids[delivery.task_id] = left

    def _without_duplicates(self, deliveries: list[Delivery]) -> tuple[list[Delivery],
                                                                        list[Delivery]]:
        """(deliveries to claim, deliveries of tasks already held here) (rule 17)."""
        fresh: list[Delivery] = []
        again: list[Delivery] = []
        seen: set[str] = set()
        for d in deliveries:
            if d.task_id in self._held_ids or d.task_id in seen:
                again.append(d)
            else:
                seen.add(d.task_id)
                fresh.append(d)
        return fresh, again

    async def _fetch_until(self, stop: asyncio.Event, drain: bool) -> None:
        stop_wait = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if await self._pipeline_paused():
                    await asyncio.wait({stop_wait}, timeout=PAUSE_RECHECK_S)
                    continue
                for item in self.dispatcher.expired():
                    self._offer(*item)
                self._start_ready()
                free = self._fetch_budget()
                if free <= 0:
                    self._slot_freed.clear()
                    slot = asyncio.create_task(self._slot_freed.wait())
                    wait_s = self.limiter.held_for_s() or ROOM_WAIT_S
                    await asyncio.wait({slot, stop_wait}, timeout=wait_s,
                                       return_when=asyncio.FIRST_COMPLETED)
                    slot.cancel()
                    continue
                deliveries = await self.source.fetch(free, FETCH_WAIT_S)
                if stop.is_set():
                    # Fetched as stop came: hand them straight back, unclaimed.
                    await self.source.retry_later([(d, 0.0) for d in deliveries])
                    break
                if deliveries and await self._pipeline_paused():
                    # Paused while this fetch waited: hand them back unclaimed (rule 7).
                    await self.source.retry_later([(d, 0.0) for d in deliveries])
                    continue
                if deliveries:
                    deliveries, again = self._without_duplicates(deliveries)
                    if again:
                        await self.source.retry_later([(d, DUPLICATE_DELAY_S) for d in again])
                if deliveries:
                    self._dispatch_soon(deliveries)
                elif drain and await self._drained():
                    break
        finally:
            stop_wait.cancel()

    async def _pipeline_paused(self) -> bool:
        now = time.monotonic()
        if now >= self._paused_until_check:
            self._paused = await self.store.is_paused(self.config.name)
            self._paused_until_check = now + self.pause_recheck_s
        return self._paused

    def set_paused(self, paused: bool) -> None:
        """The pipeline was paused or resumed through this process or announced by the store
        (rule 7): at once, not at the next look at the store."""
        self._paused = paused
        self._paused_until_check = time.monotonic() + self.pause_recheck_s

    def control_pushed(self, pushed: bool) -> None:
        """Whether the store announces pauses to this loop (rule 7): it then looks itself only
        every ``PUSHED_PAUSE_RECHECK_S``; ``False`` (its announcements may have been missed)
        looks at once and every ``PAUSE_RECHECK_S`` again."""
        self.pause_recheck_s = PUSHED_PAUSE_RECHECK_S if pushed else PAUSE_RECHECK_S
        if not pushed:
            self._paused_until_check = 0.0

    def cancel_attempt(self, task_id: str) -> bool:
        """Stop the running attempt of ``task_id`` here, if any (its task was cancelled)."""
        for task, deliveries in self._running.items():
            if any(d.task_id == task_id for d in deliveries):
                if self.batch is not None:
                    # One task of a batch call: the call runs on; the store refuses this
                    # task's end (it is CANCELLED, final), so its message is settled (rule 4).
                    return True
                self._cancelled.add(task_id)
                task.cancel()
                return True
        return False

    async def _drained(self) -> bool:
        await self._claims_done()
        if self._running or self._pending or self._held or self._ready:
            return False
        return await self.source.pending() == 0

    def _dispatch_soon(self, deliveries: list[Delivery]) -> None:
        """Claim fetched deliveries without waiting for the store (rule 15): the fetch goes
        on while one claim is written, and what it brings meanwhile is claimed next, in one
        write (group commit), in the order fetched."""
        if self._claiming is not None and self._claiming.done():
            claiming, self._claiming = self._claiming, None
            error = None if claiming.cancelled() else claiming.exception()
            if error is not None:
                raise error  # a claim failed: the loop stops, as it did waiting for it
        for d in deliveries:
            self._hold(d)
        self._to_claim.extend(deliveries)
        if self._claiming is None:
            self._claiming = asyncio.get_running_loop().create_task(self._claim_pending())

    async def _claim_pending(self) -> None:
        while self._to_claim:
            batch, self._to_claim = self._to_claim, []
            await self._dispatch(batch)

    async def _dispatch(self, deliveries: list[Delivery]) -> None:
        # Rule 2: start with the claim only what its lane would run now; reserve the rest.
        free = self.dispatcher.would_run([(self._lane(d), d.task_id) for d in deliveries])
        # A task first seen here keeps the head of its body (the store cuts it on insert).
        keep = self.config.consumer.keep_payload_bytes
        claims = [Claim(d.task_id, d.key, d.enqueued_at, d.deliveries, start, d.tenant,
                        d.body, d.content_type, keep)
                  for d, start in zip(deliveries, free, strict=True)]
        results = await self.store.claim(self.config.name, self.config.tenant, claims, self.owner,
                                         self.source.lease_s, time.time())
        for delivery, claim in zip(deliveries, results, strict=True):
            if claim.status != ClaimStatus.RUN:
                await self._not_run(delivery, claim)
            elif self.gate is None or await self._passes_gate(delivery, claim):
                self._offer(delivery, claim)
        self._start_ready()

    async def _passes_gate(self, delivery: Delivery, claim: ClaimResult) -> bool:
        """Rule 14: whether a claimed message goes on to its handler; one its filter drops is
        recorded FILTERED, one its schema refuses fails (dead letter) without running."""
        assert self.gate is not None
        verdict = self.gate.check(delivery.body, delivery.content_type, delivery.key,
                                  delivery.headers)
        if verdict.run:
            return True
        if verdict.invalid is None:
            self.stats.filtered += 1
            self._filtered.inc()
            self._settle(_Settle(delivery, Completion(delivery.task_id, TaskState.FILTERED)))
            return False
        outcome = Outcome("failure", error_type="InvalidPayload", error_message=verdict.invalid)
        await self._fail(delivery, claim, outcome, "", None)
        return False

    async def _not_run(self, delivery: Delivery, claim: ClaimResult) -> None:
        """Settle the message of a task this worker may not run (rule 2)."""
        if claim.status == ClaimStatus.DONE:
            self.stats.skipped += 1
            if self._producing is not None:
                task = await self.store.get(delivery.task_id, self.config.name)
                self._settle(_Settle(delivery, outputs=self.results.stored(delivery, task)))
            else:
                self._settle(_Settle(delivery))
        elif claim.status == ClaimStatus.BUSY:
            now = time.time()
            wait = max((claim.lease_until or now) - now, 0.0) + 0.05
            self._settle(_Settle(delivery, delay_s=wait))
        else:  # HELD (paused)
            self._settle(_Settle(delivery, delay_s=HOLD_RECHECK_S))

    def _lane(self, delivery: Delivery) -> Hashable | None:
        return self.dispatcher.lane_of(delivery.key, delivery.partition)

    def _offer(self, delivery: Delivery, claim: ClaimResult) -> None:
        if self.dispatcher.offer(self._lane(delivery), delivery.task_id, (delivery, claim)):
            if claim.started:
                self._ready.append((delivery, claim))
            else:  # reserved: its start is written first (rule 12)
                self._to_start.append((delivery, claim))
                self._pending_event.set()

    def _start_ready(self) -> None:
        """Start ready tasks while the limiter has permits (none once stopping: rule 8)."""
        if self.batch is not None:
            self._start_batches(self.batch)
        elif self._fair is not None and self._fair and not self._stopping:
            start = asyncio.get_running_loop().create_task
            while (taken := self._fair.take()) is not None:
                (delivery, claim), fair_permit = taken
                task = start(self._run_attempts(delivery, claim, fair_permit))
                self._running[task] = (delivery,)
                task.add_done_callback(self._attempt_done)
        elif self._ready and not self._stopping:
            # Each take() lowers available() by one: count once (it reads the clock).
            start = asyncio.get_running_loop().create_task  # no name: asyncio.create_task's
            for _ in range(min(len(self._ready), self.limiter.available())):
                delivery, claim = self._ready.popleft()
                permit = self.limiter.take()
                task = start(self._run_attempts(delivery, claim, permit))
                self._running[task] = (delivery,)
                task.add_done_callback(self._attempt_done)
        self.stats.in_flight = self.limiter.in_flight

    async def _run_attempts(self, delivery: Delivery, claim: ClaimResult,
                            permit: Permit) -> None:
        """Attempts one after another in one asyncio task (rule 16): after each, the next
        ready task, with a permit of its own, while the limiter has room; else the task ends.
        It yields to the event loop every ``YIELD_EVERY`` attempts (a handler that never
        awaits would otherwise hold it)."""
        task = asyncio.current_task()
        assert task is not None
        done = 0
        while True:
            await self._run_attempt(delivery, claim, permit)
            done += 1
            if done % YIELD_EVERY == 0:
                self._running[task] = ()  # between attempts: nothing here to cancel
                await asyncio.sleep(0)
            if self._stopping or not self._ready:
                break
            taken = self._next_ready()
            if taken is None:
                break
            (delivery, claim), permit = taken
            self._running[task] = (delivery,)
        self._start_ready()

    def _next_ready(self) -> tuple[Item, Permit] | None:
        """The next ready task that may start now, with its permit (rule 16)."""
        if self._fair is not None:
            return self._fair.take()
        if self.limiter.available() <= 0:
            return None
        return self._ready.popleft(), self.limiter.take()

    def _give_back(self, permit: Permit, signal: Signal, retry_after_s: float | None,
                   latency_s: float | None) -> None:
        if self._fair is not None:
            self._fair.give_back(permit, signal, retry_after_s, latency_s)
        else:
            self.limiter.give_back(permit, signal, retry_after_s, latency_s)

    def _start_batches(self, batch: BatchConfig) -> None:
        """Start batch calls (rule 13): one per permit, each with up to ``max_size`` ready
        tasks; a batch that is not full waits up to ``max_wait_ms`` for more, unless no more
        can come (the worker holds all it may, or it stops)."""
        now = time.monotonic()
        if not self._ready:
            self._batch_since = None
        elif self._batch_since is None:
            self._batch_since = now
        start = asyncio.get_running_loop().create_task
        while self._ready and not self._stopping and self.limiter.available() > 0:
            waited_s = now - (self._batch_since or now)
            full = len(self._ready) >= batch.max_size
            wait_s = batch.max_wait_ms / 1000.0 - waited_s
            if not full and wait_s > 0 and len(self._held) < self._capacity():
                if self._batch_timer is None:
                    self._batch_timer = asyncio.get_running_loop().call_later(
                        wait_s, self._batch_timer_fired)
                break
            items = [self._ready.popleft()
                     for _ in range(min(batch.max_size, len(self._ready)))]
            task = start(self._run_batch(items, self.limiter.take()))
            self._running[task] = tuple(d for d, _ in items)
            task.add_done_callback(self._attempt_done)
            self._batch_since = now if self._ready else None
        self.stats.in_flight = self.limiter.in_flight

    def _batch_timer_fired(self) -> None:
        self._batch_timer = None
        self._start_ready()

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error in an attempt", exc_info=task.exception())

    async def _run_attempt(self, delivery: Delivery, claim: ClaimResult,
                           permit: Permit) -> None:
        """One attempt, then: the permit back with its load signal, the lane moved on."""
        signal, retry_after_s, latency_s = Signal.ERROR, None, None
        retrying, retry_in_s = False, 0.0
        try:
            outcome, retrying, retry_in_s = await self._attempt(delivery, claim)
            if outcome is not None:
                latency_s, retry_after_s = outcome.duration_s, outcome.retry_after_s
                signal = _signal((outcome,))
        finally:
            self._give_back(permit, signal, retry_after_s, latency_s)
            self._lane_done(delivery, retrying, retry_in_s)

    def _lane_finished(self, lane: Hashable, task_id: str, retrying: bool,
                       retry_in_s: float) -> None:
        for item in self.dispatcher.finished(lane, task_id, retrying=retrying,
                                             retry_in_s=retry_in_s):
            self._offer(*item)

    # -- one attempt ------------------------------------------------------------------------

    async def _run_batch(self, items: list[tuple[Delivery, ClaimResult]],
                         permit: Permit) -> None:
        """One batch call (rule 13), then each task's end as its own attempt's; the permit
        back with the batch's load signal; each lane moved on."""
        signal, retry_after_s, latency_s = Signal.ERROR, None, None
        ends: list[tuple[Delivery, bool, float]] = []
        outcomes: list[Outcome | None] = [None] * len(items)
        # Tracing (sluice.tracing): an attempt span per message, current only while its own
        # message is made and its outcome recorded.
        spans = ([tracing.attempt_span(d.headers, self._fields(d, c.attempts), current=False)
                  for d, c in items] if tracing.ENABLED else None)
        started_at = time.time()  # the attempts' start (their history: sluice.tasks.store)
        try:
            outcomes = [self._precheck(d, c) for d, c in items]
            calls = [(i, d, c) for i, ((d, c), o) in enumerate(zip(items, outcomes, strict=True))
                     if o is None]
            if calls:
                messages = [self._message(d, c.attempts, spans[i] if spans else None)
                            for i, d, c in calls]
                assert isinstance(self.handler, BatchHandler)
                answers = await self.handler.invoke_batch(messages,
                                                          self.config.consumer.timeout_s)
                for (i, _, _), answer in zip(calls, answers, strict=True):
                    outcomes[i] = answer
                    self._observe(answer.status, answer.duration_s)
                latency_s = answers[0].duration_s
                signal = _signal(answers)
                retry_after_s = max((a.retry_after_s or 0.0 for a in answers if a.overload),
                                    default=0.0) or None
            for i, ((delivery, claim), outcome) in enumerate(zip(items, outcomes, strict=True)):
                assert outcome is not None
                with spans[i].active() if spans else contextlib.nullcontext():
                    retrying, retry_in_s = await self._conclude(delivery, claim, outcome,
                                                                started_at)
                ends.append((delivery, retrying, retry_in_s))
        finally:
            for span, outcome in zip(spans or (), outcomes, strict=False):
                span.end(outcome)
            self.limiter.give_back(permit, signal, retry_after_s, latency_s)
            ended = {id(d) for d, _, _ in ends}
            # Ended without a record (shutdown): their lanes move on as a handed-back one's.
            ends += [(d, False, 0.0) for d, _ in items if id(d) not in ended]
            for delivery, retrying, retry_in_s in ends:
                self._lane_done(delivery, retrying, retry_in_s)
            self._start_ready()

    def _lane_done(self, delivery: Delivery, retrying: bool, retry_in_s: float) -> None:
        lane = self._lane(delivery)
        if lane is not None and id(delivery) in self._unrecorded:
            # Rule 10: the lane moves on once this end is recorded (after the flush).
            self._lane_ends[id(delivery)] = (lane, delivery.task_id, retrying, retry_in_s)
        elif lane is not None:
            self._lane_finished(lane, delivery.task_id, retrying, retry_in_s)

    def _precheck(self, delivery: Delivery, claim: ClaimResult) -> Outcome | None:
        """The outcome of an attempt that cannot call the handler, else None."""
        attempts = claim.attempts
        if attempts > self.config.consumer.retry.max_attempts:
            # Its previous attempts were lost with their workers (rule 3 of the state machine).
            return Outcome("failure", error_type="WorkerLost",
                           error_message=f"{attempts - 1} attempts ended without a result "
                           "(the worker running them stopped)")
        return None

    async def _attempt(self, delivery: Delivery,
                       claim: ClaimResult) -> tuple[Outcome | None, bool, float]:
        """Run and record one attempt: (its outcome, whether it will be retried, in how long).
        """
        started_at = time.time()  # the attempt's start (its history: sluice.tasks.store)
        outcome = self._precheck(delivery, claim)
        # Tracing (issue 17 item 3, sluice.tracing): when on, the attempt runs in its span (a
        # child of the message's traceparent), current while the handler runs and its outcome
        # is recorded (the result records carry it). Off: this check and the `finally`'s.
        span = (tracing.attempt_span(delivery.headers, self._fields(delivery, claim.attempts))
                if tracing.ENABLED else None)
        try:
            if outcome is None:
                try:
                    outcome = await self._invoke(delivery, claim.attempts)
                    self._observe(outcome.status, outcome.duration_s)
                except asyncio.CancelledError:
                    if delivery.task_id not in self._cancelled:
                        raise  # shutdown: the stop path hands the delivery back
                    self._cancelled.discard(delivery.task_id)
                    current = asyncio.current_task()
                    if current is not None:
                        current.uncancel()  # the asyncio task goes on to its next (rule 16)
                    log.info("task %s: running attempt cancelled", delivery.task_id,
                             extra=self._fields(delivery, claim.attempts))
                    # The store refuses this completion (the task is CANCELLED, final) and
                    # reports the final state, so the message is settled (rule 4).
                    self._settle(_Settle(delivery, Completion(
                        delivery.task_id, TaskState.FAILED, error_type="Cancelled")))
                    return None, False, 0.0
            retrying, retry_in_s = await self._conclude(delivery, claim, outcome, started_at)
            return outcome, retrying, retry_in_s
        finally:
            if span is not None:  # tracing: the attempt's span ends (an error raised: noted)
                span.end(outcome)

    async def _conclude(self, delivery: Delivery, claim: ClaimResult, outcome: Outcome,
                        started_at: float | None) -> tuple[bool, float]:
        """Record an attempt's outcome (settled by the next flush): whether the task will be
        retried, and in how long. Its completion carries the attempt's number and start
        (``started_at``, the worker's clock) for the task's attempt history."""
        attempts, received_at = claim.attempts, claim.received_at
        if outcome.status == "success":
            self.stats.succeeded += 1
            outbox, outputs = self.results.route(delivery, claim, TaskState.SUCCEEDED, outcome)
            self._settle(_Settle(delivery, Completion(
                delivery.task_id, TaskState.SUCCEEDED, outcome.result, outcome.result_type,
                outbox=outbox, attempt=attempts, started_at=started_at), outputs=outputs))
            return False, 0.0
        reason = "" if outcome.error_type == "Reject" else "not retryable"
        if outcome.status == "retry":
            decision = self.policy.decide(attempts, received_at, time.time(), outcome.delay_s)
            if decision.retry:
                self.stats.retried += 1
                log.info("task %s attempt %d failed (%s: %s); retry in %.2fs%s",
                         delivery.task_id, attempts, outcome.error_type, outcome.error_message,
                         decision.delay_s, _traceback_tail(outcome),
                         extra=self._fields(delivery, attempts))
                self._settle(_Settle(
                    delivery,
                    Completion(delivery.task_id, TaskState.RETRYING,
                               error_type=outcome.error_type,
                               error_message=outcome.error_message,
                               error_traceback=outcome.traceback, attempt=attempts,
                               started_at=started_at),
                    delay_s=decision.delay_s))
                return True, decision.delay_s
            reason = decision.reason
        retrying = await self._fail(delivery, claim, outcome, reason, started_at)
        return retrying, DEAD_LETTER_RETRY_S

    def _fields(self, delivery: Delivery, attempt: int) -> dict[str, Any]:
        """A task's log line's fields (``--log-format json`` writes them as keys)."""
        traceparent = delivery.headers.get("traceparent") or ""  # W3C: 00-<trace id>-...
        return {"pipeline": self.config.name, "task_id": delivery.task_id, "attempt": attempt,
                "tenant": delivery.tenant or self.config.tenant, "function": delivery.function,
                "trace_id": traceparent[3:35] if len(traceparent) >= 55 else None}

    def _observe(self, status: str, duration_s: float) -> None:
        child = self._histograms.get(status)
        if child is None:
            child = self._histograms[status] = metrics.HANDLER_SECONDS.labels(
                self.config.name, status)
        child.observe(duration_s)

    def _message(self, delivery: Delivery, attempts: int,
                 span: tracing.AttemptSpan | None = None) -> Message:
        """What the handler gets (its payload decoded when the handler first reads it).
        ``span``: a batch message's attempt span (else the current one is the attempt's)."""
        headers = delivery.headers
        if tracing.ENABLED:  # tracing (issue 17 item 3): the attempt span's traceparent
            if span is not None:
                with span.active():
                    headers = tracing.handler_headers(headers)
            else:
                headers = tracing.handler_headers(headers)
        return Message(delivery.task_id, self.config.name, body=delivery.body,
                       content_type=delivery.content_type, key=delivery.key,
                       headers=headers, attempt=attempts, tenant=delivery.tenant,
                       function=delivery.function)

    async def _invoke(self, delivery: Delivery, attempts: int) -> Outcome:
        return await self.handler.invoke(self._message(delivery, attempts),
                                         self.config.consumer.timeout_s)

    async def _fail(self, delivery: Delivery, claim: ClaimResult, outcome: Outcome,
                    reason: str, started_at: float | None) -> bool:
        """Dead-letter and record FAILED (rule 5); True if it must be retried (dead letter
        down). ``started_at``: the attempt's start, None if no handler ran."""
        letter = self.results.dead_letter(delivery, outcome, claim.attempts, reason)
        try:
            await self.dead_letter.send([letter])
        except Exception as exc:
            log.error("task %s: the dead letter is unavailable (%s); retrying in %gs",
                      delivery.task_id, exc, DEAD_LETTER_RETRY_S,
                      extra=self._fields(delivery, claim.attempts))
            self._settle(_Settle(delivery, Completion(
                delivery.task_id, TaskState.RETRYING, error_type=outcome.error_type,
                error_message=outcome.error_message, error_traceback=outcome.traceback,
                attempt=claim.attempts, started_at=started_at),
                delay_s=DEAD_LETTER_RETRY_S))
            return True
        self.stats.failed += 1
        log.warning("task %s failed for good: %s: %s (%s); sent to the dead letter%s",
                    delivery.task_id, outcome.error_type, outcome.error_message,
                    reason or ("payload refused" if outcome.error_type == "InvalidPayload"
                               else "rejected by the handler"), _traceback_tail(outcome),
                    extra=self._fields(delivery, claim.attempts))
        message = f"{outcome.error_message} ({reason})" if reason else outcome.error_message
        outbox, outputs = self.results.route(delivery, claim, TaskState.FAILED, outcome, message)
        self._settle(_Settle(delivery, Completion(
            delivery.task_id, TaskState.FAILED, error_type=outcome.error_type,
            error_message=message, outbox=outbox, error_traceback=outcome.traceback,
            dead_letter=DeadLetter(delivery.body, delivery.content_type, delivery.key,
                                   dict(delivery.headers) or None),
            attempt=claim.attempts, started_at=started_at),
            outputs=outputs))
        return False

    # -- recording and settling (group commit) -----------------------------------------------

    def _settle(self, item: _Settle) -> None:
        self._pending.append(item)
        self._unrecorded.add(id(item.delivery))
        self._pending_event.set()

    async def _flush_forever(self) -> None:
        """The only writer of attempt ends; never cancelled, it returns once closing and empty
        (so a batch is never cut off between its store write and its settlement)."""
        while True:
            await self._pending_event.wait()
            self._pending_event.clear()
            try:
                await self._flush_once()
            except Exception:
                log.exception("recording finished tasks failed; will try again")
                await asyncio.sleep(FLUSH_ERROR_PAUSE_S)
                self._pending_event.set()
                continue
            if self._closing and not self._pending:
                return

    async def _flush_once(self) -> None:
        batch = self._pending
        if not batch:
            await self._write_starts()  # step 5 alone: lanes that admitted outside a flush
            return
        self._pending = []
        try:
            # Step 1: record every attempt's end in one store write (rules 4, 6).
            recorded = [s for s in batch if s.completion is not None]
            states = await self.store.complete(
                self.config.name, [s.completion for s in recorded if s.completion], self.owner,
                time.time()) if recorded else []
        except Exception:
            self._pending[:0] = batch  # nothing was written: try the whole batch again
            raise
        # Step 2: what the store accepted decides how each message is settled.
        recorded_as = {id(s): st for s, st in zip(recorded, states, strict=True)}
        acks: list[tuple[Delivery, tuple[Output, ...]]] = []
        requeues: list[tuple[Delivery, float]] = []
        for s in batch:
            state = recorded_as.get(id(s))
            if id(s) in recorded_as and state is None:
                continue  # another worker owns the task now; its message is not ours to settle
            if s.delay_s is not None and (state is None or not state.final):
                requeues.append((s.delivery, s.delay_s))
            else:
                # Outputs only of the end this attempt recorded (not, say, a cancel that won).
                keep = s.completion is None or s.completion.state == state
                acks.append((s.delivery, s.outputs if keep else ()))
        try:
            # Step 3: settle at the source, after the record (rule 4).
            try:
                if self._producing is not None:
                    await self._producing.ack_producing(acks)
                else:
                    await self.source.ack([d for d, _ in acks])
                await self.source.retry_later(requeues)
            except Unavailable as exc:  # rule 4: the broker hands them out again later
                log.debug("settling %d message(s) at the source failed (%s); they come back "
                          "and their recorded ends settle them", len(batch), exc)
        finally:
            # Step 4: the deliveries are no longer held (room to fetch: wake the fetch loop),
            # and each lane whose attempt ended here moves on, its end recorded (rule 10).
            self._finished += len(batch)
            for s in batch:
                self._unhold(s.delivery)
                self._unrecorded.discard(id(s.delivery))
                lane_end = self._lane_ends.pop(id(s.delivery), None)
                if lane_end is not None:
                    self._lane_finished(*lane_end)
            self._start_ready()
            self._slot_freed.set()
        # Step 5: the reserved tasks those lanes admitted start (rule 12).
        await self._write_starts()

    async def _write_starts(self) -> None:
        """Write the starts of the reserved tasks whose lanes admitted them, in one store
        write; each runs once it returned (rule 12). One not RUNNING here any more (cancelled,
        taken over) is settled unrun, and its lane moves on once that is recorded."""
        if not self._to_start or self._stopping:
            return
        self._starting, self._to_start = self._to_start, []
        self._starts_idle.clear()
        try:
            results = await self.store.start(self.config.name,
                                             [d.task_id for d, _ in self._starting],
                                             self.owner, time.time())
        except Exception:
            self._to_start[:0] = self._starting  # nothing was written: all of them again
            raise
        finally:
            starting, self._starting = self._starting, []
            self._starts_idle.set()
        for (delivery, _), claim in zip(starting, results, strict=True):
            if claim.status == ClaimStatus.RUN:
                self._ready.append((delivery, claim))
                continue
            await self._not_run(delivery, claim)
            lane = self._lane(delivery)
            if lane is not None:
                self._lane_ends[id(delivery)] = (lane, delivery.task_id, False, 0.0)
        self._start_ready()

    # -- leases ---------------------------------------------------------------------------

    async def _heartbeat_forever(self) -> None:
        """Extend the source's leases of every delivery held here, and the store's lease of
        every task claimed here: running, ready, or waiting in its lane (a task that waits
        behind its key must not be taken over meanwhile). A task whose store lease was lost
        (another worker took it over) is cancelled if running, else dropped unrun."""
        interval = max(self.source.lease_s / 3.0, 0.05)
        while True:
            await asyncio.sleep(interval)
            held = list(self._held.values())
            if not held:
                continue
            claimed = ([d.task_id for ds in self._running.values() for d in ds]
                       + [d.task_id for d, _ in self._ready]
                       + [d.task_id for d, _ in self._to_start + self._starting]
                       + [d.task_id for d, _ in self.dispatcher.waiting_items()])
            try:
                with contextlib.suppress(Unavailable):  # its source logs the outage, once
                    await self.source.extend(held)
                lost = await self.store.extend(self.config.name, claimed, self.owner,
                                               self.source.lease_s, time.time())
            except Exception:
                log.exception("extending leases failed; will try again")
                continue
            if lost:
                await self._drop_lost(set(lost))

    async def _drop_lost(self, lost: set[str]) -> None:
        for task_id in lost:
            self.cancel_attempt(task_id)
        admitted = [d for d, _ in self._ready if d.task_id in lost]
        if self._fair is not None:
            self._fair.remove_where(lambda item: item[0].task_id in lost)
        else:
            self._ready = deque(item for item in self._ready if item[0].task_id not in lost)
        admitted += [d for d, _ in self._to_start if d.task_id in lost]
        self._to_start = [item for item in self._to_start if item[0].task_id not in lost]
        unstarted = admitted + [d for d, _ in self.dispatcher.remove_waiting(
            lambda item: item[0].task_id not in lost)]
        for d in admitted:  # each held its lane (as a running attempt does): let it move on
            lane = self._lane(d)
            if lane is not None:
                self._lane_finished(lane, d.task_id, False, 0.0)
        if not unstarted:
            return
        log.warning("%d task(s) waiting here were taken over by another worker; dropped "
                    "unrun", len(unstarted))
        await self.source.retry_later([(d, 0.0) for d in unstarted])
        for d in unstarted:
            self._unhold(d)
        self._slot_freed.set()

    async def _claims_done(self) -> None:
        """Wait for the claims under way to be written and offered (raise if one failed)."""
        if self._claiming is not None:
            claiming, self._claiming = self._claiming, None
            await claiming

    async def _finish_in_flight(self) -> None:
        self._stopping = True  # nothing new starts (rule 8); a start write under way ends first
        await self._claims_done()
        await self._starts_idle.wait()
        await self._hand_back_unstarted()
        if not self._running:
            return
        grace = self.config.consumer.timeout_s + 1.0
        log.info("stopping: waiting up to %.1fs for %d task(s) in flight", grace,
                 len(self._running))
        _done, still = await asyncio.wait(set(self._running), timeout=grace)
        # Lanes freed by the finishing tasks: not started now.
        await self._hand_back_unstarted()
        if not still:
            return
        handed_back = [d for t in still if t in self._running for d in self._running[t]]
        for task in still:
            task.cancel()
        await asyncio.gather(*still, return_exceptions=True)
        await self.store.release(self.config.name, [d.task_id for d in handed_back], self.owner)
        await self.source.retry_later([(d, 0.0) for d in handed_back])
        for d in handed_back:
            self._unhold(d)
        log.warning("stopping: handed %d unfinished task(s) back to the queue", len(handed_back))

    async def _hand_back_unstarted(self) -> None:
        """Every task claimed here whose handler has not run (ready, admitted and waiting for
        its start, or waiting in its lane): un-claimed and handed back at once (rule 11)."""
        items = [*self._ready, *self._to_start, *self.dispatcher.drop_waiting()]
        self._ready.clear()
        self._to_start.clear()
        if not items:
            return
        started = [d.task_id for d, claim in items if claim.started]
        reserved = [d.task_id for d, claim in items if not claim.started]
        if started:
            await self.store.unclaim(self.config.name, started, self.owner)
        if reserved:
            await self.store.unclaim(self.config.name, reserved, self.owner, started=False)
        await self.source.retry_later([(d, 0.0) for d, _ in items])
        for d, _ in items:
            self._unhold(d)
