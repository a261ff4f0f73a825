"""The one exception hierarchy of sluice.

::

    SluiceError                      base of everything sluice raises on purpose
    ├── ConfigError                  a pipeline file is invalid; carries every ConfigIssue found
    ├── MissingDependency            an optional extra is not installed (says which one)
    ├── TaskError                    the task store refused an operation
    │   ├── TaskNotFound             no task with that id (or not visible to the caller)
    │   └── IllegalTransition        a state change the state machine does not allow
    ├── SourceError                  a source, queue or store cannot do what was asked
    │   ├── Unavailable              transient: unreachable or busy now; retry later
    │   ├── Unsupported              permanent: this source or pipeline cannot do that at all
    │   └── Misconfigured            permanent until its settings change
    ├── DeliveryError                a sink could not deliver a record (retryable or not)
    └── HandlerSignal                raised *by handlers* to steer the outcome of one attempt
        ├── Retry                    retry this task (optionally after ``delay_s``)
        │   └── Overloaded           retry, and the backend is overloaded: the limit shrinks
        └── Reject                   fail this task now, without retrying
            └── InvalidPayload       Message.payload read, and the body does not decode

A user-facing error names where (file:line:col, key path) and what was expected; the CLI prints
``str(error)`` on stderr and exits 2, never a traceback.

Whether to retry: a :class:`SourceError` says it with ``retriable``. Driver errors become these
at each client library's boundary, in one place per library
(:func:`sluice.datadir.map_sqlite_errors`, :func:`sluice.connectors.kafka_client.map_kafka_errors`).
The HTTP API answers a retriable one 503 with Retry-After, a permanent one 422; the CLI exits 1
for a retriable one and 2 for a permanent one.
"""

from __future__ import annotations

from dataclasses import dataclass


class SluiceError(Exception):
    """Base class of every error sluice raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in one pipeline file, at one place."""

    file: str
    line: int  # 1-based
    col: int  # 1-based
    path: str  # dotted key path, e.g. "consumer.retry.max_attempts"; "" for the document
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(SluiceError):
    """A pipeline file is invalid. ``issues`` holds every problem found, not only the first."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class MissingDependency(SluiceError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, module: str, extra: str) -> None:
        self.module = module
        self.extra = extra
        super().__init__(
            f"the Python package {module!r} is not installed; "
            f"install it with: pip install 'sluice[{extra}]'"
        )


class TaskError(SluiceError):
    """The task store refused an operation."""


class TaskNotFound(TaskError):
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"no task with id {task_id!r}")


class IllegalTransition(TaskError):
    def __init__(self, task_id: str, current: str, wanted: str) -> None:
        self.task_id = task_id
        self.current = current
        self.wanted = wanted
        super().__init__(f"task {task_id!r} is {current}; it cannot become {wanted}")


class SourceError(SluiceError):
    """A source, queue or store cannot do what was asked.

    ``retriable``: whether the same request may succeed later. A bare ``SourceError`` counts as
    an outage (retriable); the subclasses say which it is.
    """

    retriable: bool = True
    retry_after_s: float | None = None  # how long to wait before retrying, when known


class Unavailable(SourceError):
    """Transient: the broker, queue or store cannot be reached or is busy now (a lock held,
    brokers down, a disk full); the same request may succeed later (HTTP 503 + Retry-After)."""

    retriable = True

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class Unsupported(SourceError):
    """Permanent: this source or pipeline cannot do what was asked, however often it is asked
    (a submit to a pipeline that does not track its tasks, a delay on a source without delayed
    redelivery, a submit to a source that takes none)."""

    retriable = False


class Misconfigured(SourceError):
    """Permanent until its settings change: the client library, the broker or the store refuses
    the configuration (bad client settings, no authorization, a read-only database)."""

    retriable = False


class DeliveryError(SluiceError):
    """A sink could not deliver. ``permanent``: retrying cannot help (e.g. HTTP 400/404);
    ``retry_after_s``: the destination asked to wait this long (HTTP Retry-After)."""

    def __init__(self, message: str, *, permanent: bool = False,
                 retry_after_s: float | None = None) -> None:
        self.permanent = permanent
        self.retry_after_s = retry_after_s
        super().__init__(message)


class HandlerSignal(SluiceError):
    """Raised by a handler to choose the outcome of its attempt."""


class Retry(HandlerSignal):
    """Retry this task. ``delay_s`` overrides the backoff for this one retry."""

    def __init__(self, reason: str = "retry requested", *, delay_s: float | None = None) -> None:
        if delay_s is not None and delay_s < 0:
            raise ValueError("Retry(delay_s=...) must be >= 0")
        self.reason = reason
        self.delay_s = delay_s
        super().__init__(reason)


class Overloaded(Retry):
    """The backend is overloaded: retry this task, and cut the concurrency limit (AIMD).
    ``retry_after_s`` also holds every new attempt of this handler for that long."""

    def __init__(self, reason: str = "backend overloaded", *,
                 retry_after_s: float | None = None) -> None:
        super().__init__(reason, delay_s=retry_after_s)
        self.retry_after_s = retry_after_s


class Reject(HandlerSignal):
    """Fail this task now: no further attempts; it goes to the dead letter."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class InvalidPayload(Reject):
    """The task's body does not decode as its content type says (raised by
    :attr:`sluice.message.Message.payload`): retrying cannot help, so the task fails."""
