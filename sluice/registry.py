"""Component registry: name → (config spec, factory, capabilities, hooks), for every family.

Families: ``source`` (where deliveries come from), ``handler`` (what runs a task) and ``sink``
(where results and dead letters go). Each component module declares its spec beside its code and
calls :func:`register` at import. A :class:`Registry` is built from the built-in modules plus
the Python entry points in group ``sluice.components`` (a third party ships a connector as its
own package); the module-level functions use the default registry (:func:`default`).

A component declares what it can do (:class:`Capability`) and provides the hooks that need its
own knowledge (a submitter, a cross-component config check, a wake for a resumed task, which
result destinations it writes with its acknowledgement). Generic code (runtime, loader, gateway,
CLI, consumer loop) asks the registry; it never names a component type.

A component's module must import without its optional dependency installed (import it inside
the factory), so the schema and the ``sluice connectors`` listing cover every component on every
install.

Rules:

1. A spec belongs to the module whose import declared it (:func:`register`); a registry that
   loads that module gets every spec it declared, whichever registry or test imported it first.
2. An entry point names a module (its import declares specs, rule 1) or a callable taking the
   registry (``def register(registry: Registry) -> None``). A broken one is an error naming it,
   never skipped silently.
3. A later registration of a (family, name) replaces the earlier one: built-ins load first, so
   an entry point may replace a built-in component.
4. A capability that needs a hook (``submit``: a submitter; ``outputs_with_ack``: its rule) is
   refused at registration without that hook.
5. A spec is generic over its typed config and its product (``ComponentSpec[C, P]``): its
   ``settings`` converter turns the loader's validated mapping (defaults applied again, so a
   default dead letter's partial mapping is whole) into ``C`` once, at :meth:`ComponentSpec.
   build`, and its factory takes that ``C``. A spec without a converter (a third party's) gets
   the mapping itself. The family getters (:meth:`Registry.source`, ``sink``, ``handler``) say
   what the product is, so the runtime needs no cast.
6. A component that connects somewhere says where (:attr:`ComponentSpec.endpoints`: by default
   its ``url`` key), and one that runs the operator's code on the worker says so
   (``runs_operator_code``), and what else a restricted pipeline may not set
   (``restricted_check``): the network policy of a restricted pipeline
   (:mod:`sluice.netpolicy`) checks a pipeline with them, never by its component types.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import sys
import types
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from sluice.errors import SluiceError
from sluice.spec import Field, ObjectSpec

if TYPE_CHECKING:
    from sluice.config.model import ComponentConfig, PipelineConfig
    from sluice.connectors.base import Sink, Source
    from sluice.datadir import QueuedMessage
    from sluice.handlers.base import Handler
    from sluice.netpolicy import NetworkPolicy
    from sluice.stores.base import Store
    from sluice.tasks.store import NewTask, TaskRecord

FAMILIES = ("source", "handler", "sink")
ENTRY_POINT_GROUP = "sluice.components"

BUILTIN_MODULES = (
    "sluice.connectors.embedded",
    "sluice.connectors.kafka",
    "sluice.connectors.rabbitmq",
    "sluice.connectors.nats",
    "sluice.connectors.redis",
    "sluice.connectors.mqtt",
    "sluice.handlers.python",
    "sluice.handlers.http",
    "sluice.sinks.embedded",
    "sluice.sinks.http",
    "sluice.sinks.webhook",
    "sluice.sinks.kafka",
    "sluice.sinks.rabbitmq",
    "sluice.sinks.nats",
    "sluice.sinks.redis",
    "sluice.sinks.mqtt",
)

T = TypeVar("T")
C = TypeVar("C")  # a component's typed config
P = TypeVar("P")  # what its factory makes


class Capability(enum.StrEnum):
    """What a component can do, beyond its factory (declared on its spec)."""

    SUBMIT = "submit"  # tasks can be submitted to it (gateway, CLI): it provides a submitter
    DELAYED_REDELIVERY = "delayed_redelivery"  # a message can be made visible later (a delay)
    KEY_ORDER = "key_order"  # the source itself hands out one key's messages in order
    OUTPUTS_WITH_ACK = "outputs_with_ack"  # writes result destinations with its acknowledgement
    UNTRACKED = "untracked"  # consumer.track_tasks: false (its acks record what is finished)
    EXACTLY_ONCE = "exactly_once"  # consumer.exactly_once (results and acks in one transaction)


@dataclass(frozen=True)
class BuildContext:
    """What a factory may use besides its own config."""

    pipeline: str
    tenant: str = "default"
    data_dir: Path | None = None
    pipeline_file: Path | None = None
    concurrency: int = 8
    ordering: str = "key"  # consumer.ordering (a source may keep keys in order itself)
    source: Any = None  # the pipeline's source ComponentConfig (a sink may default to its broker)
    exactly_once: bool = False  # consumer.exactly_once (the source then runs transactions)
    batch: bool = False  # handler.batch is set (the handler is called with lists of messages)
    store_url: str | None = None  # the process's store (--store); None: data_dir's SQLite
    opened: Store | None = None  # that store, already open (else opened from store_url)
    # A restricted pipeline's network policy (sluice.netpolicy): components that connect
    # refuse what it refuses, at connect time too. None: the operator's pipeline.
    network: NetworkPolicy | None = None

    def own_or_source_url(self, url: str | None, family_name: str, what: str,
                          example: str) -> str:
        """A sink's connection: its own ``url``, else the ``url`` of the pipeline's source when
        that is the same broker (``family_name``), else :class:`~sluice.errors.Misconfigured`
        naming ``what`` (the sink and its target) and an ``example`` url."""
        if url:
            return url
        if self.source is not None and self.source.type == family_name:
            return str(get("source", family_name).typed(self.source.config).url)
        from sluice.errors import Misconfigured

        raise Misconfigured(f"pipeline {self.pipeline!r}: {what} needs a url: the pipeline's "
                            f"source is not {family_name}, so set url: {example}")

    @property
    def store(self) -> Store:
        """The process's store (:func:`sluice.stores.open_store`): where embedded queues,
        tasks and outboxes live."""
        if self.opened is not None:
            return self.opened
        from sluice.stores import open_store

        return open_store(self.store_url, self.data_dir)


# -- submitting ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Submission:
    """One task to submit: its pipeline and tenant, the message, a delay, when it arrived."""

    pipeline: str
    tenant: str
    message: QueuedMessage
    delay_s: float = 0.0
    received_at: float | None = None
    # A hosting pipeline's function (sluice.tenancy): its route may name a dedicated queue.
    function: str | None = None
    # The pipeline's consumer.keep_payload_bytes: the task record keeps that much of the body.
    keep_payload_bytes: int = 0

    def new_task(self) -> NewTask:
        """The task record to create for this submission (its payload kept)."""
        from sluice.tasks.store import NewTask

        m = self.message
        return NewTask.of(m.task_id, m.key, self.received_at, m.body, m.content_type,
                          self.keep_payload_bytes)


class Submitter(Protocol):
    """Puts tasks on one pipeline's source (made by its source's spec, :attr:`ComponentSpec.
    submitter`): the task is created ``QUEUED`` and its message queued or produced."""

    async def submit(self, items: Sequence[Submission]) -> list[TaskRecord | None]:
        """The created tasks; ``None`` where the task id was already used in the pipeline."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class SubmitContext:
    """What a submitter and a wake hook may use: the process's store."""

    store: Store


