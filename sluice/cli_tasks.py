"""``sluice submit``, ``sluice tasks ...`` and ``sluice pipelines ...``.

Each talks to a sluice server when given ``--url`` (or ``SLUICE_URL``; token from ``--token`` or
``SLUICE_TOKEN``), else to the local data directory.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from sluice.cli_common import data_dir_option, err, fail, guarded, load_all, out
from sluice.client import ApiResponse, Client
from sluice.errors import IllegalTransition, SluiceError, TaskNotFound
from sluice.tasks.state import TaskState
from sluice.tasks.store import TaskRecord

if TYPE_CHECKING:
    from sluice.config.model import PipelineConfig
    from sluice.datadir import Database, QueuedMessage


def remote_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--token", envvar="SLUICE_TOKEN", default=None,
                      help="API key for --url. Env: SLUICE_TOKEN.")(fn)
    return click.option("--url", envvar="SLUICE_URL", default=None,
                        help="A sluice server (e.g. http://127.0.0.1:8080); without it, the "
                        "local data directory is used. Env: SLUICE_URL.")(fn)


def _client(url: str, token: str | None) -> Client:
    return Client(url, token)


def _check(resp: ApiResponse) -> Any:
    if not resp.ok:
        fail(f"HTTP {resp.status}: {resp.detail()}", 2 if resp.status < 500 else 1)
    return resp.body


def _store(data_dir: Path) -> Any:
    from sluice.datadir import Database
    from sluice.tasks.sqlite import SqliteTaskStore

    return SqliteTaskStore(Database.open(data_dir))


def _ts(at: float | None) -> str:
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}"


# -- submit ---------------------------------------------------------------------------------

def _read_data(value: str) -> bytes:
    if value.startswith("@"):
        try:
            raw = Path(value[1:]).read_bytes()
        except OSError as exc:
            fail(f"--data {value}: cannot read the file: {exc}")
    else:
        raw = value.encode()
    try:
        json.loads(raw)
    except ValueError as exc:
        fail(f"--data {value[:60]!r}: not valid JSON: {exc}")
    return raw


@click.command()
@click.argument("pipeline")
@click.option("-f", "--file", "files", multiple=True, type=click.Path(path_type=Path),
              help="Pipeline file(s) defining PIPELINE (local mode).")
@click.option("--data", "datas", multiple=True, required=True,
              help="Task payload as JSON, or @path to a JSON file. Repeat for several tasks.")
@click.option("--task-id", default=None,
              help="Client-chosen task id (one task only): a repeat submit is refused.")
@click.option("--key", default=None, help="Message key (ordering).")
@click.option("--delay-s", type=click.FloatRange(min=0), default=0.0,
              help="Run no sooner than this many seconds from now.")
@data_dir_option
@remote_options
def submit(pipeline: str, files: Sequence[Path], datas: Sequence[str], task_id: str | None,
           key: str | None, delay_s: float, data_dir: Path, url: str | None,
           token: str | None) -> None:
    """Submit task(s) to PIPELINE; print each task id."""
    if task_id is not None and len(datas) > 1:
        fail("--task-id names one task; give one --data with it")
    bodies = [_read_data(d) for d in datas]
    if url:
        refused = False
        client = _client(url, token)
        for body in bodies:
            send = functools.partial(client.submit, pipeline, body, task_id=task_id, key=key,
                                     delay_s=delay_s)
            resp = guarded(send)
            if resp.status == 409:
                refused = True
                err.print(f"error: {resp.detail()} (state {resp.body.get('state')})",
                          highlight=False)
                continue
            click.echo(_check(resp)["task_id"])
        sys.exit(2 if refused else 0)
    if not files:
        fail("give -f FILE (the pipeline file), or --url to submit through a server")
    _submit_local(pipeline, files, bodies, task_id, key, delay_s, data_dir)


def _submit_local(pipeline: str, files: Sequence[Path], bodies: list[bytes],
                  task_id: str | None, key: str | None, delay_s: float, data_dir: Path) -> None:
    from sluice.connectors import embedded
    from sluice.datadir import Database
    from sluice.tasks.sqlite import get_in

    configs = guarded(lambda: load_all(files))
    config = next((c for c in configs if c.name == pipeline), None)
    if config is None:
        fail(f"no pipeline named {pipeline!r} in {', '.join(map(str, files))}; "
             f"found: {', '.join(c.name for c in configs) or 'none'}")
    if config.source.type not in ("embedded", "kafka"):
        fail(f"submit to a {config.source.type!r} source is not supported yet; "
             "only the embedded queue and kafka")
    if delay_s and config.source.type == "kafka":
        fail("--delay-s: a kafka source has no delayed delivery; submit without it")
    queue = config.source.config.get("queue") or config.name
    messages = [embedded.QueuedMessage(task_id or embedded.new_task_id(), body, key=key)
                for body in bodies]
    db = Database.open(data_dir)
    if config.source.type == "kafka":
        created = guarded(lambda: asyncio.run(_submit_kafka(db, config, messages)), code=1)
    else:
        created = guarded(lambda: embedded.submit(db, config.name, config.tenant, queue,
                                                  messages, delay_s=delay_s))
    refused = False
    for message, record in zip(messages, created, strict=True):
        if record is None:
            refused = True
            existing = db.read_sync(functools.partial(get_in, task_id=message.task_id,
                                                      pipeline=config.name))
            state = existing[0].state if existing else "?"
            err.print(f"error: task id {message.task_id!r} is already used in pipeline "
                      f"{config.name!r} (state {state}); not submitted again", highlight=False)
        else:
            click.echo(message.task_id)
    sys.exit(2 if refused else 0)


async def _submit_kafka(db: Database, config: PipelineConfig,
                        messages: list[QueuedMessage]) -> list[TaskRecord | None]:
    """Create the tasks, then produce their messages to the pipeline's topic."""
    from sluice.connectors.embedded import Submission
    from sluice.connectors.kafka_submit import KafkaSubmitter

    submitter = KafkaSubmitter(db, config)
    try:
        return await submitter.submit([Submission(config.name, config.tenant, "", m)
                                       for m in messages])
    finally:
        await submitter.close()


