"""sluice: the stateful consumer layer between any message queue and stateless handlers.

The public API for handler authors::

    from sluice import Message, Retry, Reject

    async def handle(message: Message) -> dict:
        if message.payload.get("bad"):
            raise Reject("bad input")          # fail now, no retry, dead letter
        ...
        return {"ok": True}                    # stored as the task's result

A source, sink or store (built in, or a plugin's) says whether a failure is worth retrying:
``Unavailable`` is transient, ``Unsupported`` and ``Misconfigured`` are permanent; each is a
``SourceError`` whose ``retriable`` says which.
"""

from sluice.errors import (
    ConfigError,
    HandlerSignal,
    IllegalTransition,
    InvalidPayload,
    Misconfigured,
    MissingDependency,
    Overloaded,
    Reject,
    Retry,
    SluiceError,
    SourceError,
    TaskError,
    TaskNotFound,
    Unavailable,
    Unsupported,
)
from sluice.message import Message, Outcome
from sluice.tasks.state import TaskState

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "HandlerSignal",
    "IllegalTransition",
    "InvalidPayload",
    "Message",
    "Misconfigured",
    "MissingDependency",
    "Outcome",
    "Overloaded",
    "Reject",
    "Retry",
    "SluiceError",
    "SourceError",
    "TaskError",
    "TaskNotFound",
    "TaskState",
    "Unavailable",
    "Unsupported",
    "__version__",
]