# -- hooks -----------------------------------------------------------------------------------

# (config, pipeline file) → (key path under the component, message) for each problem.
Check = Callable[[Any, Path | None], list[tuple[tuple[str, ...], str]]]
# (validated, defaulted pipeline document) → (key path from the document root, message).
PipelineCheck = Callable[[Mapping[str, Any]], Iterable[tuple[tuple[str | int, ...], str]]]
SubmitterFactory = Callable[["PipelineConfig", SubmitContext], Submitter]
Wake = Callable[["PipelineConfig", str, SubmitContext], Awaitable[None]]
OutputsWithAck = Callable[["PipelineConfig", "ComponentConfig"], bool]
# pipeline name → the dead letter's sink config, {type: config}.
DefaultDeadLetter = Callable[[str], dict[str, Any]]
# typed config → (key path under the component, a URL or host[:port]) for each address it
# connects to (rule 6).
Endpoints = Callable[[Any], list[tuple[tuple[str, ...], str]]]

_NEEDS_HOOK = {Capability.SUBMIT: "submitter", Capability.OUTPUTS_WITH_ACK: "outputs_with_ack"}


def as_given(value: Any) -> Any:
    """The converter of a spec that declares no typed config: its factory gets the mapping."""
    return value


URL_KEY = "url"


def url_endpoints(config: Any) -> list[tuple[tuple[str, ...], str]]:
    """The default :attr:`ComponentSpec.endpoints` (rule 6): the ``url`` key of a typed config
    (an attribute) or of a mapping, when it is set."""
    value = config.get(URL_KEY) if isinstance(config, Mapping) else getattr(config, URL_KEY,
                                                                            None)
    return [((URL_KEY,), value)] if isinstance(value, str) and value else []


