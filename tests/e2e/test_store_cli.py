"""``--store`` as a user gives it: the CLI on a PostgreSQL store, ``sluice store migrate``, bad
URLs and unreachable servers answered in one line, and a worker's ``--metrics-port``."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from sluice.datadir import VERSION
from sluice.stores.postgres_schema import VERSION as PG_VERSION
from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers.postgres import URL, pg_url  # noqa: F401  (a fixture)
from tests.helpers.server import free_port

QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"


def sluice(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_migrate_is_idempotent_and_the_env_names_the_store(pg_url: str) -> None:  # noqa: F811
    first = sluice("store", "migrate", "--store", pg_url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().endswith(f"schema version 0 -> {VERSION}")
    assert "sluice:***@" in first.stdout  # the password is never printed
    again = sluice("store", "migrate", SLUICE_STORE=pg_url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().endswith(f"schema version {VERSION}, up to date")


def test_a_store_of_the_previous_version_is_brought_up_to_date(
        pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    """A version 1 store (before hosting pipelines' route tables, the pipeline definitions,
    the task attempts and kept payloads) migrates to version 4, on PostgreSQL (migrations 2 to
    4) and on SQLite (its tables and columns made when opened)."""
    assert VERSION == PG_VERSION == 4
    assert sluice("store", "migrate", "--store", pg_url).returncode == 0
    schema = pg_url.rsplit("schema=", 1)[1]

    async def back_to_1() -> None:
        import asyncpg

        conn = await asyncpg.connect(URL)
        try:
            await conn.execute(f"DROP TABLE {schema}.routes, {schema}.route_events,"
                               f" {schema}.task_notes, {schema}.definitions,"
                               f" {schema}.task_attempts; ALTER TABLE {schema}.tasks"
                               " DROP COLUMN payload, DROP COLUMN payload_type,"
                               " DROP COLUMN payload_size;"
                               f" DELETE FROM {schema}.sluice_schema WHERE version >= 2")
        finally:
            await conn.close()

    asyncio.run(back_to_1())
    up = sluice("store", "migrate", "--store", pg_url)
    assert up.returncode == 0 and up.stdout.strip().endswith("schema version 1 -> 4"), up
    data = tmp_path / "data"
    assert sluice("store", "migrate", "--data-dir", str(data)).returncode == 0
    with sqlite3.connect(data / "sluice.db") as conn:
        conn.executescript("DROP TABLE routes; DROP TABLE route_events; DROP TABLE task_notes;"
                           " DROP TABLE definitions; DROP TABLE task_attempts;"
                           " ALTER TABLE tasks DROP COLUMN payload;"
                           " ALTER TABLE tasks DROP COLUMN payload_type;"
                           " ALTER TABLE tasks DROP COLUMN payload_size;"
                           " DELETE FROM sluice_schema WHERE version >= 2;")
    # (SQLite brings a database up to date as it opens it, before the command looks)
    assert sluice("store", "migrate", "--data-dir", str(data)).returncode == 0
    with sqlite3.connect(data / "sluice.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        (version,) = conn.execute("SELECT MAX(version) FROM sluice_schema").fetchone()
    assert {"routes", "route_events", "task_notes", "definitions", "task_attempts"} <= tables
    assert version == 4


def test_a_version_3_store_gets_task_attempts_and_kept_payloads(
        pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    """A version 3 store with a task in it (before the attempt history and kept payloads)
    migrates to version 4, on PostgreSQL (migration 4) and on SQLite (as it opens): the old
    task reads with no payload and no attempts, a new one keeps its payload."""
    from sluice import intake
    from sluice.config.load import parse_pipeline
    from sluice.datadir import QueuedMessage
    from sluice.stores import open_store

    config = parse_pipeline("name: mig\nsource: {embedded: {queue: mig}}\n"
                            "handler: {python: 'bench.handlers:noop'}\n")

    async def submit_and_read(url: str, task_id: str) -> tuple[object, object, object]:
        store = open_store(url)
        try:
            await intake.submit(store, config, [QueuedMessage(task_id, b'{"new": true}')])
            old, new = await store.tasks.get("old", "mig"), await store.tasks.get(task_id, "mig")
            return old.attempt_log, old.payload, new.to_json()["payload"]
        finally:
            await store.close()

    schema = pg_url.rsplit("schema=", 1)[1]

    async def version_3_with_a_task() -> None:
        import asyncpg

        conn = await asyncpg.connect(URL)
        try:
            await conn.execute(f"DROP TABLE {schema}.task_attempts; ALTER TABLE {schema}.tasks"
                               " DROP COLUMN payload, DROP COLUMN payload_type,"
                               " DROP COLUMN payload_size;"
                               f" DELETE FROM {schema}.sluice_schema WHERE version >= 4;"
                               f" INSERT INTO {schema}.tasks (pipeline, task_id, tenant, state,"
                               " updated_at) VALUES ('mig', 'old', 'default', 'SUCCEEDED', 1)")
        finally:
            await conn.close()

    assert sluice("store", "migrate", "--store", pg_url).returncode == 0
    asyncio.run(version_3_with_a_task())
    up = sluice("store", "migrate", "--store", pg_url)
    assert up.returncode == 0 and up.stdout.strip().endswith("schema version 3 -> 4"), up
    kept = {"content_type": "application/json", "size_bytes": 13, "kept_bytes": 13,
            "truncated": False, "encoding": "json", "value": {"new": True}}
    assert asyncio.run(submit_and_read(pg_url, "pg-new")) == ([], None, kept)

    data = tmp_path / "data"
    assert sluice("store", "migrate", "--data-dir", str(data)).returncode == 0
    with sqlite3.connect(data / "sluice.db") as conn:
        conn.executescript("DROP TABLE task_attempts; ALTER TABLE tasks DROP COLUMN payload;"
                           " ALTER TABLE tasks DROP COLUMN payload_type;"
                           " ALTER TABLE tasks DROP COLUMN payload_size;"
                           " DELETE FROM sluice_schema WHERE version >= 4;"
                           " INSERT INTO tasks (pipeline, task_id, tenant, state, updated_at)"
                           " VALUES ('mig', 'old', 'default', 'SUCCEEDED', 1);")
    up = sluice("store", "migrate", "--data-dir", str(data))
    assert up.returncode == 0, up
    with sqlite3.connect(data / "sluice.db") as conn:
        (version,) = conn.execute("SELECT MAX(version) FROM sluice_schema").fetchone()
        columns = {r[1] for r in conn.execute("PRAGMA table_info(tasks)")}
    assert version == 4 and {"payload", "payload_type", "payload_size"} <= columns
    url = f"sqlite:///{data / 'sluice.db'}"
    assert asyncio.run(submit_and_read(url, "sq-new")) == ([], None, kept)


def test_a_store_of_a_newer_sluice_is_refused(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    assert sluice("store", "migrate", "--store", pg_url).returncode == 0

    async def from_the_future() -> None:
        import asyncpg

        conn = await asyncpg.connect(URL)
        try:
            schema = pg_url.rsplit("schema=", 1)[1]
            await conn.execute(f"INSERT INTO {schema}.sluice_schema (version, description)"
                               " VALUES (99, 'later')")
        finally:
            await conn.close()

    asyncio.run(from_the_future())
    line = one_line_error(sluice("store", "migrate", "--store", pg_url), 2)
    assert f"has schema version 99, newer than this sluice's {VERSION}: upgrade sluice" in line

    data = tmp_path / "data"
    assert sluice("store", "migrate", "--data-dir", str(data)).returncode == 0
    with sqlite3.connect(data / "sluice.db") as conn:
        conn.execute("INSERT INTO sluice_schema VALUES (99, 'later', 0)")
    line = one_line_error(sluice("tasks", "list", "--data-dir", str(data)), 2)
    assert f"has schema version 99, newer than this sluice's {VERSION}: upgrade sluice" in line


@pytest.mark.parametrize(("url", "code", "says"), [
    ("mysql://h/db", 2, "unknown scheme 'mysql'; expected sqlite:///path/sluice.db or "
                        "postgresql://user:password@host/database"),
    ("sqlite://relative.db", 2, "a SQLite URL names its file after three slashes"),
    ("postgresql://sluice:sluice@127.0.0.1:5432/no_such_db", 2, "cannot be used"),
    ("postgresql://no_such_user:secret@127.0.0.1:5432/sluice", 2, "cannot be used"),
    ("postgresql://sluice:sluice@127.0.0.1:1/sluice", 1, "is unavailable"),
    ("postgresql://sluice:sluice@127.0.0.1:5432/sluice?schema=a-b", 2, "not a plain PostgreSQL "
                                                                        "identifier"),
])
def test_a_bad_or_unreachable_store_is_one_line(url: str, code: int, says: str) -> None:
    if "5432" in url:
        from tests.helpers.postgres import require_postgres

        require_postgres()
    line = one_line_error(sluice("tasks", "list", "--store", url), code)
    assert says in line
    assert "secret" not in line  # the password is never printed


def test_the_cli_round_trip_on_postgres(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    submitted = sluice("submit", "thumbnails", "-f", str(QUICKSTART), "--store", pg_url,
                       "--data", json.dumps({"image": "cat.png"}), "--task-id", "cat")
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.strip() == "cat"
    again = sluice("submit", "thumbnails", "-f", str(QUICKSTART), "--store", pg_url,
                   "--data", "{}", "--task-id", "cat")
    assert again.returncode == 2 and "already used" in again.stderr and "QUEUED" in again.stderr
    # A worker on another "machine" (its own data directory) runs it.
    ran = sluice("run", str(QUICKSTART), "--drain", "--store", pg_url,
                 "--data-dir", str(tmp_path / "elsewhere"))
    assert ran.returncode == 0, ran.stderr
    got = sluice("tasks", "get", "cat", "--json", "--store", pg_url)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["state"] == "SUCCEEDED"
    listed = sluice("pipelines", "list", "--json", "--store", pg_url)
    assert listed.returncode == 0, listed.stderr
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["name"], row["counts"]) == ("thumbnails", {"SUCCEEDED": 1})
    assert not (tmp_path / "elsewhere" / "sluice.db").exists()  # no SQLite store was made


def test_a_worker_serves_metrics_with_its_queue_depth(pg_url: str,  # noqa: F811
                                                      tmp_path: Path) -> None:
    for n in range(3):
        assert sluice("submit", "thumbnails", "-f", str(QUICKSTART), "--store", pg_url,
                      "--data", "{}", "--delay-s", "600", "--task-id", f"later-{n}",
                      ).returncode == 0
    port = free_port()
    proc = subprocess.Popen(
        [*sluice_cmd(), "run", str(QUICKSTART), "--store", pg_url, "--metrics-port", str(port),
         "--metrics-host", "127.0.0.1"], cwd=ROOT, env=subprocess_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert json.loads(r.read()) == {"status": "ok"}
    finally:
        proc.terminate()
        _, errs = proc.communicate(timeout=60)
    assert proc.returncode == 0, errs
    assert re.search(r'^sluice_queue_depth\{pipeline="thumbnails"\} 3\.0$', body, re.M), body
    assert re.search(r'^sluice_tasks\{pipeline="thumbnails",state="QUEUED"\} 3\.0$', body,
                     re.M), body
