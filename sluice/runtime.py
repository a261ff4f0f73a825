"""Wires pipelines: source → consumer loop → handler → dead letter, over one task store.

:func:`build` turns a :class:`~sluice.config.model.PipelineConfig` into a ready
:class:`~sluice.consumer.loop.ConsumerLoop`; :func:`run_pipelines` runs several in one process
until stopped (SIGINT/SIGTERM from the CLI) or, with ``drain``, until their sources are empty.

A loop's handler is built (a Python handler's module imported) only when the loop is to run:
:func:`build` gives it a :class:`DeferredHandler`; :func:`build_handlers` (which
:func:`run_pipelines` calls first) builds them all, and refuses a handler whose code is missing
with a :class:`~sluice.errors.ConfigError` at its ``file:line:col``. A process that serves the
API without workers builds loops for their sources but never imports a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from sluice import registry
from sluice.config.destinations import destinations
from sluice.config.model import ComponentConfig, PipelineConfig
from sluice.connectors.base import ProducingSource, Sink, Source
from sluice.consumer.loop import ConsumerLoop, LoopStats
from sluice.consumer.results import ResultRouter
from sluice.errors import ConfigError, ConfigIssue
from sluice.handlers.base import BatchHandler, Handler
from sluice.message import Message, Outcome
from sluice.netpolicy import NetworkPolicy
from sluice.sinks.delivery import Deliverer, Destination, outbox_lease_s
from sluice.stores.base import ControlEvent, Store
from sluice.stores.patient import PatientOutbox, PatientTaskStore
from sluice.tasks.store import TaskStore
from sluice.tasks.untracked import UntrackedStore
from sluice.tenancy.hosting import Hosting
from sluice.tenancy.queues import QueueOps
from sluice.tenancy.source import RoutedSource

log = logging.getLogger(__name__)


def context(config: PipelineConfig, data_dir: Path | None,
            store_url: str | None = None, *,
            network: NetworkPolicy | None = None) -> registry.BuildContext:
    """What the pipeline's factories get; ``network``: a restricted pipeline's policy
    (:mod:`sluice.netpolicy`), ``None`` for the operator's own."""
    return registry.BuildContext(
        network=network,
        store_url=store_url,
        pipeline=config.name,
        tenant=config.tenant,
        data_dir=data_dir,
        pipeline_file=config.path,
        concurrency=config.consumer.concurrency,
        ordering=config.consumer.ordering,
        source=config.source,
        exactly_once=config.consumer.exactly_once,
        batch=config.batch is not None,
    )


def _source(component: ComponentConfig, ctx: registry.BuildContext) -> Source:
    return registry.source(component.type).build(component.config, ctx)


def _sink(component: ComponentConfig, ctx: registry.BuildContext) -> Sink:
    return registry.sink(component.type).build(component.config, ctx)


def build_source(config: PipelineConfig, data_dir: Path | None, *,
                 store_url: str | None = None, network: NetworkPolicy | None = None) -> Source:
    return _source(config.source, context(config, data_dir, store_url, network=network))


def build(config: PipelineConfig, data_dir: Path | None,
          worker_id: str | None = None, *, store_url: str | None = None,
          network: NetworkPolicy | None = None) -> ConsumerLoop:
    """The pipeline's loop over the store ``store_url`` (``None``: ``data_dir``'s SQLite).
    ``network``: a restricted pipeline's policy (its components refuse what it refuses, at
    connect time too; :mod:`sluice.netpolicy`); ``None``: the operator's pipeline."""
    ctx = context(config, data_dir, store_url, network=network)
    state = ctx.store
    store: TaskStore = state.tasks
    if state.patience_s:
        store = PatientTaskStore(store, state.patience_s, f"the store {state.url}")
    dead_letter = _sink(config.dead_letter, ctx)
    source = _source(config.source, ctx)
    routed: RoutedSource | None = None
    queues: QueueOps | None = None
    if config.tenancy is not None:  # a hosting pipeline: its functions' queues as one source
        spec = registry.get("source", config.source.type)
        if spec.hosting is not None:
            queues = spec.hosting(spec.typed(config.source.config), ctx)
        routed = RoutedSource(config.tenancy, config.tenant, source,
                              queues.shared if queues is not None else config.name, queues)
        source = routed
    deliverers: list[Deliverer] = []
    outboxed: list[Destination] = []
    with_ack: list[tuple[Destination, str]] = []  # (destination, its target: a topic)
    for destination in destinations(config):
        component = destination.component
        target = destination.target
        if writes_with_offsets(config, component) and target is not None and routed is None:
            # Written by the source with its commits (rule 9 of the consumer loop).
            with_ack.append((destination, target))
            continue
        outboxed.append(destination)
        outbox = state.outbox(config.name, destination.label, outbox_lease_s(destination),
                              legacy=(destination.legacy_name,))
        if state.patience_s:
            outbox = PatientOutbox(outbox, state.patience_s,
                                   f"outbox {destination.label} of the store {state.url}")
        deliverers.append(Deliverer(config.name, destination, _sink(component, ctx),
                                    dead_letter, outbox))
    if with_ack:
        if not isinstance(source, ProducingSource):
            raise TypeError(f"source {config.source.type!r} declares outputs_with_ack but "
                            "has no produce_to")
        # Each target with its sink's typed config (the source reads what it needs of it).
        source.produce_to([(t, d.settings) for d, t in with_ack])
    loop = ConsumerLoop(
        config,
        source=source,
        store=store if config.consumer.track_tasks else UntrackedStore(store, state.put_outbox),
        handler=DeferredHandler(config, ctx),
        dead_letter=dead_letter,
        worker_id=worker_id,
        deliverers=deliverers,
        results=ResultRouter(config, outboxed, with_ack),
    )
    if routed is not None:
        fair = loop.fair_shares
        assert fair is not None
        routed.fair = fair
        routed.capacity = loop.capacity
        loop.hosting = Hosting(config, state, routed, fair, queues)
    return loop


