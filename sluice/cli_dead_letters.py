"""``sluice dead-letters``: list a pipeline's dead-lettered tasks and replay them (see
:mod:`sluice.dead_letters`: a replay is a new task ``<id>.replay-<n>`` linked to the old one)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from sluice.cli_common import (
    api,
    checked,
    data_dir_option,
    err,
    fail,
    guarded,
    local_state,
    local_store,
    out,
    print_wide,
    remote_options,
    run_local,
    table,
    timestamp,
)


@click.group("dead-letters")
def dead_letters() -> None:
    """List dead-lettered tasks with their reasons; replay them as new tasks."""


@dead_letters.command("list")
@click.argument("pipeline")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@data_dir_option
@remote_options
def list_command(pipeline: str, limit: int, as_json: bool, data_dir: Path, url: str | None,
                 token: str | None) -> None:
    """A pipeline's tasks that failed for good, newest first: why, after how many attempts,
    and whether (as what) they were replayed."""
    if url:
        items = checked(guarded(lambda: api(url, token).request(
            "GET", f"/v1/pipelines/{_quote(pipeline)}/dead-letters",
            query={"limit": str(limit)})))["items"]
    else:
        store = local_store(data_dir)
        items = [d.to_json() for d in
                 guarded(lambda: run_local(store.dead_letters(pipeline, limit=limit)))]
    if as_json:
        for item in items:
            click.echo(json.dumps(item))
        return
    if not items:
        out.print(f"no dead letters in pipeline {pipeline!r}", soft_wrap=True)
        return
    rows = table("task id", "failed at", "attempts", "error", "replayed as", wrap=("error",))
    for item in items:
        error = item.get("error") or {}
        rows.add_row(item["task_id"], timestamp(item.get("failed_at")),
                     str(item.get("attempts", "")),
                     f"{error.get('type') or ''}: {error.get('message') or ''}",
                     item.get("replayed_as") or "-")
    print_wide(rows)


@dead_letters.command("replay")
@click.argument("pipeline")
@click.argument("task_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True,
              help="Every dead letter of the pipeline not replayed yet (up to 1000 a call).")
@click.option("--again", is_flag=True, help="Replay those already replayed once more too.")
@click.option("-f", "--file", "files", multiple=True, type=click.Path(path_type=Path),
              help="The pipeline file (local mode: where to submit the replays).")
@data_dir_option
@remote_options
def replay_command(pipeline: str, task_ids: Sequence[str], replay_all: bool, again: bool,
                   files: Sequence[Path], data_dir: Path, url: str | None,
                   token: str | None) -> None:
    """Submit dead-lettered tasks again, each as a new task `<id>.replay-<n>` (same body, key
    and content type; header sluice-replay-of names the old task, which stays FAILED).
    Prints `old-id -> new-id` per task; exit 2 if any could not be replayed."""
    if bool(task_ids) == replay_all:
        fail("give the task ids to replay, or --all")
    if url:
        body: dict[str, Any] = {"again": again}
        body["all" if replay_all else "task_ids"] = True if replay_all else list(task_ids)
        results = checked(guarded(lambda: api(url, token).request(
            "POST", f"/v1/pipelines/{_quote(pipeline)}/dead-letters/replay",
            json.dumps(body).encode(), {"Content-Type": "application/json"})))["items"]
    else:
        results = _replay_local(pipeline, None if replay_all else task_ids, again, files,
                                data_dir)
    _report(results)


def _replay_local(pipeline: str, task_ids: Sequence[str] | None, again: bool,
                  files: Sequence[Path], data_dir: Path) -> list[dict[str, Any]]:
    from sluice.config.load import load_pipelines
    from sluice.dead_letters import Replayed, replay
    from sluice.intake import Intake

    if not files:
        fail("give -f FILE (the pipeline file: the replays are submitted to its source), or "
             "--url to replay through a server")
    configs = guarded(lambda: load_pipelines(files, check_code=False))
    config = next((c for c in configs if c.name == pipeline), None)
    if config is None:
        fail(f"no pipeline named {pipeline!r} in {', '.join(map(str, files))}; "
             f"found: {', '.join(c.name for c in configs) or 'none'}")
    state = local_state(data_dir)
    store = state.tasks

    async def replay_all() -> list[Replayed]:
        intake = Intake(state)
        try:
            return await replay(store, intake, config, task_ids, again=again)
        finally:
            await intake.close()

    done = guarded(lambda: run_local(replay_all()), code=1)
    return [{"task_id": r.task_id, "replay_id": r.replay_id, "skipped": r.skipped}
            for r in done]


def _report(results: list[dict[str, Any]]) -> None:
    if not results:
        out.print("nothing to replay", soft_wrap=True)
    refused = False
    for r in results:
        if r.get("replay_id"):
            out.print(f"{r['task_id']} -> {r['replay_id']}", soft_wrap=True)
        else:
            refused = True
            err.print(f"error: {r['task_id']}: {r.get('skipped')}", soft_wrap=True)
    sys.exit(2 if refused else 0)


def _quote(part: str) -> str:
    import urllib.parse

    return urllib.parse.quote(part, safe="")
