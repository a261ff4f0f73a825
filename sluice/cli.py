"""The ``sluice`` command line.

Bad input (a pipeline file, ``--data``, a task id) is reported on stderr with what and where,
and the command exits 2; it never prints a traceback. Exit codes: 0 ok, 1 the work failed,
2 bad input or usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from sluice import registry
from sluice.cli_common import (
    chosen_store_url,
    data_dir_option,
    fail,
    guarded,
    load_all,
    print_wide,
    run_async,
    say,
    setup_logging,
    table,
)
from sluice.cli_dead_letters import dead_letters
from sluice.cli_keys import keys as keys_group
from sluice.cli_pipelines import pipelines
from sluice.cli_store import store as store_group
from sluice.cli_tasks import submit, tasks
from sluice.cli_tenants import tenants
from sluice.config.load import duplicate_names, load_pipeline, schema_text
from sluice.errors import ConfigError, Misconfigured, SluiceError
from sluice.pipeline_tests import pipeline_test
from sluice.spec import REQUIRED, Field, ObjectSpec
from sluice.tracing import setup as setup_tracing


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
    loaded = []
    for file in files:
        try:
            loaded.append(load_pipeline(file))
        except ConfigError as exc:
            bad = True
            for issue in exc.issues:
                click.echo(str(issue), err=True)
            continue
        click.echo(f"{file}: ok")
    for issue in duplicate_names(loaded):  # files run or served together share one store
        bad = True
        click.echo(str(issue), err=True)
    sys.exit(2 if bad else 0)


# -- run --------------------------------------------------------------------------------------

ALLOW_NETWORK_HELP = (
    "A private, loopback or link-local range (CIDR, e.g. 10.0.0.0/8; one address: "
    "127.0.0.1) that pipelines put with a tenant's key may reach; repeatable. Without it they "
    "reach public addresses only (docs/runtime-pipelines.md). Pipelines of files and of admin "
    "keys are not restricted.")


def _network(cidrs: Sequence[str]) -> Any:
    from sluice.netpolicy import NetworkPolicy

    try:
        return NetworkPolicy.parse(cidrs)
    except ValueError as exc:
        fail(f"--allow-network: {exc}")


@cli.command()
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@data_dir_option
@click.option("--concurrency", type=click.IntRange(1, 10000), default=None,
              help="Override consumer.concurrency of every pipeline.")
@click.option("--allow-network", "allow_network", multiple=True, metavar="CIDR",
              help=ALLOW_NETWORK_HELP)
@click.option("--drain", is_flag=True,
              help="Exit once the pipelines' queues are empty (delayed retries included).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", show_default=True,
              type=click.Choice(["text", "json"]), help="json: one JSON object per line.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              envvar="SLUICE_METRICS_PORT",
              help="Serve /metrics (Prometheus) and /healthz on this port. "
              "Env: SLUICE_METRICS_PORT.")
@click.option("--metrics-host", default="0.0.0.0", show_default=True,
              help="Address of --metrics-port (read-only counters and gauges).")
@click.option("--tracing", type=click.Choice(["otlp", "console", "none"]), default=None,
              help="Trace submits, attempts and deliveries with OpenTelemetry (docs/tracing.md)."
              " Default: OTEL_TRACES_EXPORTER (otlp or console), else off.")
def run(files: Sequence[Path], data_dir: Path, concurrency: int | None,
        allow_network: Sequence[str], drain: bool, log_level: str, log_format: str,
        metrics_port: int | None, metrics_host: str, tracing: str | None) -> None:
    """Run the pipelines' workers until SIGINT/SIGTERM (or, with --drain, until done).

    The pipelines are the FILES' and the store's definitions (put with `PUT
    /v1/pipelines/NAME` or `sluice pipelines apply`), followed as they change (a file wins
    over a definition of its name). Without FILES the store's definitions only: the store
    must have one when the command starts. With --drain, the pipelines there at the start,
    until their queues are empty."""
    from sluice.stores import open_store
    from sluice.supervisor import Supervisor

    setup_logging(log_level, log_format)
    guarded(lambda: setup_tracing(tracing))  # --tracing, else OTEL_TRACES_EXPORTER
    configs = guarded(lambda: load_all(files)) if files else []
    network = _network(allow_network)
    store_url = chosen_store_url()
    store = guarded(lambda: open_store(store_url, data_dir))
    log = logging.getLogger("sluice.run")
    supervisor = Supervisor(store, data_dir, store_url=store_url, network=network,
                            concurrency=concurrency)
    supervisor.drain = drain
    supervisor.keep_ran = True  # the summary at the end

    async def main() -> None:
        await supervisor.start(configs)
        if not supervisor.running:
            await store.close()
            raise Misconfigured(f"nothing to run: give pipeline files, or put pipeline "
                                f"definitions in the store {store.url} first (sluice "
                                "pipelines apply)")
        loops = list(supervisor.loops.values())
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
        log.info("running %s (store %s)", ", ".join(supervisor.running), store.url)
        from sluice import metrics_server

        served = None
        if metrics_port is not None:
            try:
                served = await metrics_server.start(
                    metrics_host, metrics_port, store.tasks, supervisor.live_loops())
            except OSError as exc:
                raise SluiceError(f"--metrics-port: cannot serve on {metrics_host}:"
                                  f"{metrics_port}: {exc.strerror or exc}") from None
        from sluice import live_status

        if live_status.wanted(log_format):
            status = live_status.LiveStatus(loops)
            supervisor.on_change.append(
                lambda: setattr(status, "loops", list(supervisor.loops.values())))
            progress = asyncio.create_task(status.run())
        else:
            progress = asyncio.create_task(_progress(supervisor.live_loops(), log))
        try:
            await supervisor.run(stop)
        finally:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress  # the live status is cleared before the summary lines
            if served is not None:
                await served.cleanup()
            await store.close()
        for lp in supervisor.ran:
            s = lp.stats
            log.info("%s: %d succeeded, %d failed, %d retried, %d skipped as already done",
                     lp.config.name, s.succeeded, s.failed, s.retried, s.skipped)

    guarded(lambda: run_async(main()), code=1)


async def _progress(loops: Mapping[str, Any], log: logging.Logger,
                    every_s: float = 10.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        for lp in loops.values():
            s = lp.stats
            log.info("%s: %s; succeeded %d, failed %d, retried %d", lp.config.name,
                     lp.limiter.status(), s.succeeded, s.failed, s.retried)


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
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: component (family.name) → its config's JSON Schema.")
def connectors(as_json: bool) -> None:
    """List every component (sources, handlers, sinks) with its config keys."""
    if as_json:
        click.echo(json.dumps({f"{c.family}.{c.name}": c.json_schema()
                               for c in registry.components()}, indent=2))
        return
    for comp in registry.components():
        extra = f"  (pip install 'sluice[{comp.extra}]')" if comp.extra else ""
        say((comp.family, "bold"), " ", (comp.name, "cyan"), f": {comp.summary}{extra}")
        keys = table("key", "type", "default", "description", wrap=("description",))
        keys.show_edge = False
        for row in _field_rows(comp.config):
            keys.add_row(*row)
        print_wide(keys)


@cli.command()
def schema() -> None:
    """Print the pipeline JSON Schema (schemas/pipeline.schema.json is this output)."""
    click.echo(schema_text(), nl=False)


@cli.command()
def reference() -> None:
    """Print the reference of every key and command (docs/reference.md is this output)."""
    from sluice.reference import render

    click.echo(render(cli), nl=False)


# -- serve ---------------------------------------------------------------------------------

@cli.command()
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@data_dir_option
@click.option("--workers/--no-workers", default=True, show_default=True,
              help="Also run the pipelines' workers in this process (without them, the "
              "handlers' code is not imported).")
@click.option("--auth-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Keys file (API key hashes → tenants); see `sluice keys new`.")
@click.option("--insecure", is_flag=True,
              help="Allow binding a non-loopback address without --auth-file.")
@click.option("--max-body-bytes", type=click.IntRange(1), default=1 << 20, show_default=True,
              help="Largest task payload accepted (larger: 413).")
@click.option("--concurrency", type=click.IntRange(1, 10000), default=None,
              help="Override consumer.concurrency of every pipeline.")
@click.option("--allow-network", "allow_network", multiple=True, metavar="CIDR",
              help=ALLOW_NETWORK_HELP)
@click.option("--watch", is_flag=True,
              help="Reload the FILES when they change: a file that loads is applied (its "
              "pipeline's loop swapped, nothing lost or run twice), one that does not is "
              "logged and the running pipeline kept.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", show_default=True,
              type=click.Choice(["text", "json"]))
@click.option("--tracing", type=click.Choice(["otlp", "console", "none"]), default=None,
              help="Trace submits, attempts and deliveries with OpenTelemetry (docs/tracing.md)."
              " Default: OTEL_TRACES_EXPORTER (otlp or console), else off.")
def serve(files: Sequence[Path], host: str, port: int, data_dir: Path, workers: bool,
          auth_file: Path | None, insecure: bool, max_body_bytes: int, concurrency: int | None,
          allow_network: Sequence[str], watch: bool, log_level: str, log_format: str,
          tracing: str | None) -> None:
    """Serve the HTTP API (trigger URLs, task API, /metrics, PUT /v1/pipelines/NAME) and run
    the workers.

    The pipelines are the FILES' (none is fine) and the store's definitions, followed as they
    are put and deleted (docs/runtime-pipelines.md); a file wins over a definition of its
    name."""
    from sluice.gateway.auth import KeyRing
    from sluice.gateway.server import check_bind
    from sluice.gateway.server import serve as serve_forever

    setup_logging(log_level, log_format)
    guarded(lambda: setup_tracing(tracing))  # --tracing, else OTEL_TRACES_EXPORTER
    configs = guarded(lambda: load_all(files, check_code=workers)) if files else []
    if concurrency is not None:
        configs = [c.with_concurrency(concurrency) for c in configs]
    if watch and not files:
        fail("--watch reloads the pipeline FILES given: give some")
    network = _network(allow_network)
    keys = guarded(lambda: KeyRing.load(auth_file)) if auth_file else None
    guarded(lambda: check_bind(host, keys, insecure))
    try:
        guarded(lambda: run_async(serve_forever(
            configs, data_dir, host=host, port=port, keys=keys, workers=workers,
            max_body_bytes=max_body_bytes, store_url=chosen_store_url(), network=network,
            watch=files if watch else ())), code=1)
    except OSError as exc:
        fail(f"cannot serve on {host}:{port}: {exc.strerror or exc}")


cli.add_command(keys_group)
cli.add_command(submit)
cli.add_command(tasks)
cli.add_command(pipelines)
cli.add_command(dead_letters)
cli.add_command(store_group)
cli.add_command(tenants)
cli.add_command(pipeline_test)


def main() -> None:
    cli(prog_name="sluice")


if __name__ == "__main__":
    main()
