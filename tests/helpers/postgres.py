"""The real PostgreSQL the tests use (``scripts/services start postgres``; scripts/test starts
it): its URL, a check that it answers, and a fresh schema per test (``?schema=``), dropped
after, so tests never see each other's tables."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

URL = os.environ.get("SLUICE_POSTGRES_URL", "postgresql://sluice:sluice@127.0.0.1:5432/sluice")

_problem: list[str] = []


def postgres_problem() -> str | None:
    """Why the server cannot be used (``None``: it answers); asked once per session."""
    if not _problem:
        try:
            asyncio.run(_ping())
            _problem.append("")
        except Exception as exc:  # any failure to connect is the reason to report
            _problem.append(f"{type(exc).__name__}: {exc}")
    if not _problem[0]:
        return None
    return (f"PostgreSQL is not reachable at {URL} ({_problem[0]}); start it with "
            "`scripts/services start postgres` (scripts/test does)")


async def _ping() -> None:
    import asyncpg

    conn = await asyncpg.connect(URL, timeout=5)
    await conn.close()


def require_postgres() -> None:
    """Skip the test when PostgreSQL does not answer; fail it in CI (``CI=true``)."""
    problem = postgres_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)


def drop_schema(schema: str) -> None:
    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(URL, timeout=5)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


@contextmanager
def fresh_url() -> Iterator[str]:
    """A store URL on a schema of its own, dropped when the block ends."""
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{URL}?schema={schema}"
    finally:
        drop_schema(schema)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL store URL for one test (see :func:`fresh_url`)."""
    with fresh_url() as url:
        yield url
