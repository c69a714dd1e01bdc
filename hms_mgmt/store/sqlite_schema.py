"""The SQLite store's schema and rows: the SQL, its migrations, how records become rows and
rows records, one transaction's statements, and what an SQLite error says about the store.

Everything here runs on the store's own thread (see :mod:`hms_mgmt.store.sqlite`).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from typing import Any

from hms_mgmt.errors import StoreError
from hms_mgmt.store.base import Batch, StoreIdentity
from hms_mgmt.store.rows import RUN_COLUMNS, WORKFLOW_COLUMNS, as_json, run_row, workflow_row

SCHEMA_VERSION = 10

# How the schema changes: a new file gets SCHEMA (which always has everything); a file of an
# older version gets MIGRATIONS[v] for each v after its own, in order, in one transaction at
# open. The version is meta's 'schema'; each version applied is a row of schema_migrations
# (version, applied_at), and so is the version a new file is created at.

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS definitions (
    name TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS workflows (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL,
    input TEXT, output TEXT, error TEXT, seq INTEGER NOT NULL, visits TEXT NOT NULL,
    timer_at REAL, timer_kind TEXT, wait TEXT, signals TEXT NOT NULL, idempotency_key TEXT UNIQUE,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, traceparent TEXT,
    retries INTEGER NOT NULL DEFAULT 0, pause TEXT, priority INTEGER NOT NULL DEFAULT 3,
    parent TEXT, children TEXT, branches TEXT);
CREATE INDEX IF NOT EXISTS workflows_timer ON workflows (timer_at) WHERE timer_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS workflows_status ON workflows (status, created_at);
CREATE TABLE IF NOT EXISTS step_runs (
    workflow_id TEXT NOT NULL, seq INTEGER NOT NULL, step TEXT NOT NULL, visit INTEGER NOT NULL,
    attempt INTEGER NOT NULL, status TEXT NOT NULL, input TEXT, output TEXT, error TEXT,
    context TEXT, created_at REAL NOT NULL, due_at REAL, started_at REAL, finished_at REAL,
    deadline_at REAL, PRIMARY KEY (workflow_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY, workflow_id TEXT NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL,
    detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_workflow ON history (workflow_id, id);
CREATE TABLE IF NOT EXISTS outbox (
    message_id TEXT PRIMARY KEY, exchange TEXT NOT NULL, routing_key TEXT NOT NULL,
    body BLOB NOT NULL, headers TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, reply TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS schedules (
    id TEXT PRIMARY KEY, workflow TEXT NOT NULL, cron TEXT NOT NULL, timezone TEXT NOT NULL,
    payload TEXT, catch_up TEXT NOT NULL, next_at REAL NOT NULL, created_at REAL NOT NULL,
    last_tick REAL);
CREATE TABLE IF NOT EXISTS workflow_attributes (
    workflow_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (workflow_id, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS workflow_attributes_value ON workflow_attributes (key, value);
CREATE TABLE IF NOT EXISTS type_pauses (
    workflow TEXT NOT NULL, step TEXT NOT NULL, since REAL NOT NULL, reason TEXT,
    PRIMARY KEY (workflow, step));
"""

MIGRATIONS: dict[int, list[str]] = {
    # version -> what upgrades a file of the version before it (the new-file schema has it all)
    2: ["ALTER TABLE workflows ADD COLUMN traceparent TEXT"],
    3: ["ALTER TABLE workflows ADD COLUMN retries INTEGER NOT NULL DEFAULT 0"],
    4: [],  # schema_migrations, created by SCHEMA before any migration runs
    5: [],  # workflow_attributes (business keys) and its index, created by SCHEMA
    # a paused workflow's pause (JSON); and type_pauses (paused workflow types), by SCHEMA
    6: ["ALTER TABLE workflows ADD COLUMN pause TEXT"],
    # a workflow's priority (start(priority=1..5)): the order of its queued runs
    7: ["ALTER TABLE workflows ADD COLUMN priority INTEGER NOT NULL DEFAULT 3"],
    # compensated is terminal too: the partial index of finished workflows, made again by
    # INDEXES with it (retention finds compensated workflows through it)
    8: ["DROP INDEX IF EXISTS workflows_finished"],
    # child workflows: a child's parent, and the group of children a parent's step started
    9: [
        "ALTER TABLE workflows ADD COLUMN parent TEXT",
        "ALTER TABLE workflows ADD COLUMN children TEXT",
    ],
    # fan-out and join: the latest fan-out a workflow's step made, its branches' runs (JSON)
    10: ["ALTER TABLE workflows ADD COLUMN branches TEXT"],
}
INDEXES = """
CREATE INDEX IF NOT EXISTS workflows_created ON workflows (created_at);
CREATE INDEX IF NOT EXISTS workflows_finished ON workflows (updated_at)
    WHERE status IN ('succeeded', 'failed', 'cancelled', 'compensated');
CREATE INDEX IF NOT EXISTS requests_at ON requests (at);
"""
MIN_FREE_BYTES = 16 * 1024 * 1024  # less free space than this is a full disk
VACUUM_STEP = 512  # pages handed back to the file system per upkeep step
VACUUM_WHEN = 0.2  # ... once this share of the file is free pages


