"""docs/reference.md's command section: each command under its own path, once."""

from __future__ import annotations

import re

from sluice.cli import cli
from sluice.reference import render


def test_usage_lines_name_each_command_once() -> None:
    text = render(cli)
    usages = re.findall(r"^`(sluice [^`]*)`$", text, flags=re.MULTILINE)
    assert "sluice keys new [OPTIONS]" in usages
    assert "sluice tasks get [OPTIONS] TASK_ID" in usages
    assert not [u for u in usages if u.startswith("sluice sluice")]
    headings = re.findall(r"^### `(sluice [^`]*)`$", text, flags=re.MULTILINE)
    assert "sluice pipelines list" in headings
    assert all(not h.startswith("sluice sluice") for h in headings)


def test_command_help_is_not_indented_as_code() -> None:
    text = render(cli)
    section = text[text.index("### `sluice keys new`"):]
    section = section[:section.index("| option |")]
    assert not [line for line in section.splitlines() if line.startswith("    ")]
