"""``sluice pipelines list|pause|resume|apply|get|delete``.

Each talks to a sluice server when given ``--url`` (or ``SLUICE_URL``), else to the local data
directory. Locally, the known pipelines are those of the ``-f`` files and those the data
directory holds tasks or a pause setting of; any other name is an error.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sluice.cli_common import (
    api,
    checked,
    chosen_store_url,
    data_dir_option,
    fail,
    guarded,
    load_all,
    local_state,
    local_store,
    print_wide,
    remote_options,
    run_local,
    table,
)

if TYPE_CHECKING:
    from sluice.client import Client

LOCAL_HELP = ("Locally, the pipelines of the -f files and those the data directory has tasks or "
              "a pause setting of are known; another name is an error.")


def files_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-f", "--file", "files", multiple=True,
                        type=click.Path(dir_okay=False, path_type=Path),
                        help="Pipeline file(s) (local mode): their pipelines are known even "
                        "before they have tasks.")(fn)


@click.group()
def pipelines() -> None:
    """List, pause and resume whole pipelines; apply, get and delete pipelines at runtime."""


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


# -- definitions: apply, get, delete (sluice.definitions) ----------------------------------

def _definition_file(path: Path) -> tuple[str, str, str]:
    """``(name, text, content type)`` of a pipeline file to apply; exits on a file that cannot
    be read or names no pipeline (the server validates the rest)."""
    import yaml

    from sluice.config.readfile import read_yaml_file

    text = guarded(lambda: read_yaml_file(path))
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        fail(f"{path}: not valid YAML: {exc}")
    name = doc.get("name") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name:
        fail(f"{path}: the file names no pipeline (a top-level 'name: ...' is needed)")
    json_suffix = path.suffix.lower() == ".json"
    return name, text, "application/json" if json_suffix else "application/yaml"


def _remote_issues(path: Path, body: Any) -> None:
    """Print the issues of a refused definition at the file's own ``file:line:col``."""
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list) or not errors:
        return
    for issue in errors:
        if not isinstance(issue, dict):
            continue
        where = f"{path}:{issue.get('line', 1)}:{issue.get('col', 1)}"
        key = issue.get("path")
        message = issue.get("message") or issue.get("detail") or issue
        click.echo(f"{where}: {key}: {message}" if key else f"{where}: {message}", err=True)
    sys.exit(2)


@pipelines.command("apply")
@click.option("-f", "--file", "files", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A pipeline file (YAML or JSON) to create or replace; repeatable.")
@data_dir_option
@remote_options
def pipelines_apply(files: Sequence[Path], data_dir: Path, url: str | None,
                    token: str | None) -> None:
    """Create or replace pipelines from files, while workers run: each is validated as a file
    is, stored, and picked up by every worker of the store within about a second (a running
    pipeline of that name is swapped: what it holds in flight finishes first, nothing is lost
    or run twice).

    With --url: PUT to the server (a tenant's key puts its own tenant's pipelines). Without:
    into the local store (--store, else the data directory)."""
    for path in files:
        name, text, content_type = _definition_file(path)
        if url:
            body, created = _apply_remote(api(url, token), path, name, text, content_type)
        else:
            body, created = _apply_local(path, name, text, content_type, data_dir)
        click.echo(f"{name}: {'created' if created else 'replaced'} "
                   f"(version {body.get('version')})")


def _apply_remote(client: Client, path: Path, name: str, text: str,
                  content_type: str) -> tuple[dict[str, Any], bool]:
    resp = guarded(lambda: client.put_pipeline(name, text.encode(), content_type))
    if not resp.ok:
        _remote_issues(path, resp.body)
    return checked(resp), resp.status == 201


def _apply_local(path: Path, name: str, text: str, content_type: str,
                 data_dir: Path) -> tuple[dict[str, Any], bool]:
    """Validated as the file it is (its handler's code is checked by the workers that run
    it), then stored as the operator's own (not restricted)."""
    from sluice.config.load import parse_pipeline
    from sluice.definitions import JSON, YAML

    config = guarded(lambda: parse_pipeline(text, str(path), check_code=False))
    state = local_state(data_dir, create=True)
    fmt = JSON if content_type == "application/json" else YAML

    async def put() -> tuple[dict[str, Any], bool]:
        before = await state.definitions.get(name)
        stored = await state.definitions.put(name, config.tenant, text, fmt, put_by="admin",
                                             restricted=False)
        return stored.to_json(), before is None

    return guarded(lambda: run_local(put()))


@pipelines.command("get")
@click.argument("pipeline")
@click.option("--json", "as_json", is_flag=True,
              help="The definition's record (version, who put it) with its text, as JSON.")
@data_dir_option
@remote_options
def pipelines_get(pipeline: str, as_json: bool, data_dir: Path, url: str | None,
                  token: str | None) -> None:
    """Print a pipeline's definition as it was applied (a file pipeline's server answers with
    its file's text)."""
    if url:
        body = checked(guarded(lambda: api(url, token).get_pipeline(pipeline,
                                                                    as_json=as_json)))
        click.echo(json.dumps(body) if as_json else str(body).rstrip("\n"))
        return
    state = local_state(data_dir)
    found = guarded(lambda: run_local(state.definitions.get(pipeline)))
    if found is None:
        fail(f"no pipeline definition named {pipeline!r} in the store (a pipeline of a file "
             "is its file)")
    if as_json:
        click.echo(json.dumps({**found.to_json(), "body": found.body}))
    else:
        click.echo(found.body.rstrip("\n"))


@pipelines.command("delete")
@click.argument("pipeline")
@data_dir_option
@remote_options
def pipelines_delete(pipeline: str, data_dir: Path, url: str | None,
                     token: str | None) -> None:
    """Delete a pipeline applied at runtime: its workers stop fetching and finish what they
    hold in flight; its tasks are kept (their records stay readable). A pipeline of a file is
    removed by removing the file and restarting."""
    if url:
        checked(guarded(lambda: api(url, token).delete_pipeline(pipeline)))
    else:
        state = local_state(data_dir)
        if guarded(lambda: run_local(state.definitions.delete(pipeline))) is None:
            fail(f"no pipeline definition named {pipeline!r} in the store")
    click.echo(f"{pipeline}: deleted (its tasks are kept)")
