"""Errors say whether to retry: driver errors mapped at each client library's boundary, the
HTTP API (503 + Retry-After for a transient refusal, 422 for a permanent one) and the CLI's
exit codes (1 transient, 2 permanent)."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner

from sluice.cli_common import guarded
from sluice.config.load import parse_pipeline
from sluice.datadir import Database, map_sqlite_errors
from sluice.errors import (
    ConfigError,
    ConfigIssue,
    Misconfigured,
    SluiceError,
    SourceError,
    TaskNotFound,
    Unavailable,
    Unsupported,
)
from sluice.gateway.app import errors_middleware, make_app
from sluice.gateway.server import build_gateway
from sluice.stores import open_store

UNTRACKED = """
name: untracked
source: {kafka: {brokers: "127.0.0.1:9092", topic: sluice-untracked}}
handler: {python: "tests.helpers.handlers:echo"}
consumer: {track_tasks: false}
"""


def test_each_kind_says_whether_to_retry() -> None:
    assert issubclass(Unavailable, SourceError) and Unavailable("x").retriable
    assert issubclass(Unsupported, SourceError) and not Unsupported("x").retriable
    assert issubclass(Misconfigured, SourceError) and not Misconfigured("x").retriable
    assert SourceError("an outage, as before").retriable
    assert Unavailable("x", retry_after_s=2.5).retry_after_s == 2.5


# -- sqlite3 --------------------------------------------------------------------------------

def test_a_database_locked_past_the_busy_timeout_is_unavailable(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_SQLITE_BUSY_TIMEOUT_MS", "50")
    db = Database.open(data_dir)
    locker = sqlite3.connect(db.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Unavailable, match="is unavailable: database is locked") as caught:
            db.run_sync(lambda c: c.execute("INSERT INTO pipelines VALUES ('p', 1, 1.0)"))
        assert caught.value.retriable and str(db.path) in str(caught.value)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    db.run_sync(lambda c: c.execute("INSERT INTO pipelines VALUES ('p', 1, 1.0)"))  # retried


def test_a_file_that_is_not_a_database_is_misconfigured(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    (data_dir / "sluice.db").write_bytes(b"not a database, " * 256)
    with pytest.raises(Misconfigured, match=r"cannot be used: .*SQLITE_NOTADB") as caught:
        Database.open(data_dir)
    assert not caught.value.retriable
    assert "sluice.db" in str(caught.value)


def test_a_data_directory_that_cannot_be_made_is_misconfigured(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(Misconfigured, match=r"cannot make the data directory .*file/data"):
        Database.open(tmp_path / "file" / "data")


def test_errors_of_the_sql_itself_are_not_mapped(data_dir: Path) -> None:
    db = Database.open(data_dir)

    def twice(conn: sqlite3.Connection) -> None:
        for _ in range(2):
            conn.execute("INSERT INTO pipelines VALUES ('p', 1, 1.0)")

    with pytest.raises(sqlite3.IntegrityError):
        db.run_sync(twice)
    assert db.read_sync(lambda c: c.execute("SELECT COUNT(*) FROM pipelines").fetchone()) == (0,)


@pytest.mark.parametrize(("code", "kind"), [
    (5, Unavailable),  # SQLITE_BUSY
    (13, Unavailable),  # SQLITE_FULL
    (10 | (3 << 8), Unavailable),  # SQLITE_IOERR_WRITE: an extended code
    (8, Misconfigured),  # SQLITE_READONLY
    (8 | (1 << 8), Misconfigured),  # SQLITE_READONLY_RECOVERY
    (14, Misconfigured),  # SQLITE_CANTOPEN
])
def test_sqlite_result_codes(code: int, kind: type[SourceError]) -> None:
    error = sqlite3.OperationalError("from the driver")
    error.sqlite_errorcode = code
    with pytest.raises(kind, match="from the driver"), map_sqlite_errors(Path("x.db")):
        raise error


# -- confluent-kafka ------------------------------------------------------------------------

def test_kafka_errors_by_code() -> None:
    ck = pytest.importorskip("confluent_kafka")
    from sluice.connectors.kafka_client import kafka_error, map_kafka_errors

    down = kafka_error("brokers b:1", ck.KafkaError(ck.KafkaError._TRANSPORT))
    assert isinstance(down, Unavailable) and str(down).startswith("brokers b:1: ")
    denied = kafka_error("topic t", ck.KafkaException(
        ck.KafkaError(ck.KafkaError.TOPIC_AUTHORIZATION_FAILED)))
    assert isinstance(denied, Misconfigured)
    with pytest.raises(Misconfigured, match=r"^kafka producer: .*no\.such\.setting"), \
            map_kafka_errors("kafka producer"):
        ck.Producer({"bootstrap.servers": "127.0.0.1:1", "no.such.setting": 1})


# -- HTTP -----------------------------------------------------------------------------------

def _raising(exc: Exception) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        raise exc
    return handler


@pytest.mark.parametrize(("exc", "status", "slug", "retry_after"), [
    (Unavailable("the queue is busy"), 503, "unavailable", "1"),
    (Unavailable("the queue is busy", retry_after_s=2.5), 503, "unavailable", "3"),
    (SourceError("an outage"), 503, "unavailable", "1"),
    (Unsupported("no delay on this source"), 422, "unsupported", None),
    (Misconfigured("the database is read-only"), 422, "misconfigured", None),
])
async def test_the_api_answers_by_kind(exc: SourceError, status: int, slug: str,
                                       retry_after: str | None) -> None:
    app = web.Application(middlewares=[errors_middleware])
    app.router.add_get("/x", _raising(exc))
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/x")
        body = await resp.json(content_type=None)
        assert resp.status == status
        assert resp.headers["Content-Type"].startswith("application/problem+json")
        assert resp.headers.get("Retry-After") == retry_after
        assert body["type"].endswith("/" + slug) and body["status"] == status
        assert str(exc) in body["detail"]


async def test_a_submit_to_a_pipeline_that_does_not_track_tasks_is_refused_for_good(
        data_dir: Path) -> None:
    """A permanent refusal, not a 503: a client that retries 503s would loop forever."""
    gateway = build_gateway([parse_pipeline(UNTRACKED, "untracked.yaml", check_code=False)],
                            open_store(None, data_dir), None, 1 << 20)
    try:
        async with TestClient(TestServer(make_app(gateway))) as client:
            resp = await client.post("/v1/pipelines/untracked/tasks", data=b"{}",
                                     headers={"Content-Type": "application/json"})
            body = await resp.json(content_type=None)
    finally:
        await gateway.close()
    assert 400 <= resp.status < 500, body
    assert "Retry-After" not in resp.headers
    assert "does not track its tasks" in body["detail"]
    assert await gateway.store.counts() == {}  # nothing was created


# -- CLI ------------------------------------------------------------------------------------

def _exit_code(exc: SluiceError, code: int = 2) -> int:
    def boom() -> None:
        raise exc

    with pytest.raises(SystemExit) as caught:
        guarded(boom, code)
    assert isinstance(caught.value.code, int)
    return caught.value.code


def test_cli_exit_codes_say_whether_to_retry() -> None:
    assert _exit_code(Unavailable("locked")) == 1
    assert _exit_code(SourceError("an outage")) == 1
    assert _exit_code(Unsupported("no"), code=1) == 2
    assert _exit_code(Misconfigured("no"), code=1) == 2
    assert _exit_code(ConfigError([ConfigIssue("p.yaml", 1, 1, "", "bad")]), code=1) == 2
    assert _exit_code(TaskNotFound("t")) == 2
    assert _exit_code(SluiceError("other"), code=1) == 1


def test_cli_exits_1_while_the_database_is_locked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sluice.cli import cli

    monkeypatch.setenv("SLUICE_SQLITE_BUSY_TIMEOUT_MS", "50")
    file = tmp_path / "untracked.yaml"
    file.write_text(UNTRACKED, encoding="utf-8")
    db = Database.open(tmp_path / "data")
    locker = sqlite3.connect(db.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        result = CliRunner().invoke(cli, ["pipelines", "pause", "untracked", "-f", str(file),
                                          "--data-dir", str(tmp_path / "data")])
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert result.exit_code == 1, result.output
    assert "database is locked" in result.output and "Traceback" not in result.output


def test_cli_submit_to_a_pipeline_that_does_not_track_tasks_exits_2(tmp_path: Path) -> None:
    from sluice.cli import cli

    file = tmp_path / "untracked.yaml"
    file.write_text(UNTRACKED, encoding="utf-8")
    result = CliRunner().invoke(cli, ["submit", "untracked", "-f", str(file), "--data", "{}",
                                      "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 2, result.output
    assert "does not track its tasks" in result.output
    assert "Traceback" not in result.output