def placeholders(count: int) -> str:
    return ",".join("?" * count)


def _upsert(table: str, columns: str, key: str) -> str:
    names = [c.strip() for c in columns.split(",")]
    keys = {k.strip() for k in key.split(",")}
    updates = ", ".join(f"{n} = excluded.{n}" for n in names if n not in keys)
    return (
        f"INSERT INTO {table} ({columns}) VALUES ({placeholders(len(names))}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


UPSERT_WORKFLOW = _upsert("workflows", WORKFLOW_COLUMNS, "id")
UPSERT_RUN = _upsert("step_runs", RUN_COLUMNS, "workflow_id, seq")


def path_of(url: str) -> str:
    """``sqlite:///rel.db`` -> ``rel.db``; ``sqlite:////abs.db`` -> ``/abs.db``."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"invalid SQLite URL {url!r}: expected sqlite:///path.db")
    return url[len("sqlite:///") :] or ":memory:"


def statements(batch: Batch) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """The batch as SQL statements with their rows, encoded here, outside the SQLite thread."""
    statements: list[tuple[str, list[tuple[Any, ...]]]] = []
    if batch.workflows:
        statements.append((UPSERT_WORKFLOW, [workflow_row(w) for w in batch.workflows.values()]))
    if batch.runs:
        statements.append((UPSERT_RUN, [run_row(r) for r in batch.runs.values()]))
    if batch.history:
        statements.append(
            (
                "INSERT INTO history (workflow_id, at, kind, detail) VALUES (?, ?, ?, ?)",
                [(w, at, kind, as_json(detail)) for w, at, kind, detail in batch.history],
            )
        )
    if batch.outbox:
        statements.append(
            (
                "INSERT OR IGNORE INTO outbox (message_id, exchange, routing_key, body, headers,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.message_id,
                        r.exchange,
                        r.routing_key,
                        r.body,
                        as_json(r.headers),
                        r.created_at,
                    )
                    for r in batch.outbox
                ],
            )
        )
    if batch.sent:
        statements.append(("DELETE FROM outbox WHERE message_id = ?", [(i,) for i in batch.sent]))
    if batch.schedules:
        kept = [x for x in batch.schedules.values() if x is not None]
        gone = [(key,) for key, x in batch.schedules.items() if x is None]
        if kept:
            statements.append(
                (
                    "INSERT OR REPLACE INTO schedules (id, workflow, cron, timezone, payload, "
                    "catch_up, next_at, created_at, last_tick) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            x.id,
                            x.workflow,
                            x.cron,
                            x.timezone,
                            as_json(x.payload),
                            x.catch_up,
                            x.next_at,
                            x.created_at,
                            x.last_tick,
                        )
                        for x in kept
                    ],
                )
            )
        if gone:
            statements.append(("DELETE FROM schedules WHERE id = ?", gone))
    if batch.attributes:
        statements.append(
            (
                "INSERT OR REPLACE INTO workflow_attributes (workflow_id, key, value) "
                "VALUES (?, ?, ?)",
                [(w, key, value) for (w, key), value in batch.attributes.items()],
            )
        )
    if batch.type_pauses:
        kept_pauses = [x for x in batch.type_pauses.values() if x is not None]
        gone_pauses = [key for key, x in batch.type_pauses.items() if x is None]
        if kept_pauses:
            statements.append(
                (
                    "INSERT OR REPLACE INTO type_pauses (workflow, step, since, reason) "
                    "VALUES (?, ?, ?, ?)",
                    [(x.workflow, x.step or "", x.since, x.reason) for x in kept_pauses],
                )
            )
        if gone_pauses:
            statements.append(
                ("DELETE FROM type_pauses WHERE workflow = ? AND step = ?", gone_pauses)
            )
    if batch.requests:
        statements.append(
            (
                "INSERT OR REPLACE INTO requests (request_id, reply, at) VALUES (?, ?, ?)",
                [(rid, as_json(reply), at) for rid, reply, at in batch.requests],
            )
        )
    return statements


def migrate(db: sqlite3.Connection, version: int) -> None:
    """Upgrade a file from ``version`` to :data:`SCHEMA_VERSION`, in one transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for sql in MIGRATIONS[target]:
                db.execute(sql)
            db.execute(
                "INSERT OR REPLACE INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (target, time.time()),
            )
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def write(
    db: sqlite3.Connection,
    statements: list[tuple[str, list[tuple[Any, ...]]]],
    *,
    owner: str | None = None,
) -> None:
    """One transaction, run on the store's thread; with ``owner``, only while it owns the store."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if owner is not None:
            row = db.execute("SELECT value FROM meta WHERE key = 'owner'").fetchone()
            if row is None or row[0] != owner:
                raise StoreError(
                    f"another engine ({row[0] if row else 'unknown'}) has taken over this store "
                    "while this one was cut off; this engine must stop",
                    kind="taken",
                    lasting=True,
                )
        for sql, rows in statements:
            db.executemany(sql, rows)
        db.execute("COMMIT")
    except BaseException:
        # SQLite rolls back by itself on a full disk or an I/O error; a ROLLBACK then would
        # fail ("no transaction is active") and hide the real cause.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def make_folder(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def prepare(db: sqlite3.Connection) -> StoreIdentity:
    """Set up a new file or check an existing one; its identity (made once, kept in ``meta``)."""
    if db.execute("PRAGMA page_count").fetchone()[0] > 0:  # fails on a file that is not SQLite
        found = db.execute("PRAGMA quick_check").fetchall()
        if found != [("ok",)]:
            raise sqlite3.DatabaseError(f"database disk image is malformed: {found[0][0]}")
    else:
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes before the first table
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    # Checkpoints are the store's own upkeep (``watch``): the file then changes size only
    # there, so a file that shrinks between them was truncated under us.
    db.execute("PRAGMA wal_autocheckpoint=0")
    fresh = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None
    db.executescript(SCHEMA)
    row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    if row is None:
        db.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        db.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
            (SCHEMA_VERSION, time.time()),
        )
    elif int(row[0]) > SCHEMA_VERSION:
        raise StoreError(f"it has schema {row[0]}, newer than this version of hms-mgmt knows")
    elif int(row[0]) < SCHEMA_VERSION:
        migrate(db, int(row[0]))
    db.executescript(INDEXES)
    made = {
        "store_id": secrets.token_hex(16),
        "secret": secrets.token_hex(32),
        "created_at": repr(time.time()),
    }
    db.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", made.items())
    values = dict(db.execute("SELECT key, value FROM meta").fetchall())
    return StoreIdentity(values["store_id"], bytes.fromhex(values["secret"]), fresh)


def store_error(path: str, exc: BaseException) -> StoreError:
    """What an SQLite error says about the store, in words an operator can act on."""
    text = str(exc)
    lowered = text.lower()
    if "readonly" in lowered or "read-only" in lowered:
        return StoreError(
            f"the store {path} is read-only: SQLite must write the file and the -wal and "
            f"-shm files beside it ({text})",
            kind="read_only",
        )
    if "full" in lowered or "no space" in lowered:
        return StoreError(f"the disk of the store {path} is full ({text})", kind="full")
    if "malformed" in lowered or "not a database" in lowered or "corrupt" in lowered:
        return StoreError(
            f"the store {path} is corrupt ({text}): restore it from a backup "
            "(see 'Backing up and restoring the store' in the README)",
            kind="corrupt",
            lasting=True,
        )
    if "disk i/o error" in lowered and not all(
        os.access(name, os.W_OK) for name in (path, path + "-wal") if os.path.exists(name)
    ):
        return StoreError(
            f"the store {path} cannot be written: a read-only file system, an immutable file "
            f"or missing permissions ({text})",
            kind="read_only",
        )
    if "unable to open" in lowered:
        return StoreError(
            f"cannot open the store {path}: a missing or read-only folder, a folder where the "
            f"file should be, or no permission ({text})",
            kind="unopenable",
            lasting=True,
        )
    return StoreError(f"the store {path} failed: {text}", kind="io")
