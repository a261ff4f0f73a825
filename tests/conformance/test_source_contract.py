"""The :class:`~sluice.connectors.base.Source` protocol, checked on every connector's source.

Each source is built the way a worker builds it (:func:`sluice.runtime.build_source` from a
pipeline file) over the connectors of ``conftest.CONNECTORS``, and driven through the protocol
alone, without the consumer layer. What every source must do:

1. ``fetch`` never returns more than ``max_n`` deliveries; on an empty source it returns
   (nothing) once ``wait_s`` has passed, and a message arriving meanwhile is returned.
2. A fetched delivery is the fetcher's until it settles it: fetching again does not hand it out
   while it is extended past its lease; where deliveries are leased one by one
   (``per_message_leases``), no other consumer of the queue gets it either, until the lease
   lapses without an ``extend``.
3. ``retry_later(delay)`` hands the delivery out again after the delay, not before, and not
   more than 20% after.
4. ``pending()`` counts every message not finished: visible, delayed and leased; ``ack``
   finishes one.
5. ``close()`` may be called twice, before or after ``start()``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sluice.config.load import parse_pipeline
from sluice.connectors.base import Delivery, Source
from sluice.runtime import build_source
from tests.conformance.conftest import LEASE_S, Connector, Item

PIPELINE = """
name: jobs
source: {source}
handler: {{python: "tests.helpers.handlers:behave"}}
"""

HANG_GUARD_S = 60.0  # a call that never returns fails here instead of hanging the suite
POLL_S = 0.1

OpenSource = Callable[[], Awaitable[Source]]


@pytest.fixture
async def open_source(connector: Connector, data_dir: Path) -> AsyncIterator[OpenSource]:
    """Start a source of the connector's test queue (each call: one more consumer of it)."""
    opened: list[Source] = []

    async def start() -> Source:
        src = build_source(parse_pipeline(PIPELINE.format(source=connector.source_yaml())),
                           data_dir, store_url=connector.store_url)
        opened.append(src)
        await src.start()
        return src

    yield start
    for src in opened:
        await src.close()


def items(n: int) -> list[Item]:
    return [Item(f"s{i:03d}", {"n": i}) for i in range(n)]


async def fetch(src: Source, max_n: int, wait_s: float = POLL_S) -> list[Delivery]:
    got = await asyncio.wait_for(src.fetch(max_n, wait_s), wait_s + HANG_GUARD_S)
    assert len(got) <= max_n
    return got


async def fetch_exactly(src: Source, n: int) -> list[Delivery]:
    """``n`` deliveries, in as many fetches (of at most ``n`` still wanted) as it takes."""
    got: list[Delivery] = []
    deadline = time.monotonic() + HANG_GUARD_S
    while len(got) < n:
        assert time.monotonic() < deadline, f"fetched {len(got)} of {n}"
        got.extend(await fetch(src, n - len(got)))
    return got


async def published(connector: Connector, sent: list[Item]) -> None:
    await asyncio.to_thread(connector.publish, sent)


async def test_fetch_returns_at_most_max_n(connector: Connector,
                                           open_source: OpenSource) -> None:
    sent = items(7)
    await published(connector, sent)
    src = await open_source()
    got: list[Delivery] = []
    deadline = time.monotonic() + HANG_GUARD_S
    while len(got) < len(sent):
        assert time.monotonic() < deadline, f"fetched {len(got)} of {len(sent)}"
        got.extend(await fetch(src, 3, 0.5))  # fetch() checks the bound of each call
    assert sorted(d.task_id for d in got) == [i.task_id for i in sent]
    assert await fetch(src, 1, 0.0) == []  # max_n 1, no wait: nothing left to hand out
    await src.ack(got)


async def test_fetch_on_an_empty_source_returns_after_wait_s(connector: Connector,
                                                             open_source: OpenSource) -> None:
    src = await open_source()
    assert await fetch(src, 5, 0.5) == []
    # A message that arrives while a fetch waits is returned by that fetch.
    waiting = asyncio.ensure_future(fetch(src, 5, 30.0))
    await published(connector, [Item("late", {"n": 1})])
    got = await waiting
    assert [d.task_id for d in got] == ["late"]
    await src.ack(got)


async def test_an_extended_delivery_is_not_handed_out_again(connector: Connector,
                                                            open_source: OpenSource) -> None:
    await published(connector, [Item("held", {"n": 1})])
    first = await open_source()
    other = await open_source() if connector.per_message_leases else None
    (held,) = await fetch_exactly(first, 1)
    # Extended every few tenths of a second, past twice its lease: nobody else gets it.
    until = time.monotonic() + 2 * LEASE_S
    while time.monotonic() < until:
        assert await fetch(first, 10, 0.2) == []
        if other is not None:
            assert await fetch(other, 10, 0.2) == []
        await first.extend([held])
    if other is not None:
        # Not extended any more: once the lease lapses, another consumer gets it.
        (again,) = await fetch_exactly(other, 1)
        assert (again.task_id, again.deliveries) == ("held", 2)
        await other.ack([again])
    else:
        await first.ack([held])
    assert await first.pending() == 0


async def test_retry_later_hands_out_again_after_the_delay_not_before(
        connector: Connector, open_source: OpenSource) -> None:
    await published(connector, [Item("again", {"n": 1})])
    src = await open_source()
    (first,) = await fetch_exactly(src, 1)
    delay_s = 1.0
    asked_at = time.monotonic()
    await src.retry_later([(first, delay_s)])
    (back,) = await fetch_exactly(src, 1)
    waited_s = time.monotonic() - asked_at
    assert back.task_id == "again"
    assert delay_s - 0.01 <= waited_s <= delay_s * 1.2, (
        f"handed out again {waited_s:.3f}s after retry_later({delay_s})")
    await src.ack([back])
    assert await src.pending() == 0


async def test_pending_counts_visible_delayed_and_leased(connector: Connector,
                                                         open_source: OpenSource) -> None:
    sent = items(5)
    await published(connector, sent)
    src = await open_source()
    leased, delayed = await fetch_exactly(src, 2)
    await src.retry_later([(delayed, 600.0)])  # delayed well past the test
    assert await src.pending() == 5  # 3 visible, 1 delayed, 1 leased
    await src.ack([leased])
    assert await src.pending() == 4
    rest = await fetch_exactly(src, 3)
    assert await src.pending() == 4  # leased now, not finished
    await src.ack(rest)
    assert await src.pending() == 1  # the delayed one


async def test_close_twice_is_fine(connector: Connector, open_source: OpenSource) -> None:
    await published(connector, items(2))
    src = await open_source()
    got = await fetch_exactly(src, 1)
    await src.ack(got)
    await asyncio.wait_for(src.close(), HANG_GUARD_S)
    await asyncio.wait_for(src.close(), HANG_GUARD_S)


async def test_close_twice_without_start_is_fine(connector: Connector, data_dir: Path) -> None:
    src = build_source(parse_pipeline(PIPELINE.format(source=connector.source_yaml())),
                       data_dir, store_url=connector.store_url)
    await asyncio.wait_for(src.close(), HANG_GUARD_S)
    await asyncio.wait_for(src.close(), HANG_GUARD_S)
