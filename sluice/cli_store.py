"""``sluice store``: the state store itself (``--store URL`` or the data directory's SQLite)."""

from __future__ import annotations

from pathlib import Path

import click

from sluice.cli_common import data_dir_option, guarded, local_state, run_local, say


@click.group()
def store() -> None:
    """The store: its schema (see --store on every command)."""


@store.command("migrate")
@data_dir_option
def migrate(data_dir: Path) -> None:
    """Create the store's tables, or bring them to this sluice's schema version. Idempotent:
    run it before starting new workers (they do it themselves at first use, too)."""
    state = local_state(data_dir, create=True)
    before, after = guarded(lambda: run_local(state.migrate()), code=1)
    if before == after:
        say(f"{state.url}: schema version {after}, up to date")
    else:
        say(f"{state.url}: schema version {before} -> {after}")
