"""Component registry: name → (config spec, factory), for every family.

Families: ``source`` (where deliveries come from), ``handler`` (what runs a task) and ``sink``
(where results and dead letters go). Each component module declares its spec beside its code and
calls :func:`register` at import; :func:`load_builtins` imports them all. A component's module
must import without its optional dependency installed (import it inside the factory), so the
schema and the ``sluice connectors`` listing cover every component on every install.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice.spec import Field, ObjectSpec

FAMILIES = ("source", "handler", "sink")

_BUILTIN_MODULES = (
    "sluice.connectors.embedded",
    "sluice.connectors.kafka",
    "sluice.handlers.python",
    "sluice.handlers.http",
    "sluice.sinks.embedded",
    "sluice.sinks.http",
    "sluice.sinks.webhook",
    "sluice.sinks.kafka",
)


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
    exactly_once: bool = False  # consumer.exactly_once (a Kafka source then runs transactions)


# (config, pipeline file) → (key path under the component, message) for each problem.
Check = Callable[[Any, Path | None], list[tuple[tuple[str, ...], str]]]


@dataclass(frozen=True)
class ComponentSpec:
    family: str
    name: str
    summary: str
    config: ObjectSpec | Field  # a Field for a scalar shorthand, e.g. ``python: mod:fn``
    factory: Callable[..., Any]
    extra: str | None = None  # the pip extra its dependency comes with
    # Load-time checks a schema cannot express: (config, pipeline file) →
    # (key path under the component, message) for each problem. Pure: no I/O, no user code.
    check: Check | None = None
    # Checks that load the component's own code on this machine (a Python handler imports
    # its module): run by `sluice validate` and workers, skipped by an API-only load
    # (`serve --no-workers`, `submit -f`). The factory then meets the same problem at build.
    check_code: Check | None = None

    def json_schema(self) -> dict[str, Any]:
        schema = self.config.json_schema()
        schema.setdefault("description", self.summary)
        return schema

    def apply_defaults(self, value: Any) -> Any:
        if isinstance(self.config, ObjectSpec) and isinstance(value, dict):
            return self.config.apply_defaults(value)
        return value


_components: dict[tuple[str, str], ComponentSpec] = {}
_loaded = False


def register(spec: ComponentSpec) -> ComponentSpec:
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown component family {spec.family!r}")
    _components[(spec.family, spec.name)] = spec
    return spec


def load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True


def get(family: str, name: str) -> ComponentSpec:
    load_builtins()
    return _components[(family, name)]


def names(family: str) -> list[str]:
    load_builtins()
    return sorted(name for fam, name in _components if fam == family)


def components(family: str | None = None) -> list[ComponentSpec]:
    load_builtins()
    return [s for (fam, _), s in sorted(_components.items()) if family in (None, fam)]


def family_schema(family: str) -> dict[str, Any]:
    """A one-key object naming the component type: ``{embedded: {queue: jobs}}``."""
    return {
        "type": "object",
        "minProperties": 1,
        "maxProperties": 1,
        "properties": {s.name: s.json_schema() for s in components(family)},
        "additionalProperties": False,
        "x-sluice-family": family,
    }
