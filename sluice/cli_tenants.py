"""``sluice tenants TENANT``, ``sluice tenants pin`` and ``sluice tenants events``: a tenant's
functions in hosting pipelines (those with a ``tenancy`` key), moved by hand, and their route
changes.

Each talks to a sluice server when given ``--url`` (or ``SLUICE_URL``; token from ``--token``
or ``SLUICE_TOKEN``), else to the local store with the pipelines of the ``-f`` files. Locally
there is no worker to ask, so in flight, limit, error share and p99 show as ``-``.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from sluice.cli_common import (
    api,
    checked,
    data_dir_option,
    fail,
    guarded,
    load_all,
    local_state,
    print_wide,
    remote_options,
    run_local,
    say,
    table,
    timestamp,
)
from sluice.config.model import PipelineConfig
from sluice.tenancy.routes import TIERS


class _TenantGroup(click.Group):
    """``sluice tenants TENANT`` is ``sluice tenants show TENANT``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["show", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_TenantGroup, no_args_is_help=True)
def tenants() -> None:
    """A tenant's functions in hosting pipelines: `sluice tenants TENANT` shows them (as
    `sluice tenants show TENANT`), `pin` moves one by hand, `events` lists route changes."""


def _options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = remote_options(data_dir_option(fn))
    fn = click.option("--pipeline", default=None,
                      help="One hosting pipeline (default: every one of the -f files, or "
                      "the server's).")(fn)
    return click.option("-f", "--file", "files", multiple=True,
                        type=click.Path(dir_okay=False, path_type=Path),
                        help="Pipeline file(s) defining the hosting pipelines (local "
                        "mode).")(fn)


def _hosting(files: Sequence[Path], pipeline: str | None) -> list[PipelineConfig]:
    """The hosting pipelines of the -f files (only ``pipeline`` if given); exit 2 if none."""
    if not files:
        fail("give -f FILE (the hosting pipeline's file), or --url to ask a server")
    configs = guarded(lambda: load_all(files, check_code=False))
    hosting = [c for c in configs if c.tenancy is not None
               and (pipeline is None or c.name == pipeline)]
    if pipeline is not None and not hosting:
        named = next((c for c in configs if c.name == pipeline), None)
        fail(f"pipeline {pipeline!r} hosts no functions (it has no tenancy key)" if named
             else f"no pipeline named {pipeline!r} in {', '.join(map(str, files))}; found: "
             f"{', '.join(c.name for c in configs) or 'none'}")
    if not hosting:
        fail(f"no hosting pipeline (one with a tenancy key) in {', '.join(map(str, files))}")
    return hosting


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _remote(url: str, token: str | None, method: str, path: str,
            query: dict[str, str] | None = None, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else None
    return checked(guarded(lambda: api(url, token).request(method, path, data, headers, query)))


# -- show -----------------------------------------------------------------------------------

def _number(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _print_functions(tenant: str, rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"tenant": tenant, "functions": rows}))
        return
    if not rows:
        click.echo(f"no functions of tenant {tenant}")
        return
    several = len({r["pipeline"] for r in rows}) > 1
    shown = table(*(["pipeline"] if several else []), "function", "tier", "backlog",
                  "in flight", "limit", "error share", "p99", "reason", wrap=("reason",))
    for r in rows:
        tier = r["tier"] + (" (pinned)" if r.get("pinned") else "")
        p99 = r.get("p99_s")
        share = r.get("error_share")
        shown.add_row(*([r["pipeline"]] if several else []), r["function"], tier,
                      str(r.get("backlog", 0)), _number(r.get("in_flight"), "d"),
                      _number(r.get("limit"), "g"),
                      "-" if share is None else f"{share * 100:.1f}%",
                      "-" if p99 is None else f"{p99 * 1000:.1f} ms", r.get("reason") or "-")
    print_wide(shown)


