"""In-process Python handlers: ``handler: {python: package.module:function}``.

The function receives a :class:`~sluice.message.Message`. Returning a value succeeds (the value,
JSON-encoded, or bytes as they are, is the task's result); raising
:class:`~sluice.errors.Retry` or any other exception retries; raising
:class:`~sluice.errors.Reject` fails the task at once. ``async def`` functions run on the event
loop; plain functions run in a thread pool sized to the pipeline's concurrency.

Timeouts (``consumer.timeout_s``) hold for both: an async attempt is cancelled; a sync attempt's
thread cannot be stopped, so it runs on in the background while its outcome is discarded and
the task is retried (keep sync handlers bounded, or make them async).

When the module is imported: by ``sluice validate`` (a module that does not import is an error
at the ``handler.python`` line of the file) and by a worker when it builds the handler
(``sluice run``, ``sluice serve`` with workers: the same error, exit 2, before any task runs).
Never by an API-only load: ``sluice serve --no-workers`` and ``sluice submit -f`` need the
pipeline file, not the handler's code, so a machine that only takes tasks in need not have it.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice import registry
from sluice.errors import InvalidPayload, Overloaded, Reject, Retry
from sluice.handlers.deadlines import Deadlines
from sluice.message import Message, Outcome, encode_result, format_traceback
from sluice.spec import REQUIRED, Field

TARGET_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"

CONFIG = Field(
    "python", "string", "An importable function, as package.module:function; imported from the "
    "current directory, else from the pipeline file's package root (its directory, or the "
    "first directory above it without an __init__.py).", default=REQUIRED,
    pattern=TARGET_PATTERN,
)


@dataclass(frozen=True, slots=True)
class PythonHandlerConfig:
    """The typed ``python`` handler config: the scalar shorthand ``package.module:function``."""

    target: str

    @classmethod
    def of(cls, value: str | PythonHandlerConfig) -> PythonHandlerConfig:
        """From the validated value (an instance is returned as is)."""
        if isinstance(value, PythonHandlerConfig):
            return value
        if not isinstance(value, str):
            raise TypeError(f"{cls.__name__}: expected package.module:function, got "
                            f"{type(value).__name__}")
        return cls(value)

    def to_config(self) -> str:
        """The value it was made from."""
        return self.target


def import_roots(pipeline_file: Path | None) -> tuple[Path, ...]:
    """Where a pipeline file's handler modules import from, besides the current directory
    (the rule pytest uses for test modules: climb out of packages)."""
    if pipeline_file is None:
        return ()
    here = pipeline_file.resolve().parent
    root = here
    while (root / "__init__.py").exists() and root.parent != root:
        root = root.parent
    return (here,) if root == here else (here, root)


def import_target(target: str, extra_paths: tuple[Path, ...] = ()) -> Callable[..., Any]:
    """Import ``package.module:attr.path``; raise ``ImportError`` with a one-line reason."""
    module_name, _, attr_path = target.partition(":")
    for path in (Path.cwd(), *extra_paths):
        if str(path) not in sys.path:
            sys.path.append(str(path))
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # any error while importing user code is reported, not raised
        raise ImportError(f"cannot import module {module_name!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(obj):
        raise ImportError(f"{target!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


class PythonHandler:
    def __init__(self, fn: Callable[..., Any], max_threads: int = 8) -> None:
        self.fn = fn
        self.is_async = _is_async(fn)
        self._deadlines = Deadlines()  # consumer.timeout_s of every attempt
        self._executor = (
            None if self.is_async
            else ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="sluice-handler")
        )

    async def invoke(self, message: Message, timeout_s: float) -> Outcome:
        started = time.perf_counter()
        try:
            value = await self._call(message, timeout_s)
        except _TimedOut:
            return _timed_out(timeout_s, time.perf_counter() - started)
        except Exception as exc:
            return outcome_of_error(exc, time.perf_counter() - started)
        return outcome_of_value(value, time.perf_counter() - started)

    async def invoke_batch(self, messages: Sequence[Message],
                           timeout_s: float) -> list[Outcome]:
        """One call with the list of messages; one outcome per message, in order. An item
        that is an exception (``Retry``, ``Reject``, any other) is that message's error; an
        exception raised by the call, a timeout, or a result that is not a list of one item
        per message is every message's error (the whole batch is retried; ``Reject`` raised
        by the call fails them all). A message whose payload the call read and that does not
        decode fails alone (InvalidPayload); the call is made again without it."""
        started = time.perf_counter()
        try:
            values = await self._call(list(messages), timeout_s)
            if not isinstance(values, list | tuple) or len(values) != len(messages):
                got = (f"{len(values)} items" if isinstance(values, list | tuple)
                       else type(values).__name__)
                raise InvalidBatchResult(f"a batch handler returns a list of one outcome per "
                                         f"message: got {got} for {len(messages)} messages")
        except _TimedOut:
            return [_timed_out(timeout_s, time.perf_counter() - started)] * len(messages)
        except InvalidPayload as exc:
            return await self._without_undecodable(messages, timeout_s, exc, started)
        except Exception as exc:
            return [outcome_of_error(exc, time.perf_counter() - started)] * len(messages)
        duration = time.perf_counter() - started
        return [outcome_of_error(v, duration) if isinstance(v, BaseException)
                else outcome_of_value(v, duration) for v in values]

    async def _without_undecodable(self, messages: Sequence[Message], timeout_s: float,
                                   error: InvalidPayload, started: float) -> list[Outcome]:
        """The call read a payload that does not decode: those messages fail alone
        (InvalidPayload), and the others are called again without them."""
        bad: dict[int, Outcome] = {}
        for i, message in enumerate(messages):
            try:
                _ = message.payload
            except InvalidPayload as exc:
                bad[i] = outcome_of_error(exc, time.perf_counter() - started)
        if not bad:  # raised for another reason (the function's own InvalidPayload)
            return [outcome_of_error(error, time.perf_counter() - started)] * len(messages)
        good = [m for i, m in enumerate(messages) if i not in bad]
        again = iter(await self.invoke_batch(good, timeout_s) if good else [])
        return [bad[i] if i in bad else next(again) for i in range(len(messages))]

    async def _call(self, arg: Any, timeout_s: float) -> Any:
        """The function's return value; raises what it raised, or ``_TimedOut``."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("PythonHandler.invoke must run in an asyncio task")
        cancelling = task.cancelling()
        self._deadlines.add(task, timeout_s)
        try:
            if self.is_async:
                return await self.fn(arg)
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, functools.partial(self.fn, arg))
        except asyncio.CancelledError:
            if not self._deadlines.expired(task, cancelling):
                raise
            raise _TimedOut from None
        finally:
            self._deadlines.discard(task)

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


