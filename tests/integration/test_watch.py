"""``sluice serve --watch`` (sluice.watch): real files, real file-system events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sluice.config.model import PipelineConfig
from sluice.watch import watch_files

PIPELINE = """\
name: {name}
source: {{embedded: {{queue: q}}}}
consumer: {{concurrency: {concurrency}}}
handler: {{http: {{url: "http://127.0.0.1:9/x"}}}}
"""


class Seen:
    def __init__(self) -> None:
        self.applied: list[PipelineConfig] = []
        self.removed: list[str] = []
        self.changed = asyncio.Event()

    async def apply(self, config: PipelineConfig) -> None:
        self.applied.append(config)
        self.changed.set()

    async def remove(self, name: str) -> None:
        self.removed.append(name)
        self.changed.set()

    async def next(self, timeout_s: float = 10.0) -> None:
        await asyncio.wait_for(self.changed.wait(), timeout_s)
        self.changed.clear()


@contextlib.asynccontextmanager
async def watching(path: Path, seen: Seen) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(watch_files([path], seen.apply, seen.remove, stop,
                                           debounce_ms=50))
    await asyncio.sleep(0.5)  # the watch is set up
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_saved_change_is_applied_and_a_renamed_pipeline_replaces_the_old(
        tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(name="p", concurrency=4))
    seen = Seen()
    async with watching(path, seen):
        path.write_text(PIPELINE.format(name="p", concurrency=16))
        await seen.next()
        assert [c.consumer.concurrency for c in seen.applied] == [16]
        # An editor's save: a new file renamed over the old one.
        tmp = tmp_path / ".p.yaml.swp"
        tmp.write_text(PIPELINE.format(name="q", concurrency=16))
        os.replace(tmp, path)
        await seen.next()
        await asyncio.sleep(0.3)
    assert [c.name for c in seen.applied] == ["p", "q"]
    assert seen.removed == ["p"]


async def test_a_bad_save_keeps_the_running_pipeline_and_says_where(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "p.yaml"
    other = tmp_path / "other.yaml"  # a file in the same folder that is not watched
    path.write_text(PIPELINE.format(name="p", concurrency=4))
    seen = Seen()
    with caplog.at_level(logging.ERROR, logger="sluice.watch"):
        async with watching(path, seen):
            path.write_text(PIPELINE.format(name="p", concurrency="lots"))
            other.write_text(PIPELINE.format(name="o", concurrency=1))
            await asyncio.sleep(1.0)
            assert seen.applied == []
            path.write_text(PIPELINE.format(name="p", concurrency=8))
            await seen.next()
    assert [c.consumer.concurrency for c in seen.applied] == [8]
    assert f"{path}:3:" in caplog.text and "does not load" in caplog.text


async def test_a_deleted_file_keeps_its_pipeline(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(name="p", concurrency=4))
    seen = Seen()
    with caplog.at_level(logging.WARNING, logger="sluice.watch"):
        async with watching(path, seen):
            path.unlink()
            await asyncio.sleep(1.0)
    assert seen.removed == [] and seen.applied == []
    assert "keeps running" in caplog.text