# -- tasks ----------------------------------------------------------------------------------

@click.group()
def tasks() -> None:
    """List, inspect and control tasks."""


def _print_list(records: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for r in records:
            click.echo(json.dumps(r))
        return
    table = Table("task id", "pipeline", "state", "attempts", "received", "error")
    for r in records:
        error = r.get("error") or {}
        received = next((s["at"] for s in r["timeline"] if s["stage"] == "received"), None)
        table.add_row(r["task_id"], r["pipeline"], r["state"], str(r["attempts"]),
                      _ts(received), f"{error['type']}: {error['message']}" if error else "")
    out.print(table)


@tasks.command("list")
@click.option("--pipeline", default=None)
@click.option("--state", type=click.Choice([s.value for s in TaskState], case_sensitive=False),
              default=None)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@data_dir_option
@remote_options
def tasks_list(pipeline: str | None, state: str | None, limit: int, as_json: bool,
               data_dir: Path, url: str | None, token: str | None) -> None:
    """List tasks, newest first."""
    if url:
        body = _check(guarded(lambda: _client(url, token).list_tasks(
            pipeline=pipeline or "", state=state or "", limit=str(limit))))
        _print_list(body["tasks"], as_json)
        return
    wanted = TaskState(state.upper()) if state else None
    records = guarded(lambda: asyncio.run(_store(data_dir).list(pipeline, wanted, limit)))
    _print_list([r.to_json() for r in records], as_json)


def _local_find(data_dir: Path, task_id: str, pipeline: str | None) -> TaskRecord:
    found: list[TaskRecord] = guarded(lambda: asyncio.run(_store(data_dir).find(task_id)))
    if pipeline is not None:
        found = [r for r in found if r.pipeline == pipeline]
    if not found:
        fail(str(TaskNotFound(task_id)))
    if len(found) > 1:
        fail(f"task id {task_id!r} is used in several pipelines "
             f"({', '.join(r.pipeline for r in found)}); add --pipeline")
    return found[0]


def _show(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    out.print(f"[bold]{data['task_id']}[/]  pipeline {data['pipeline']}  tenant {data['tenant']}")
    out.print(f"state {data['state']}  attempts {data['attempts']}")
    if data.get("result") is not None:
        out.print("result ", json.dumps(data["result"]), highlight=False)
    if data.get("error"):
        out.print(f"error  {data['error']['type']}: {data['error']['message']}", highlight=False)
    table = Table("stage", "at", "since previous")
    for stage in data["timeline"]:
        since = stage["since_previous_s"]
        table.add_row(stage["stage"], _ts(stage["at"]),
                      "-" if since is None else f"{since * 1000:.1f} ms")
    out.print(table)
    if data.get("deliveries"):
        deliveries = Table("destination", "delivery", "attempts", "at", "error")
        for name, d in sorted(data["deliveries"].items()):
            deliveries.add_row(name, d["state"], str(d["attempts"]), _ts(d["at"]),
                               d.get("error") or "")
        out.print(deliveries)


@tasks.command("get")
@click.argument("task_id")
@click.option("--pipeline", default=None, help="Needed when two pipelines use the same id.")
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
@remote_options
def tasks_get(task_id: str, pipeline: str | None, as_json: bool, data_dir: Path,
              url: str | None, token: str | None) -> None:
    """Show one task: state, attempts, result or error, and its stage timeline."""
    if url:
        _show(_check(guarded(lambda: _client(url, token).get_task(task_id, pipeline))), as_json)
        return
    _show(_local_find(data_dir, task_id, pipeline).to_json(), as_json)


def _control_command(action: str, wanted: TaskState, doc: str) -> click.Command:
    @click.command(action, help=doc)
    @click.argument("task_id")
    @click.option("--pipeline", default=None, help="Needed when two pipelines use the same id.")
    @data_dir_option
    @remote_options
    def command(task_id: str, pipeline: str | None, data_dir: Path, url: str | None,
                token: str | None) -> None:
        if url:
            body = _check(guarded(lambda: _client(url, token).control_task(task_id, action,
                                                                           pipeline)))
            click.echo(f"{body['task_id']}: {body['state']}")
            return
        record = _local_find(data_dir, task_id, pipeline)
        try:
            new = asyncio.run(_store(data_dir).transition(record.pipeline, task_id, wanted,
                                                          time.time()))
        except IllegalTransition as exc:
            fail(str(exc))
        except SluiceError as exc:
            fail(str(exc))
        click.echo(f"{new.task_id}: {new.state}")
    return command


tasks.add_command(_control_command(
    "cancel", TaskState.CANCELLED,
    "Cancel a task: a queued one never runs; a running one's attempt is stopped."))
tasks.add_command(_control_command(
    "pause", TaskState.PAUSED, "Hold a queued or retrying task: it is not run until resumed."))
tasks.add_command(_control_command("resume", TaskState.QUEUED, "Resume a paused task."))


@tasks.command("summary")
@click.option("--pipeline", default=None)
@data_dir_option
def tasks_summary(pipeline: str | None, data_dir: Path) -> None:
    """Counts per state and p50/p99 time per stage (local data directory)."""
    from sluice.tasks.summary import summarize

    records = guarded(lambda: asyncio.run(_store(data_dir).stats(pipeline)))
    summary = summarize(records)
    counts = Table("state", "tasks", title=f"tasks{' of ' + pipeline if pipeline else ''}")
    for state, n in summary.counts.items():
        counts.add_row(state, str(n))
    out.print(counts)
    stages = Table("stage", "p50", "p99", "n", title="time per stage")
    for stage, (p50, p99, n) in summary.stages.items():
        stages.add_row(stage, f"{p50 * 1000:.1f} ms", f"{p99 * 1000:.1f} ms", str(n))
    out.print(stages)


# -- pipelines ------------------------------------------------------------------------------

@click.group()
def pipelines() -> None:
    """Pause and resume whole pipelines."""


def _pipeline_command(action: str, doc: str) -> click.Command:
    @click.command(action, help=doc)
    @click.argument("pipeline")
    @data_dir_option
    @remote_options
    def command(pipeline: str, data_dir: Path, url: str | None, token: str | None) -> None:
        if url:
            body = _check(guarded(lambda: _client(url, token).control_pipeline(pipeline,
                                                                               action)))
            click.echo(f"{body['name']}: {'paused' if body['paused'] else 'running'}")
            return
        paused = action == "pause"
        guarded(lambda: asyncio.run(_store(data_dir).set_paused(pipeline, paused, time.time())))
        click.echo(f"{pipeline}: {'paused' if paused else 'running'}")
    return command


pipelines.add_command(_pipeline_command(
    "pause", "Stop taking new work (in-flight tasks finish; queued tasks wait)."))
pipelines.add_command(_pipeline_command("resume", "Take new work again."))
