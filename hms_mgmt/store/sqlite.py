"""The SQLite store, through aiosqlite, in WAL mode.

One connection, one writer (the engine). A batch of transitions is one
transaction (group commit): a commit per transition would cost a third of the
engine's throughput. JSON columns are text, so the file can be read by hand.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.messages import dumps
from hms_mgmt.records import StepRun, StepStatus, Workflow, WorkflowStatus
from hms_mgmt.schedules import Schedule
from hms_mgmt.store.base import Batch, HistoryEntry, OutboxRow

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
"""

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


def _write(db: sqlite3.Connection, statements: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
    """One transaction, run on the store's thread."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in statements:
            db.executemany(sql, rows)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class SQLiteStore:
    """A :class:`hms_mgmt.store.base.Store` in one SQLite file."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = path_of(url)
        self._db: aiosqlite.Connection | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the store is not open")
        return self._db

    async def open(self) -> None:
        if self._db is not None:
            return
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        await self.db.execute("PRAGMA journal_mode=WAL")
        await self.db.execute("PRAGMA synchronous=NORMAL")
        await self.db.execute("PRAGMA busy_timeout=5000")
        await self.db.executescript(SCHEMA)
        async with self.db.execute("SELECT value FROM meta WHERE key = 'schema'") as cursor:
            row = await cursor.fetchone()
        if row is None:
            await self.db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row[0]) > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema {row[0]}, newer than this version of hms-mgmt knows"
            )
        elif int(row[0]) < SCHEMA_VERSION:
            await self._in_thread(lambda db: _migrate(db, int(row[0])))
        await self.db.executescript(INDEXES)

    async def ping(self) -> None:
        """Raise if the file cannot be read (for readiness checks)."""
        await self._all("SELECT 1 FROM meta LIMIT 1")

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        return list(await self.db.execute_fetchall(sql, tuple(params)))  # one thread hop

    async def definitions(self) -> list[WorkflowDefinition]:
        rows = await self._all("SELECT body, version FROM definitions ORDER BY name, version")
        return [WorkflowDefinition.from_json(json.loads(body), version) for body, version in rows]

    async def save_definition(self, definition: WorkflowDefinition, now: float) -> None:
        await self.db.execute(
            "INSERT OR IGNORE INTO definitions (name, version, body, created_at) VALUES (?, ?, ?, ?)",
            (definition.name, definition.version, _json(definition.to_json()), now),
        )

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

    async def _in_thread(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """Run several statements in one trip to aiosqlite's thread."""
        run_in_thread = getattr(self.db, "_execute", None)
        if run_in_thread is None:  # pragma: no cover - older aiosqlite
            return read(self.db._conn)
        result: T = await run_in_thread(read, self.db._conn)
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
        await self._in_thread(lambda db: _write(db, statements))

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

    async def forget_requests(self, before: float) -> None:
        """Drop the answers kept for repeated requests older than ``before``."""
        await self._in_thread(lambda db: db.execute("DELETE FROM requests WHERE at < ?", (before,)))

    async def schedules(self) -> list[Schedule]:
        rows = await self._all(
            "SELECT id, workflow, cron, timezone, payload, catch_up, next_at, created_at, last_tick "
            "FROM schedules ORDER BY id"
        )
        return [
            Schedule(i, w, c, tz, _unjson(p), cu, n, ca, lt)
            for i, w, c, tz, p, cu, n, ca, lt in rows
        ]

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._all("SELECT status, count(*) FROM workflows GROUP BY status")
        return {status: count for status, count in rows}