class _TimedOut(Exception):
    """The attempt ran past ``consumer.timeout_s`` (its task was cancelled for it)."""


class InvalidBatchResult(Exception):
    """A batch handler's return value is not one outcome per message."""


def _timed_out(timeout_s: float, duration_s: float) -> Outcome:
    return Outcome("retry", error_type="Timeout",
                   error_message=f"the attempt took longer than timeout_s={timeout_s:g}",
                   duration_s=duration_s, overload=True)


def outcome_of_error(exc: BaseException, duration_s: float) -> Outcome:
    """The outcome of an attempt that raised ``exc`` (or a batch item that is ``exc``)."""
    if isinstance(exc, Overloaded):
        return Outcome("retry", error_type="Overloaded", error_message=exc.reason,
                       delay_s=exc.delay_s, duration_s=duration_s, overload=True,
                       retry_after_s=exc.retry_after_s)
    if isinstance(exc, Reject):  # InvalidPayload too, named as itself
        return Outcome("failure", error_type=type(exc).__name__, error_message=exc.reason,
                       duration_s=duration_s)
    if isinstance(exc, Retry):
        return Outcome("retry", error_type="Retry", error_message=exc.reason,
                       delay_s=exc.delay_s, duration_s=duration_s)
    return Outcome("retry", error_type=type(exc).__name__, error_message=str(exc),
                   duration_s=duration_s, traceback=format_traceback(exc))


def outcome_of_value(value: Any, duration_s: float) -> Outcome:
    """The outcome of an attempt that returned ``value`` (stored JSON-encoded, bytes as is)."""
    try:
        result, result_type = encode_result(value)
    except (TypeError, ValueError) as exc:
        return Outcome("failure", error_type="InvalidResult",
                       error_message=f"the handler's return value cannot be stored as JSON: "
                       f"{exc}", duration_s=duration_s)
    return Outcome("success", result=result, result_type=result_type, duration_s=duration_s)


def check_import(config: Any, file: Path | None) -> list[tuple[tuple[str, ...], str]]:
    """Whether the target imports (a check that runs the handler's code; see the module
    docstring for when it runs)."""
    try:
        import_target(PythonHandlerConfig.of(config).target, import_roots(file))
    except ImportError as exc:
        return [((), str(exc))]
    return []


def build_handler(config: PythonHandlerConfig, ctx: registry.BuildContext) -> PythonHandler:
    return PythonHandler(import_target(config.target, import_roots(ctx.pipeline_file)),
                         max_threads=ctx.concurrency)


registry.register(registry.ComponentSpec(
    family="handler",
    name="python",
    summary="An in-process Python function (sync or async).",
    config=CONFIG,
    factory=build_handler,
    settings=PythonHandlerConfig.of,
    check_code=check_import,
))
