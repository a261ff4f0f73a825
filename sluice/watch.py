"""``sluice serve --watch``: the served pipeline files, reloaded when they change.

Rules:

1. The folders of the files are watched (with :mod:`watchfiles`), not the files: an editor that
   saves by writing a new file and renaming it over the old one is seen too. Only the named
   files count; changes within ``debounce_ms`` are taken together.
2. A changed file is loaded exactly as at start (:func:`sluice.config.load.load_pipeline`,
   its handler's code checked). If it loads, its pipeline is applied (the running loop is
   swapped, see :mod:`sluice.supervisor`); a file whose text did not change is not applied
   again. If it does not load, every issue is logged at its ``file:line:col`` and the running
   pipeline is kept as it was.
3. A file whose ``name`` changed: the pipeline of the old name is removed after the new one is
   applied. A file deleted (and not back when the changes settle) keeps its pipeline running,
   with a warning: removing work because a file vanished mid-save would be worse than keeping
   it; restart without the file to remove it.
4. Two files may not name one pipeline: a reload that would is refused like a bad file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from watchfiles import Change, awatch

from sluice.config.load import load_pipeline
from sluice.config.model import PipelineConfig
from sluice.errors import ConfigError

log = logging.getLogger(__name__)

Apply = Callable[[PipelineConfig], Awaitable[None]]
Remove = Callable[[str], Awaitable[None]]


class FileSet:
    """What each watched file runs: its pipeline's name and the text it was loaded from."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [p.resolve() for p in paths]
        self.names: dict[Path, str] = {}
        self.texts: dict[Path, str] = {}
        for path in self.paths:
            try:
                self.texts[path] = path.read_text(encoding="utf-8")
                self.names[path] = load_pipeline(path, check_code=False).name
            except (OSError, ConfigError, UnicodeDecodeError):
                pass  # not served (the server refused it at start): a later good save adds it

    async def reload(self, path: Path, apply: Apply, remove: Remove) -> None:
        """Rules 2-4 for one changed file."""
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            if path in self.names:
                log.warning("%s was removed; its pipeline %r keeps running (restart the server "
                            "without it to stop it)", path, self.names[path])
            return
        except (OSError, UnicodeDecodeError) as exc:
            log.error("%s: cannot read it (%s); its pipeline is unchanged", path, exc)
            return
        if self.texts.get(path) == text:
            return
        try:
            config = load_pipeline(path)
        except ConfigError as exc:
            log.error("%s changed but does not load; the running pipeline is unchanged:\n%s",
                      path, exc)
            return
        other = next((p for p, n in self.names.items() if n == config.name and p != path), None)
        if other is not None:
            log.error("%s changed but names pipeline %r, which %s already runs; the running "
                      "pipeline is unchanged", path, config.name, other)
            return
        try:
            await apply(config)
        except Exception as exc:  # a pipeline that cannot be built here: said, others go on
            log.error("%s changed but pipeline %r cannot start: %s; see the log above",
                      path, config.name, exc)
            return
        old = self.names.get(path)
        self.names[path], self.texts[path] = config.name, text
        log.info("%s reloaded: pipeline %r applied", path, config.name)
        if old is not None and old != config.name:
            await remove(old)
            log.info("pipeline %r removed: %s now names %r", old, path, config.name)


async def watch_files(paths: Sequence[Path], apply: Apply, remove: Remove,
                      stop: asyncio.Event, *, debounce_ms: int = 300) -> None:
    """Watch ``paths`` until ``stop`` (see the module rules)."""
    files = FileSet(paths)
    wanted = set(files.paths)
    folders = sorted({str(p.parent) for p in wanted})

    def only_ours(change: Change, name: str) -> bool:
        return Path(name).resolve() in wanted

    async for changes in awatch(*folders, watch_filter=only_ours, stop_event=stop,
                                debounce=debounce_ms, recursive=False):
        for path in sorted({Path(name).resolve() for _, name in changes}):
            await files.reload(path, apply, remove)
