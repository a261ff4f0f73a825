"""The definitions of a store (sluice.definitions) on both stores: puts and deletes take one
version sequence, a delete leaves a tombstone that ``changes`` still gives, and puts at once
from many coroutines get distinct versions that a reader following ``changes`` sees all of."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.definitions import JSON, YAML
from sluice.stores import open_store
from tests.helpers.postgres import fresh_url


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sluice.db'}"
        return
    with fresh_url() as url:
        yield url


def test_put_get_delete_and_changes(store_url: str) -> None:
    async def main() -> None:
        store = open_store(store_url)
        defs = store.definitions
        try:
            assert await defs.get("a") is None and await defs.changes(0) == []
            a1 = await defs.put("a", "acme", "name: a\n", YAML, put_by="acme", restricted=True)
            assert (a1.name, a1.tenant, a1.body, a1.format, a1.put_by, a1.restricted,
                    a1.deleted) == ("a", "acme", "name: a\n", YAML, "acme", True, False)
            b1 = await defs.put("b", "default", '{"name": "b"}', JSON, put_by="admin",
                                restricted=False)
            a2 = await defs.put("a", "acme", "name: a  # 2\n", YAML, put_by="admin",
                                restricted=False)
            assert a1.version < b1.version < a2.version
            got = await defs.get("a")
            assert got is not None and got.body == "name: a  # 2\n" and not got.restricted
            assert [d.name for d in await defs.live()] == ["a", "b"]
            assert [(d.name, d.version) for d in await defs.changes(0)] == [
                ("b", b1.version), ("a", a2.version)]  # one row per name, its newest
            gone = await defs.delete("b")
            assert gone is not None and gone.deleted and gone.version > a2.version
            assert gone.tenant == "default"
            assert await defs.delete("b") is None  # no live definition of that name
            assert await defs.get("b") is None
            assert [d.name for d in await defs.live()] == ["a"]
            assert [(d.name, d.deleted) for d in await defs.changes(a2.version)] == [
                ("b", True)]
            again = await defs.put("b", "default", "name: b\n", YAML, put_by="admin",
                                   restricted=False)
            assert again.version > gone.version and not again.deleted
        finally:
            await store.close()

    asyncio.run(main())


def test_concurrent_puts_take_distinct_versions_in_order(store_url: str) -> None:
    async def main() -> None:
        store = open_store(store_url)
        defs = store.definitions
        seen: dict[str, int] = {}
        since = 0
        done = asyncio.Event()

        async def follow() -> None:
            nonlocal since
            while True:
                finished = done.is_set()
                for d in await defs.changes(since):
                    assert d.version > since
                    since = d.version
                    seen[d.name] = max(seen.get(d.name, 0), d.version)
                if finished:
                    return
                await asyncio.sleep(0.005)

        try:
            follower = asyncio.create_task(follow())
            rows = await asyncio.gather(*(
                defs.put(f"p{i % 10}", "default", f"name: p{i % 10}\n", YAML, put_by="admin",
                         restricted=False) for i in range(60)))
            done.set()
            await follower
            assert len({r.version for r in rows}) == 60
            newest = {r.name: max(x.version for x in rows if x.name == r.name) for r in rows}
            assert seen == newest  # the follower missed no last put of any name
        finally:
            await store.close()

    asyncio.run(main())
