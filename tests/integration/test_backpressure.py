"""Backpressure: with 1,000,000 messages waiting, the consumer loop leases only what it may
hold (``consumer.prefetch``, and at least three per slot of the limit), and its memory stays
flat while it works through the backlog."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from pathlib import Path

import psutil
import pytest

from sluice.config.load import parse_pipeline
from sluice.connectors import embedded
from sluice.connectors.embedded import QueuedMessage
from sluice.consumer.loop import HELD_PER_SLOT
from sluice.datadir import Database
from sluice.runtime import build

BACKLOG = 1_000_000
BATCH = 50_000
RUN_S = 8.0
LIMIT = 16
PREFETCH = 100  # more than HELD_PER_SLOT * LIMIT: the prefetch bounds what is held
MAX_RSS_GROWTH_MIB = 40

PIPELINE = f"""
name: backlog
source: {{embedded: {{queue: backlog}}}}
handler: {{python: "tests.helpers.handlers:behave"}}
consumer:
  concurrency: {{initial: {LIMIT}, min: 1, max: {LIMIT}}}
  ordering: unordered
  prefetch: {PREFETCH}
"""


def leased_now(db: Database) -> int:
    row = db.run_sync(lambda c: c.execute(
        "SELECT COUNT(*) FROM messages WHERE queue = 'backlog' AND lease_token IS NOT NULL"
        " AND visible_at > ?", (time.time(),)).fetchone())
    return int(row[0])


@pytest.mark.slow
async def test_a_million_message_backlog_leases_only_what_fits(data_dir: Path) -> None:
    db = Database.open(data_dir)
    body = b'{"sleep_s": 0.01}'
    for start in range(0, BACKLOG, BATCH):
        embedded.submit(db, "backlog", "default", "backlog",
                        [QueuedMessage(f"m{i:07d}", body) for i in range(start, start + BATCH)])
    gc.collect()
    process = psutil.Process(os.getpid())
    rss_start = process.memory_info().rss

    loop = build(parse_pipeline(PIPELINE), data_dir)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    held_max = leased_max = 0
    rss_max = rss_start
    samples = 0
    deadline = time.monotonic() + RUN_S
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        held_max = max(held_max, len(loop._held))
        if samples % 5 == 0:
            leased_max = max(leased_max, leased_now(db))
        rss_max = max(rss_max, process.memory_info().rss)
        samples += 1
    stop.set()
    await asyncio.wait_for(running, 30)
    done = loop.stats.succeeded
    growth_mib = (rss_max - rss_start) / 2**20
    print(f"\nbacklog {BACKLOG:,}: ran {done:,} tasks in {RUN_S:g}s; held at most {held_max}, "
          f"leased at most {leased_max}; RSS {rss_start / 2**20:.1f} MiB at start, "
          f"{rss_max / 2**20:.1f} MiB at most (+{growth_mib:.1f} MiB)")
    assert done > 100  # it did work through the backlog
    assert HELD_PER_SLOT * LIMIT < PREFETCH
    assert held_max <= PREFETCH
    assert leased_max <= PREFETCH
    assert growth_mib < MAX_RSS_GROWTH_MIB
    remaining = db.run_sync(lambda c: c.execute(
        "SELECT COUNT(*) FROM messages WHERE queue = 'backlog'").fetchone()[0])
    assert remaining == BACKLOG - done  # nothing lost, nothing finished twice
