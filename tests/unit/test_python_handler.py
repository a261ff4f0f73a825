"""Python handlers: results, Retry, Reject, exceptions and timeouts, sync and async."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from sluice import Message, Reject, Retry
from sluice.handlers.python import PythonHandler, import_target


def msg(payload: object = None, attempt: int = 1) -> Message:
    return Message("t1", "p", payload, json.dumps(payload).encode(), attempt=attempt)


async def async_ok(m: Message) -> dict[str, object]:
    return {"got": m.payload, "attempt": m.attempt}


def sync_ok(m: Message) -> bytes:
    return b"\x00raw"


async def async_slow(m: Message) -> None:
    await asyncio.sleep(5)


HOLD_S = 10.0  # far beyond every timeout below


class Held:
    """Handlers that run until released (or ``HOLD_S``), noting whether they finished: an
    attempt that times out returns while its handler is still held."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.finished = threading.Event()

    async def async_fn(self, m: Message) -> str:
        deadline = time.monotonic() + HOLD_S
        while not self.release.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.finished.set()
        return "finished"

    def sync_fn(self, m: Message) -> str:
        self.release.wait(HOLD_S)
        self.finished.set()
        return "finished"


def raises(exc: BaseException) -> object:
    def handler(m: Message) -> None:
        raise exc
    return handler


async def test_async_and_sync_results() -> None:
    out = await PythonHandler(async_ok).invoke(msg({"a": 1}, attempt=2), 5)
    assert out.status == "success"
    assert json.loads(out.result or b"") == {"got": {"a": 1}, "attempt": 2}
    assert out.result_type == "application/json"
    out = await PythonHandler(sync_ok).invoke(msg(), 5)
    assert (out.status, out.result, out.result_type) == ("success", b"\x00raw",
                                                         "application/octet-stream")


@pytest.mark.parametrize(("exc", "status", "error_type", "delay"), [
    (Retry("later", delay_s=3), "retry", "Retry", 3),
    (Reject("bad input"), "failure", "Reject", None),
    (ValueError("boom"), "retry", "ValueError", None),
])
async def test_signals_and_errors(exc: BaseException, status: str, error_type: str,
                                  delay: float | None) -> None:
    out = await PythonHandler(raises(exc)).invoke(msg(), 5)  # type: ignore[arg-type]
    assert (out.status, out.error_type, out.delay_s) == (status, error_type, delay)
    assert out.error_message == str(exc)


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_timeout_is_enforced_for_both_kinds(kind: str) -> None:
    held = Held()
    fn = held.async_fn if kind == "async" else held.sync_fn
    try:
        out = await PythonHandler(fn).invoke(msg(), 0.2)
        assert not held.finished.is_set()  # the attempt ended while its handler still ran
    finally:
        held.release.set()
    assert (out.status, out.error_type) == ("retry", "Timeout")
    assert "timeout_s=0.2" in (out.error_message or "")
    assert out.duration_s >= 0.2 - 0.01  # not before its deadline


async def test_result_that_is_not_json_fails() -> None:
    out = await PythonHandler(lambda m: object()).invoke(msg(), 5)
    assert (out.status, out.error_type) == ("failure", "InvalidResult")


def test_import_target_errors() -> None:
    assert import_target("tests.helpers.handlers:echo").__name__ == "echo"
    with pytest.raises(ImportError, match="cannot import module 'nope'"):
        import_target("nope:fn")
    with pytest.raises(ImportError, match="has no attribute"):
        import_target("tests.helpers.handlers:missing")


async def test_many_attempts_each_time_out_at_their_deadline() -> None:
    held = Held()
    handler = PythonHandler(held.async_fn)
    try:
        outs = await asyncio.gather(*(handler.invoke(msg(), 0.3) for _ in range(50)))
        assert not held.finished.is_set()
    finally:
        held.release.set()
    assert {(o.status, o.error_type) for o in outs} == {("retry", "Timeout")}
    assert min(o.duration_s for o in outs) >= 0.3 - 0.01  # none cancelled early


async def test_a_cancellation_that_is_not_the_timeout_propagates() -> None:
    handler = PythonHandler(async_slow)
    attempt = asyncio.ensure_future(handler.invoke(msg(), 10))
    await asyncio.sleep(0.05)
    attempt.cancel()  # a stop, or the task was cancelled: not a timeout
    with pytest.raises(asyncio.CancelledError):
        await attempt


async def test_a_cancellation_on_top_of_a_timeout_still_propagates() -> None:
    handler = PythonHandler(async_slow)
    attempt = asyncio.ensure_future(handler.invoke(msg(), 0.05))
    while not handler._deadlines._fired:  # the sweep cancelled it; it has not resumed yet
        await asyncio.sleep(0)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt


async def test_a_handler_that_swallows_the_timeout_leaves_its_task_uncancelled() -> None:
    async def stubborn(m: Message) -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            return "finished anyway"
        return "slept"

    async def attempt() -> tuple[str | None, int]:
        out = await PythonHandler(stubborn).invoke(msg(), 0.05)
        task = asyncio.current_task()
        assert task is not None
        await asyncio.sleep(0.01)  # would raise CancelledError if a cancel were left pending
        return out.status, task.cancelling()

    assert await attempt() == ("success", 0)


async def test_a_short_timeout_behind_a_long_one_still_fires() -> None:
    held = Held()
    handler = PythonHandler(held.async_fn)
    long_attempt = asyncio.ensure_future(handler.invoke(msg(), HOLD_S * 2))
    try:
        await asyncio.sleep(0.01)
        out = await handler.invoke(msg(), 0.1)  # due before the attempt added ahead of it
        assert (out.status, out.error_type) == ("retry", "Timeout")
        assert not long_attempt.done()  # it fired on its own deadline, not the long one's
    finally:
        held.release.set()
    assert (await long_attempt).status == "success"
