"""The PostgreSQL store's schema: its migrations, the batch statements and ``hms_commit``.

Schema changes are :data:`MIGRATIONS`, applied in order at open under an advisory lock, each
recorded as a row of ``schema_migrations`` in the same transaction as its DDL.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from typing import Any

from hms_mgmt.errors import StoreError
from hms_mgmt.store.base import Batch, StoreIdentity
from hms_mgmt.store.rows import (
    FINISHED,
    RUN_COLUMNS,
    WORKFLOW_COLUMNS,
    WORKFLOW_WIDTH,
    as_json,
    run_row,
    workflow_row,
)

MIGRATIONS: dict[int, list[str]] = {
    # version -> what upgrades a database of the version before it; 1 creates everything
    1: [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE definitions (name TEXT NOT NULL, version BIGINT NOT NULL, "
        "body TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (name, version))",
        "CREATE TABLE workflows (id TEXT PRIMARY KEY, name TEXT NOT NULL, version BIGINT NOT NULL, "
        "status TEXT NOT NULL, input TEXT, output TEXT, error TEXT, seq BIGINT NOT NULL, "
        "visits TEXT NOT NULL, timer_at DOUBLE PRECISION, timer_kind TEXT, wait TEXT, "
        "signals TEXT NOT NULL, idempotency_key TEXT UNIQUE, created_at DOUBLE PRECISION NOT NULL, "
        "updated_at DOUBLE PRECISION NOT NULL, traceparent TEXT, retries BIGINT NOT NULL DEFAULT 0)",
        "CREATE INDEX workflows_timer ON workflows (timer_at) WHERE timer_at IS NOT NULL",
        "CREATE INDEX workflows_status ON workflows (status, created_at)",
        "CREATE INDEX workflows_created ON workflows (created_at)",
        "CREATE INDEX workflows_finished ON workflows (updated_at) "
        "WHERE status IN ('succeeded', 'failed', 'cancelled')",  # as it was: see 6
        "CREATE TABLE step_runs (workflow_id TEXT NOT NULL, seq BIGINT NOT NULL, step TEXT NOT NULL, "
        "visit BIGINT NOT NULL, attempt BIGINT NOT NULL, status TEXT NOT NULL, input TEXT, "
        "output TEXT, error TEXT, context TEXT, created_at DOUBLE PRECISION NOT NULL, "
        "due_at DOUBLE PRECISION, started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION, "
        "deadline_at DOUBLE PRECISION, PRIMARY KEY (workflow_id, seq))",
        "CREATE TABLE history (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        "workflow_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL, "
        "detail TEXT NOT NULL)",
        "CREATE INDEX history_workflow ON history (workflow_id, id)",
        "CREATE TABLE outbox (message_id TEXT PRIMARY KEY, exchange TEXT NOT NULL, "
        "routing_key TEXT NOT NULL, body BYTEA NOT NULL, headers TEXT NOT NULL, "
        "created_at DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE requests (request_id TEXT PRIMARY KEY, reply TEXT NOT NULL, "
        "at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX requests_at ON requests (at)",
        "CREATE TABLE schedules (id TEXT PRIMARY KEY, workflow TEXT NOT NULL, cron TEXT NOT NULL, "
        "timezone TEXT NOT NULL, payload TEXT, catch_up TEXT NOT NULL, "
        "next_at DOUBLE PRECISION NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
        "last_tick DOUBLE PRECISION)",
    ],
}
TABLES = (
    "meta",
    "definitions",
    "workflows",
    "step_runs",
    "history",
    "outbox",
    "requests",
    "schedules",
    "workflow_attributes",
    "type_pauses",
    "schema_migrations",
)
MIGRATION_LOCK = 0x686D735F6D677274  # pg_advisory_xact_lock key: "hms_mgrt"
POOL_SIZE = 4  # the batch loop, the relay's confirmations, API reads, upkeep
CONNECT_TIMEOUT = 10.0
IDLE_IN_TRANSACTION = "5s"  # the server ends a session idle this long inside a transaction
COMMAND_TIMEOUT = 15.0  # a statement longer than this fails (the batch is held, tried again)

# The workflows' columns up to schema 3, as hms_commit took them then (migrations 2 and 3
# made and replaced it with these; 4 drops that signature), and since schema 4 (``pause``).
WORKFLOW_COLUMNS_7 = WORKFLOW_COLUMNS.removesuffix(", branches")  # schema 8 adds it
WORKFLOW_COLUMNS_5 = WORKFLOW_COLUMNS_7.removesuffix(", parent, children")  # schema 6 adds them
WORKFLOW_COLUMNS_4 = WORKFLOW_COLUMNS_5.removesuffix(", priority")  # schema 5 adds priority
WORKFLOW_COLUMNS_3 = WORKFLOW_COLUMNS_4.removesuffix(", pause")
WORKFLOW_TYPES_3 = (
    "text text int8 text text text text int8 text float8 text text text text float8 float8 "
    "text int8"
)
WORKFLOW_TYPES_4 = WORKFLOW_TYPES_3 + " text"
WORKFLOW_TYPES_5 = WORKFLOW_TYPES_4 + " int8"
WORKFLOW_TYPES_7 = WORKFLOW_TYPES_5 + " text text"
WORKFLOW_TYPES = WORKFLOW_TYPES_7 + " text"
RUN_TYPES = "text int8 text int8 int8 text text text text text float8 float8 float8 float8 float8"


def _upsert(table: str, columns: str, types: str, key: str) -> str:
    """One statement that inserts or updates many rows, one array parameter per column."""
    names = [c.strip() for c in columns.split(",")]
    keys = {k.strip() for k in key.split(",")}
    arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types.split(), start=1))
    updates = ", ".join(f"{n} = excluded.{n}" for n in names if n not in keys)
    action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
    return (
        f"INSERT INTO {table} ({columns}) SELECT * FROM unnest({arrays}) "
        f"ON CONFLICT ({key}) {action}"
    )


UPSERT_WORKFLOWS_3 = _upsert("workflows", WORKFLOW_COLUMNS_3, WORKFLOW_TYPES_3, "id")
UPSERT_WORKFLOWS_4 = _upsert("workflows", WORKFLOW_COLUMNS_4, WORKFLOW_TYPES_4, "id")
UPSERT_WORKFLOWS_5 = _upsert("workflows", WORKFLOW_COLUMNS_5, WORKFLOW_TYPES_5, "id")
UPSERT_WORKFLOWS_7 = _upsert("workflows", WORKFLOW_COLUMNS_7, WORKFLOW_TYPES_7, "id")
UPSERT_WORKFLOWS = _upsert("workflows", WORKFLOW_COLUMNS, WORKFLOW_TYPES, "id")
UPSERT_RUNS = _upsert("step_runs", RUN_COLUMNS, RUN_TYPES, "workflow_id, seq")
INSERT_HISTORY = (
    "INSERT INTO history (workflow_id, at, kind, detail) SELECT w, a, k, d FROM "
    "unnest($1::text[], $2::float8[], $3::text[], $4::text[]) WITH ORDINALITY AS x(w, a, k, d, n) "
    "ORDER BY n"
)
INSERT_OUTBOX = _upsert(
    "outbox",
    "message_id, exchange, routing_key, body, headers, created_at",
    "text text text bytea text float8",
    "message_id",
)
UPSERT_SCHEDULES = _upsert(
    "schedules",
    "id, workflow, cron, timezone, payload, catch_up, next_at, created_at, last_tick",
    "text text text text text text float8 float8 float8",
    "id",
)
UPSERT_REQUESTS = _upsert("requests", "request_id, reply, at", "text text float8", "request_id")
UPSERT_ATTRIBUTES = _upsert(
    "workflow_attributes", "workflow_id, key, value", "text text text", "workflow_id, key"
)
FENCE = "SELECT value FROM meta WHERE key = 'owner' FOR SHARE"


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as one list per column (the arrays ``unnest`` takes)."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


DELETE_SENT = "DELETE FROM outbox WHERE message_id = ANY($1::text[])"
DELETE_SCHEDULES = "DELETE FROM schedules WHERE id = ANY($1::text[])"
PARTS_2 = (  # what a batch wrote at schema 2, in this order: (statement, its arrays' types)
    (UPSERT_WORKFLOWS_3, WORKFLOW_TYPES_3),
    (UPSERT_RUNS, RUN_TYPES),
    (INSERT_HISTORY, "text float8 text text"),
    (INSERT_OUTBOX, "text text text bytea text float8"),
    (DELETE_SENT, "text"),
    (UPSERT_SCHEDULES, "text text text text text text float8 float8 float8"),
    (DELETE_SCHEDULES, "text"),
    (UPSERT_REQUESTS, "text text float8"),
)
PARTS_3 = (*PARTS_2, (UPSERT_ATTRIBUTES, "text text text"))  # schema 3: business keys
UPSERT_TYPE_PAUSES = _upsert(
    "type_pauses", "workflow, step, since, reason", "text text float8 text", "workflow, step"
)
DELETE_TYPE_PAUSES = (
    "DELETE FROM type_pauses WHERE (workflow, step) IN "
    "(SELECT * FROM unnest($1::text[], $2::text[]))"
)
PARTS_4 = (  # schema 4: workflows' pause, and paused workflow types
    (UPSERT_WORKFLOWS_4, WORKFLOW_TYPES_4),
    *PARTS_3[1:],
    (UPSERT_TYPE_PAUSES, "text text float8 text"),
    (DELETE_TYPE_PAUSES, "text text"),
)
PARTS_5 = ((UPSERT_WORKFLOWS_5, WORKFLOW_TYPES_5), *PARTS_4[1:])  # schema 5: workflows' priority
PARTS_7 = ((UPSERT_WORKFLOWS_7, WORKFLOW_TYPES_7), *PARTS_4[1:])  # schema 7: parent, children
PARTS = ((UPSERT_WORKFLOWS, WORKFLOW_TYPES), *PARTS_4[1:])  # schema 8: branches
TAKEN = "HM001"  # the SQLSTATE hms_commit raises when another engine owns the store


def _shifted(sql: str, offset: int) -> str:
    """``sql`` with its parameters ``$1``, ``$2``... renumbered from ``offset + 1``."""
    return re.sub(r"\$(\d+)", lambda m: f"${int(m.group(1)) + offset}", sql)


def _signature(parts: Sequence[tuple[str, str]]) -> list[str]:
    """hms_commit's parameter types for ``parts``: the owner, then one array per column."""
    return ["text"] + [f"{t}[]" for _, part_types in parts for t in part_types.split()]


