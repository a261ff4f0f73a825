"""The submit service: the one way tasks are submitted to a pipeline, from the HTTP API (the
gateway), the CLI's local submit and dead-letter replays. The task is created ``QUEUED`` and its
message put on the pipeline's source, by the submitter the source's spec provides
(:attr:`sluice.registry.ComponentSpec.submitter`).

Rules:

1. Only a source with the ``submit`` capability takes submits; a delay only a source with
   ``delayed_redelivery``. Both are refused (:class:`~sluice.errors.Unsupported`) before
   anything is written; a front end checks them first (:func:`submittable`, :func:`delays`) to
   say so in its own terms (an HTTP problem, a CLI option).
2. A pipeline's submitter is made at its first submit and kept until :meth:`Intake.close`.
3. The result has one slot per message: the created task, or ``None`` where the task id was
   already used in the pipeline (nothing was submitted for it).
4. A resumed task is woken by its source's ``wake`` hook, if it has one (a message held back
   while the task was paused becomes visible at once).
5. A hosting pipeline's (one with ``tenancy``) every message carries its tenant and function
   in the headers ``sluice-tenant`` and ``sluice-function``, and its submission names both (the
   function's route may send it to a dedicated queue). The tenant is the one asked for, else
   the message's own header (a dead letter replayed keeps its tenant), else the pipeline's;
   the function likewise, else ``default``. A pipeline without tenancy takes neither
   (``ValueError``), and its messages are left as they are.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import replace

from sluice import registry
from sluice.config.model import PipelineConfig
from sluice.datadir import QueuedMessage
from sluice.errors import Unsupported
from sluice.registry import Capability, Submission
from sluice.stores.base import Store
from sluice.tasks.store import TaskRecord
from sluice.tenancy.config import (
    DEFAULT_FUNCTION,
    FUNCTION_HEADER,
    FUNCTION_PATTERN,
    TENANT_HEADER,
    TENANT_SPEC,
)

_FUNCTION_RE = re.compile(FUNCTION_PATTERN)
# A tenant's name as a hosting pipeline's tenancy.tenants names it (the gateway's Tenant header,
# the CLI's --tenant); a tenant key's own tenant is taken as the keys file spells it.
TENANT_RE = re.compile(next(f.pattern for f in TENANT_SPEC.fields_ if f.name == "name") or "")


def new_task_id() -> str:
    return uuid.uuid4().hex


def submittable(config: PipelineConfig) -> bool:
    """Whether tasks can be submitted to the pipeline (rule 1)."""
    return registry.source_can(config, Capability.SUBMIT)


def delays(config: PipelineConfig) -> bool:
    """Whether a submit to the pipeline may be delayed (rule 1)."""
    return registry.source_can(config, Capability.DELAYED_REDELIVERY)


def submittable_sources() -> list[str]:
    """The source types that take submits."""
    return registry.with_capability("source", Capability.SUBMIT)


class Intake:
    """Submits to pipelines over one store."""

    def __init__(self, store: Store) -> None:
        self.context = registry.SubmitContext(store)
        self._submitters: dict[str, registry.Submitter] = {}

    async def submit(self, config: PipelineConfig, messages: Sequence[QueuedMessage], *,
                     delay_s: float = 0.0, received_at: float | None = None,
                     tenant: str | None = None,
                     function: str | None = None) -> list[TaskRecord | None]:
        """Create the tasks and queue their messages on the pipeline's source (rules 1-3);
        ``tenant`` and ``function``: a hosting pipeline's (rule 5)."""
        items = submissions(config, messages, delay_s, received_at, tenant, function)
        submitter = self._submitter(config, delay_s)
        return await submitter.submit(items)

    async def wake(self, config: PipelineConfig, task_id: str) -> None:
        """A resumed task: its message, if its source held it back, is visible now (rule 4)."""
        hook = registry.get("source", config.source.type).wake
        if hook is not None:
            await hook(config, task_id, self.context)

    async def close(self) -> None:
        submitters, self._submitters = list(self._submitters.values()), {}
        for submitter in submitters:
            await submitter.close()

    def _submitter(self, config: PipelineConfig, delay_s: float) -> registry.Submitter:
        kind = config.source.type
        spec = registry.get("source", kind)
        if not spec.can(Capability.SUBMIT) or spec.submitter is None:
            raise Unsupported(f"pipeline {config.name!r}: submitting to a {kind!r} source is "
                              f"not supported; only to {' and '.join(submittable_sources())}")
        if delay_s and not spec.can(Capability.DELAYED_REDELIVERY):
            raise Unsupported(f"a {kind} source has no delayed delivery: submit without a "
                              "delay")
        submitter = self._submitters.get(config.name)
        if submitter is None:
            submitter = self._submitters[config.name] = spec.submitter(config, self.context)
        return submitter


def submissions(config: PipelineConfig, messages: Sequence[QueuedMessage], delay_s: float,
                received_at: float | None, tenant: str | None = None,
                function: str | None = None) -> list[Submission]:
    """The submissions of ``messages``: a hosting pipeline's with their tenant and function in
    the headers and the submission (rule 5); ``ValueError`` for a tenant or function asked of
    a pipeline without tenancy, or a function name that is not one. Each keeps the pipeline's
    ``consumer.keep_payload_bytes`` of its body with its task record."""
    keep = config.consumer.keep_payload_bytes
    if config.tenancy is None:
        if tenant is not None or function is not None:
            raise ValueError(f"pipeline {config.name!r} hosts no functions (it has no tenancy "
                             "key): submit without a tenant or function")
        return [Submission(config.name, config.tenant, m, delay_s, received_at,
                           keep_payload_bytes=keep) for m in messages]
    if function is not None and not _FUNCTION_RE.fullmatch(function):
        raise ValueError(f"function {function[:80]!r}: expected 1-63 letters, digits and ._- "
                         "starting with a letter or digit")
    out = []
    for m in messages:
        own = m.headers or {}
        who = tenant or own.get(TENANT_HEADER) or config.tenant
        what = function or own.get(FUNCTION_HEADER) or DEFAULT_FUNCTION
        headers = {**own, TENANT_HEADER: who, FUNCTION_HEADER: what}
        out.append(Submission(config.name, who, replace(m, headers=headers), delay_s,
                              received_at, function=what, keep_payload_bytes=keep))
    return out


async def submit(store: Store, config: PipelineConfig, messages: Sequence[QueuedMessage],
                 *, delay_s: float = 0.0, tenant: str | None = None,
                 function: str | None = None) -> list[TaskRecord | None]:
    """Submit once, from this process (the CLI's local submit)."""
    intake = Intake(store)
    try:
        return await intake.submit(config, messages, delay_s=delay_s, tenant=tenant,
                                   function=function)
    finally:
        await intake.close()
