"""In-process Python handlers: ``handler: {python: package.module:function}``.

The function receives a :class:`~sluice.message.Message`. Returning a value succeeds (the value,
JSON-encoded, or bytes as they are, is the task's result); raising
:class:`~sluice.errors.Retry` or any other exception retries; raising
:class:`~sluice.errors.Reject` fails the task at once. ``async def`` functions run on the event
loop; plain functions run in a thread pool sized to the pipeline's concurrency.

Timeouts (``consumer.timeout_s``) hold for both: an async attempt is cancelled; a sync attempt's
thread cannot be stopped, so it runs on in the background while its outcome is discarded and
the task is retried (keep sync handlers bounded, or make them async).

A hosting pipeline (``tenancy:``) runs many functions: the target may name a mapping of
function names to callables (``FUNCTIONS = {"resize": resize, "thumb": thumb}``), and each
message goes to the callable of its function (``message.function``; one that names none: the
function ``default``). Each callable is sync or async on its own, with the timeouts above. A
message naming a function the mapping lacks fails at once (``UnknownFunction``, no retry). The
mapping is read once, when the module is imported. A mapping takes no ``handler.batch`` (a
batch call is one call of one function): its build is refused where the build context says
``batch`` (an ``ImportError``, reported at the handler's line); given a batch anyway, it runs
each message as an attempt of its own.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice import registry
from sluice.errors import InvalidPayload, Overloaded, Reject, Retry
from sluice.handlers.deadlines import Deadlines
from sluice.message import Message, Outcome, encode_result, format_traceback
from sluice.spec import REQUIRED, Field
from sluice.tenancy.config import DEFAULT_FUNCTION

TARGET_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"

CONFIG = Field(
    "python", "string", "An importable function, as package.module:function; imported from the "
    "current directory, else from the pipeline file's package root (its directory, or the "
    "first directory above it without an __init__.py). For a hosting pipeline it may name a "
    "mapping of function names to functions (package.module:FUNCTIONS): each task runs the "
    "function it names ('default' when it names none); a name the mapping lacks fails the "
    "task (UnknownFunction); a mapping takes no handler.batch.", default=REQUIRED,
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
    """Import ``package.module:attr.path``; raise ``ImportError`` with a one-line reason.

    The target is a callable, or a mapping of function names to callables, returned as a
    :class:`Functions` table."""
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
    if isinstance(obj, Mapping):
        return Functions.of(target, obj)
    if not callable(obj):
        raise ImportError(f"{target!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


NAMES_SHOWN = 10  # an unknown function's error lists at most this many known ones


class Functions(Mapping[str, Callable[..., Any]]):
    """A target that is a mapping of function names to callables (a hosting pipeline's
    functions), as read when its module was imported. Calling it with a message calls the
    message's function (``default`` when it names none; :class:`~sluice.errors.Reject` for a
    name it lacks)."""

    __slots__ = ("_async", "_functions", "target")

    def __init__(self, target: str, functions: Mapping[str, Callable[..., Any]]) -> None:
        self.target = target
        self._functions = dict(functions)
        self._async = {name: _is_async(fn) for name, fn in self._functions.items()}

    @classmethod
    def of(cls, target: str, mapping: Mapping[Any, Any]) -> Functions:
        """The table of an imported mapping; ``ImportError`` naming a key that is not a
        string or whose value is not callable."""
        if not mapping:
            raise ImportError(f"{target!r} is an empty mapping: name at least one function")
        for name, fn in mapping.items():
            if not isinstance(name, str):
                raise ImportError(f"{target!r}: the key {name!r} is not a string (the keys "
                                  "are function names)")
            if not callable(fn):
                raise ImportError(f"{target!r}: the value of {name!r} is not callable "
                                  f"({type(fn).__name__})")
        return cls(target, mapping)

    def __getitem__(self, name: str) -> Callable[..., Any]:
        return self._functions[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._functions)

    def __len__(self) -> int:
        return len(self._functions)

    def __repr__(self) -> str:
        return f"Functions({self.target!r}, {sorted(self._functions)!r})"

    @property
    def any_sync(self) -> bool:
        """Whether one of the callables is a plain function (it needs the thread pool)."""
        return not all(self._async.values())

    def resolve(self, name: str) -> tuple[Callable[..., Any], bool] | None:
        """The callable named ``name`` and whether it is async; None if there is none."""
        fn = self._functions.get(name)
        return None if fn is None else (fn, self._async[name])

    def unknown(self, name: str) -> str:
        """The error of a message naming a function the mapping lacks."""
        names = sorted(self._functions)
        shown = ", ".join(names[:NAMES_SHOWN])
        if len(names) > NAMES_SHOWN:
            shown += f", ... ({len(names) - NAMES_SHOWN} more)"
        return f"no function {name!r} in {self.target}; its functions: {shown}"

    def __call__(self, message: Message) -> Any:
        name = message.function or DEFAULT_FUNCTION
        found = self._functions.get(name)
        if found is None:
            raise Reject(self.unknown(name))
        return found(message)


class PythonHandler:
    """Calls one function, or for a :class:`Functions` target each message's function."""

    def __init__(self, fn: Callable[..., Any], max_threads: int = 8) -> None:
        self.fn = fn
        self.functions = fn if isinstance(fn, Functions) else None
        self.is_async = _is_async(fn)
        needs_threads = (self.functions.any_sync if self.functions is not None
                         else not self.is_async)
        self._deadlines = Deadlines()  # consumer.timeout_s of every attempt
        self._executor = (
            ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="sluice-handler")
            if needs_threads else None
        )

    async def invoke(self, message: Message, timeout_s: float) -> Outcome:
        started = time.perf_counter()
        fn, is_async = self.fn, self.is_async
        if self.functions is not None:
            name = message.function or DEFAULT_FUNCTION
            found = self.functions.resolve(name)
            if found is None:
                return Outcome("failure", error_type="UnknownFunction",
                               error_message=self.functions.unknown(name))
            fn, is_async = found
        try:
            value = await self._call(fn, is_async, message, timeout_s)
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
        decode fails alone (InvalidPayload); the call is made again without it.

        A :class:`Functions` target takes no batches (its build is refused with
        ``handler.batch``); called anyway, each message is an attempt of its own."""
        if self.functions is not None:
            return list(await asyncio.gather(*(self.invoke(m, timeout_s) for m in messages)))
        started = time.perf_counter()
        try:
            values = await self._call(self.fn, self.is_async, list(messages), timeout_s)
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

    async def _call(self, fn: Callable[..., Any], is_async: bool, arg: Any,
                    timeout_s: float) -> Any:
        """``fn``'s return value; raises what it raised, or ``_TimedOut``."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("PythonHandler.invoke must run in an asyncio task")
        cancelling = task.cancelling()
        self._deadlines.add(task, timeout_s)
        try:
            if is_async:
                return await fn(arg)
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, functools.partial(fn, arg))
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
    fn = import_target(config.target, import_roots(ctx.pipeline_file))
    # handler.batch (an ImportError: the runtime reports it at the handler's line, as a module
    # that does not import).
    if isinstance(fn, Functions) and ctx.batch:
        raise ImportError(f"{config.target!r} is a mapping of functions, which takes no batch: "
                          "remove handler.batch")
    return PythonHandler(fn, max_threads=ctx.concurrency)


registry.register(registry.ComponentSpec(
    family="handler",
    name="python",
    summary="An in-process Python function (sync or async).",
    config=CONFIG,
    factory=build_handler,
    settings=PythonHandlerConfig.of,
    check_code=check_import,
    runs_operator_code=True,
))
