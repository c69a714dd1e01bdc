"""The SQLite store, through aiosqlite, in WAL mode.

One connection, one writer (the engine). A batch of transitions is one
transaction (group commit): a commit per transition would cost a third of the
engine's throughput. JSON columns are text, so the file can be read by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import aiosqlite

from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.errors import StoreError
from hms_mgmt.records import StepRun, StepStatus, Workflow, WorkflowStatus
from hms_mgmt.schedules import Schedule
from hms_mgmt.store.base import (
    Batch,
    HistoryEntry,
    OutboxRow,
    StoreIdentity,
)
from hms_mgmt.wire.codec import dumps

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS definitions (
    name TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS workflows (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL,
    input TEXT, output TEXT, error TEXT, seq INTEGER NOT NULL, visits TEXT NOT NULL,
    timer_at REAL, timer_kind TEXT, wait TEXT, signals TEXT NOT NULL, idempotency_key TEXT UNIQUE,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, traceparent TEXT);
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
"""

MIGRATIONS: dict[int, list[str]] = {
    # version -> what upgrades a file of the version before it (the new-file schema has it all)
    2: ["ALTER TABLE workflows ADD COLUMN traceparent TEXT"],
}
INDEXES = """
CREATE INDEX IF NOT EXISTS workflows_created ON workflows (created_at);
CREATE INDEX IF NOT EXISTS workflows_finished ON workflows (updated_at)
    WHERE status IN ('succeeded', 'failed', 'cancelled');
CREATE INDEX IF NOT EXISTS requests_at ON requests (at);
"""
FINISHED = "status IN ('succeeded', 'failed', 'cancelled')"  # matches the partial index
MIN_FREE_BYTES = 16 * 1024 * 1024  # less free space than this is a full disk
VACUUM_STEP = 512  # pages handed back to the file system per upkeep step
VACUUM_WHEN = 0.2  # ... once this share of the file is free pages

WORKFLOW_COLUMNS = (
    "id, name, version, status, input, output, error, seq, visits, timer_at, timer_kind, "
    "wait, signals, idempotency_key, created_at, updated_at, traceparent"
)
RUN_COLUMNS = (
    "workflow_id, seq, step, visit, attempt, status, input, output, error, context, "
    "created_at, due_at, started_at, finished_at, deadline_at"
)


def _json(value: Any) -> str | None:
    return None if value is None else dumps(value).decode()


