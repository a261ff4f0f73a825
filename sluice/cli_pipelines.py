"""``sluice pipelines list|pause|resume``.

Each talks to a sluice server when given ``--url`` (or ``SLUICE_URL``), else to the local data
directory. Locally, the known pipelines are those of the ``-f`` files and those the data
directory holds tasks or a pause setting of; any other name is an error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from sluice.cli_common import (
    api,
    checked,
    chosen_store_url,
    data_dir_option,
    fail,
    guarded,
    load_all,
    local_store,
    print_wide,
    remote_options,
    run_local,
    table,
)

LOCAL_HELP = ("Locally, the pipelines of the -f files and those the data directory has tasks or "
              "a pause setting of are known; another name is an error.")


def files_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-f", "--file", "files", multiple=True,
                        type=click.Path(dir_okay=False, path_type=Path),
                        help="Pipeline file(s) (local mode): their pipelines are known even "
                        "before they have tasks.")(fn)


@click.group()
def pipelines() -> None:
    """List, pause and resume whole pipelines."""


def local_pipelines(files: Sequence[Path], data_dir: Path) -> list[dict[str, Any]]:
    """One row per known pipeline (see the module docstring), sorted by name. Without -f files
    the data directory must exist; it is never created."""
    from sluice.datadir import DB_FILE
    from sluice.tasks.store import StoredPipeline

    configs = guarded(lambda: load_all(files, check_code=False)) if files else []
    stored: dict[str, StoredPipeline] = {}
    if not files or chosen_store_url() or (data_dir / DB_FILE).is_file():
        store = local_store(data_dir)
        stored = guarded(lambda: run_local(store.pipelines()))
    rows: dict[str, dict[str, Any]] = {}
    for config in configs:
        rows[config.name] = {"name": config.name, "tenant": config.tenant,
                             "source": config.source.type, "paused": False, "counts": {}}
    for name, entry in stored.items():
        row = rows.setdefault(name, {"name": name, "tenant": ", ".join(entry.tenants) or None,
                                     "source": None, "paused": False, "counts": {}})
        row["paused"] = entry.paused
        row["counts"] = dict(sorted(entry.counts.items()))
    return [rows[name] for name in sorted(rows)]


def _counts_text(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "-"
    return ", ".join(f"{state} {n}" for state, n in counts.items() if n) or "none"


@pipelines.command("list")
@files_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@data_dir_option
@remote_options
def pipelines_list(files: Sequence[Path], as_json: bool, data_dir: Path, url: str | None,
                   token: str | None) -> None:
    """List pipelines: name, tenant, source, whether paused, and tasks per state.

    Locally: the pipelines of the -f files and every pipeline the data directory has tasks or
    a pause setting of. With --url: the server's pipelines the token may see (tasks per state
    when the server reports them)."""
    if url:
        rows: list[dict[str, Any]] = checked(guarded(
            lambda: api(url, token).list_pipelines()))["pipelines"]
    else:
        rows = local_pipelines(files, data_dir)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo("no pipelines")
        return
    shown = table("name", "tenant", "source", "paused", "tasks", wrap=("tasks",))
    for row in rows:
        shown.add_row(row["name"], row.get("tenant") or "-", row.get("source") or "-",
                      "yes" if row.get("paused") else "no", _counts_text(row.get("counts")))
    print_wide(shown)


def _unknown(pipeline: str, known: Sequence[str], where: str) -> str:
    listed = ", ".join(repr(n) for n in known) if known else "none"
    return f"unknown pipeline {pipeline!r} {where}; known: {listed}"


def _pipeline_command(action: str, doc: str) -> click.Command:
    @click.command(action, help=f"{doc} {LOCAL_HELP} To {action} a pipeline that has no tasks "
                   "yet, name its file with -f.")
    @click.argument("pipeline")
    @files_option
    @data_dir_option
    @remote_options
    def command(pipeline: str, files: Sequence[Path], data_dir: Path, url: str | None,
                token: str | None) -> None:
        paused = action == "pause"
        if url:
            client = api(url, token)
            resp = guarded(lambda: client.control_pipeline(pipeline, action))
            if resp.status == 404:
                listed = checked(guarded(client.list_pipelines))["pipelines"]
                fail(_unknown(pipeline, [p["name"] for p in listed], f"on {url}"))
            body = checked(resp)
            click.echo(f"{body['name']}: {'paused' if body['paused'] else 'running'}")
            return
        known = [row["name"] for row in local_pipelines(files, data_dir)]
        if pipeline not in known:
            where = f"in {data_dir}" + (" or the -f files" if files else "")
            fail(_unknown(pipeline, known, where) + "; a pipeline with no tasks yet is known "
                 "once its file is named with -f")
        store = local_store(data_dir, create=True)
        guarded(lambda: run_local(store.set_paused(pipeline, paused, time.time())))
        click.echo(f"{pipeline}: {'paused' if paused else 'running'}")
    return command


pipelines.add_command(_pipeline_command(
    "pause", "Stop taking new work (in-flight tasks finish; queued tasks wait)."))
pipelines.add_command(_pipeline_command("resume", "Take new work again."))
