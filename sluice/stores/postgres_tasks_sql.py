"""The SQL of the PostgreSQL task store (:mod:`sluice.stores.postgres_tasks`), and the row to
record mapping it shares.

Every time written or compared is ``now_sql`` of the statement's ``now`` parameter
(:func:`~sluice.stores.postgres_schema.now_sql`: the caller's time, or the database's clock
when it is NULL); a batch statement takes its rows as arrays (``unnest``), one statement for
the whole batch. A task's kept payload goes in its row's own INSERT, an attempt's history
entry in its completion's transaction (:mod:`sluice.tasks.store` rules 1-2).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sluice.stores.postgres_schema import now_sql
from sluice.tasks.state import TaskState
from sluice.tasks.store import TaskRecord

COLUMNS = (
    "pipeline, task_id, tenant, state, attempts, key, result, result_type, error_type, "
    "error_message, received_at, queued_at, started_at, finished_at, updated_at, seq, delivered,"
    " error_traceback"
)


# The single-task reads' columns: COLUMNS, then the kept payload (sluice.tasks.store rule 3).
DETAIL_COLUMNS = COLUMNS + ", payload, payload_type, payload_size"

ATTEMPTS = (
    "SELECT pipeline, task_id, attempt, started_at, ended_at, outcome, error_type,"
    " error_message FROM task_attempts WHERE pipeline = ANY($1::text[]) AND task_id = $2"
    " ORDER BY attempt")

# The attempt entries of a completion batch's written rows ($2: their task ids).
PUT_ATTEMPTS = (
    "INSERT INTO task_attempts (pipeline, task_id, attempt, started_at, ended_at, outcome,"
    " error_type, error_message) SELECT $1, v.task_id, v.attempt, v.started_at, $8::float8,"
    " v.outcome, v.error_type, v.error_message"
    " FROM unnest($2::text[], $3::int[], $4::float8[], $5::text[], $6::text[], $7::text[])"
    " AS v(task_id, attempt, started_at, outcome, error_type, error_message)"
    " ON CONFLICT (pipeline, task_id, attempt) DO UPDATE SET started_at = excluded.started_at,"
    " ended_at = excluded.ended_at, outcome = excluded.outcome,"
    " error_type = excluded.error_type, error_message = excluded.error_message")


def record(row: Iterable[Any]) -> TaskRecord:
    values = list(row)
    values[3] = TaskState(values[3])
    values[16] = json.loads(values[16]) if values[16] else None  # delivered
    return TaskRecord(*values)


# Each task gets its seq in batch order, but rows are inserted in task id order (as claims
# insert theirs), so two writers of overlapping batches wait for each other, never in a cycle.
CREATE = (
    f"WITH n AS (SELECT {now_sql('$6')} AS now),"
    " v AS (SELECT u.*, nextval(pg_get_serial_sequence('tasks', 'seq')) AS seq"
    " FROM unnest($3::text[], $4::text[], $5::float8[], $7::bytea[], $8::text[], $9::int[])"
    " WITH ORDINALITY AS u(task_id, key, received_at, payload, payload_type, payload_size,"
    " ord))"
    " INSERT INTO tasks (seq, pipeline, task_id, tenant, state, key, received_at, queued_at,"
    " updated_at, payload, payload_type, payload_size) SELECT v.seq, $1, v.task_id, $2,"
    " 'QUEUED', v.key, COALESCE(v.received_at, n.now), n.now, n.now, v.payload,"
    " v.payload_type, v.payload_size FROM v, n"
    ' ORDER BY v.task_id COLLATE "C" ON CONFLICT (pipeline, task_id) DO NOTHING'
    " RETURNING task_id, received_at, queued_at, updated_at")

# Tasks first seen at the consumer, seq and insert order as in CREATE.
CLAIM_INSERT = (
    f"WITH n AS (SELECT {now_sql('$9')} AS now),"
    " v AS (SELECT u.*, nextval(pg_get_serial_sequence('tasks', 'seq')) AS seq"
    " FROM unnest($5::text[], $6::text[], $7::float8[], $8::bool[], $10::text[],"
    " $11::bytea[], $12::text[], $13::int[])"
    " WITH ORDINALITY AS u(task_id, key, received_at, start, tenant, payload, payload_type,"
    " payload_size, ord) WHERE NOT EXISTS"
    " (SELECT 1 FROM tasks t WHERE t.pipeline = $1 AND t.task_id = u.task_id)),"
    " ins AS (INSERT INTO tasks (seq, pipeline, task_id, tenant, state, attempts, key,"
    " received_at, queued_at, started_at, updated_at, lease_owner, lease_until, payload,"
    " payload_type, payload_size)"
    " SELECT v.seq, $1, v.task_id, COALESCE(v.tenant, $2), 'RUNNING',"
    " CASE WHEN v.start THEN 1 ELSE 0 END, v.key,"
    " COALESCE(v.received_at, n.now), COALESCE(v.received_at, n.now),"
    " CASE WHEN v.start THEN n.now END, n.now, $3, n.now + $4::float8, v.payload,"
    " v.payload_type, v.payload_size FROM v, n"
    ' ORDER BY v.task_id COLLATE "C" ON CONFLICT (pipeline, task_id) DO NOTHING'
    " RETURNING task_id)"
    " SELECT n.now, ARRAY(SELECT task_id FROM ins) AS inserted FROM n")

CLAIM_LOCK = (
    "SELECT task_id, state, attempts, lease_until, lease_owner, received_at, queued_at,"
    " started_at FROM tasks WHERE pipeline = $1 AND task_id = ANY($2::text[])"
    ' ORDER BY task_id COLLATE "C" FOR UPDATE')

CLAIM_UPDATE = (
    "UPDATE tasks SET state = 'RUNNING', attempts = v.attempts, started_at = v.started_at,"
    " updated_at = $3, lease_owner = $4, lease_until = $5"
    " FROM unnest($2::text[], $6::int[], $7::float8[]) AS v(task_id, attempts, started_at)"
    " WHERE tasks.pipeline = $1 AND tasks.task_id = v.task_id")

# $4: how many times each id is started in the batch (an id given twice starts twice).
START = (
    "UPDATE tasks SET attempts = tasks.attempts + v.times,"
    " started_at = COALESCE(tasks.started_at, c.now), updated_at = c.now"
    f" FROM unnest($3::text[], $4::int[]) AS v(task_id, times), (SELECT {now_sql('$5')} AS now)"
    " AS c WHERE tasks.pipeline = $1 AND tasks.task_id = v.task_id AND tasks.state = 'RUNNING'"
    " AND tasks.lease_owner = $2"
    " RETURNING tasks.task_id, tasks.attempts, tasks.received_at, tasks.queued_at,"
    " tasks.started_at")

STATES = (
    "SELECT task_id, state, attempts, received_at, lease_until FROM tasks"
    " WHERE pipeline = $1 AND task_id = ANY($2::text[])")

EXTEND = (
    f"UPDATE tasks SET lease_until = {now_sql('$4')} + $5::float8 WHERE pipeline = $1"
    " AND task_id = ANY($2::text[]) AND lease_owner = $3 AND state = 'RUNNING'"
    " RETURNING task_id")

RELEASE = (
    "UPDATE tasks SET lease_until = 0 WHERE pipeline = $1 AND task_id = ANY($2::text[])"
    " AND lease_owner = $3 AND state = 'RUNNING'")

UNCLAIM = (
    "UPDATE tasks SET state = 'QUEUED', {undo} lease_owner = NULL, lease_until = NULL"
    " WHERE pipeline = $1 AND task_id = ANY($2::text[]) AND lease_owner = $3"
    " AND state = 'RUNNING'")
UNCLAIM_UNDO = ("attempts = GREATEST(attempts - 1, 0),"
                " started_at = CASE WHEN attempts <= 1 THEN NULL ELSE started_at END,")

COMPLETE = (
    "UPDATE tasks SET state = v.state, result = v.result, result_type = v.result_type,"
    " error_type = v.error_type, error_message = v.error_message,"
    " error_traceback = v.error_traceback, finished_at = CASE WHEN v.final THEN c.now END,"
    " updated_at = c.now,"
    " lease_owner = CASE WHEN v.final THEN NULL ELSE tasks.lease_owner END, lease_until = NULL"
    " FROM unnest($3::text[], $4::text[], $5::bytea[], $6::text[], $7::text[], $8::text[],"
    " $9::text[], $10::bool[]) AS v(task_id, state, result, result_type, error_type,"
    f" error_message, error_traceback, final), (SELECT {now_sql('$11')} AS now) AS c"
    " WHERE tasks.pipeline = $1 AND tasks.task_id = v.task_id AND tasks.state = 'RUNNING'"
    " AND tasks.lease_owner = $2 RETURNING tasks.task_id, tasks.updated_at")

SET_DELIVERED = (
    "UPDATE tasks SET delivered = v.delivered FROM unnest($2::text[], $3::text[])"
    " AS v(task_id, delivered) WHERE tasks.pipeline = $1 AND tasks.task_id = v.task_id")

RECORD_DELIVERY = (
    "UPDATE tasks SET delivered = (COALESCE(tasks.delivered, '{}')::jsonb"
    " || jsonb_build_object($2::text, v.status::jsonb))::text"
    " FROM unnest($3::text[], $4::text[]) AS v(task_id, status)"
    " WHERE tasks.pipeline = $1 AND tasks.task_id = v.task_id")

PUT_DEAD_LETTERS = (
    "INSERT INTO dead_letters (pipeline, task_id, body, content_type, key, headers, failed_at)"
    f" SELECT $1, v.task_id, v.body, v.content_type, v.key, v.headers, {now_sql('$7')}"
    " FROM unnest($2::text[], $3::bytea[], $4::text[], $5::text[], $6::text[])"
    " AS v(task_id, body, content_type, key, headers) ON CONFLICT (pipeline, task_id)"
    " DO UPDATE SET body = excluded.body, content_type = excluded.content_type,"
    " key = excluded.key, headers = excluded.headers, failed_at = excluded.failed_at")

TRANSITION_LOCK = f"SELECT {COLUMNS} FROM tasks WHERE pipeline = $1 AND task_id = $2 FOR UPDATE"

TRANSITION = (
    f"UPDATE tasks SET state = $3, updated_at = c.now,"
    " finished_at = CASE WHEN $4 THEN c.now ELSE finished_at END"
    f" FROM (SELECT {now_sql('$5')} AS now) AS c"
    f" WHERE pipeline = $1 AND task_id = $2 AND state = $6 RETURNING {COLUMNS}")

SET_PAUSED = (
    f"INSERT INTO pipelines (name, paused, updated_at) VALUES ($1, $2, {now_sql('$3')})"
    " ON CONFLICT (name) DO UPDATE SET paused = excluded.paused,"
    " updated_at = excluded.updated_at")

# One statement, so one snapshot: tasks by (pipeline, tenant, state), then the pause flags.
PIPELINES = (
    "SELECT pipeline, tenant, state, n, paused FROM ("
    "SELECT 0 AS part, pipeline, tenant, state, COUNT(*) AS n, NULL::boolean AS paused"
    " FROM tasks GROUP BY pipeline, tenant, state"
    " UNION ALL SELECT 1, name, NULL, NULL, NULL, paused FROM pipelines) AS s"
    ' ORDER BY part, pipeline COLLATE "C", tenant COLLATE "C", state')

DEAD_LETTERS = (
    "SELECT d.pipeline, d.task_id, d.body, d.content_type, d.key, d.headers, d.failed_at,"
    " t.error_type, t.error_message, t.attempts, d.replayed_as, d.replayed_at"
    " FROM dead_letters d LEFT JOIN tasks t ON t.pipeline = d.pipeline"
    " AND t.task_id = d.task_id WHERE d.pipeline = $1")

MARK_REPLAYED = (
    "UPDATE dead_letters SET replayed_as = v.replay, replayed_at = c.now"
    f" FROM unnest($2::text[], $3::text[]) AS v(task_id, replay), (SELECT {now_sql('$4')}"
    " AS now) AS c WHERE dead_letters.pipeline = $1 AND dead_letters.task_id = v.task_id")