@tenants.command("show")
@click.argument("tenant")
@_options
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object: {"tenant": ..., "functions": [...]}.')
def tenants_show(tenant: str, files: Sequence[Path], pipeline: str | None, as_json: bool,
                 data_dir: Path, url: str | None, token: str | None) -> None:
    """Show TENANT's functions: tier (shared or dedicated, pinned by hand or not), backlog,
    tasks in flight, concurrency limit, error share and p99 in the isolation window, and why
    the route is what it is."""
    if url:
        body = _remote(url, token, "GET", f"/v1/tenants/{_q(tenant)}/functions",
                       {"pipeline": pipeline} if pipeline else None)
        _print_functions(tenant, body["functions"], as_json)
        return
    from sluice.tenancy import status

    configs = _hosting(files, pipeline)
    store = local_state(data_dir)

    async def rows() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for config in configs:
            out.extend(await status.functions(store, config, tenant, None))
        return out

    _print_functions(tenant, guarded(lambda: run_local(rows()), code=1), as_json)


# -- pin ------------------------------------------------------------------------------------

@tenants.command("pin")
@click.argument("tenant")
@click.argument("function")
@click.option("--tier", required=True, type=click.Choice(TIERS),
              help="dedicated: its own queue; shared: the pipeline's queue; auto: back to the "
              "isolation rules, where it is now.")
@_options
@click.option("--json", "as_json", is_flag=True, help="The route as one JSON object.")
def tenants_pin(tenant: str, function: str, tier: str, files: Sequence[Path],
                pipeline: str | None, as_json: bool, data_dir: Path, url: str | None,
                token: str | None) -> None:
    """Move TENANT's FUNCTION by hand (the isolation rules then leave it alone), or give it
    back to the rules with --tier auto. Its waiting tasks move with it where the queue is the
    store's."""
    if url:
        body: dict[str, Any] = {"tier": tier}
        if pipeline:
            body["pipeline"] = pipeline
        route = _remote(url, token, "POST",
                        f"/v1/tenants/{_q(tenant)}/functions/{_q(function)}/pin", body=body)
    else:
        from sluice.tenancy import status

        configs = _hosting(files, pipeline)
        if len(configs) > 1:
            fail(f"--pipeline: give one of {', '.join(c.name for c in configs)}")
        store = local_state(data_dir, create=True)
        try:
            route = guarded(lambda: run_local(status.pin(store, configs[0], tenant, function,
                                                         tier)), code=1)
        except ValueError as exc:
            fail(str(exc))
    if as_json:
        click.echo(json.dumps(route))
        return
    where = (f"dedicated (queue {route['queue']})" if route["tier"] == "dedicated"
             else "shared")
    moved = route.get("moved")
    say(f"{route['pipeline']}: {tenant}/{function}: {where}, "
        f"{'pinned' if route['pinned'] else 'by the isolation rules'}"
        + (f"; {moved} waiting tasks moved" if moved else ""))


# -- events ---------------------------------------------------------------------------------

@tenants.command("events")
@click.argument("tenant")
@_options
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def tenants_events(tenant: str, files: Sequence[Path], pipeline: str | None, limit: int,
                   as_json: bool, data_dir: Path, url: str | None, token: str | None) -> None:
    """List TENANT's route changes, newest first: a function isolated to a dedicated queue,
    reclaimed to the shared one, or pinned by hand, with why and how many tasks moved."""
    if url:
        query = {"limit": str(limit), **({"pipeline": pipeline} if pipeline else {})}
        found: list[dict[str, Any]] = _remote(
            url, token, "GET", f"/v1/tenants/{_q(tenant)}/events", query)["events"]
    else:
        from sluice.tenancy import status

        configs = _hosting(files, pipeline)
        store = local_state(data_dir)

        async def events() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            for config in configs:
                out.extend(await status.events(store, config, tenant, limit))
            return sorted(out, key=lambda e: float(e["at"]), reverse=True)[:limit]

        found = guarded(lambda: run_local(events()), code=1)
    if as_json:
        for event in found:
            click.echo(json.dumps(event))
        return
    if not found:
        click.echo(f"no route changes of tenant {tenant}")
        return
    shown = table("at", "pipeline", "function", "action", "tier", "moved", "reason",
                  wrap=("reason",))
    for e in found:
        shown.add_row(timestamp(e["at"]), e["pipeline"], e["function"], e["action"], e["tier"],
                      str(e["moved"]), e["reason"])
    print_wide(shown)
