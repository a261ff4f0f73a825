"""Batch statements for SQLite: one statement for many rows, not one per row.

Why not ``executemany``: Python's ``sqlite3`` releases the GIL around every ``sqlite3_step``,
so a statement run once per row gives the GIL away once per row, and the database thread then
waits for the event loop's thread to hand it back (up to the interpreter's switch interval,
5 ms) before it can bind the next row. Measured on this project's machine: inserting 3,000
rows into a table like ``tasks`` took 5.3 µs a row with ``executemany`` on an idle process and
398 µs a row while another thread ran Python; one multi-row ``INSERT`` per 500 rows took 3.3
and 19 µs. A worker's event loop is that other thread, so the store's hot writes (claims,
completions, acknowledgements) go through these helpers, each a statement per chunk of rows.

Invariants: rows are written in the order given; a chunk holds at most ``CHUNK_ROWS`` rows
and at most ``MAX_VARIABLES`` bound values (SQLite's limit is 32,766 since 3.32); every
helper runs in the caller's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence

CHUNK_ROWS = 500
MAX_VARIABLES = 30_000

Row = Sequence[object]


def _chunks(rows: Sequence[Row], width: int) -> Iterator[Sequence[Row]]:
    size = max(1, min(CHUNK_ROWS, MAX_VARIABLES // max(width, 1)))
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def values_list(n: int, width: int) -> str:
    """``(?, ?), (?, ?)`` for ``n`` rows of ``width`` values."""
    one = "(" + ", ".join("?" * width) + ")"
    return ", ".join([one] * n)


def _flat(rows: Sequence[Row]) -> list[object]:
    return [value for row in rows for value in row]


def insert(conn: sqlite3.Connection, head: str, rows: Sequence[Row]) -> None:
    """``head`` is ``INSERT INTO t (a, b)``; each row its values, in that order."""
    if not rows:
        return
    width = len(rows[0])
    for chunk in _chunks(rows, width):
        conn.execute(f"{head} VALUES {values_list(len(chunk), width)}", _flat(chunk))


def update_from(conn: sqlite3.Connection, sql: str, rows: Sequence[Row],
                params: Sequence[object] = ()) -> int:
    """Run ``sql`` once per chunk with ``{values}`` replaced by the chunk's rows, a table the
    statement names ``v`` with columns ``column1``, ``column2`` …, e.g. ``UPDATE t SET x =
    v.column2 FROM (VALUES ...) AS v WHERE t.id = v.column1`` written as ``... FROM
    ({values}) AS v ...``; ``params`` are bound after the rows' values. Returns the rows
    changed."""
    if not rows:
        return 0
    width = len(rows[0])
    changed = 0
    for chunk in _chunks(rows, width + len(params)):
        cur = conn.execute(sql.format(values="VALUES " + values_list(len(chunk), width)),
                           [*_flat(chunk), *params])
        changed += cur.rowcount
    return changed
