"""Reading a YAML file's bytes as text (a pipeline file, a keys file), with every failure as
one ConfigIssue.

Accepted: UTF-8 (with or without a byte-order mark), and UTF-16 or UTF-32 *with* a byte-order
mark (the encodings YAML names). Refused, each with ``file:line:col`` where known and what was
expected: a missing, unreadable or directory path, an empty file, bytes that are not UTF-8
(Latin-1, Windows-1252, ...), UTF-16/32 without a byte-order mark, and a file larger than
:data:`MAX_FILE_BYTES` (a pipeline file is a page of YAML; this also bounds ``/dev/zero``).
Control characters in the decoded text are the YAML reader's to report
(:mod:`sluice.config.yamlmarks`), at their line and column.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from sluice.errors import ConfigError, ConfigIssue

MAX_FILE_BYTES = 1 << 20  # 1 MiB

PIPELINE_FILE = "a pipeline file: a YAML mapping of pipeline keys (name, source, handler, ...)"

# Longest first: the UTF-32 little-endian mark begins with the UTF-16 one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def read_yaml_file(path: str | Path, *, expected: str = PIPELINE_FILE) -> str:
    """The text of the YAML file at ``path``; :class:`ConfigError` if it cannot be had.
    ``expected`` says what the file should be, in messages ("expected <expected>")."""
    file = str(path)
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise _error(file, f"no such file; expected {expected}") from None
    except IsADirectoryError:
        raise _error(file, f"this is a directory; expected {expected}") from None
    except PermissionError:
        raise _error(file, "cannot read the file: permission denied "
                     "(it needs read permission for this user)") from None
    except OSError as exc:
        raise _error(file, f"cannot read the file: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise _error(file, f"the file is larger than {MAX_FILE_BYTES // 1024} KiB; "
                     f"expected {expected}")
    return decode_yaml_bytes(raw, file, expected=expected)


def decode_yaml_bytes(raw: bytes, file: str, *, expected: str = PIPELINE_FILE) -> str:
    """Decode a YAML file's bytes (see the module docstring for what is accepted)."""
    if not raw:
        raise _error(file, f"the file is empty; expected {expected}")
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), None)
    if encoding is None:
        wide = _wide_without_bom(raw)
        if wide:
            raise _error(file, f"the file looks like {wide} without a byte-order mark; "
                         "save it as UTF-8")
        encoding = "utf-8"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        before = raw[:exc.start].decode(encoding, errors="replace")
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        bad = raw[exc.start:exc.end][:4]
        shown = " ".join(f"0x{b:02X}" for b in bad)
        utf8 = encoding.startswith("utf-8")
        hint = " (it may have been saved as Latin-1 or Windows-1252)" if utf8 else ""
        raise ConfigError([ConfigIssue(
            file, line, col, "", f"the file is not valid {'UTF-8' if utf8 else encoding.upper()}"
            f": cannot decode byte(s) {shown} ({exc.reason}); save the file as UTF-8{hint}")]
        ) from None


def _wide_without_bom(raw: bytes) -> str | None:
    """UTF-16/32 detected by the zero bytes of an ASCII first character (YAML 1.2, 5.2)."""
    head = raw[:4]
    if len(head) >= 4 and head[:3] == b"\0\0\0" and head[3]:
        return "UTF-32 (big-endian)"
    if len(head) >= 4 and head[0] and head[1:4] == b"\0\0\0":
        return "UTF-32 (little-endian)"
    if len(head) >= 2 and head[0] == 0 and head[1]:
        return "UTF-16 (big-endian)"
    if len(head) >= 2 and head[0] and head[1] == 0:
        return "UTF-16 (little-endian)"
    return None


def _error(file: str, message: str) -> ConfigError:
    return ConfigError([ConfigIssue(file, 1, 1, "", message)])
