"""Config specs: one declaration per key, from which the JSON Schema, the ``sluice connectors``
listing and the reference docs are all generated.

A component declares its keys beside its code (as Redpanda Connect's ``ConfigSpec`` does)::

    SPEC = ObjectSpec(
        Field("queue", "string", "Queue name.", default=None),
        Field("lease_s", "number", "Visibility timeout.", default=30.0, exclusive_minimum=0),
    )

``Field.default`` of ``REQUIRED`` makes the key required; ``None`` means optional, no default.

Past the loader a component reads its config as a frozen dataclass declared beside its spec (a
:class:`Settings`): one attribute per key, built once from the validated, defaulted mapping
(:meth:`Settings.from_mapping`), so nothing indexes a ``dict[str, Any]`` by string after that::

    @dataclass(frozen=True, slots=True)
    class EmbeddedSourceConfig(Settings):
        queue: str | None
        lease_s: float
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

Kind = Literal["string", "integer", "number", "boolean", "object", "array", "null"]
# family → the JSON Schema of its one-key component slot (:meth:`sluice.registry.Registry.
# family_schema`), for a spec with component slots.
FamilySchemas = Callable[[str], dict[str, Any]]


S = TypeVar("S", bound="Settings")


class Settings:
    """Base of a component's typed config: a frozen (slots) dataclass whose fields are the keys
    of its spec, each given a value by the loader (defaults applied), so none has a default."""

    __slots__ = ()

    @classmethod
    def from_mapping(cls: type[S], value: Mapping[str, Any] | S) -> S:
        """The typed config of a validated, defaulted mapping (an instance is returned as is).
        A key the class does not declare is an error: unknown keys end at the loader."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"{cls.__name__}: expected a mapping, got {type(value).__name__}")
        names = cls.keys()
        unknown = sorted(str(k) for k in value if k not in names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown key(s) {', '.join(unknown)}; expected "
                             f"{', '.join(names)}")
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"{cls.__name__}: missing key(s) {', '.join(missing)}")
        make: Callable[..., S] = cls
        return make(**value)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Its keys: the names of its dataclass fields, in order."""
        fields: Mapping[str, Any] = getattr(cls, "__dataclass_fields__", {})
        return tuple(fields)

    def to_mapping(self) -> dict[str, Any]:
        """The mapping it was made from (what :meth:`from_mapping` takes back)."""
        return {name: getattr(self, name) for name in self.keys()}


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()

_ARTICLE = {"integer": "an integer", "number": "a number", "string": "a string",
            "boolean": "true or false", "object": "a mapping", "array": "a list"}


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind | tuple[Kind, ...]
    description: str
    default: Any = None
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    enum: tuple[Any, ...] | None = None
    pattern: str | None = None
    items: Field | None = None
    fields: ObjectSpec | None = None  # for kind "object"
    family: str | None = None  # a one-key component slot ("source", "handler", "sink")
    # Keys a component slot allows beside its one type key (``handler: {python: ..., batch:
    # {...}}``): each optional, none of them alone.
    extra: ObjectSpec | None = None
    variants: tuple[Field, ...] = ()  # alternatives (anyOf), e.g. an integer or a mapping

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def json_schema(self, families: FamilySchemas | None = None) -> dict[str, Any]:
        """This key's JSON Schema; ``families`` gives the schema of a component slot."""
        schema: dict[str, Any]
        if self.variants:
            schema = {"anyOf": [v.json_schema(families) for v in self.variants]}
        elif self.family is not None:
            if families is None:
                raise ValueError(f"key {self.name!r} is a {self.family} slot: its schema needs "
                                 "the registry's family schemas (families=)")
            schema = families(self.family)
            if self.extra is not None:
                names = [f.name for f in self.extra.fields_]
                schema = {**schema, "properties": {
                    **schema["properties"],
                    **{f.name: f.json_schema(families) for f in self.extra.fields_}},
                    "maxProperties": 1 + len(names),
                    "not": {"propertyNames": {"enum": names}}}
        elif self.fields is not None:
            schema = self.fields.json_schema(families)
        else:
            kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
            schema = {"type": kinds[0] if len(kinds) == 1 else list(kinds)}
        schema["description"] = self.description
        for key, value in (
            ("minimum", self.minimum),
            ("exclusiveMinimum", self.exclusive_minimum),
            ("maximum", self.maximum),
            ("pattern", self.pattern),
        ):
            if value is not None:
                schema[key] = value
        if self.enum is not None:
            schema["enum"] = list(self.enum)
        if self.items is not None:
            schema["items"] = self.items.json_schema(families)
        if self.default is not None and not self.required:
            schema["default"] = self.default
        return schema

    def type_label(self) -> str:
        if self.variants:
            return " or ".join(v.type_label() for v in self.variants)
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        return "|".join(kinds)


class ObjectSpec:
    """A mapping with a fixed set of keys; unknown keys are an error."""

    __slots__ = ("fields_",)

    def __init__(self, *fields_: Field) -> None:
        self.fields_ = tuple(fields_)

    def json_schema(self, families: FamilySchemas | None = None) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {f.name: f.json_schema(families) for f in self.fields_},
            "additionalProperties": False,
        }
        required = [f.name for f in self.fields_ if f.required]
        if required:
            schema["required"] = required
        return schema

    def apply_defaults(self, value: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of a *validated* mapping with every default filled in, recursively."""
        out = dict(value)
        for f in self.fields_:
            if f.name not in out:
                if f.fields is not None and not f.required and f.default is None:
                    out[f.name] = f.fields.apply_defaults({})
                elif not f.required:
                    out[f.name] = f.default
            elif f.extra is not None and isinstance(out[f.name], Mapping):
                slot = dict(out[f.name])
                for extra in f.extra.fields_:
                    if extra.fields is not None and isinstance(slot.get(extra.name), Mapping):
                        slot[extra.name] = extra.fields.apply_defaults(slot[extra.name])
                out[f.name] = slot
            elif f.fields is not None and isinstance(out[f.name], Mapping):
                out[f.name] = f.fields.apply_defaults(out[f.name])
            elif f.variants and isinstance(out[f.name], Mapping):
                for variant in f.variants:
                    if variant.fields is not None:
                        out[f.name] = variant.fields.apply_defaults(out[f.name])
        return out


def describe_expected(schema: Mapping[str, Any]) -> str:
    """Human words for what a schema accepts: ``an integer >= 1``, ``one of 'a', 'b'``."""
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    kinds = schema.get("type", "")
    kind_list = kinds if isinstance(kinds, list) else [kinds]
    words = " or ".join(_ARTICLE.get(str(k), str(k)) for k in kind_list if k)
    bounds: list[str] = []
    if "minimum" in schema:
        bounds.append(f">= {_num(schema['minimum'])}")
    if "exclusiveMinimum" in schema:
        bounds.append(f"> {_num(schema['exclusiveMinimum'])}")
    if "maximum" in schema:
        bounds.append(f"<= {_num(schema['maximum'])}")
    if "pattern" in schema:
        bounds.append(f"matching {schema['pattern']}")
    if "x-sluice-format" in schema:
        bounds.append(f"of the form {schema['x-sluice-format']}")
    return " ".join([words or "a value", *bounds])


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
