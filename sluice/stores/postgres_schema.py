"""The PostgreSQL store's schema, its migrations, and the SQL pieces its modules share.

Invariants:

1. ``sluice_schema`` holds one row per applied migration (its version and when); the schema's
   version is the highest. Migrations are forward only and each runs once, in its own
   transaction, under an advisory lock (:data:`MIGRATION_LOCK`), so processes starting at once
   never apply one twice. A database at a version above :data:`VERSION` is refused: it was
   migrated by a newer sluice.
2. Times are epoch seconds (``double precision``), as in the SQLite store, so records read the
   same from both. They are the database's clock (:func:`now_sql`), never a worker's: a lease
   taken on one machine lapses at the same moment for every other. Only the conformance suite
   passes its own times (a store made with ``caller_clock``).
3. One table per kind of state, shared by every pipeline and queue of the database; a URL's
   ``?schema=`` puts them in a PostgreSQL schema of their own (a test, a second deployment on
   the same server).
4. A message put on a queue is announced on the channel :data:`QUEUE_CHANNEL` (payload: the
   queue's name) in the transaction that puts it, so idle consumers wake at its commit; a
   control change on :data:`CONTROL_CHANNEL` (payload: JSON ``{pipeline, action, task_id}``).
   Notifications are per database, so a channel's name carries the schema
   (:func:`notify_sql`, :func:`channel`): two deployments on one server never wake or cancel
   each other's work.
5. Messages with a key are put under a transaction-scoped advisory lock per (queue, key), taken
   in key order: a key's messages get their ids in commit order, so "the oldest message of the
   key" (ordered keys) is never overtaken by an older id committing later.
"""

from __future__ import annotations

MIGRATION_LOCK = 0x51_1C_E0_01  # pg_advisory_xact_lock key while migrating
QUEUE_CHANNEL = "sluice_queue"
CONTROL_CHANNEL = "sluice_control"

# (version, what it does, its SQL). Append only; never edit an applied one.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "queues, tasks, pipelines, dead letters", """
CREATE TABLE IF NOT EXISTS messages (
    id           BIGSERIAL PRIMARY KEY,
    queue        TEXT             NOT NULL,
    task_id      TEXT             NOT NULL,
    body         BYTEA            NOT NULL,
    content_type TEXT             NOT NULL,
    key          TEXT,
    headers      TEXT,
    enqueued_at  DOUBLE PRECISION NOT NULL,
    visible_at   DOUBLE PRECISION NOT NULL,
    lease_token  TEXT,
    deliveries   INTEGER          NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, visible_at, id);
CREATE INDEX IF NOT EXISTS messages_by_key ON messages (queue, key, id);
CREATE INDEX IF NOT EXISTS messages_by_task ON messages (queue, task_id);

CREATE TABLE IF NOT EXISTS tasks (
    seq             BIGSERIAL PRIMARY KEY,
    pipeline        TEXT             NOT NULL,
    task_id         TEXT             NOT NULL,
    tenant          TEXT             NOT NULL,
    state           TEXT             NOT NULL,
    attempts        INTEGER          NOT NULL DEFAULT 0,
    key             TEXT,
    result          BYTEA,
    result_type     TEXT,
    error_type      TEXT,
    error_message   TEXT,
    received_at     DOUBLE PRECISION,
    queued_at       DOUBLE PRECISION,
    started_at      DOUBLE PRECISION,
    finished_at     DOUBLE PRECISION,
    updated_at      DOUBLE PRECISION NOT NULL,
    lease_owner     TEXT,
    lease_until     DOUBLE PRECISION,
    delivered       TEXT,
    error_traceback TEXT,
    UNIQUE (pipeline, task_id)
);
CREATE INDEX IF NOT EXISTS tasks_by_id ON tasks (task_id);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (pipeline, state, seq);

