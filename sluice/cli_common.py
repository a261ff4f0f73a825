"""What the CLI's command modules share: consoles, error exits, common options, loading."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console

from sluice.config.load import load_pipeline
from sluice.config.model import PipelineConfig
from sluice.errors import ConfigError, SluiceError

T = TypeVar("T")

DATA_DIR_HELP = "Data directory (embedded queues and the task store). Env: SLUICE_DATA_DIR."

out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    sys.exit(code)


def guarded(fn: Callable[[], T], code: int = 2) -> T:
    """Run ``fn``; a ConfigError prints every issue and exits 2, any other SluiceError (a
    source that cannot start, a missing topic) prints one line and exits ``code``."""
    try:
        return fn()
    except ConfigError as exc:
        for issue in exc.issues:
            click.echo(str(issue), err=True)
        sys.exit(2)
    except SluiceError as exc:
        fail(str(exc), code)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (the default on Linux and macOS: lower
    latency per request and per task), else on asyncio's own loop.
    ``SLUICE_EVENT_LOOP=asyncio`` forces the latter."""
    choice = os.environ.get("SLUICE_EVENT_LOOP", "uvloop")
    if choice not in ("uvloop", "asyncio"):
        main.close()
        fail(f"SLUICE_EVENT_LOOP: expected 'uvloop' or 'asyncio', got {choice!r}")
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


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