def writes_with_offsets(config: PipelineConfig, destination: ComponentConfig) -> bool:
    """Whether the source writes this result destination with its acknowledgement (its
    commits) instead of the outbox: the source's spec decides
    (:attr:`sluice.registry.ComponentSpec.outputs_with_ack`)."""
    return registry.outputs_with_ack(config, destination)


class DeferredHandler:
    """A loop's handler before it is built: :meth:`build` makes it (imports its code).
    :func:`build_handlers` puts the built handler in the loop's place; a loop run on its own
    builds it at its first attempt."""

    def __init__(self, config: PipelineConfig, ctx: registry.BuildContext) -> None:
        self.config = config
        self._ctx = ctx
        self._built: Handler | None = None

    def build(self) -> Handler:
        if self._built is None:
            component = self.config.handler
            try:
                self._built = registry.handler(component.type).build(component.config,
                                                                     self._ctx)
            except ImportError as exc:
                raise ConfigError([self.config.issue(
                    ("handler", component.type), f"{exc} (the handler's code must be "
                    "importable where the pipeline's workers run)")]) from None
        return self._built

    async def invoke(self, message: Message, timeout_s: float) -> Outcome:
        return await self.build().invoke(message, timeout_s)

    async def invoke_batch(self, messages: Sequence[Message],
                           timeout_s: float) -> list[Outcome]:
        """The built handler's batch call; a handler type without one (a plugin's) gets each
        message in a call of its own, all at once."""
        built = self.build()
        if isinstance(built, BatchHandler):
            return await built.invoke_batch(messages, timeout_s)
        return list(await asyncio.gather(*(built.invoke(m, timeout_s) for m in messages)))

    async def close(self) -> None:
        if self._built is not None:
            await self._built.close()


def build_handlers(loops: Sequence[ConsumerLoop]) -> None:
    """Build every loop's handler now; raise :class:`ConfigError` with every one that cannot
    be built (its module missing), each at the ``handler`` line of its file."""
    issues: list[ConfigIssue] = []
    for loop in loops:
        if isinstance(loop.handler, DeferredHandler):
            try:
                loop.handler = loop.handler.build()
            except ConfigError as exc:
                issues.extend(exc.issues)
    if issues:
        raise ConfigError(issues)


async def warn_stranded(state: Store, loop: ConsumerLoop) -> None:
    """Log the outboxes of the loop's pipeline whose records no destination takes now."""
    config = loop.config
    taken = {name for d in loop.deliverers
             for name in (d.destination.label, d.destination.legacy_name)}
    for name, count in (await state.stranded(config.name, taken)).items():
        log.warning("pipeline %r: %d result record(s) wait in the outbox %r, which no "
                    "destination takes now (its target changed?); to deliver them, give the "
                    "destination that should take them label: %s", config.name, count, name,
                    name)


def control_listener(loops: Sequence[ConsumerLoop]) -> Callable[[ControlEvent], None]:
    """What a control change announced by the store does to this process's loops: a cancel
    stops the task's attempt where it runs here; a pause or resume reaches the loop at once."""
    by_name = {loop.config.name: loop for loop in loops}

    def apply(event: ControlEvent) -> None:
        if event.action in ("listening", "deaf"):
            for each in loops:  # a loop looks at the store itself only while it may miss one
                each.control_pushed(event.action == "listening")
            return
        loop = by_name.get(event.pipeline)
        if loop is None:
            return
        if event.action == "cancel" and event.task_id is not None:
            loop.cancel_attempt(event.task_id)
        elif event.action in ("pause", "resume"):
            loop.set_paused(event.action == "pause")

    return apply


async def run_pipelines(loops: Sequence[ConsumerLoop], stop: asyncio.Event, *,
                        drain: bool = False, store: Store | None = None) -> list[LoopStats]:
    """Run every loop until ``stop`` (or each is drained); close their components after.
    ``store``: the loops' store, whose control changes (store invariant 4) reach them."""
    unwatch: Callable[[], None] | None = None
    try:
        build_handlers(loops)
        if store is not None:
            for loop in loops:
                await warn_stranded(store, loop)
            unwatch = await store.watch_control(control_listener(loops))
        return list(await asyncio.gather(*(loop.run(stop, drain=drain) for loop in loops)))
    finally:
        if unwatch is not None:
            unwatch()
        for loop in loops:
            for closer in (loop.handler.close, loop.source.close, loop.dead_letter.close):
                with contextlib.suppress(Exception):
                    await closer()