def _unjson(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _placeholders(count: int) -> str:
    return ",".join("?" * count)


def _upsert(table: str, columns: str, key: str) -> str:
    names = [c.strip() for c in columns.split(",")]
    keys = {k.strip() for k in key.split(",")}
    updates = ", ".join(f"{n} = excluded.{n}" for n in names if n not in keys)
    return (
        f"INSERT INTO {table} ({columns}) VALUES ({_placeholders(len(names))}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


_WORKFLOW_AND_RUN = ", ".join(
    [f"w.{c.strip()}" for c in WORKFLOW_COLUMNS.split(",")]
    + [f"r.{c.strip()}" for c in RUN_COLUMNS.split(",")]
)
T = TypeVar("T")

UPSERT_WORKFLOW = _upsert("workflows", WORKFLOW_COLUMNS, "id")
UPSERT_RUN = _upsert("step_runs", RUN_COLUMNS, "workflow_id, seq")


def _workflow_row(w: Workflow) -> tuple[Any, ...]:
    return (
        w.id, w.name, w.version, str(w.status), _json(w.input), _json(w.output), _json(w.error),
        w.seq, _json(w.visits), w.timer_at, w.timer_kind, _json(w.wait), _json(w.signals),
        w.idempotency_key, w.created_at, w.updated_at, w.traceparent,
    )  # fmt: skip


def _workflow(row: Sequence[Any]) -> Workflow:
    return Workflow(
        id=row[0], name=row[1], version=row[2], status=WorkflowStatus(row[3]),
        input=_unjson(row[4]), output=_unjson(row[5]), error=_unjson(row[6]), seq=row[7],
        visits=_unjson(row[8]), timer_at=row[9], timer_kind=row[10], wait=_unjson(row[11]),
        signals=_unjson(row[12]), idempotency_key=row[13], created_at=row[14], updated_at=row[15],
        traceparent=row[16],
    )  # fmt: skip


def _run_row(r: StepRun) -> tuple[Any, ...]:
    return (
        r.workflow_id, r.seq, r.step, r.visit, r.attempt, str(r.status), _json(r.input),
        _json(r.output), _json(r.error), _json(r.context), r.created_at, r.due_at,
        r.started_at, r.finished_at, r.deadline_at,
    )  # fmt: skip


def _run(row: Sequence[Any]) -> StepRun:
    return StepRun(
        workflow_id=row[0], seq=row[1], step=row[2], visit=row[3], attempt=row[4],
        status=StepStatus(row[5]), input=_unjson(row[6]), output=_unjson(row[7]),
        error=_unjson(row[8]), context=_unjson(row[9]), created_at=row[10], due_at=row[11],
        started_at=row[12], finished_at=row[13], deadline_at=row[14],
    )  # fmt: skip


def path_of(url: str) -> str:
    """``sqlite:///rel.db`` -> ``rel.db``; ``sqlite:////abs.db`` -> ``/abs.db``."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"invalid SQLite URL {url!r}: expected sqlite:///path.db")
    return url[len("sqlite:///") :] or ":memory:"


def _statements(batch: Batch) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """The batch as SQL statements with their rows, encoded here, outside the SQLite thread."""
    statements: list[tuple[str, list[tuple[Any, ...]]]] = []
    if batch.workflows:
        statements.append((UPSERT_WORKFLOW, [_workflow_row(w) for w in batch.workflows.values()]))
    if batch.runs:
        statements.append((UPSERT_RUN, [_run_row(r) for r in batch.runs.values()]))
    if batch.history:
        statements.append(
            (
                "INSERT INTO history (workflow_id, at, kind, detail) VALUES (?, ?, ?, ?)",
                [(w, at, kind, _json(detail)) for w, at, kind, detail in batch.history],
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
                        _json(r.headers),
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
                            _json(x.payload),
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
    if batch.requests:
        statements.append(
            (
                "INSERT OR REPLACE INTO requests (request_id, reply, at) VALUES (?, ?, ?)",
                [(rid, _json(reply), at) for rid, reply, at in batch.requests],
            )
        )
    return statements


def _migrate(db: sqlite3.Connection, version: int) -> None:
    """Upgrade a file from ``version`` to :data:`SCHEMA_VERSION`, in one transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for sql in MIGRATIONS[target]:
                db.execute(sql)
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _write(
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


def _make_folder(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _prepare(db: sqlite3.Connection) -> StoreIdentity:
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
    elif int(row[0]) > SCHEMA_VERSION:
        raise StoreError(f"it has schema {row[0]}, newer than this version of hms-mgmt knows")
    elif int(row[0]) < SCHEMA_VERSION:
        _migrate(db, int(row[0]))
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


class SQLiteStore:
    """A :class:`hms_mgmt.store.base.Store` in one SQLite file."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = path_of(url)
        self._db: aiosqlite.Connection | None = None
        self.identity = StoreIdentity("", b"", fresh=False)
        self._file: tuple[int, int] | None = None  # (device, inode) of the file we opened
        self._checkpointed_size = 0  # the file's size after our last complete checkpoint
        self._upkeep = 0
        self._owner: str | None = None  # the engine that claimed the store (fencing)

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the store is not open")
        return self._db

    async def open(self) -> None:
        if self._db is not None:
            return
        memory = self.path == ":memory:"
        try:
            if not memory:
                await asyncio.to_thread(_make_folder, self.path)
            try:
                self._db = await aiosqlite.connect(self.path, isolation_level=None)
            except sqlite3.Error as exc:
                raise store_error(self.path, exc) from None
            self.identity = await self._in_thread(_prepare)
            if not memory:
                stat = os.stat(self.path)
                self._file = (stat.st_dev, stat.st_ino)
                self._checkpointed_size = stat.st_size
        except BaseException as exc:
            await self.close()
            if isinstance(exc, OSError):
                raise StoreError(
                    f"cannot open the store {self.path}: {exc.strerror or exc}", kind="unopenable"
                ) from None
            if isinstance(exc, StoreError) and self.path not in str(exc):
                raise StoreError(
                    f"cannot use the store {self.path}: {exc}", kind=exc.kind
                ) from None
            raise

    def check_file(self) -> StoreError | None:
        if self._file is None:
            return None
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return StoreError(
                f"the store file {self.path} was deleted under the engine",
                kind="deleted",
                lasting=True,
            )
        except OSError as exc:
            return StoreError(f"cannot look at the store {self.path}: {exc}")
        if (stat.st_dev, stat.st_ino) != self._file:
            return StoreError(
                f"the store file {self.path} was replaced by another file",
                kind="replaced",
                lasting=True,
            )
        return self._truncated(stat.st_size)

    def _truncated(self, size: int) -> StoreError | None:
        # Only our own checkpoints change the file's size (auto-checkpoints are off); one
        # that may shrink it sets _checkpointed_size to 0 while it runs.
        if size >= self._checkpointed_size:
            return None
        return StoreError(
            f"the store file {self.path} was truncated under the engine "
            f"({size} bytes, at least {self._checkpointed_size} expected)",
            kind="truncated",
            lasting=True,
        )

    async def watch(self, *, probe: bool) -> StoreError | None:
        problem = self.check_file()
        if problem is not None or self._file is None:
            return problem
        try:
            return await self._in_thread(lambda db: self._upkeep_step(db, probe))
        except StoreError as exc:
            return exc

    def _upkeep_step(self, db: sqlite3.Connection, probe: bool) -> StoreError | None:
        """On the store's thread: prove a commit, spot truncation, checkpoint, hand back space."""
        truncated = self._truncated(os.stat(self.path).st_size)
        if truncated is not None:
            return truncated
        # A small commit can go through on a file that cannot grow (it reuses WAL space), so
        # the room to grow and the right to write are checked, not only a probe commit.
        files = [name for name in (self.path, self.path + "-wal") if os.path.exists(name)]
        if not all(os.access(name, os.W_OK) for name in files):
            return StoreError(
                f"the store {self.path} cannot be written: a read-only file system, an "
                "immutable file or missing permissions",
                kind="read_only",
            )
        disk = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        free = disk.f_bavail * disk.f_frsize
        if free < MIN_FREE_BYTES:
            return StoreError(
                f"the disk of the store {self.path} is full: {free} bytes free, the engine "
                f"needs at least {MIN_FREE_BYTES} to commit safely",
                kind="full",
            )
        if probe:
            self._write(
                db, [("UPDATE meta SET value = ? WHERE key = 'probe'", [(repr(time.time()),)])]
            )
        self._upkeep += 1
        if self._upkeep % 10 == 0:
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            if free > 1000 and free > pages * VACUUM_WHEN:
                db.execute(f"PRAGMA incremental_vacuum({VACUUM_STEP})").fetchall()
        known, self._checkpointed_size = self._checkpointed_size, 0
        busy, frames, done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        size = os.stat(self.path).st_size
        # Complete: the file holds everything, at its full size. Not (a backup reading beside
        # us): it may have grown, but cannot have shrunk.
        self._checkpointed_size = size if busy == 0 and frames == done else max(known, size)
        return None

    async def claim(self, owner: str) -> None:
        def take(db: sqlite3.Connection) -> None:
            _write(
                db, [("INSERT OR REPLACE INTO meta (key, value) VALUES ('owner', ?)", [(owner,)])]
            )

        await self._in_thread(take)
        self._owner = owner

    def _write(
        self, db: sqlite3.Connection, statements: list[tuple[str, list[tuple[Any, ...]]]]
    ) -> None:
        """One transaction, refused if another engine has claimed the store since we did."""
        _write(db, statements, owner=self._owner)

    async def rescue(self) -> str:
        destination = f"{self.path}.rescued-{time.strftime('%Y%m%dT%H%M%S')}"

        def copy(db: sqlite3.Connection) -> None:
            target = sqlite3.connect(destination)
            try:
                db.backup(target)
            finally:
                target.close()

        try:
            await self._in_thread(copy)
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(f"cannot write {destination}: {exc}") from None
        return destination

    async def owner(self) -> str | None:
        rows = await self._all("SELECT value FROM meta WHERE key = 'owner'")
        return str(rows[0][0]) if rows else None

    async def prune(self, before: float, limit: int) -> int:
        def delete(db: sqlite3.Connection) -> int:
            ids = [
                row[0]
                for row in db.execute(
                    f"SELECT id FROM workflows WHERE {FINISHED} AND updated_at < ? LIMIT ?",
                    (before, limit),
                )
            ]
            if not ids:
                return 0
            marks = _placeholders(len(ids))
            self._write(
                db,
                [
                    (f"DELETE FROM {table} WHERE {column} IN ({marks})", [tuple(ids)])
                    for table, column in (
                        ("step_runs", "workflow_id"),
                        ("history", "workflow_id"),
                        ("workflows", "id"),
                    )
                ],
            )
            return len(ids)

        return await self._in_thread(delete)

    async def size(self) -> int:
        if self._file is None:
            return 0
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(self.path + suffix).st_size
        return total

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def discard(self) -> None:
        await self.close()
        if self._file is not None and self.identity.fresh:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.remove(self.path + suffix)

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        values = tuple(params)
        return await self._in_thread(lambda db: db.execute(sql, values).fetchall())

    async def definitions(self) -> list[WorkflowDefinition]:
        rows = await self._all("SELECT body, version FROM definitions ORDER BY name, version")
        return [WorkflowDefinition.from_json(json.loads(body), version) for body, version in rows]

    async def save_definition(self, definition: WorkflowDefinition, now: float) -> None:
        row = (definition.name, definition.version, _json(definition.to_json()), now)
        sql = "INSERT OR IGNORE INTO definitions (name, version, body, created_at) VALUES (?, ?, ?, ?)"
        await self._in_thread(lambda db: self._write(db, [(sql, [row])]))

    async def load(self, workflow_ids: Sequence[str]) -> dict[str, tuple[Workflow, StepRun | None]]:
        found: dict[str, tuple[Workflow, StepRun | None]] = {}
        ids = list(dict.fromkeys(workflow_ids))
        width = len(WORKFLOW_COLUMNS.split(","))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            for row in await self._all(
                f"SELECT {_WORKFLOW_AND_RUN} FROM workflows w LEFT JOIN step_runs r "
                f"ON r.workflow_id = w.id AND r.seq = w.seq WHERE w.id IN ({_placeholders(len(chunk))})",
                chunk,
            ):
                run = None if row[width] is None else _run(row[width:])
                found[row[0]] = (_workflow(row[:width]), run)
        return found

    async def workflow_with_runs(self, workflow_id: str) -> tuple[Workflow, list[StepRun]] | None:
        def read(db: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
            workflow = db.execute(
                f"SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE id = ?", (workflow_id,)
            ).fetchall()
            runs = db.execute(
                f"SELECT {RUN_COLUMNS} FROM step_runs WHERE workflow_id = ? ORDER BY seq",
                (workflow_id,),
            ).fetchall()
            return workflow, runs

        workflow_rows, run_rows = await self._in_thread(read)
        if not workflow_rows:
            return None
        return _workflow(workflow_rows[0]), [_run(row) for row in run_rows]

    async def _in_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run several statements in one trip to aiosqlite's thread; SQLite errors as StoreError."""
        run_in_thread = getattr(self.db, "_execute", None)
        try:
            if run_in_thread is None:  # pragma: no cover - older aiosqlite
                return work(self.db._conn)
            result: T = await run_in_thread(work, self.db._conn)
        except sqlite3.Error as exc:
            raise store_error(self.path, exc) from None
        return result

    async def find_by_idempotency_key(self, keys: Sequence[str]) -> dict[str, str]:
        if not keys:
            return {}
        rows = await self._all(
            f"SELECT idempotency_key, id FROM workflows WHERE idempotency_key IN "
            f"({_placeholders(len(keys))})",
            keys,
        )
        return {key: workflow_id for key, workflow_id in rows}

    async def run(self, workflow_id: str, seq: int) -> StepRun | None:
        rows = await self._all(
            f"SELECT {RUN_COLUMNS} FROM step_runs WHERE workflow_id = ? AND seq = ?",
            (workflow_id, seq),
        )
        return _run(rows[0]) if rows else None

    async def runs(self, workflow_id: str) -> list[StepRun]:
        rows = await self._all(
            f"SELECT {RUN_COLUMNS} FROM step_runs WHERE workflow_id = ? ORDER BY seq",
            (workflow_id,),
        )
        return [_run(row) for row in rows]

    async def history(self, workflow_id: str) -> list[HistoryEntry]:
        rows = await self._all(
            "SELECT at, kind, detail FROM history WHERE workflow_id = ? ORDER BY id", (workflow_id,)
        )
        return [HistoryEntry(at, kind, json.loads(detail)) for at, kind, detail in rows]

    async def request_replies(self, request_ids: Sequence[str]) -> dict[str, Any]:
        if not request_ids:
            return {}
        rows = await self._all(
            f"SELECT request_id, reply FROM requests WHERE request_id IN "
            f"({_placeholders(len(request_ids))})",
            request_ids,
        )
        return {request_id: json.loads(reply) for request_id, reply in rows}

    async def commit(self, batch: Batch) -> None:
        if not batch:
            return
        statements = _statements(batch)
        # One trip to aiosqlite's thread for the whole transaction, not one per statement.
        await self._in_thread(lambda db: self._write(db, statements))

    async def unsent(self) -> list[OutboxRow]:
        rows = await self._all(
            "SELECT message_id, exchange, routing_key, body, headers, created_at FROM outbox "
            "ORDER BY created_at"
        )
        return [
            OutboxRow(mid, exchange, key, bytes(body), json.loads(headers), created)
            for mid, exchange, key, body, headers, created in rows
        ]

    async def due_timers(self, until: float, limit: int) -> list[tuple[str, str, float]]:
        rows = await self._all(
            "SELECT id, timer_kind, timer_at FROM workflows WHERE timer_at IS NOT NULL "
            "AND timer_at <= ? ORDER BY timer_at LIMIT ?",
            (until, limit),
        )
        return [(row[0], row[1], row[2]) for row in rows]

    async def list_workflows(
        self, *, status: str | None = None, name: str | None = None, limit: int = 50
    ) -> list[Workflow]:
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if name is not None:
            where.append("name = ?")
            params.append(name)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._all(
            f"SELECT {WORKFLOW_COLUMNS} FROM workflows {clause} ORDER BY created_at DESC LIMIT ?",
            [*params, limit],
        )
        return [_workflow(row) for row in rows]

    async def forget_requests(self, before: float, limit: int = 1000) -> int:
        """Drop up to ``limit`` answers kept for repeated requests older than ``before``."""
        sql = (
            "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests WHERE at < ? LIMIT ?)"
        )

        def delete(db: sqlite3.Connection) -> int:
            self._write(db, [(sql, [(before, limit)])])
            return int(db.execute("SELECT changes()").fetchone()[0])

        return await self._in_thread(delete)

    async def schedules(self) -> list[Schedule]:
        rows = await self._all(
            "SELECT id, workflow, cron, timezone, payload, catch_up, next_at, created_at, last_tick "
            "FROM schedules ORDER BY id"
        )
        return [
            Schedule(i, w, c, tz, _unjson(p), cu, n, ca, lt)
            for i, w, c, tz, p, cu, n, ca, lt in rows
        ]

    async def stuck_counts(self, before: float) -> dict[tuple[str, str], int]:
        rows = await self._all(
            "SELECT w.name, r.step, count(*) FROM workflows w JOIN step_runs r "
            "ON r.workflow_id = w.id AND r.seq = w.seq "
            "WHERE w.status IN ('pending', 'running') AND r.status = 'pending' "
            "AND max(r.created_at, coalesce(r.due_at, 0)) < ? GROUP BY w.name, r.step",
            (before,),
        )
        return {(name, step): count for name, step, count in rows}

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._all("SELECT status, count(*) FROM workflows GROUP BY status")
        return {status: count for status, count in rows}


def backup(source: str, destination: str) -> dict[str, Any]:
    """An online, consistent copy of the store at ``source`` (SQLite's backup API), checked.

    Safe beside a running engine: it reads a snapshot and never writes the store.
    """
    began = time.monotonic()
    if not os.path.isfile(source):
        raise StoreError(f"there is no store at {source}", kind="unopenable")
    partial = destination + ".partial"
    try:
        reader = sqlite3.connect(
            f"file:{urllib.parse.quote(os.path.abspath(source))}?mode=ro", uri=True
        )
        try:
            writer = sqlite3.connect(partial)
            try:
                reader.backup(writer)
                if writer.execute("PRAGMA quick_check").fetchall() != [("ok",)]:
                    raise StoreError(f"the copy of {source} does not check out", kind="corrupt")
                workflows = writer.execute("SELECT count(*) FROM workflows").fetchone()[0]
            finally:
                writer.close()
        finally:
            reader.close()
        os.replace(partial, destination)
    except sqlite3.Error as exc:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise store_error(source, exc) from None
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise StoreError(f"cannot write the backup {destination}: {exc.strerror or exc}") from None
    return {
        "source": source,
        "path": destination,
        "workflows": workflows,
        "bytes": os.path.getsize(destination),
        "seconds": round(time.monotonic() - began, 3),
    }
