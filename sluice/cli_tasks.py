"""``sluice submit`` and ``sluice tasks ...``.

Each talks to a sluice server when given ``--url`` (or ``SLUICE_URL``; token from ``--token`` or
``SLUICE_TOKEN``), else to the local data directory.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from sluice.cli_common import (
    api,
    checked,
    data_dir_option,
    err,
    fail,
    guarded,
    load_all,
    local_state,
    local_store,
    out,
    print_wide,
    remote_options,
    run_local,
    say,
    table,
    timestamp,
)
from sluice.client import ApiResponse, Client
from sluice.config.model import PipelineConfig
from sluice.errors import SluiceError, TaskNotFound
from sluice.tasks.state import TaskState
from sluice.tasks.store import TaskRecord

# -- submit ---------------------------------------------------------------------------------

def _read_data(value: str, number: int, count: int) -> bytes:
    """The bytes of one ``--data`` value (JSON text, or ``@path`` of a JSON file); exit 2 naming
    that ``--data`` when it cannot be read or is not JSON."""
    from_file = value.startswith("@")
    shown = value if from_file else repr(value if len(value) <= 60 else value[:57] + "...")
    which = f"--data #{number} ({shown})" if count > 1 else f"--data {shown}"
    if from_file:
        try:
            raw = Path(value[1:]).read_bytes()
        except OSError as exc:
            fail(f"{which}: cannot read the file: {exc.strerror or exc}")
    else:
        raw = value.encode()
    try:
        json.loads(raw)
    except UnicodeDecodeError as exc:
        fail(f"{which}: not valid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})")
    except ValueError as exc:
        fail(f"{which}: not valid JSON: {exc}")
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
@click.option("--function", default=None,
              help="A hosting pipeline's (one with a tenancy key) function to run the task "
              "(default: the function 'default').")
@click.option("--tenant", default=None,
              help="A hosting pipeline's tenant the task is for (default: the pipeline's; "
              "with --url, the token's, and only an admin token may name another).")
@data_dir_option
@remote_options
def submit(pipeline: str, files: Sequence[Path], datas: Sequence[str], task_id: str | None,
           key: str | None, delay_s: float, function: str | None, tenant: str | None,
           data_dir: Path, url: str | None, token: str | None) -> None:
    """Submit task(s) to PIPELINE; print each task id."""
    if task_id is not None and len(datas) > 1:
        fail("--task-id names one task; give one --data with it")
    bodies = [_read_data(d, i, len(datas)) for i, d in enumerate(datas, start=1)]
    if url:
        refused = False
        client = api(url, token)
        for body in bodies:
            send = functools.partial(client.submit, pipeline, body, task_id=task_id, key=key,
                                     delay_s=delay_s)
            if function is not None or tenant is not None:
                send = functools.partial(_submit_function, client, pipeline, body, task_id,
                                         key, delay_s, function, tenant)
            resp = guarded(send)
            if resp.status == 409:
                refused = True
                err.print(f"error: {resp.detail()} (state {resp.body.get('state')})",
                          soft_wrap=True)
                continue
            click.echo(checked(resp)["task_id"])
        sys.exit(2 if refused else 0)
    if not files:
        fail("give -f FILE (the pipeline file), or --url to submit through a server")
    _submit_local(pipeline, files, bodies, task_id, key, delay_s, data_dir, function, tenant)


def _submit_function(client: Client, pipeline: str, body: bytes, task_id: str | None,
                     key: str | None, delay_s: float, function: str | None,
                     tenant: str | None) -> ApiResponse:
    """A submit to a hosting pipeline's function (the server answers 404 for a pipeline
    that hosts none, naming it)."""
    from urllib.parse import quote

    from sluice.tenancy.config import DEFAULT_FUNCTION

    headers = {"Content-Type": "application/json"}
    for name, value in (("Task-Id", task_id), ("Task-Key", key), ("Tenant", tenant)):
        if value:
            headers[name] = value
    if delay_s:
        headers["Delay-S"] = repr(delay_s)
    path = (f"/v1/pipelines/{quote(pipeline, safe='')}/functions/"
            f"{quote(function or DEFAULT_FUNCTION, safe='')}/tasks")
    return client.request("POST", path, body, headers)


def _submit_local(pipeline: str, files: Sequence[Path], bodies: list[bytes],
                  task_id: str | None, key: str | None, delay_s: float, data_dir: Path,
                  function: str | None = None, tenant: str | None = None) -> None:
    from sluice import intake
    from sluice.datadir import QueuedMessage

    configs = guarded(lambda: load_all(files, check_code=False))
    config = next((c for c in configs if c.name == pipeline), None)
    if config is None:
        fail(f"no pipeline named {pipeline!r} in {', '.join(map(str, files))}; "
             f"found: {', '.join(c.name for c in configs) or 'none'}")
    kind = config.source.type
    if not intake.submittable(config):
        fail(f"submit to a {kind!r} source is not supported; only to "
             f"{' and '.join(intake.submittable_sources())}")
    if delay_s and not intake.delays(config):
        fail(f"--delay-s: a {kind} source has no delayed delivery; submit without it")
    if (function is not None or tenant is not None) and config.tenancy is None:
        fail(f"--function/--tenant: pipeline {config.name!r} hosts no functions (it has no "
             "tenancy key); submit without them")
    if tenant is not None and not intake.TENANT_RE.fullmatch(tenant):
        fail(f"--tenant {tenant[:64]!r}: expected 1-63 lowercase letters, digits and ._- "
             "starting with a letter or digit")
    messages = [QueuedMessage(task_id or intake.new_task_id(), body, key=key) for body in bodies]
    try:  # a function's name is checked here, before anything is written
        intake.submissions(config, messages, delay_s, None, tenant, function)
    except ValueError as exc:
        fail(f"--function: {exc}")
    where = local_state(data_dir, create=True)
    created = guarded(lambda: run_local(intake.submit(where, config, messages,
                                                      delay_s=delay_s, tenant=tenant,
                                                      function=function)), code=1)
    refused = False
    for message, record in zip(messages, created, strict=True):
        if record is None:
            refused = True
            state = _state_of(data_dir, config.name, message.task_id)
            err.print(f"error: task id {message.task_id!r} is already used in pipeline "
                      f"{config.name!r} (state {state}); not submitted again", soft_wrap=True)
        else:
            click.echo(message.task_id)
    sys.exit(2 if refused else 0)


def _state_of(data_dir: Path, pipeline: str, task_id: str) -> str:
    """The state of a task of the local store ("?" if it cannot be had)."""
    store = local_store(data_dir, create=True)
    try:
        return str(run_local(store.get(task_id, pipeline)).state)
    except SluiceError:
        return "?"


# -- tasks ----------------------------------------------------------------------------------

@click.group()
def tasks() -> None:
    """List, inspect and control tasks."""


def _print_list(records: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for r in records:
            click.echo(json.dumps(r))
        return
    if not records:
        click.echo("no tasks")
        return
    rows = table("task id", "pipeline", "key", "state", "attempts", "received", "error",
                 wrap=("error",))
    for r in records:
        error = r.get("error") or {}
        received = next((s["at"] for s in r["timeline"] if s["stage"] == "received"), None)
        key = r.get("key")
        rows.add_row(r["task_id"], r["pipeline"], "-" if key is None else key, r["state"],
                     str(r["attempts"]), timestamp(received),
                     f"{error['type']}: {error['message']}" if error else "")
    print_wide(rows)


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
    """List tasks, newest first. Ids, keys and names are shown whole (the terminal wraps a
    wide table)."""
    if url:
        body = checked(guarded(lambda: api(url, token).list_tasks(
            pipeline=pipeline or "", state=state or "", limit=str(limit))))
        _print_list(body["tasks"], as_json)
        return
    wanted = TaskState(state.upper()) if state else None
    store = local_store(data_dir)
    records = guarded(lambda: run_local(store.list(pipeline, wanted, limit)))
    _print_list([r.to_json() for r in records], as_json)


def _local_find(data_dir: Path, task_id: str, pipeline: str | None) -> TaskRecord:
    store = local_store(data_dir)
    found: list[TaskRecord] = guarded(lambda: run_local(store.find(task_id)))
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
    say((str(data["task_id"]), "bold"), f"  pipeline {data['pipeline']}  tenant {data['tenant']}")
    key = data.get("key")
    say(f"state {data['state']}  attempts {data['attempts']}"
        + ("" if key is None else f"  key {key}"))
    if data.get("result") is not None:
        say("result ", json.dumps(data["result"]))
    error = data.get("error")
    if error:
        say("error  ", (f"{error['type']}: {error['message']}", "red"))
        traceback = error.get("traceback")
        if traceback:
            out.print(Text(str(traceback).rstrip("\n")), soft_wrap=True)
    stages = table("stage", "at", "since previous")
    for stage in data["timeline"]:
        since = stage["since_previous_s"]
        stages.add_row(stage["stage"], timestamp(stage["at"]),
                       "-" if since is None else f"{since * 1000:.1f} ms")
    print_wide(stages)
    if data.get("deliveries"):
        deliveries = table("destination", "delivery", "attempts", "at", "error", wrap=("error",))
        for name, d in sorted(data["deliveries"].items()):
            deliveries.add_row(name, d["state"], str(d["attempts"]), timestamp(d["at"]),
                               d.get("error") or "")
        print_wide(deliveries)


@tasks.command("get")
@click.argument("task_id")
@click.option("--pipeline", default=None, help="Needed when two pipelines use the same id.")
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
@remote_options
def tasks_get(task_id: str, pipeline: str | None, as_json: bool, data_dir: Path,
              url: str | None, token: str | None) -> None:
    """Show one task: state, attempts, result or error (with the handler's traceback when it
    raised), and its stage timeline."""
    if url:
        _show(checked(guarded(lambda: api(url, token).get_task(task_id, pipeline))), as_json)
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
            _control_remote(task_id, action, pipeline, url, token)
            return
        record = _local_find(data_dir, task_id, pipeline)
        store = local_store(data_dir)
        new = guarded(lambda: run_local(store.transition(record.pipeline, task_id, wanted,
                                                           time.time())))
        click.echo(f"{new.task_id}: {new.state}")
    return command


def _control_remote(task_id: str, action: str, pipeline: str | None, url: str,
                    token: str | None) -> None:
    body = checked(guarded(lambda: api(url, token).control_task(task_id, action, pipeline)))
    click.echo(f"{body['task_id']}: {body['state']}")


@tasks.command("resume")
@click.argument("task_id")
@click.option("--pipeline", default=None, help="Needed when two pipelines use the same id.")
@click.option("-f", "--file", "files", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Pipeline file(s) defining the task's pipeline (local mode): a message a "
              "worker holds back while the task is paused is woken at once.")
@data_dir_option
@remote_options
def tasks_resume(task_id: str, pipeline: str | None, files: Sequence[Path], data_dir: Path,
                 url: str | None, token: str | None) -> None:
    """Resume a paused task.

    With --url the server resumes and wakes it. Locally, with -f naming its pipeline's file,
    its message is woken at once (as the server does); without -f, a worker holding it runs it
    at its next check (within 5 s)."""
    if url:
        _control_remote(task_id, "resume", pipeline, url, token)
        return
    record = _local_find(data_dir, task_id, pipeline)
    config = None
    if files:
        configs = guarded(lambda: load_all(files, check_code=False))
        config = next((c for c in configs if c.name == record.pipeline), None)
        if config is None:
            fail(f"task {task_id!r} is of pipeline {record.pipeline!r}, which is not in "
                 f"{', '.join(map(str, files))}; found: "
                 f"{', '.join(c.name for c in configs) or 'none'}")
    store = local_store(data_dir)
    new = guarded(lambda: run_local(store.transition(record.pipeline, task_id,
                                                       TaskState.QUEUED, time.time())))
    click.echo(f"{new.task_id}: {new.state}")
    if config is None:
        from sluice.consumer.loop import HOLD_RECHECK_S

        err.print(f"note: {task_id} resumes at the worker's next check (within "
                  f"{HOLD_RECHECK_S:g} s) if a worker held its message back while it was paused;"
                  f" to wake it at once, name its pipeline file: sluice tasks resume {task_id} "
                  "-f FILE", soft_wrap=True)
        return
    _wake_local(data_dir, config, task_id)


def _wake_local(data_dir: Path, config: PipelineConfig, task_id: str) -> None:
    """Wake a resumed task's message through the submit service, as the server does."""
    from sluice.intake import Intake

    state = local_state(data_dir)

    async def wake() -> None:
        intake = Intake(state)
        try:
            await intake.wake(config, task_id)
        finally:
            await intake.close()

    guarded(lambda: run_local(wake()), code=1)


