"""The loops a process runs: those of its pipeline files and those of its store's definitions
(:mod:`sluice.definitions`), started, swapped and stopped while the process runs.

Rules:

1. One loop per pipeline name at a time. :meth:`Supervisor.apply` of a running pipeline
   *swaps*: the old loop stops fetching, finishes what it holds in flight (settled, acked; what
   it claimed but had not started goes back to the queue, un-claimed), its components close,
   and only then does the new loop start. No task is lost or run twice across a swap: the two
   loops never hold the same pipeline's work at once.
2. A new pipeline is built (its handler's code imported, when this process runs workers)
   before the old loop stops: one that cannot be built here is logged with its
   ``file:line:col`` issues and skipped, and the loop it was to replace runs on. Nothing one
   pipeline does (a build error, a crash of its loop) stops another's; only a crash of a file
   pipeline's loop ends the process, as it did before definitions.
3. A file pipeline wins over a definition of the same name (definitions invariant 4): the
   definition is ignored here, with a warning.
4. The store's definitions are followed: every ``poll_s`` (and at once after :meth:`poke`, which
   the local gateway calls after a PUT or DELETE) the changes after the last version seen are
   read and applied in order, so every process of a shared store converges on the same
   pipelines. A definition's "file" in its errors is ``store:<name>``. A change of one name
   waits for the previous change of that name to be done; changes of other names do not.
5. The gateway (when there is one) sees what runs: ``gateway.pipelines`` holds a pipeline as
   soon as it is accepted and ``gateway.loops`` its loop from its start, until it is removed.
   Both are replaced (copy on write), never changed in place, so a reader iterating one while
   it awaits never sees it change under it. ``gateway.retired`` keeps the tenant of each
   deleted definition, so its tasks stay readable through the task API.
6. Control changes announced by the store (cancel, pause, resume; listening or deaf) reach
   every loop running at the time, including those started after the listener was set up.
7. Without workers (``sluice serve --no-workers``) the loops are built (their sources answer
   ``/readyz`` and ``/metrics``) but never run, and no handler is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sluice import runtime
from sluice.config.load import parse_pipeline
from sluice.config.model import PipelineConfig
from sluice.consumer.loop import ConsumerLoop, LoopStats
from sluice.definitions import Definition
from sluice.errors import ConfigError, ConfigIssue, SluiceError
from sluice.netpolicy import NetworkPolicy
from sluice.stores.base import ControlEvent, Store

if TYPE_CHECKING:
    from sluice.gateway.app import Gateway

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often the store's definitions are looked at (rule 4)
FILE, STORE = "file", "store"  # where a running pipeline came from


def definition_file(name: str) -> str:
    """The "file" a definition's errors name (rule 4)."""
    return f"store:{name}"


def parse_definition(definition: Definition, *, check_code: bool = False) -> PipelineConfig:
    """A definition's pipeline, parsed as a file is (definitions invariant 1); one put with a
    tenant's key may not read the server's environment. Its tenant is the definition's (a
    body without ``tenant`` put with a tenant's key is that tenant's)."""
    config = parse_pipeline(definition.body, definition_file(definition.name),
                            check_code=check_code, trusted=not definition.restricted)
    return dataclasses.replace(config, tenant=definition.tenant)


@dataclass
class Running:
    """One pipeline of the process and its loop."""

    config: PipelineConfig
    loop: ConsumerLoop
    origin: str  # FILE or STORE
    version: int  # the definition's; 0 for a file
    restricted: bool
    stop: asyncio.Event
    task: asyncio.Task[LoopStats | None] | None  # None: built, not run (rule 7)


