"""sluice: the stateful consumer layer between any message queue and stateless handlers.

The public API for handler authors::

    from sluice import Message, Retry, Reject

    async def handle(message: Message) -> dict:
        if message.payload.get("bad"):
            raise Reject("bad input")          # fail now, no retry, dead letter
        ...
        return {"ok": True}                    # stored as the task's result
"""

from sluice.errors import (
    ConfigError,
    DuplicateTask,
    HandlerSignal,
    IllegalTransition,
    MissingDependency,
    Overloaded,
    Reject,
    Retry,
    SluiceError,
    SourceError,
    TaskError,
    TaskNotFound,
)
from sluice.message import Message, Outcome
from sluice.tasks.state import TaskState

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DuplicateTask",
    "HandlerSignal",
    "IllegalTransition",
    "Message",
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
    "__version__",
]