tasks.add_command(_control_command(
    "cancel", TaskState.CANCELLED,
    "Cancel a task: a queued one never runs; a running one's attempt is stopped."))
tasks.add_command(_control_command(
    "pause", TaskState.PAUSED, "Hold a queued or retrying task: it is not run until resumed."))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


@tasks.command("summary")
@click.option("--pipeline", default=None)
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: counts per state, and p50_s/p99_s/n per stage (null when "
              "no task has the stage).")
@data_dir_option
def tasks_summary(pipeline: str | None, as_json: bool, data_dir: Path) -> None:
    """Counts per state and p50/p99 time per stage (local data directory)."""
    from sluice.tasks.summary import summarize

    store = local_store(data_dir)
    summary = summarize(guarded(lambda: run_local(store.stats(pipeline))))
    if as_json:
        click.echo(json.dumps(summary.to_json()))
        return
    if summary.counts["total"] == 0:
        click.echo(f"no tasks{' in pipeline ' + repr(pipeline) if pipeline else ''}")
        return
    counts = table("state", "tasks", title=f"tasks{' of ' + pipeline if pipeline else ''}")
    for state, n in summary.counts.items():
        counts.add_row(state, str(n))
    print_wide(counts)
    stages = table("stage", "p50", "p99", "n", title="time per stage")
    for stage, (p50, p99, n) in summary.stages.items():
        stages.add_row(stage, _ms(p50), _ms(p99), str(n))
    print_wide(stages)
