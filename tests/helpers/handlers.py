"""Handlers the tests run, in-process and in worker subprocesses.

Each call appends a line ``event task_id attempt pid`` to the file named by ``SLUICE_TEST_LOG``
(O_APPEND: lines from several processes never interleave), so a test can count runs.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from sluice import Message, Reject, Retry


def record(event: str, message: Message) -> None:
    path = os.environ.get("SLUICE_TEST_LOG")
    if path:
        line = f"{event} {message.task_id} {message.attempt} {os.getpid()}\n".encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


async def echo(message: Message) -> Any:
    record("done", message)
    return message.payload


def echo_sync(message: Message) -> Any:
    record("done", message)
    return message.payload


async def behave(message: Message) -> Any:
    """Does what the payload says: ``fail_until`` attempt N raises; ``reject``; ``sleep_s``;
    ``retry_delay_s`` raises Retry with that delay; ``sleep_first_s`` sleeps on attempt 1 only."""
    p = message.payload
    record("start", message)
    if p.get("reject"):
        raise Reject(str(p["reject"]))
    if message.attempt == 1 and p.get("sleep_first_s"):
        await asyncio.sleep(float(p["sleep_first_s"]))
    if p.get("sleep_s"):
        await asyncio.sleep(float(p["sleep_s"]))
    if message.attempt < int(p.get("fail_until", 0)):
        if "retry_delay_s" in p:
            raise Retry("asked to retry", delay_s=float(p["retry_delay_s"]))
        raise RuntimeError(f"failing attempt {message.attempt}")
    record("done", message)
    return {"attempt": message.attempt}


def behave_sync(message: Message) -> Any:
    p = message.payload
    record("start", message)
    if p.get("sleep_s"):
        time.sleep(float(p["sleep_s"]))
    if message.attempt < int(p.get("fail_until", 0)):
        raise RuntimeError(f"failing attempt {message.attempt}")
    record("done", message)
    return {"attempt": message.attempt, "sync": True}


def not_json(message: Message) -> Any:
    return object()


def read_log(path: str) -> list[tuple[str, str, int, int]]:
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        if line:
            event, task_id, attempt, pid = line.split(" ")
            out.append((event, task_id, int(attempt), int(pid)))
    return out


async def until_cancelled(message: Message) -> Any:
    """Sleeps ``sleep_s`` (default 60); an attempt stopped meanwhile records ``cancelled``."""
    record("start", message)
    try:
        await asyncio.sleep(float(message.payload.get("sleep_s", 60)))
    except asyncio.CancelledError:
        record("cancelled", message)
        raise
    record("done", message)
    return {"attempt": message.attempt}
