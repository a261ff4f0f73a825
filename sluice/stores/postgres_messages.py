"""Putting messages on a queue of the PostgreSQL store: the one insert every writer shares (a
submit, the embedded sink, the outbox of a completion).

Rules:

1. The insert announces the queue on :data:`~sluice.stores.postgres_schema.QUEUE_CHANNEL` in the
   same statement, so the notification leaves at the commit (postgres_schema invariant 4).
2. Messages with a key are put under the keys' advisory locks, taken first, in key order
   (postgres_schema invariant 5); a put without keys takes none.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sluice.stores.postgres_schema import QUEUE_CHANNEL, notify_sql, now_sql

if TYPE_CHECKING:
    from sluice.datadir import QueuedMessage

PUT_SQL = (
    "WITH n AS (SELECT " + now_sql("$7") + " AS now),"
    " ins AS (INSERT INTO messages (queue, task_id, body, content_type, key, headers,"
    " enqueued_at, visible_at) SELECT $1, t.task_id, t.body, t.content_type, t.key, t.headers,"
    " n.now, n.now + $8::float8 FROM n, unnest($2::text[], $3::bytea[], $4::text[], $5::text[],"
    " $6::text[]) WITH ORDINALITY AS t(task_id, body, content_type, key, headers, i)"
    " ORDER BY t.i RETURNING 1)"
    f" SELECT {notify_sql(repr(QUEUE_CHANNEL), '$1')} WHERE EXISTS (SELECT 1 FROM ins)"
)
# The keys arrive sorted and distinct; a function scan keeps their order (rule 2).
LOCK_KEYS_SQL = ("SELECT count(pg_advisory_xact_lock(hashtextextended($1 || chr(31) || k, 0)))"
                 " FROM unnest($2::text[]) AS k")


async def put_in(conn: Any, queue: str, messages: Sequence[QueuedMessage], now: float | None,
                 delay_s: float = 0.0) -> None:
    """Put ``messages`` on ``queue`` in ``conn``'s transaction, visible ``delay_s`` from now
    (``now``: the caller's clock; ``None``: the database's), in one statement, announced at
    the commit (rule 1); keyed ones under their keys' locks (rule 2)."""
    if not messages:
        return
    keys = sorted({m.key for m in messages if m.key is not None})
    if keys:
        await conn.fetchval(LOCK_KEYS_SQL, queue, keys)
    await conn.execute(
        PUT_SQL, queue, [m.task_id for m in messages], [m.body for m in messages],
        [m.content_type for m in messages], [m.key for m in messages],
        [json.dumps(m.headers) if m.headers else None for m in messages], now, float(delay_s))