def _commit_function(parts: Sequence[tuple[str, str]]) -> str:
    """``hms_commit(owner, arrays...)``: a whole batch in one statement, so one round trip.

    It checks the owner (``FOR SHARE``, held to the commit) and runs each part whose arrays
    are not empty; parameters are positional (``$1`` is the owner).
    """
    types = ["text"]
    body = []
    for sql, part_types in parts:
        offset = len(types)
        renumbered = _shifted(sql, offset)
        body.append(f"IF cardinality(${offset + 1}) > 0 THEN {renumbered}; END IF;")
        types.extend(f"{t}[]" for t in part_types.split())
    return (
        f"CREATE OR REPLACE FUNCTION hms_commit({', '.join(types)}) RETURNS void "
        "LANGUAGE plpgsql AS $fn$ DECLARE holder text; BEGIN "
        "IF $1 IS NOT NULL THEN "
        "SELECT value INTO holder FROM meta WHERE key = 'owner' FOR SHARE; "
        "IF holder IS DISTINCT FROM $1 THEN "
        f"RAISE EXCEPTION USING ERRCODE = '{TAKEN}', MESSAGE = coalesce(holder, 'unknown'); "
        "END IF; END IF; " + " ".join(body) + " END $fn$"
    )


# 2: a batch in one round trip. A change to PARTS needs a new migration that replaces it
# (dropping the old signature: more parameters make another function, not a replacement).
MIGRATIONS[2] = [_commit_function(PARTS_2)]
# 3: business keys, written with the batch (hms_commit gains their arrays).
MIGRATIONS[3] = [
    "CREATE TABLE workflow_attributes (workflow_id TEXT NOT NULL, key TEXT NOT NULL, "
    "value TEXT NOT NULL, PRIMARY KEY (workflow_id, key))",
    "CREATE INDEX workflow_attributes_value ON workflow_attributes (key, value)",
    f"DROP FUNCTION hms_commit({', '.join(_signature(PARTS_2))})",
    _commit_function(PARTS_3),
]
# 4: a paused workflow's pause (since, reason, the status it resumes to, its frozen timer,
# the run it holds), a column of workflows, and the paused workflow types (type_pauses),
# both written by hms_commit.
MIGRATIONS[4] = [
    "ALTER TABLE workflows ADD COLUMN pause TEXT",
    "CREATE TABLE type_pauses (workflow TEXT NOT NULL, step TEXT NOT NULL, "
    "since DOUBLE PRECISION NOT NULL, reason TEXT, PRIMARY KEY (workflow, step))",
    f"DROP FUNCTION hms_commit({', '.join(_signature(PARTS_3))})",
    _commit_function(PARTS_4),
]
# 5: a workflow's priority (start(priority=1..5), 1 first): the order of its queued runs and
# of the starts a type pause holds; hms_commit writes it.
MIGRATIONS[5] = [
    "ALTER TABLE workflows ADD COLUMN priority BIGINT NOT NULL DEFAULT 3",
    f"DROP FUNCTION hms_commit({', '.join(_signature(PARTS_4))})",
    _commit_function(PARTS_5),
]
# 6: compensated is a terminal status too: retention deletes compensated workflows, found
# through the partial index of the finished ones.
MIGRATIONS[6] = [
    "DROP INDEX IF EXISTS workflows_finished",
    f"CREATE INDEX workflows_finished ON workflows (updated_at) WHERE {FINISHED}",
]
# 7: child workflows: a child's parent and the group of children a parent's step started
# (JSON), columns of workflows that hms_commit writes.
MIGRATIONS[7] = [
    "ALTER TABLE workflows ADD COLUMN parent TEXT",
    "ALTER TABLE workflows ADD COLUMN children TEXT",
    f"DROP FUNCTION hms_commit({', '.join(_signature(PARTS_5))})",
    _commit_function(PARTS_7),
]
# 8: fan-out and join: the latest fan-out a workflow's step made, with its branches' runs
# (JSON), a column of workflows that hms_commit writes.
MIGRATIONS[8] = [
    "ALTER TABLE workflows ADD COLUMN branches TEXT",
    f"DROP FUNCTION hms_commit({', '.join(_signature(PARTS_7))})",
    _commit_function(PARTS),
]
SCHEMA_VERSION = max(MIGRATIONS)
ARGUMENTS = 1 + sum(len(types.split()) for _, types in PARTS)  # the owner, then the arrays
COMMIT = f"SELECT hms_commit({', '.join(f'${i}' for i in range(1, ARGUMENTS + 1))})"


