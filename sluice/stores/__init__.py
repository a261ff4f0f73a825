"""Stores by URL: :func:`open_store` turns ``--store`` / ``SLUICE_STORE`` (or, without one,
``--data-dir``) into the process's :class:`~sluice.stores.base.Store`.

URLs:

- ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (SQLAlchemy's form: the
  path follows the third slash); without a URL, ``<data-dir>/sluice.db``.
- ``postgresql://user:password@host:port/database`` (also ``postgres://``); ``?schema=name``
  keeps sluice's tables in a PostgreSQL schema of their own (default ``public``); other query
  parameters are libpq's (``sslmode=require`` …).

Rules:

1. One store per URL per process (as one :class:`~sluice.datadir.Database` per file): every
   pipeline, gateway and submitter of a process that names the same URL shares it.
2. A URL with an unknown scheme or without a path is refused with
   :class:`~sluice.errors.Misconfigured` naming what is accepted; nothing is opened.
3. A store opens lazily where it must connect (PostgreSQL: at first use, in the event loop that
   uses it); opening a SQLite store creates its file.
"""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import urlsplit

from sluice.datadir import DB_FILE, DEFAULT_DATA_DIR, Database
from sluice.errors import Misconfigured
from sluice.stores.base import Store

SCHEMES = ("sqlite", "postgresql", "postgres")
_open: dict[str, Store] = {}
_lock = threading.Lock()


def default_url(data_dir: str | Path | None = None) -> str:
    """The URL of the SQLite store in ``data_dir`` (default ``./.sluice``)."""
    return f"sqlite:///{(Path(data_dir or DEFAULT_DATA_DIR)).resolve() / DB_FILE}"


def sqlite_path(url: str) -> Path:
    """The database file a ``sqlite:`` URL names (rule 2)."""
    rest = url.split(":", 1)[1]
    if not rest.startswith("///") or len(rest) == 3:
        raise Misconfigured(f"store URL {url!r}: a SQLite URL names its file after three "
                            "slashes: sqlite:///relative/file.db or sqlite:////abs/file.db")
    return Path(rest[3:])


def scheme_of(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise Misconfigured(f"store URL {_shown(url)!r}: unknown scheme {scheme or '(none)'!r};"
                            " expected sqlite:///path/sluice.db or "
                            "postgresql://user:password@host/database")
    return scheme


def _shown(url: str) -> str:
    from sluice.stores.postgres_db import redact

    return redact(url)


def open_store(url: str | None = None, data_dir: str | Path | None = None) -> Store:
    """The process's store for ``url``, else for the SQLite database of ``data_dir`` (rule 1)."""
    url = url or default_url(data_dir)
    scheme = scheme_of(url)
    with _lock:
        store = _open.get(url)
        if store is None:
            store = _open[url] = _make(scheme, url)
        return store


def _make(scheme: str, url: str) -> Store:
    if scheme == "sqlite":
        from sluice.stores.sqlite import SqliteStore

        return SqliteStore(Database.at(sqlite_path(url)))
    from sluice.stores.postgres import PostgresStore

    return PostgresStore(url)


async def close_all() -> None:
    """Close what every open store holds in the running event loop (its pool, its writer)."""
    with _lock:
        opened = list(_open.values())
    for store in opened:
        await store.close()


def forget(url: str) -> None:
    """Drop the process's store for ``url`` (a test that closed it)."""
    with _lock:
        _open.pop(url, None)
