"""Pipelines defined at runtime: their definitions, kept in the store so that every worker and
gateway of a shared store runs the same ones (``PUT /v1/pipelines/{name}``,
``sluice pipelines apply``).

Invariants:

1. A definition is the text that was put (YAML or JSON), kept as given; every process parses
   it with the same loader as a pipeline file (:func:`sluice.config.load.parse_pipeline`), so a
   definition that was accepted once is read the same way by every worker.
2. Every put and every delete takes the next ``version`` of the whole table (one sequence per
   store), so a process that has seen up to version *v* asks only for what changed after it
   (:meth:`DefinitionStore.changes`). A delete leaves a tombstone (``deleted``) with its
   version, so a worker that was away when it happened still hears of it.
3. ``restricted`` is true for a definition put with a tenant's key: its components may not
   reach the operator's own network (:mod:`sluice.netpolicy`), and only handler types that run
   no operator-side code are allowed. A definition put by an admin (or from a file) is the
   operator's own, and is not restricted.
4. A pipeline named by a file of the process is the file's: a definition of the same name is
   refused at the gateway, and ignored (with a warning) by a worker that has the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

YAML, JSON = "yaml", "json"  # the format of a definition's text


@dataclass(frozen=True, slots=True)
class Definition:
    name: str
    tenant: str  # the pipeline's tenant
    body: str  # the text as put (invariant 1)
    format: str  # YAML or JSON
    put_by: str  # "admin", or the tenant whose key put it
    restricted: bool  # invariant 3
    version: int  # invariant 2
    updated_at: float  # unix seconds
    deleted: bool = False  # a tombstone (invariant 2)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "tenant": self.tenant, "format": self.format,
                "put_by": self.put_by, "restricted": self.restricted,
                "version": self.version, "updated_at": self.updated_at,
                "deleted": self.deleted}


class DefinitionStore(Protocol):
    """The definitions of a store (``Store.definitions``)."""

    async def put(self, name: str, tenant: str, body: str, fmt: str, *, put_by: str,
                  restricted: bool) -> Definition:
        """Create or replace ``name``'s definition; the stored row (its new version)."""
        ...

    async def delete(self, name: str) -> Definition | None:
        """Replace ``name``'s definition by a tombstone; the tombstone, or ``None`` when there
        was no live definition of that name."""
        ...

    async def get(self, name: str) -> Definition | None:
        """The live definition of ``name`` (``None``: none, or deleted)."""
        ...

    async def live(self) -> list[Definition]:
        """Every live definition, by name."""
        ...

    async def changes(self, since_version: int) -> list[Definition]:
        """Every row (tombstones too) whose version is above ``since_version``, by version."""
        ...
