"""Result destinations as typed objects, each with a stable ``label``.

A destination is one entry of ``on_success`` or ``on_failure``. Its label names it wherever it
must be found again later: its outbox (records waiting for it survive a restart) and its key in
a task's ``deliveries``. So a label must not depend on where the entry stands in its list:

1. A label is the ``label`` key of the entry when declared, else
   ``<slot>:<type>:<target>``: the slot (``on_success``/``on_failure``), the component type, and
   the value of the key the sink's spec names as its target (:class:`LabelField`: a URL, a
   topic, a queue) — that value itself when it is a plain name (``[A-Za-z0-9_.-]``, up to 64
   characters), else the first 12 hex digits of its SHA-256 (a URL may hold a secret, and a
   label is shown in the task API). Reordering entries, inserting one, or changing a retry
   setting leaves every label as it was; changing the target makes a new destination (records
   still waiting under the old label are reported when the pipeline starts; declaring the old
   ``label`` delivers them).
2. Labels are unique within a pipeline; a duplicate is a load error naming both entries.
3. Before labels, a destination was named by its position, ``<slot>.<index>.<type>``
   (:attr:`Destination.legacy_name`). Records still waiting under that name are delivered by
   the destination now at that position (see :mod:`sluice.sinks.delivery`).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sluice import registry
from sluice.config.model import ComponentConfig, PipelineConfig
from sluice.config.yamlmarks import Marks, PathKey
from sluice.errors import ConfigIssue
from sluice.spec import Field, Settings

LABEL = "label"  # the config key of every sink
LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
SLOTS = ("on_success", "on_failure")
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HASH_HEX_DIGITS = 12


@dataclass(frozen=True)
class LabelField(Field):
    """A sink's ``label`` key; ``target`` names the key whose value makes its default."""

    target: str | None = None


def label_field(target: str) -> LabelField:
    """The ``label`` key of a sink whose records go to the value of its ``target`` key."""
    return LabelField(
        LABEL, "string",
        "Under on_success/on_failure: this destination's name, for its outbox (records "
        "waiting for it) and its key in a task's deliveries; unique in the pipeline. Default: "
        f"<slot>:<type>:<{target}> (the {target} itself when it is a plain name, else the first "
        f"12 hex digits of its SHA-256), unchanged when entries are reordered. Changing the "
        f"{target} makes a new destination: keep its label to deliver records still waiting.",
        default=None, pattern=LABEL_PATTERN, target=target)


class SinkSettings(Settings):
    """A sink's typed config (a frozen dataclass declaring ``label`` among its fields): its
    declared label and its target, the value of the key its :class:`LabelField` names."""

    __slots__ = ()
    label: str | None

    @property
    def target(self) -> str | None:
        """The value a default label is made from (rule 1); ``None``: the sink has none."""
        return None


@dataclass(frozen=True)
class Destination:
    """One entry of ``on_success`` / ``on_failure``."""

    slot: str  # on_success | on_failure
    index: int  # its position in the list: for messages and the legacy name only
    component: ComponentConfig
    label: str

    @property
    def legacy_name(self) -> str:
        """Its name before labels (by position): ``on_success.0.webhook``."""
        return f"{self.slot}.{self.index}.{self.component.type}"

    @functools.cached_property
    def settings(self) -> Any:
        """The sink's typed config (its spec's ``settings``), made once."""
        return registry.sink(self.component.type).typed(self.component.config)

    @property
    def target(self) -> str | None:
        """Where its records go (a URL, a topic, a queue), if its sink names one."""
        return _label_and_target(self.component.type, self.settings)[1]


def _target_key(type_name: str) -> str | None:
    spec = registry.get("sink", type_name).config
    for f in getattr(spec, "fields_", ()):
        if isinstance(f, LabelField):
            return f.target
    return None


def _label_and_target(type_name: str, settings: Any) -> tuple[str | None, str | None]:
    """The declared label and the target of a sink's typed config; a third party's sink
    without a typed config keeps its mapping, read by the keys its spec names."""
    if isinstance(settings, SinkSettings):
        return settings.label, settings.target
    if isinstance(settings, Mapping):
        key = _target_key(type_name)
        target = settings.get(key) if key else None
        label = settings.get(LABEL)
        return (str(label) if label else None), (None if target is None else str(target))
    return None, None


def default_label(slot: str, type_name: str, config: Any) -> str:
    """Rule 1: ``<slot>:<type>:<target>``, or ``<slot>:<type>`` for a sink without a target."""
    return _default_label(slot, type_name,
                          _label_and_target(type_name, registry.sink(type_name).typed(config))[1])


def _default_label(slot: str, type_name: str, target: str | None) -> str:
    if target is None:
        return f"{slot}:{type_name}"
    text = target
    if not _PLAIN.match(text):
        text = hashlib.sha256(text.encode()).hexdigest()[:_HASH_HEX_DIGITS]
    return f"{slot}:{type_name}:{text}"


def label_of(slot: str, component: ComponentConfig) -> str:
    settings = registry.sink(component.type).typed(component.config)
    declared, target = _label_and_target(component.type, settings)
    return declared if declared else _default_label(slot, component.type, target)


def destinations(config: PipelineConfig) -> list[Destination]:
    """Every destination of a pipeline, on_success first, in file order."""
    return [Destination(slot, i, component, label_of(slot, component))
            for slot, components in (("on_success", config.on_success),
                                     ("on_failure", config.on_failure))
            for i, component in enumerate(components)]


def duplicate_labels(doc: Mapping[str, Any], marks: Marks) -> Iterable[ConfigIssue]:
    """Rule 2, over a validated document with defaults applied: one issue per entry whose
    label an earlier entry has, at its ``label`` (or the entry), naming the earlier one."""
    seen: dict[str, PathKey] = {}
    for slot in SLOTS:
        for index, entry in enumerate(doc.get(slot) or ()):
            if not isinstance(entry, Mapping) or len(entry) != 1:
                continue
            ((type_name, cfg),) = entry.items()
            path: PathKey = (slot, index, type_name)
            label = label_of(slot, ComponentConfig(type_name, cfg))
            first = seen.setdefault(label, path)
            if first == path:
                continue
            declared = _label_and_target(type_name,
                                         registry.sink(type_name).typed(cfg))[0] is not None
            line, col = marks.value_at(first)
            yield marks.issue(
                (*path, LABEL) if declared else path,
                f"label {label!r} is also the label of {_dotted(first)} (line {line}, column "
                f"{col}); give one of them its own label")


def _dotted(path: PathKey) -> str:
    slot, index, type_name = path
    return f"{slot}[{index}].{type_name}"
