"""The ``sluice`` command line.

Bad input (a pipeline file, ``--data``, a task id) is reported on stderr with what and where,
and the command exits 2; it never prints a traceback. Exit codes: 0 ok, 1 the work failed,
2 bad input or usage.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from sluice import registry
from sluice.config.load import load_pipeline, schema_text
from sluice.config.model import PipelineConfig
from sluice.errors import ConfigError, SluiceError, TaskNotFound
from sluice.spec import REQUIRED, Field, ObjectSpec
from sluice.tasks.state import TaskState

T = TypeVar("T")

DATA_DIR_HELP = "Data directory (embedded queues and the task store). Env: SLUICE_DATA_DIR."

out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    sys.exit(code)


def guarded(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except ConfigError as exc:
        for issue in exc.issues:
            click.echo(str(issue), err=True)
        sys.exit(2)
    except SluiceError as exc:
        fail(str(exc))


def data_dir_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                        envvar="SLUICE_DATA_DIR", default=Path(".sluice"), show_default=True,
                        help=DATA_DIR_HELP)(fn)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6), "level": record.levelname.lower(),
            "logger": record.name, "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sluice")
def cli() -> None:
    """sluice: the stateful consumer layer between any message queue and your handlers."""


# -- validate ---------------------------------------------------------------------------------

@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate(files: Sequence[Path]) -> None:
    """Check pipeline files; print every problem with file:line:col and key path."""
    bad = False
    for file in files:
        try:
            load_pipeline(file)
        except ConfigError as exc:
            bad = True
            for issue in exc.issues:
                click.echo(str(issue), err=True)
            continue
        click.echo(f"{file}: ok")
    sys.exit(2 if bad else 0)


def load_all(files: Sequence[Path]) -> list[PipelineConfig]:
    configs: list[PipelineConfig] = []
    issues = []
    for file in files:
        try:
            configs.append(load_pipeline(file))
        except ConfigError as exc:
            issues.extend(exc.issues)
    if issues:
        raise ConfigError(issues)
    names = [c.name for c in configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SluiceError(f"pipeline names must be unique; repeated: {', '.join(dupes)}")
    return configs


# -- run --------------------------------------------------------------------------------------

@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@data_dir_option
@click.option("--concurrency", type=click.IntRange(1, 10000), default=None,
              help="Override consumer.concurrency of every pipeline.")
@click.option("--drain", is_flag=True,
              help="Exit once the pipelines' queues are empty (delayed retries included).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", show_default=True,
              type=click.Choice(["text", "json"]), help="json: one JSON object per line.")
def run(files: Sequence[Path], data_dir: Path, concurrency: int | None, drain: bool,
        log_level: str, log_format: str) -> None:
    """Run the pipelines' workers until SIGINT/SIGTERM (or, with --drain, until done)."""
    from sluice import runtime

    setup_logging(log_level, log_format)
    configs = guarded(lambda: load_all(files))
    if concurrency is not None:
        configs = [c.with_concurrency(concurrency) for c in configs]
    loops = guarded(lambda: [runtime.build(c, data_dir) for c in configs])
    log = logging.getLogger("sluice.run")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = {"count": 0}

        def on_signal(signum: int) -> None:
            signals["count"] += 1
            if signals["count"] > 1:
                log.warning("second signal: exiting now; unfinished tasks return to the queue "
                            "when their leases lapse")
                os._exit(1)
            log.info("%s: no new work; finishing tasks in flight (signal again to exit now)",
                     signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        log.info("running %s (data dir %s)", ", ".join(c.name for c in configs), data_dir)
        progress = asyncio.create_task(_progress(loops, log))
        try:
            await runtime.run_pipelines(loops, stop, drain=drain)
        finally:
            progress.cancel()
        for lp in loops:
            s = lp.stats
            log.info("%s: %d succeeded, %d failed, %d retried, %d skipped as already done",
                     lp.config.name, s.succeeded, s.failed, s.retried, s.skipped)

    asyncio.run(main())


async def _progress(loops: Sequence[Any], log: logging.Logger, every_s: float = 10.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        for lp in loops:
            s = lp.stats
            log.info("%s: in flight %d, succeeded %d, failed %d, retried %d", lp.config.name,
                     s.in_flight, s.succeeded, s.failed, s.retried)


# -- submit -----------------------------------------------------------------------------------

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


@cli.command()
@click.argument("pipeline")
@click.option("-f", "--file", "files", multiple=True, required=True,
              type=click.Path(path_type=Path), help="Pipeline file(s) defining PIPELINE.")
@click.option("--data", "datas", multiple=True, required=True,
              help="Task payload as JSON, or @path to a JSON file. Repeat for several tasks.")
@click.option("--task-id", default=None,
              help="Client-chosen task id (one task only): a repeat submit is refused.")
@click.option("--key", default=None, help="Message key (ordering).")
@click.option("--delay-s", type=click.FloatRange(min=0), default=0.0,
              help="Run no sooner than this many seconds from now.")
@data_dir_option
def submit(pipeline: str, files: Sequence[Path], datas: Sequence[str], task_id: str | None,
           key: str | None, delay_s: float, data_dir: Path) -> None:
    """Submit task(s) to PIPELINE's queue; print each task id."""
    from sluice.connectors import embedded
    from sluice.datadir import Database

    configs = guarded(lambda: load_all(files))
    config = next((c for c in configs if c.name == pipeline), None)
    if config is None:
        fail(f"no pipeline named {pipeline!r} in {', '.join(map(str, files))}; "
             f"found: {', '.join(c.name for c in configs) or 'none'}")
    if task_id is not None and len(datas) > 1:
        fail("--task-id names one task; give one --data with it")
    if config.source.type != "embedded":
        fail(f"submit to a {config.source.type!r} source is not supported yet; "
             "only the embedded queue")
    bodies = [_read_data(d) for d in datas]
    queue = config.source.config.get("queue") or config.name
    messages = [embedded.QueuedMessage(task_id or embedded.new_task_id(), body, key=key)
                for body in bodies]
    db = Database.open(data_dir)
    created = guarded(lambda: embedded.submit(db, config.name, config.tenant, queue, messages,
                                              delay_s=delay_s))
    refused = False
    for message, record in zip(messages, created, strict=True):
        if record is None:
            refused = True
            from sluice.tasks.sqlite import get_in

            existing = db.read_sync(functools.partial(get_in, task_id=message.task_id,
                                                      pipeline=config.name))
            state = existing[0].state if existing else "?"
            err.print(f"error: task id {message.task_id!r} is already used in pipeline "
                      f"{config.name!r} (state {state}); not submitted again", highlight=False)
        else:
            click.echo(message.task_id)
    sys.exit(2 if refused else 0)


# -- tasks ------------------------------------------------------------------------------------

@cli.group()
def tasks() -> None:
    """Look at tasks in the data directory."""


def _store(data_dir: Path) -> Any:
    from sluice.datadir import Database
    from sluice.tasks.sqlite import SqliteTaskStore

    return SqliteTaskStore(Database.open(data_dir))


def _ts(at: float | None) -> str:
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}"


@tasks.command("list")
@click.option("--pipeline", default=None)
@click.option("--state", type=click.Choice([s.value for s in TaskState], case_sensitive=False),
              default=None)
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@data_dir_option
def tasks_list(pipeline: str | None, state: str | None, limit: int, as_json: bool,
               data_dir: Path) -> None:
    """List tasks, newest first."""
    wanted = TaskState(state.upper()) if state else None
    records = asyncio.run(_store(data_dir).list(pipeline, wanted, limit))
    if as_json:
        for r in records:
            click.echo(json.dumps(r.to_json()))
        return
    table = Table("task id", "pipeline", "state", "attempts", "received", "error")
    for r in records:
        table.add_row(r.task_id, r.pipeline, str(r.state), str(r.attempts), _ts(r.received_at),
                      (f"{r.error_type}: {r.error_message}" if r.error_type else ""))
    out.print(table)


@tasks.command("get")
@click.argument("task_id")
@click.option("--pipeline", default=None, help="Needed when two pipelines use the same id.")
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
def tasks_get(task_id: str, pipeline: str | None, as_json: bool, data_dir: Path) -> None:
    """Show one task: state, attempts, result or error, and its stage timeline."""
    store = _store(data_dir)
    found = asyncio.run(store.find(task_id))
    if pipeline is not None:
        found = [r for r in found if r.pipeline == pipeline]
    if not found:
        fail(str(TaskNotFound(task_id)))
    if len(found) > 1:
        fail(f"task id {task_id!r} is used in several pipelines "
             f"({', '.join(r.pipeline for r in found)}); add --pipeline")
    record = found[0]
    if as_json:
        click.echo(json.dumps(record.to_json(), indent=2))
        return
    data = record.to_json()
    out.print(f"[bold]{record.task_id}[/]  pipeline {record.pipeline}  tenant {record.tenant}")
    out.print(f"state {record.state}  attempts {record.attempts}")
    if data["result"] is not None:
        out.print("result ", json.dumps(data["result"]), highlight=False)
    if record.error_type:
        out.print(f"error  {record.error_type}: {record.error_message}", highlight=False)
    table = Table("stage", "at", "since previous")
    for stage, at, since in record.timeline():
        table.add_row(stage, _ts(at), "-" if since is None else f"{since * 1000:.1f} ms")
    out.print(table)


@tasks.command("summary")
@click.option("--pipeline", default=None)
@data_dir_option
def tasks_summary(pipeline: str | None, data_dir: Path) -> None:
    """Counts per state and p50/p99 time per stage."""
    from sluice.tasks.summary import summarize

    records = asyncio.run(_store(data_dir).stats(pipeline))
    summary = summarize(records)
    counts = Table("state", "tasks", title=f"tasks{' of ' + pipeline if pipeline else ''}")
    for state, n in summary.counts.items():
        counts.add_row(state, str(n))
    out.print(counts)
    stages = Table("stage", "p50", "p99", "n", title="time per stage")
    for stage, (p50, p99, n) in summary.stages.items():
        stages.add_row(stage, f"{p50 * 1000:.1f} ms", f"{p99 * 1000:.1f} ms", str(n))
    out.print(stages)


# -- connectors and schema --------------------------------------------------------------------

def _field_rows(spec: ObjectSpec | Field, prefix: str = "") -> list[tuple[str, str, str, str]]:
    if isinstance(spec, Field):
        return [("(value)", spec.type_label(), "required", spec.description)]
    rows = []
    for f in spec.fields_:
        default = "required" if f.default is REQUIRED else (
            "-" if f.default is None else json.dumps(f.default))
        rows.append((prefix + f.name, f.type_label(), default, f.description))
        if f.fields is not None:
            rows.extend(_field_rows(f.fields, prefix + f.name + "."))
    return rows


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="The JSON Schema of each component.")
def connectors(as_json: bool) -> None:
    """List every component (sources, handlers, sinks) with its config keys."""
    if as_json:
        click.echo(json.dumps({f"{c.family}.{c.name}": c.json_schema()
                               for c in registry.components()}, indent=2))
        return
    for comp in registry.components():
        extra = f"  (pip install 'sluice[{comp.extra}]')" if comp.extra else ""
        out.print(f"[bold]{comp.family}[/] [cyan]{comp.name}[/]: {comp.summary}{extra}")
        table = Table("key", "type", "default", "description", show_edge=False)
        for row in _field_rows(comp.config):
            table.add_row(*row)
        out.print(table)


@cli.command()
def schema() -> None:
    """Print the pipeline JSON Schema (schemas/pipeline.schema.json is this output)."""
    click.echo(schema_text(), nl=False)


@cli.command()
def reference() -> None:
    """Print the reference of every key and command (docs/reference.md is this output)."""
    from sluice.reference import render

    click.echo(render(), nl=False)


def main() -> None:
    cli(prog_name="sluice")


if __name__ == "__main__":
    main()
