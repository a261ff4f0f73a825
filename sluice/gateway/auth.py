"""API keys → tenants. The keys file stores SHA-256 hashes of keys, never the keys::

    # sluice keys file (make entries with: sluice keys new --tenant acme)
    keys:
      - {tenant: acme, sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8}
      - {admin: true, sha256: ...}

A request carries ``Authorization: Bearer <key>``. A tenant's key reaches only that tenant's
pipelines and tasks; an admin key reaches all. Without a keys file every caller is admin, which
is why ``sluice serve`` then binds only loopback unless told ``--insecure``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from sluice.config.readfile import read_yaml_file
from sluice.config.yamlmarks import load_marked
from sluice.errors import ConfigError, ConfigIssue

KEYS_FILE = ("a keys file: a YAML mapping with a 'keys' list of {sha256, tenant | admin: true, "
             "name} entries (sluice keys new --append FILE writes one)")

KEYS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["keys"],
    "additionalProperties": False,
    "properties": {"keys": {"type": "array", "items": {
        "type": "object",
        "required": ["sha256"],
        "additionalProperties": False,
        "properties": {
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "tenant": {"type": "string", "minLength": 1},
            "admin": {"type": "boolean"},
            "name": {"type": "string"},
        },
        "oneOf": [{"required": ["tenant"]}, {"required": ["admin"]}],
    }}},
}


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str | None  # None for an admin
    admin: bool = False

    def sees(self, tenant: str) -> bool:
        return self.admin or self.tenant == tenant


ADMIN = Principal(None, admin=True)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "sk_" + secrets.token_urlsafe(32)


class KeyRing:
    def __init__(self, hashes: dict[str, Principal]) -> None:
        self._hashes = hashes

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        file = str(path)
        text = read_yaml_file(path, expected=KEYS_FILE)
        doc, marks, issues = load_marked(text, file)
        if issues or doc is None:
            raise ConfigError(issues or [ConfigIssue(file, 1, 1, "",
                                                     f"the file is empty; expected {KEYS_FILE}")])
        for error in Draft202012Validator(KEYS_SCHEMA).iter_errors(doc):
            issues.append(marks.issue(tuple(error.absolute_path),
                                      f"invalid keys entry: {error.message}"))
        if issues:
            raise ConfigError(issues)
        hashes = {}
        for entry in doc["keys"]:
            admin = bool(entry.get("admin"))
            hashes[entry["sha256"]] = ADMIN if admin else Principal(str(entry["tenant"]))
        return cls(hashes)

    def principal(self, authorization: str | None) -> Principal | None:
        """The caller of an ``Authorization`` header value (None: no valid key). The scheme
        name is case-insensitive (RFC 9110, section 11.1): ``bearer`` is ``Bearer``."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        return self._hashes.get(hash_key(key))