class Supervisor:
    """Owns a process's running loops (see the module rules)."""

    def __init__(self, store: Store, data_dir: Path | None, *, store_url: str | None = None,
                 gateway: Gateway | None = None, workers: bool = True,
                 network: NetworkPolicy | None = None, concurrency: int | None = None,
                 follow: bool = True, poll_s: float = POLL_S) -> None:
        self.store = store
        self.data_dir = data_dir
        self.store_url = store_url
        self.gateway = gateway
        self.workers = workers
        # What restricted definitions may reach (default: nothing of the operator's network).
        self.network = network or NetworkPolicy()
        self.concurrency = concurrency
        self.follow = follow
        self.poll_s = poll_s
        self.running: dict[str, Running] = {}
        self.files: dict[str, PipelineConfig] = {}  # the file pipelines (rule 3)
        self.seen: dict[str, int] = {}  # the version of each definition looked at
        self.done: dict[str, int] = {}  # ... and of each served now, or refused here
        self.retired: dict[str, str] = {}  # deleted definitions' tenants (rule 5)
        self.keep_ran = False  # keep every loop that ran in ``ran`` (a final summary)
        self.ran: list[ConsumerLoop] = []
        self.on_change: list[Callable[[], None]] = []  # called when the running set changes
        self.drain = False
        self._locks: dict[str, asyncio.Lock] = {}
        self._poked = asyncio.Event()
        self._changes: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()  # loops built in vain, closing
        self._pushed: bool | None = None  # the store's last "listening"/"deaf" (rule 6)
        self._crashed: asyncio.Queue[tuple[str, BaseException]] = asyncio.Queue()
        self._since = 0
        self._unwatch: Callable[[], None] | None = None

    # -- what runs ----------------------------------------------------------------------------

    @property
    def loops(self) -> dict[str, ConsumerLoop]:
        """The loops now (a new dict: a snapshot)."""
        return {name: r.loop for name, r in self.running.items()}

    def live_loops(self) -> Mapping[str, ConsumerLoop]:
        """A view that always shows the loops of the moment, each iteration over a snapshot."""
        return _LiveLoops(self)

    def origin(self, name: str) -> str | None:
        """FILE or STORE for a pipeline that this process serves; ``None`` if it serves none of
        that name."""
        if name in self.files:
            return FILE
        running = self.running.get(name)
        return None if running is None else running.origin

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def apply(self, config: PipelineConfig, *, restricted: bool = False,
                    origin: str = FILE, version: int = 0) -> bool:
        """Run ``config`` (swap the running pipeline of its name, rule 1); ``False`` when it
        could not be built here (logged; what ran runs on, rule 2) or a file has its name."""
        name = config.name
        if origin == STORE and name in self.files:
            log.warning("%s: pipeline %r is defined by the file %s, which wins; the "
                        "definition of that name is ignored here", definition_file(name), name,
                        self.files[name].path)
            return False
        if self.concurrency is not None:
            config = config.with_concurrency(self.concurrency)
        async with self._lock(name):
            loop = self._build(config, restricted)
            if loop is None:
                return False
            if origin == FILE:
                self.files[name] = config
            self._publish_config(config)
            if origin == STORE:
                self.done[name] = version
            old = self.running.pop(name, None)
            if old is not None:
                log.info("pipeline %r: swapping its loop (the old one finishes what it holds "
                         "first)", name)
                await self._stop(old)
            await self._start(Running(config, loop, origin, version, restricted,
                                      asyncio.Event(), None))
        return True

    async def remove(self, name: str) -> bool:
        """Stop ``name``'s loop: no new fetch, what is in flight finishes; its tasks stay in
        the store. ``False``: nothing of that name runs here."""
        async with self._lock(name):
            self.files.pop(name, None)
            running = self.running.pop(name, None)
            if self.gateway is not None:
                gw = self.gateway
                gw.pipelines = {n: c for n, c in gw.pipelines.items() if n != name}
                gw.loops = {n: lp for n, lp in gw.loops.items() if n != name}
                gw.quotas.pop(name, None)
            self._changed()
            if running is None:
                return False
            log.info("pipeline %r: stopping (what it holds in flight finishes; its tasks are "
                     "kept)", name)
            await self._stop(running)
        return True

    def _build(self, config: PipelineConfig, restricted: bool, *,
               strict: bool = False) -> ConsumerLoop | None:
        """The loop of ``config`` with its handler built (rule 2); ``None``: logged (with
        ``strict``: raised)."""
        try:
            if restricted:
                loop = runtime.build(config, self.data_dir, store_url=self.store_url,
                                     network=self.network)
            else:
                loop = runtime.build(config, self.data_dir, store_url=self.store_url)
        except ConfigError as exc:
            if strict:
                raise
            _log_issues(config.name, exc)
            return None
        except Exception as exc:
            if strict:
                raise
            log.error("pipeline %r cannot be built here, skipped: %s", config.name, exc)
            return None
        if self.workers:
            try:
                runtime.build_handlers([loop])
            except ConfigError as exc:
                closing = asyncio.get_running_loop().create_task(_close(loop))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
                if strict:
                    raise
                _log_issues(config.name, exc)
                return None
        return loop

    def _publish_config(self, config: PipelineConfig) -> None:
        if self.gateway is None:
            return
        gw = self.gateway
        gw.pipelines = {**gw.pipelines, config.name: config}
        gw.retired.pop(config.name, None)
        if config.tenancy is not None:
            from sluice.tenancy.quotas import SubmitQuotas

            gw.quotas[config.name] = SubmitQuotas(config.name, config.tenancy,
                                                  self.store.routes)
        else:
            gw.quotas.pop(config.name, None)

    async def _start(self, running: Running) -> None:
        name, loop = running.config.name, running.loop
        if self.workers:
            with contextlib.suppress(SluiceError):
                await runtime.warn_stranded(self.store, loop)
            if self._pushed is not None:
                loop.control_pushed(self._pushed)
            running.task = asyncio.create_task(self._run_one(running),
                                               name=f"sluice-pipeline-{name}")
            if self.keep_ran:
                self.ran.append(loop)
        self.running[name] = running
        if self.gateway is not None:
            self.gateway.loops = {**self.gateway.loops, name: loop}
        self._changed()

    async def _run_one(self, running: Running) -> LoopStats | None:
        loop = running.loop
        try:
            return await loop.run(running.stop, drain=self.drain)
        except Exception as exc:
            if running.origin != FILE:  # a file's ends the process, which says it (rule 2)
                if isinstance(exc, SluiceError):  # a known failure: its message says it all
                    log.error("%s: pipeline %r stopped: %s", definition_file(
                        loop.config.name), loop.config.name, exc)
                else:
                    log.exception("pipeline %r: its loop failed", loop.config.name)
            self._crashed.put_nowait((running.origin, exc))
            return None
        finally:
            await _close(loop)

    async def _stop(self, running: Running) -> None:
        running.stop.set()
        if running.task is not None:
            await running.task
        else:
            await _close(running.loop)

    def _changed(self) -> None:
        for call in self.on_change:
            call()

    # -- control changes (rule 6) ------------------------------------------------------------

    def _on_control(self, event: ControlEvent) -> None:
        if event.action in ("listening", "deaf"):
            self._pushed = event.action == "listening"
        runtime.control_listener([r.loop for r in self.running.values()
                                  if r.task is not None])(event)

    # -- the store's definitions (rule 4) ----------------------------------------------------

    def poke(self) -> None:
        """Look at the store's definitions now (the local gateway put or deleted one)."""
        self._poked.set()

    async def sync(self) -> None:
        """Apply the definitions changed since the last look (each name's in order)."""
        rows = await self.store.definitions.changes(self._since)
        newest: dict[str, Definition] = {}
        for row in rows:
            newest[row.name] = row  # by version: the last of a name is its newest
            self._since = max(self._since, row.version)
        for definition in newest.values():
            task = asyncio.create_task(self._follow_one(definition))
            self._changes.add(task)
            task.add_done_callback(self._changes.discard)

    async def settled(self) -> None:
        """Wait until every change read so far is applied."""
        while self._changes:
            await asyncio.gather(*list(self._changes), return_exceptions=True)

    async def _follow_one(self, definition: Definition) -> None:
        try:
            await self._follow(definition)
        except Exception:
            log.exception("%s: the definition could not be applied here",
                          definition_file(definition.name))
        finally:
            if not definition.deleted:
                self.done[definition.name] = max(self.done.get(definition.name, 0),
                                                 definition.version)

    async def _follow(self, definition: Definition) -> None:
        name = definition.name
        if definition.deleted:
            self.seen.pop(name, None)
            if self.gateway is not None:
                self.gateway.retired[name] = definition.tenant
            self.retired[name] = definition.tenant
            running = self.running.get(name)
            if running is not None and running.origin == STORE:
                await self.remove(name)
            return
        self.retired.pop(name, None)
        if self.seen.get(name) == definition.version:
            return
        self.seen[name] = definition.version
        try:
            config = parse_definition(definition, check_code=self.workers)
        except ConfigError as exc:
            _log_issues(name, exc)
            return
        await self.apply(config, restricted=definition.restricted, origin=STORE,
                         version=definition.version)

    async def _follow_store(self, stop: asyncio.Event) -> None:
        failing_since: float | None = None  # an outage is said once, and its end once
        while not stop.is_set():
            self._poked.clear()
            try:
                await self.sync()
                if failing_since is not None:
                    log.warning("the store's pipeline definitions are readable again after "
                                "%.1fs", time.monotonic() - failing_since)
                    failing_since = None
            except SluiceError as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("cannot read the store's pipeline definitions (retrying every "
                                "%gs): %s", self.poll_s, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(self._poked.wait(), stop.wait()), self.poll_s)

    # -- the process -------------------------------------------------------------------------

    async def start(self, configs: Sequence[PipelineConfig]) -> None:
        """Listen to the store's control changes; start the files' pipelines, then the store's
        definitions as they are now. A file's pipeline that cannot be built raises (a
        :class:`ConfigError` with every file's issues) and nothing is started."""
        for config in configs:
            self.files[config.name] = config  # before any definition is looked at (rule 3)
        built: list[tuple[PipelineConfig, ConsumerLoop]] = []
        issues: list[ConfigIssue] = []
        try:
            for config in configs:
                if self.concurrency is not None:
                    config = config.with_concurrency(self.concurrency)
                try:
                    loop = self._build(config, False, strict=True)
                    assert loop is not None  # strict: raised otherwise
                    built.append((config, loop))
                except ConfigError as exc:
                    issues.extend(exc.issues)
            if issues:
                raise ConfigError(issues)
        except BaseException:
            for _config, loop in built:
                await _close(loop)
            raise
        if self.workers and self._unwatch is None:
            self._unwatch = await self.store.watch_control(self._on_control)
        for config, loop in built:
            self.files[config.name] = config
            self._publish_config(config)
            await self._start(Running(config, loop, FILE, 0, False, asyncio.Event(), None))
        if self.follow:
            await self.sync()
            await self.settled()

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the store and keep the loops running until ``stop`` (with ``drain``: until
        every loop is drained); then stop every loop, each finishing what it holds. A crash of
        a file pipeline's loop ends it with that error (rule 2)."""
        follower = (asyncio.create_task(self._follow_store(stop))
                    if self.follow and not self.drain else None)
        try:
            while not stop.is_set():
                if self.drain and self.workers and all(
                        r.task is None or r.task.done() for r in self.running.values()):
                    break
                crashed = asyncio.create_task(self._crashed.get())
                waited = asyncio.create_task(stop.wait())
                await asyncio.wait({crashed, waited}, timeout=0.5 if self.drain else None,
                                   return_when=asyncio.FIRST_COMPLETED)
                waited.cancel()
                if not crashed.done():
                    crashed.cancel()
                    continue
                origin, exc = crashed.result()
                if origin == FILE:
                    raise exc
        finally:
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower
            for task in list(self._changes):
                task.cancel()
            await asyncio.gather(*self._changes, return_exceptions=True)
            if self._unwatch is not None:
                self._unwatch()
                self._unwatch = None
            await asyncio.gather(*(self.remove(name) for name in list(self.running)),
                                 return_exceptions=True)


class _LiveLoops(Mapping[str, ConsumerLoop]):
    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def __getitem__(self, name: str) -> ConsumerLoop:
        return self._supervisor.running[name].loop

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._supervisor.running))

    def __len__(self) -> int:
        return len(self._supervisor.running)


def _log_issues(name: str, exc: ConfigError) -> None:
    log.error("pipeline %r cannot run here, skipped:\n%s", name,
              "\n".join(f"  {issue}" for issue in exc.issues))


async def _close(loop: ConsumerLoop) -> None:
    for closer in (loop.handler.close, loop.source.close, loop.dead_letter.close):
        with contextlib.suppress(Exception):
            await closer()


async def _first(*waits: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
