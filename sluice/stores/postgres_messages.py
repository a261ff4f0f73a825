"""Putting messages on a queue of the PostgreSQL store: the one insert every writer shares (a
submit, the embedded sink, the outbox of a completion), announced on
:data:`~sluice.stores.postgres_schema.QUEUE_CHANNEL` in the same transaction (postgres_schema
invariant 4)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sluice.stores.postgres_schema import QUEUE_CHANNEL, now_sql

if TYPE_CHECKING:
    from sluice.datadir import QueuedMessage

PUT_SQL = (
    "INSERT INTO messages (queue, task_id, body, content_type, key, headers, enqueued_at,"
    " visible_at) SELECT $1, t.task_id, t.body, t.content_type, t.key, t.headers, n.now,"
    " n.now + $8::float8 FROM unnest($2::text[], $3::bytea[], $4::text[], $5::text[],"
    " $6::text[]) AS t(task_id, body, content_type, key, headers),"
    f" (SELECT {now_sql('$7')} AS now) AS n"
)


async def put_in(conn: Any, queue: str, messages: Sequence[QueuedMessage], now: float | None,
                 delay_s: float = 0.0) -> None:
    """Put ``messages`` on ``queue`` in ``conn``'s transaction, visible ``delay_s`` from now
    (``now``: the caller's clock; ``None``: the database's), in one statement; then announce
    the queue (the notification is sent at commit)."""
    if not messages:
        return
    await conn.execute(
        PUT_SQL, queue, [m.task_id for m in messages], [m.body for m in messages],
        [m.content_type for m in messages], [m.key for m in messages],
        [json.dumps(m.headers) if m.headers else None for m in messages], now, float(delay_s))
    await conn.execute("SELECT pg_notify($1, $2)", QUEUE_CHANNEL, queue)