def commit_arguments(batch: Batch, owner: str | None) -> list[Any]:
    """hms_commit's arguments for a batch: the owner, then one array per column of each part."""
    workflows = [workflow_row(w) for w in batch.workflows.values()]
    runs = [run_row(r) for r in batch.runs.values()]
    events = [(w, at, kind, as_json(detail)) for w, at, kind, detail in batch.history]
    messages = [
        (r.message_id, r.exchange, r.routing_key, r.body, as_json(r.headers), r.created_at)
        for r in batch.outbox
    ]
    kept = [
        (x.id, x.workflow, x.cron, x.timezone, as_json(x.payload), x.catch_up, x.next_at,
         x.created_at, x.last_tick)
        for x in batch.schedules.values() if x is not None
    ]  # fmt: skip
    gone = [key for key, x in batch.schedules.items() if x is None]
    # The last reply to a request id wins, as INSERT OR REPLACE does in SQLite (one statement
    # may not update the same row twice).
    replies = list({rid: (rid, as_json(reply), at) for rid, reply, at in batch.requests}.values())
    return [
        owner,
        *_columns(workflows, WORKFLOW_WIDTH),
        *_columns(runs, 15),
        *_columns(events, 4),
        *_columns(messages, 6),
        list(batch.sent),
        *_columns(kept, 9),
        gone,
        *_columns(replies, 3),
        *_columns([(w, key, value) for (w, key), value in batch.attributes.items()], 3),
        *_columns(
            [
                (x.workflow, x.step or "", x.since, x.reason)
                for x in batch.type_pauses.values()
                if x is not None
            ],
            4,
        ),
        *_columns([key for key, x in batch.type_pauses.items() if x is None], 2),
    ]


