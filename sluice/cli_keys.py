"""``sluice keys new``: make an API key and its keys-file entry.

A keys file (``sluice serve --auth-file FILE``) is YAML with one top-level ``keys:`` list; each
entry names a tenant (or ``admin: true``) and the SHA-256 of a key, never the key::

    keys:
      - {tenant: "acme", sha256: "5e88...42d8"}
      - {admin: true, sha256: "...", name: "ops"}
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click
import yaml

from sluice.cli_common import err, fail, guarded

FILE_HEADER = ("# sluice keys file (sluice serve --auth-file); add entries with:\n"
               "#   sluice keys new --tenant NAME --append THIS_FILE\n")


@click.group()
def keys() -> None:
    """API keys for `sluice serve --auth-file`."""


def entry_of(key_hash: str, tenant: str | None, name: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"admin": True} if tenant is None else {"tenant": tenant}
    entry["sha256"] = key_hash
    if name is not None:
        entry["name"] = name
    return entry


def entry_line(entry: dict[str, Any]) -> str:
    """The entry as one YAML list item under ``keys:`` (values JSON-quoted: valid YAML)."""
    fields = ", ".join(f"{k}: {json.dumps(v)}" for k, v in entry.items())
    return f"  - {{{fields}}}\n"


def _entries(text: str) -> list[Any] | None:
    """The ``keys`` list of a keys file's text; None when it is not such a file."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list | None):
        return None
    return list(doc.get("keys") or [])


def append_entry(path: Path, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the keys file at ``path`` (created with a ``keys:`` list when missing
    or empty), replacing the file atomically, mode 0600. Exit 2, leaving the file as it was,
    when the file cannot be read or the entry cannot be appended to its ``keys:`` list."""
    from sluice.gateway.auth import KeyRing

    target = path.resolve()
    try:
        old = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = ""
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"--append {path}: cannot read the keys file: {exc}")
    line = entry_line(entry)
    if not old.strip():
        new = FILE_HEADER + "keys:\n" + line
    else:
        guarded(lambda: KeyRing.load(target))  # an invalid file: every issue, exit 2
        new = old + ("" if old.endswith("\n") else "\n") + line
        before, after = _entries(old), _entries(new)
        if before is None or after is None or after != [*before, entry]:
            fail(f"--append {path}: the keys file's `keys:` list is not a block list at the end "
                 f"of the file, so the entry cannot be appended; add it under `keys:` "
                 f"yourself:\n{line.rstrip()}")
    try:
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    except OSError as exc:
        fail(f"--append {path}: cannot write in {target.parent}: {exc.strerror or exc}")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o600)
        guarded(lambda: KeyRing.load(Path(temp)))
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


@keys.command("new")
@click.option("--tenant", default=None, help="The tenant this key acts for.")
@click.option("--admin", is_flag=True, help="A key that sees every tenant.")
@click.option("--name", default=None, help="A label for the entry (who holds the key).")
@click.option("--append", "append_to", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Add the entry to this keys file (created, mode 0600, when missing) and "
              "print only the key.")
def keys_new(tenant: str | None, admin: bool, name: str | None, append_to: Path | None) -> None:
    """Make a new API key (give it to the client; only its hash is stored).

    Without --append, prints a complete keys file: the key in a comment, then a `keys:` list
    with the new entry (for an existing file, copy only the `- {...}` line under its `keys:`).
    With --append FILE, adds the entry to FILE and prints only the key."""
    from sluice.gateway.auth import hash_key, new_key

    if bool(tenant) == admin:
        fail("give exactly one of --tenant NAME or --admin")
    key = new_key()
    entry = entry_of(hash_key(key), tenant, name)
    if append_to is not None:
        append_entry(append_to, entry)
        click.echo(key)
        who = "an admin key" if admin else f"a key for tenant {tenant!r}"
        err.print(f"{append_to}: added {who} (a running `sluice serve` reads it at its "
                  "next start)", soft_wrap=True)
        return
    click.echo(f"# key: {key}  (give it to the client; only its sha256 below is stored)")
    click.echo("keys:")
    click.echo(entry_line(entry), nl=False)
