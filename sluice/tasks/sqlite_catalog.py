"""The pipelines a SQLite data directory knows of: those with tasks, and those with a pause
setting (``sluice pipelines list|pause|resume`` in local mode).

Read-only: one snapshot read of the ``tasks`` and ``pipelines`` tables, no writes.
"""

from __future__ import annotations

import sqlite3

from sluice.tasks.store import StoredPipeline


def stored_pipelines_in(conn: sqlite3.Connection) -> dict[str, StoredPipeline]:
    """Pipeline name → what the store holds of it."""
    found: dict[str, StoredPipeline] = {}
    rows = conn.execute("SELECT pipeline, tenant, state, COUNT(*) FROM tasks"
                        " GROUP BY pipeline, tenant, state").fetchall()
    for name, tenant, state, n in rows:
        entry = found.setdefault(name, StoredPipeline(name))
        if tenant not in entry.tenants:
            entry.tenants.append(tenant)
        entry.counts[state] = entry.counts.get(state, 0) + int(n)
    for name, paused in conn.execute("SELECT name, paused FROM pipelines").fetchall():
        found.setdefault(name, StoredPipeline(name)).paused = bool(paused)
    return found

