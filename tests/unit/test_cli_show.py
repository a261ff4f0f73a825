"""``sluice tasks get``'s text output of one task record: literal, with its traceback."""

from __future__ import annotations

from typing import Any

import pytest

from sluice.cli_tasks import _show


def _record(error: dict[str, Any] | None) -> dict[str, Any]:
    return {"task_id": "t[/x]1", "pipeline": "p", "tenant": "acme", "state": "FAILED",
            "attempts": 1, "key": None, "result": None, "error": error,
            "timeline": [{"stage": "received", "at": 1.0, "since_previous_s": None}],
            "deliveries": {}}


def test_traceback_printed_literally_under_the_error(capsys: pytest.CaptureFixture[str]) -> None:
    traceback = ('Traceback (most recent call last):\n  File "h.py", line 3, in run\n'
                 '    raise ValueError("[bold]no[/bold]")\nValueError: [bold]no[/bold]\n')
    _show(_record({"type": "ValueError", "message": "[bold]no[/bold]",
                   "traceback": traceback}), as_json=False)
    printed = capsys.readouterr().out
    assert "t[/x]1" in printed
    error_at = printed.index("error  ValueError: [bold]no[/bold]")
    assert printed.index(traceback.rstrip("\n")) > error_at


@pytest.mark.parametrize("error", [{"type": "E", "message": "m"},
                                   {"type": "E", "message": "m", "traceback": None}])
def test_no_traceback_no_traceback_line(error: dict[str, Any],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    _show(_record(error), as_json=False)
    printed = capsys.readouterr().out
    assert "error  E: m" in printed and "Traceback" not in printed