def affected(status: str) -> int:
    """The row count of a command status such as ``DELETE 12``."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


async def prepare(db: Any) -> StoreIdentity:
    """Create or upgrade the schema (in order, each migration recorded); the store's identity.

    One transaction under an advisory lock, so engines opening the store together migrate
    it once.
    """
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        known = await db.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not known:
            if await db.fetchval("SELECT to_regclass('workflows') IS NOT NULL"):
                raise StoreError(
                    "the database has a 'workflows' table but no 'schema_migrations': it holds "
                    "something else, give hms-mgmt a database of its own"
                )
            await db.execute(
                "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, "
                "applied_at DOUBLE PRECISION NOT NULL)"
            )
        version = int(await db.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))
        if version > SCHEMA_VERSION:
            raise StoreError(f"it has schema {version}, newer than this version of hms-mgmt knows")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for sql in MIGRATIONS[target]:
                await db.execute(sql)
            await db.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                target,
                time.time(),
            )
        made = {
            "store_id": secrets.token_hex(16),
            "secret": secrets.token_hex(32),
            "created_at": repr(time.time()),
        }
        await db.executemany(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            list(made.items()),
        )
        await db.execute(
            "INSERT INTO meta (key, value) VALUES ('schema', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            str(SCHEMA_VERSION),
        )
        values = {row[0]: row[1] for row in await db.fetch("SELECT key, value FROM meta")}
    return StoreIdentity(values["store_id"], bytes.fromhex(values["secret"]), fresh=version == 0)
