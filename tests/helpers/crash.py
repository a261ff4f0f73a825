"""Crash tests' bookkeeping: the handler runs read from the shared run log as it grows, and
which repeated runs a kill explains."""

from __future__ import annotations

from collections.abc import Iterable


class LogTail:
    """Counts handler runs from the shared run log as it grows (lines are whole: O_APPEND)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pos = 0
        self.rest = b""
        self.runs: list[tuple[str, int]] = []  # (task id, pid) of each finished run, in order
        self.done: set[str] = set()

    def read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except FileNotFoundError:
            return
        self.pos += len(chunk)
        lines = (self.rest + chunk).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            event, task_id, _attempt, pid = line.decode().split(" ")
            if event == "done":
                self.runs.append((task_id, int(pid)))
                self.done.add(task_id)


def unexplained_repeats(runs: Iterable[tuple[str, int]], killed: set[int]) -> list[str]:
    """Tasks run more than once where an earlier run was in a worker that was not killed: a
    repeat is allowed only for work a killed worker had in flight (it ran, but its end was not
    recorded before the kill)."""
    pids_of: dict[str, list[int]] = {}
    for task_id, pid in runs:
        pids_of.setdefault(task_id, []).append(pid)
    return [t for t, pids in pids_of.items() if any(p not in killed for p in pids[:-1])]
