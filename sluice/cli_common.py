"""What the CLI's command modules share: consoles, error exits, common options, loading."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sluice.config.load import load_pipelines
from sluice.config.model import PipelineConfig
from sluice.errors import ConfigError, SluiceError, SourceError

if TYPE_CHECKING:
    from sluice.client import ApiResponse, Client
    from sluice.stores.base import Store
    from sluice.tasks.store import TaskStore

T = TypeVar("T")

DATA_DIR_HELP = ("Data directory: the SQLite store (embedded queues, tasks, outboxes) when "
                 "no --store is given. Env: SLUICE_DATA_DIR.")
STORE_HELP = ("The store's URL: postgresql://user:password@host/database (shared by every "
              "worker and gateway; ?schema=name for a schema of its own) or "
              "sqlite:////path/sluice.db; default: the --data-dir's SQLite. Env: SLUICE_STORE.")

# Text from users, handlers and the store is printed literally: no console markup, no emoji
# codes, no highlighting. Styled text is built with rich.text.Text, never with markup strings.
out = Console(markup=False, emoji=False, highlight=False)
err = Console(stderr=True, markup=False, emoji=False, highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` (literally) on stderr and exit with ``code``."""
    err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    sys.exit(code)


def say(*parts: str | tuple[str, str]) -> None:
    """Print one line on stdout: plain strings literally, ``(text, style)`` pairs styled."""
    out.print(Text.assemble(*parts), soft_wrap=True)


def table(*headers: str, wrap: Sequence[str] = (), title: str | None = None) -> Table:
    """A table whose columns never truncate: every column keeps its values whole (ids, keys,
    names) except those named in ``wrap``, which wrap (and fold a word too long for them)."""
    t = Table(title=title)
    for header in headers:
        if header in wrap:
            t.add_column(header, overflow="fold")
        else:
            t.add_column(header, no_wrap=True, overflow="ignore")
    return t


def print_wide(rows: Table) -> None:
    """Print ``rows`` at least as wide as its unwrappable columns need (the terminal then wraps
    the line rather than rich cutting a value short)."""
    for column in rows.columns:
        if column.no_wrap:
            widths = [cell_len(str(c)) for c in (column.header, *column.cells)]
            column.min_width = max(widths)
    width = out.width
    needed = out.measure(rows, options=out.options.update(max_width=1 << 16)).minimum
    out.width = max(width, needed)
    try:
        out.print(rows)
    finally:
        out.width = width


def store_dir(data_dir: Path) -> Path:
    """``data_dir`` when it holds sluice data; else exit 2 (read-only commands never create
    a data directory)."""
    from sluice.datadir import DB_FILE

    if not (data_dir / DB_FILE).is_file():
        fail(f"no sluice data in {data_dir} (no {DB_FILE} there); give the --data-dir that "
             "`sluice run`, `sluice serve` or `sluice submit` used (env SLUICE_DATA_DIR)")
    return data_dir


EXIT_PERMANENT = 2  # bad input or a refusal that retrying cannot change
EXIT_TRANSIENT = 1  # an outage (a broker down, a database locked): the same command may work later


def exit_code(exc: SluiceError, default: int = EXIT_PERMANENT) -> int:
    """The exit code for ``exc``: a SourceError's says whether retrying may help (1 if so, else
    2); a ConfigError is 2; any other SluiceError exits ``default``."""
    if isinstance(exc, SourceError):
        return EXIT_TRANSIENT if exc.retriable else EXIT_PERMANENT
    if isinstance(exc, ConfigError):
        return EXIT_PERMANENT
    return default


def guarded(fn: Callable[[], T], code: int = EXIT_PERMANENT) -> T:
    """Run ``fn``; a ConfigError prints every issue and exits 2; a SourceError prints one line
    and exits 1 when it is transient (retrying may work), 2 when it is permanent (unsupported,
    misconfigured); any other SluiceError prints one line and exits ``code``."""
    try:
        return fn()
    except ConfigError as exc:
        for issue in exc.issues:
            click.echo(str(issue), err=True)
        sys.exit(EXIT_PERMANENT)
    except SluiceError as exc:
        fail(str(exc), exit_code(exc, code))


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


STORE_URL = "sluice.store_url"  # the command's --store, in its click context's meta


def chosen_store_url() -> str | None:
    """The command's ``--store`` (``SLUICE_STORE``); ``None``: the data directory's SQLite."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(STORE_URL) if ctx is not None else None


def data_dir_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--data-dir`` and ``--store``: where the command's state is. The command gets
    ``data_dir``; the store's URL is :func:`chosen_store_url`."""

    @functools.wraps(fn)
    def command(*args: Any, store: str | None, **kwargs: Any) -> Any:
        click.get_current_context().meta[STORE_URL] = store or None
        return fn(*args, **kwargs)

    command = click.option("--store", "store", envvar="SLUICE_STORE", default=None,
                           metavar="URL", help=STORE_HELP)(command)
    return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                        envvar="SLUICE_DATA_DIR", default=Path(".sluice"), show_default=True,
                        help=DATA_DIR_HELP)(command)


def remote_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--token", envvar="SLUICE_TOKEN", default=None,
                      help="API key for --url. Env: SLUICE_TOKEN.")(fn)
    return click.option("--url", envvar="SLUICE_URL", default=None,
                        help="A sluice server (e.g. http://127.0.0.1:8080); without it, the "
                        "local data directory is used. Env: SLUICE_URL.")(fn)


def api(url: str, token: str | None) -> Client:
    from sluice.client import Client

    return Client(url, token)


def timestamp(at: float | None) -> str:
    """A stored time as local date and time to the millisecond; "-" for none."""
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}"


def checked(resp: ApiResponse) -> Any:
    """The body of a 2xx answer; else exit (2 for a 4xx, 1 for a 5xx) with its detail."""
    if not resp.ok:
        fail(f"HTTP {resp.status}: {resp.detail()}", 2 if resp.status < 500 else 1)
    return resp.body


def local_state(data_dir: Path, *, create: bool = False) -> Store:
    """The command's store: ``--store``'s, else the SQLite of ``data_dir``, which (unless
    ``create``) must hold sluice data already (see :func:`store_dir`). A store that cannot be
    opened exits as :func:`guarded` says."""
    from sluice.stores import open_store

    url = chosen_store_url()
    if url is None:
        path = data_dir if create else store_dir(data_dir)
        return guarded(lambda: open_store(None, path))
    return guarded(lambda: open_store(url))


def local_store(data_dir: Path, *, create: bool = False) -> TaskStore:
    """The task records of the command's store (:func:`local_state`)."""
    return local_state(data_dir, create=create).tasks


def run_local(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` (work on the command's store) in an event loop of its own, then close what
    the process's stores opened in it (a PostgreSQL pool)."""
    from sluice import stores

    async def with_close() -> T:
        try:
            return await main
        finally:
            await stores.close_all()

    return run_async(with_close())


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# A log line's fields, when its call gave them (``extra=``): written as keys of its JSON.
LOG_FIELDS = ("pipeline", "task_id", "attempt", "tenant", "function", "trace_id")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6), "level": record.levelname.lower(),
            "logger": record.name, "msg": record.getMessage(),
        }
        for name in LOG_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def load_all(files: Sequence[Path], *, check_code: bool = True) -> list[PipelineConfig]:
    """The pipelines of ``files`` (names unique). ``check_code=False``: the handlers' code is
    not imported (a machine that only submits or controls need not have it)."""
    return load_pipelines(files, check_code=check_code)