@dataclass(frozen=True)
class ComponentSpec(Generic[C, P]):
    family: str
    name: str
    summary: str
    config: ObjectSpec | Field  # a Field for a scalar shorthand, e.g. ``python: mod:fn``
    factory: Callable[[C, BuildContext], P]
    extra: str | None = None  # the pip extra its dependency comes with
    # Load-time checks a schema cannot express: (config, pipeline file) →
    # (key path under the component, message) for each problem. Pure: no I/O, no user code.
    check: Check | None = None
    # Checks that load the component's own code on this machine (a Python handler imports
    # its module): run by `sluice validate` and workers, skipped by an API-only load
    # (`serve --no-workers`, `submit -f`). The factory then meets the same problem at build.
    check_code: Check | None = None
    capabilities: frozenset[Capability] = frozenset()
    # A source's checks across the pipeline (its destinations, the consumer policy), after
    # the loader's own capability checks. Pure, as ``check``.
    pipeline_check: PipelineCheck | None = None
    submitter: SubmitterFactory | None = None  # with Capability.SUBMIT
    wake: Wake | None = None  # a resumed task's message, held while paused, made visible now
    outputs_with_ack: OutputsWithAck | None = None  # with Capability.OUTPUTS_WITH_ACK
    # The dead letter of a pipeline that names none (one component provides the default).
    default_dead_letter: DefaultDeadLetter | None = None
    # A source's dedicated queues for a hosting pipeline's functions (sluice.tenancy.queues):
    # (typed config, context) -> QueueOps. None: functions share the source's queue only.
    hosting: Callable[[Any, BuildContext], Any] | None = None
    # The validated, defaulted config → its typed form (rule 5): e.g. a Settings dataclass's
    # ``from_mapping``, which takes an instance of its own class back as it is.
    settings: Callable[[Any], C] = as_given
    # Where it connects (rule 6): typed config → (key path, URL or host[:port]) per address.
    endpoints: Endpoints = url_endpoints
    # It runs the operator's code in the worker (a Python handler): refused in a restricted
    # pipeline (rule 6).
    runs_operator_code: bool = False
    # What a restricted pipeline may not set in its config besides addresses (e.g. a client's
    # raw settings naming local files): typed config → (key path, message) per problem.
    restricted_check: Callable[[Any], list[tuple[tuple[str, ...], str]]] | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown component family {self.family!r}")
        for capability, hook in _NEEDS_HOOK.items():
            if capability in self.capabilities and getattr(self, hook) is None:
                raise ValueError(f"{self.family} {self.name!r}: capability {capability} needs "
                                 f"the {hook} hook")

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def json_schema(self) -> dict[str, Any]:
        schema = self.config.json_schema()
        schema.setdefault("description", self.summary)
        return schema

    def apply_defaults(self, value: Any) -> Any:
        if isinstance(self.config, ObjectSpec) and isinstance(value, Mapping):
            return self.config.apply_defaults(value)
        return value

    def typed(self, config: Any) -> C:
        """The typed config of a component's validated config (rule 5)."""
        return self.settings(self.apply_defaults(config))

    def build(self, config: Any, ctx: BuildContext) -> P:
        """Make the component from its validated config (rule 5)."""
        return self.factory(self.typed(config), ctx)


# Every spec declared by a module's import, by module name (rule 1).
_declared: dict[str, dict[tuple[str, str], ComponentSpec[Any, Any]]] = {}