CREATE TABLE IF NOT EXISTS pipelines (
    name       TEXT PRIMARY KEY,
    paused     BOOLEAN          NOT NULL DEFAULT FALSE,
    updated_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE IF NOT EXISTS dead_letters (
    pipeline     TEXT             NOT NULL,
    task_id      TEXT             NOT NULL,
    body         BYTEA            NOT NULL,
    content_type TEXT             NOT NULL,
    key          TEXT,
    headers      TEXT,
    failed_at    DOUBLE PRECISION NOT NULL,
    replayed_as  TEXT,
    replayed_at  DOUBLE PRECISION,
    PRIMARY KEY (pipeline, task_id)
);
"""),
    (2, "routes of hosted functions (sluice.tenancy.routes)", """
CREATE TABLE IF NOT EXISTS routes (
    pipeline     TEXT             NOT NULL,
    tenant       TEXT             NOT NULL,
    function     TEXT             NOT NULL,
    tier         TEXT             NOT NULL,
    queue        TEXT,
    pinned       BOOLEAN          NOT NULL DEFAULT FALSE,
    reason       TEXT,
    version      INTEGER          NOT NULL,
    changed_at   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (pipeline, tenant, function)
);
CREATE TABLE IF NOT EXISTS route_events (
    id           BIGSERIAL PRIMARY KEY,
    pipeline     TEXT             NOT NULL,
    tenant       TEXT             NOT NULL,
    function     TEXT             NOT NULL,
    action       TEXT             NOT NULL,
    tier         TEXT             NOT NULL,
    reason       TEXT             NOT NULL,
    moved        INTEGER          NOT NULL,
    at           DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS route_events_by_pipeline ON route_events (pipeline, id);
CREATE TABLE IF NOT EXISTS task_notes (
    pipeline     TEXT             NOT NULL,
    task_id      TEXT             NOT NULL,
    at           DOUBLE PRECISION NOT NULL,
    note         TEXT             NOT NULL
);
CREATE INDEX IF NOT EXISTS task_notes_by_task ON task_notes (pipeline, task_id);
"""),
    (3, "pipeline definitions (sluice.definitions)", """
CREATE TABLE IF NOT EXISTS definitions (
    name         TEXT PRIMARY KEY,
    tenant       TEXT             NOT NULL,
    body         TEXT             NOT NULL,
    format       TEXT             NOT NULL,
    put_by       TEXT             NOT NULL,
    restricted   BOOLEAN          NOT NULL,
    version      BIGINT           NOT NULL,
    updated_at   DOUBLE PRECISION NOT NULL,
    deleted      BOOLEAN          NOT NULL DEFAULT FALSE
);
CREATE INDEX IF NOT EXISTS definitions_by_version ON definitions (version);
"""),
    (4, "task attempts and kept payloads (sluice.tasks.store rules 1-2)", """
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS payload BYTEA;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS payload_type TEXT;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS payload_size INTEGER;
CREATE TABLE IF NOT EXISTS task_attempts (
    pipeline      TEXT             NOT NULL,
    task_id       TEXT             NOT NULL,
    attempt       INTEGER          NOT NULL,
    started_at    DOUBLE PRECISION,
    ended_at      DOUBLE PRECISION,
    outcome       TEXT             NOT NULL,
    error_type    TEXT,
    error_message TEXT,
    PRIMARY KEY (pipeline, task_id, attempt)
);
"""),
)
VERSION = MIGRATIONS[-1][0]

SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS sluice_schema (
    version     INTEGER PRIMARY KEY,
    description TEXT             NOT NULL,
    applied_at  TIMESTAMPTZ      NOT NULL DEFAULT now()
)"""


def channel(name: str, schema: str) -> str:
    """The channel ``LISTEN`` uses for ``name`` in ``schema`` (invariant 4)."""
    return f"{name}:{schema}"


def notify_sql(channel_sql: str, payload_sql: str) -> str:
    """The SQL that sends ``payload_sql`` on the channel ``channel_sql`` of the statement's
    schema (invariant 4); both arguments are SQL (placeholders or literals)."""
    return f"pg_notify({channel_sql} || ':' || current_schema(), {payload_sql})"


def now_sql(param: str) -> str:
    """The SQL for "now" in epoch seconds (invariant 2): the caller's time in ``param`` (a
    placeholder such as ``$3``) when it is not NULL, else the database's clock at the start of
    the statement."""
    return (f"COALESCE({param}::float8, "
            "EXTRACT(EPOCH FROM statement_timestamp())::float8)")
