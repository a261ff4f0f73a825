"""Every command block of README.md and docs/*.md runs as written, on a fresh copy of the tree.

A fenced ```bash block is a command block: the blocks of one page run in order in one bash
(``set -euo pipefail``), from the copy's root, with the project's ``.venv`` there and its
``sluice`` on PATH; the page fails if any command exits non-zero. Output samples are fenced
```text (or ```console) and are not run. An HTML comment on the line before a block says
more about it:

- ``<!-- docs-test: skip (why) -->``: not run, for the few commands that cannot run unattended
  (a server that runs until stopped, an install into the environment); the reason is required
  and names what covers it instead.
- ``<!-- docs-test: same-as pipelines/x.yaml -->``: the block shows that file in full; it must
  equal it.
- the README's ``<!-- api-tour:start ... -->`` block runs against a live server in
  tests/e2e/test_readme_api.py, not here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"bash", "text", "console", "yaml", "python", "json", "http"}
MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<kind>[\w-]+)\s*(?P<arg>.*?)\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
KAFKA_TOPICS = ("orders", "orders.priced", "orders.dlq")  # docs/kafka.md's walk-through
# What a page's run must print besides exiting 0 (its commands' own results).
EXPECTED = {
    "README.md": ["pipelines/quickstart.yaml: ok", "state SUCCEEDED", "thumbnail"],
    "kafka.md": ["created orders", '"total_cents":2500', "sluice-error-type=Reject",
                 "deleted orders.dlq"],
}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: tuple[str, str] | None  # (kind, argument) of a docs-test comment just before it
    api_tour: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        skipped = self.marker is not None and self.marker[0] == "skip"
        return self.lang == "bash" and not skipped and not self.api_tour


def blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{page}:{i + 1}: a fence that is never closed"
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARKER.search(before)
        found.append(Block(page, i + 1, fence["lang"], "\n".join(lines[i + 1:end]) + "\n",
                           (mark["kind"], mark["arg"]) if mark else None,
                           "api-tour:start" in before))
        i = end + 1
    return found


def test_every_block_is_labelled_and_every_marker_is_valid() -> None:
    problems = []
    for page in PAGES:
        for block in blocks(page):
            if block.lang not in LANGUAGES:
                problems.append(f"{block.where}: fence language {block.lang!r}, expected one "
                                f"of {sorted(LANGUAGES)} (output samples are `text`)")
            if block.marker is None:
                continue
            kind, arg = block.marker
            if kind == "skip":
                if block.lang != "bash" or not re.fullmatch(r"\(.{10,}\)", arg):
                    problems.append(f"{block.where}: `docs-test: skip (reason)` goes before a "
                                    "bash block and gives its reason in parentheses")
            elif kind == "same-as":
                if (ROOT / arg).read_text(encoding="utf-8") != block.text:
                    problems.append(f"{block.where}: differs from {arg}")
            else:
                problems.append(f"{block.where}: unknown docs-test marker {kind!r}")
    assert not problems, "\n".join(problems)


def test_the_api_tour_and_the_skips_are_few() -> None:
    """The mechanism for blocks that cannot run stays the exception."""
    skipped = [b.where for page in PAGES for b in blocks(page)
               if b.lang == "bash" and not b.runs]
    assert len(skipped) <= 6, skipped


def fresh_copy(dest: Path, venv: bool = True) -> Path:
    """The working tree's files that git tracks or would track (with the project's venv)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    for name in listed.stdout.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    if venv:
        (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def script(page: Path) -> str:
    parts = [f"echo '### {b.where}' >&2\n{b.text}" for b in blocks(page) if b.runs]
    return "\n".join(parts)


def run_page(page: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    tree = fresh_copy(tmp_path / "tree")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLUICE_DATA_DIR", "SLUICE_URL", "SLUICE_TOKEN", "VIRTUAL_ENV"))}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    env["KAFKA_BROKERS"] = os.environ.get("SLUICE_KAFKA_BROKERS", "127.0.0.1:9092")
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script(page)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(b.runs for b in blocks(p))],
                         ids=lambda p: p.name)
def test_command_blocks_run(page: Path, tmp_path: Path) -> None:
    if page.name == "kafka.md":
        from tests.helpers.kafka import BROKERS, require_broker

        require_broker()
        subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "pipelines.kafka_topics",
                        "delete", *KAFKA_TOPICS],  # left by an earlier run that failed half-way
                       cwd=ROOT, env=dict(os.environ, KAFKA_BROKERS=BROKERS), check=True,
                       capture_output=True, timeout=120)
    result = run_page(page, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"a command block failed (see the last ### line):\n{output}"
    assert "Traceback" not in output, output
    for expected in EXPECTED.get(page.name, []):
        assert expected in result.stdout, f"{expected!r} not printed:\n{output}"