class Registry:
    """The components of one process (or of a test): built-in modules, then entry points."""

    def __init__(self, modules: Sequence[str] = BUILTIN_MODULES,
                 entry_point_group: str | None = ENTRY_POINT_GROUP) -> None:
        self._modules = tuple(modules)
        self._group = entry_point_group
        self._components: dict[tuple[str, str], ComponentSpec[Any, Any]] = {}
        self._loaded = False
        self._loading = False
        self.generation = 0  # bumped by each registration (caches keyed on it go stale)

    def register(self, spec: ComponentSpec[C, P]) -> ComponentSpec[C, P]:
        self._components[(spec.family, spec.name)] = spec
        self.generation += 1
        return spec

    def load(self) -> None:
        """Import the built-in modules, then the entry points (rules 1-3): once it succeeded;
        a failed load is tried again (and fails the same way) at the next use."""
        if self._loaded or self._loading:  # a component asking the registry while it loads
            return
        self._loading = True
        try:
            for module in self._modules:
                self.load_module(module)
            if self._group is not None:
                for entry in metadata.entry_points(group=self._group):
                    self.load_entry_point(entry)
            self._loaded = True
        finally:
            self._loading = False

    def load_module(self, name: str) -> None:
        importlib.import_module(name)
        for spec in _declared.get(name, {}).values():
            self.register(spec)

    def load_entry_point(self, entry: metadata.EntryPoint) -> None:
        where = f"entry point {entry.name} = {entry.value} (group {entry.group})"
        try:
            loaded = entry.load()
            if isinstance(loaded, types.ModuleType):
                self.load_module(loaded.__name__)
            elif callable(loaded):
                loaded(self)
            else:
                raise TypeError("expected a module or a callable taking the registry")
        except Exception as exc:
            raise SluiceError(f"{where}: cannot register its components: "
                              f"{type(exc).__name__}: {exc}") from exc

    def get(self, family: str, name: str) -> ComponentSpec[Any, Any]:
        self.load()
        return self._components[(family, name)]

    def source(self, name: str) -> ComponentSpec[Any, Source]:
        return self.get("source", name)

    def sink(self, name: str) -> ComponentSpec[Any, Sink]:
        return self.get("sink", name)

    def handler(self, name: str) -> ComponentSpec[Any, Handler]:
        return self.get("handler", name)

    def names(self, family: str) -> list[str]:
        self.load()
        return sorted(name for fam, name in self._components if fam == family)

    def components(self, family: str | None = None) -> list[ComponentSpec[Any, Any]]:
        self.load()
        return [s for (fam, _), s in sorted(self._components.items()) if family in (None, fam)]

    def with_capability(self, family: str, capability: Capability) -> list[str]:
        """The names of the components of ``family`` that have ``capability``."""
        return [s.name for s in self.components(family) if s.can(capability)]

    def family_schema(self, family: str) -> dict[str, Any]:
        """A one-key object naming the component type: ``{embedded: {queue: jobs}}``."""
        return {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {s.name: s.json_schema() for s in self.components(family)},
            "additionalProperties": False,
            "x-sluice-family": family,
        }

    def default_dead_letter(self, source: str, pipeline: str) -> dict[str, Any]:
        """The dead letter of a pipeline that names none: the source's own default if it
        declares one, else the first registered component's (the embedded queue's)."""
        own = self.get("source", source).default_dead_letter
        if own is not None:
            return own(pipeline)
        for spec in self._components.values():
            if spec.default_dead_letter is not None:
                return spec.default_dead_letter(pipeline)
        raise LookupError("no component declares a default dead letter")

    def outputs_with_ack(self, config: PipelineConfig, destination: ComponentConfig) -> bool:
        """Whether the pipeline's source writes this result destination with its
        acknowledgement instead of the outbox (:attr:`ComponentSpec.outputs_with_ack`)."""
        spec = self.get("source", config.source.type)
        hook = spec.outputs_with_ack
        return spec.can(Capability.OUTPUTS_WITH_ACK) and hook is not None and hook(
            config, destination)


_default = Registry()


def default() -> Registry:
    """The registry the module-level functions (and so the loader and the runtime) use."""
    return _default


@contextlib.contextmanager
def using(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the default while the block runs (a test's own components)."""
    global _default
    before, _default = _default, registry
    try:
        yield registry
    finally:
        _default = before


def register(spec: ComponentSpec[C, P]) -> ComponentSpec[C, P]:
    """Declare ``spec`` as its calling module's (rule 1) and add it to the default registry."""
    module = str(sys._getframe(1).f_globals.get("__name__", ""))
    _declared.setdefault(module, {})[(spec.family, spec.name)] = spec
    return _default.register(spec)


def load_builtins() -> None:
    _default.load()


def get(family: str, name: str) -> ComponentSpec[Any, Any]:
    return _default.get(family, name)


def source(name: str) -> ComponentSpec[Any, Source]:
    return _default.source(name)


def sink(name: str) -> ComponentSpec[Any, Sink]:
    return _default.sink(name)


def handler(name: str) -> ComponentSpec[Any, Handler]:
    return _default.handler(name)


def names(family: str) -> list[str]:
    return _default.names(family)


def components(family: str | None = None) -> list[ComponentSpec[Any, Any]]:
    return _default.components(family)


def family_schema(family: str) -> dict[str, Any]:
    return _default.family_schema(family)


def with_capability(family: str, capability: Capability) -> list[str]:
    return _default.with_capability(family, capability)


def source_can(config: PipelineConfig, capability: Capability) -> bool:
    """Whether the pipeline's source has ``capability``."""
    return _default.get("source", config.source.type).can(capability)


def default_dead_letter(source: str, pipeline: str) -> dict[str, Any]:
    return _default.default_dead_letter(source, pipeline)


def outputs_with_ack(config: PipelineConfig, destination: ComponentConfig) -> bool:
    return _default.outputs_with_ack(config, destination)
