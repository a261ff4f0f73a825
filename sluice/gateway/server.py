"""``sluice serve``: the HTTP API and, unless ``--no-workers``, the pipelines' workers, in one
process. SIGINT/SIGTERM: stop accepting requests, let the workers finish in-flight tasks, exit.

The pipelines are the files' and the store's definitions (:mod:`sluice.supervisor`, which keeps
the gateway's pipelines and loops in step as definitions come and go); with ``watch``, the
files are reloaded when they change (:mod:`sluice.watch`)."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from sluice.config.model import PipelineConfig
from sluice.errors import SluiceError
from sluice.gateway.app import Gateway, alias_conflicts, make_app
from sluice.gateway.auth import KeyRing
from sluice.netpolicy import NetworkPolicy
from sluice.stores import open_store
from sluice.stores.base import Store
from sluice.supervisor import POLL_S, Supervisor

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: KeyRing | None, insecure: bool) -> None:
    if keys is None and not insecure and not is_loopback(host):
        raise SluiceError(
            f"refusing to serve on {host} without --auth-file: anyone who can reach it could "
            "submit and control every task. Give --auth-file FILE (see `sluice keys new`), "
            "bind 127.0.0.1, or pass --insecure if the network is yours alone")


def build_gateway(configs: Sequence[PipelineConfig], store: Store, keys: KeyRing | None,
                  max_body_bytes: int) -> Gateway:
    conflicts = alias_conflicts(configs)
    if conflicts:
        raise SluiceError("; ".join(conflicts))
    return Gateway(pipelines={c.name: c for c in configs}, state=store, keys=keys,
                   max_body_bytes=max_body_bytes)


async def serve(configs: Sequence[PipelineConfig], data_dir: Path, *, host: str, port: int,
                keys: KeyRing | None, workers: bool, max_body_bytes: int,
                stop: asyncio.Event | None = None, store_url: str | None = None,
                network: NetworkPolicy | None = None, watch: Sequence[Path] = (),
                poll_s: float = POLL_S) -> None:
    """Serve until ``stop`` (else SIGINT/SIGTERM). ``network``: what tenants' pipelines may
    reach; ``watch``: the files to reload when they change; ``poll_s``: how often the store's
    definitions are looked at."""
    store = open_store(store_url, data_dir)
    gateway = build_gateway(configs, store, keys, max_body_bytes)
    gateway.network = network or NetworkPolicy()
    supervisor = Supervisor(store, data_dir, store_url=store_url, gateway=gateway,
                            workers=workers, network=gateway.network, poll_s=poll_s)
    gateway.supervisor = supervisor
    await supervisor.start(configs)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(make_app(gateway), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    log.info("serving %s on http://%s:%d (auth %s, workers %s)",
             ", ".join(gateway.pipelines) or "no pipeline yet", host, port,
             "on" if keys else "off", "on" if workers else "off")
    # Everything built so far lives as long as the process: keep it out of the collector's
    # full passes, which otherwise pause every request while they walk it.
    gc.collect()
    gc.freeze()
    worker_stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(worker_stop))
    watching = None
    if watch:
        from sluice.watch import watch_files

        async def reload(config: PipelineConfig) -> None:
            await supervisor.apply(config)

        async def forget(name: str) -> None:
            await supervisor.remove(name)

        watching = asyncio.create_task(watch_files(watch, reload, forget, worker_stop))
    try:
        await stop.wait()
        log.info("stopping: no new requests; finishing tasks in flight")
    finally:
        await runner.cleanup()  # stops accepting, waits for requests in progress
        await gateway.close()
        worker_stop.set()
        if watching is not None:
            await asyncio.gather(watching, return_exceptions=True)
        await running
        await store.close()
