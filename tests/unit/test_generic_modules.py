"""Generic modules never name a connector: they ask the registry what a component can do.

A connector's type name as a quoted string, or an import of a connector module, in the runtime,
the loader, the gateway, the CLI, the consumer loop, the submit service or the dead-letter
service is a failure, listed as ``file:line``. Adding a broker then touches its own file (and
the conformance fixture), never these.
"""

from __future__ import annotations

import re
from pathlib import Path

from sluice import registry

ROOT = Path(__file__).resolve().parents[2]
SLUICE = ROOT / "sluice"
GENERIC = ("runtime.py", "config/*.py", "gateway/*.py", "cli*.py", "consumer/*.py", "tenancy/*.py",
           "intake.py", "dead_letters.py")
# The connector seam itself (the Source and Sink protocols) is generic.
GENERIC_CONNECTOR_MODULES = {"base"}
# Known uses still to be moved off a connector module: (file, line text). Each must still be
# there (a stale entry fails too), so the list only shrinks.
PENDING: set[tuple[str, str]] = set()


def connector_names() -> list[str]:
    """Every source's type name (each is a connector: kafka, embedded, ...)."""
    return registry.names("source")


def connector_modules() -> list[str]:
    modules = {p.stem for p in (SLUICE / "connectors").glob("*.py")} - {"__init__"}
    return sorted(modules - GENERIC_CONNECTOR_MODULES)


def generic_files() -> list[Path]:
    files = {f for pattern in GENERIC for f in SLUICE.glob(pattern)}
    return sorted(files)


def offences(files: list[Path], root: Path = SLUICE) -> list[tuple[str, int, str]]:
    """(file relative to ``root``, line number, line) of each line naming a connector."""
    names = "|".join(map(re.escape, connector_names()))
    quoted = re.compile(rf"""(["'])({names})\1""")
    modules = "|".join(map(re.escape, connector_modules()))
    imported = re.compile(
        rf"\bsluice\.connectors\.({modules})\b"
        rf"|\bfrom\s+sluice\.connectors\s+import\s+.*\b({modules})\b"
        rf"|\bsluice\.sinks\.({names})\b")
    found = []
    for path in files:
        rel = str(path.relative_to(root))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if quoted.search(line) or imported.search(line):
                found.append((rel, number, line.strip()))
    return found


def test_the_connectors_and_generic_files_are_found() -> None:
    assert {"kafka", "embedded"} <= set(connector_names())
    assert {"kafka", "embedded", "kafka_submit"} <= set(connector_modules())
    names = {str(p.relative_to(SLUICE)) for p in generic_files()}
    assert {"runtime.py", "config/load.py", "gateway/app.py", "cli_tasks.py",
            "consumer/loop.py", "intake.py", "dead_letters.py"} <= names


def test_no_generic_module_names_a_connector() -> None:
    found = offences(generic_files())
    unexpected = [f"sluice/{rel}:{number}: {text}" for rel, number, text in found
                  if (rel, text) not in PENDING]
    assert not unexpected, ("generic modules name connectors (ask the registry for a "
                            "capability or a hook instead):\n" + "\n".join(unexpected))
    stale = PENDING - {(rel, text) for rel, _, text in found}
    assert not stale, f"no longer found, remove from PENDING: {sorted(stale)}"


def test_the_check_sees_type_names_and_connector_imports(tmp_path: Path) -> None:
    module = tmp_path / "generic.py"
    module.write_text(
        '"""Submits to a kafka source or to the embedded queue (words are fine)."""\n'
        "from sluice.connectors.base import Delivery\n"
        "from sluice.connectors.kafka_submit import KafkaSubmitter\n"
        "from sluice.connectors import base, embedded\n"
        "import sluice.sinks.kafka\n"
        'if config.source.type == "kafka" or kind in (\'embedded\',):\n'
        "    pass\n")
    assert [n for _, n, _ in offences([module], tmp_path)] == [3, 4, 5, 6]
