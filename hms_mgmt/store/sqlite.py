"""The SQLite store, in WAL mode, on a thread of its own.

One connection, one writer (the engine). A batch of transitions is one transaction (group
commit) and one trip to the store's thread: a commit per transition would cost a third of
the engine's throughput. The thread is the store's own (``hms_mgmt.store.thread``, holding
one ``sqlite3`` connection), not aiosqlite's: aiosqlite has no public way to run several
statements in one trip to its thread. JSON columns are text, so the file can be
read by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from hms_mgmt.definitions import UnloadableDefinition, WorkflowDefinition, load_stored
from hms_mgmt.errors import StoreError
from hms_mgmt.records import StepRun, TypePause, Workflow
from hms_mgmt.schedules import Schedule
from hms_mgmt.store import file_lock
from hms_mgmt.store.base import (
    Batch,
    BatchReads,
    HistoryEntry,
    OutboxRow,
    StoreIdentity,
    prefix_range,
)
from hms_mgmt.store.rows import (
    FINISHED,
    RUN_COLUMNS,
    WORKFLOW_AND_RUN,
    WORKFLOW_COLUMNS,
    as_json,
    listing,
    run_of,
    unjson,
    workflow_of,
)
from hms_mgmt.store.sqlite_schema import (
    MIN_FREE_BYTES,
    VACUUM_STEP,
    VACUUM_WHEN,
    make_folder,
    path_of,
    placeholders,
    prepare,
    statements,
    store_error,
    write,
)
from hms_mgmt.store.thread import StoreThread

T = TypeVar("T")

INLINE_ROWS = 8
"""A commit of at most this many rows runs on the loop's thread when the store's is idle:
a lone workflow's commit (4 to 8 rows, 0.2 ms) saves the trip there and back, and a busy
engine's batches, of two events or more, keep committing beside the loop, which meanwhile
takes in the next batch's messages."""

INLINE_READS = 3
"""A batch's reads for at most this many workflows, keys and requests (a lone start's: its
workflow, its request, an idempotency key) run the same way."""


def _loaded(
    db: sqlite3.Connection, workflow_ids: Sequence[str]
) -> dict[str, tuple[Workflow, StepRun | None]]:
    """Workflows with their current run; ids that are not stored are left out."""
    found: dict[str, tuple[Workflow, StepRun | None]] = {}
    ids = list(dict.fromkeys(workflow_ids))
    width = len(WORKFLOW_COLUMNS.split(","))
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for row in db.execute(
            f"SELECT {WORKFLOW_AND_RUN} FROM workflows w LEFT JOIN step_runs r "
            f"ON r.workflow_id = w.id AND r.seq = w.seq WHERE w.id IN ({placeholders(len(chunk))})",
            chunk,
        ):
            run = None if row[width] is None else run_of(row[width:])
            found[row[0]] = (workflow_of(row[:width]), run)
    return found


def _keyed(db: sqlite3.Connection, keys: Sequence[str]) -> dict[str, str]:
    if not keys:
        return {}
    rows = db.execute(
        f"SELECT idempotency_key, id FROM workflows WHERE idempotency_key IN "
        f"({placeholders(len(keys))})",
        list(keys),
    )
    return {key: workflow_id for key, workflow_id in rows}


def _answered(db: sqlite3.Connection, request_ids: Sequence[str]) -> dict[str, Any]:
    if not request_ids:
        return {}
    rows = db.execute(
        f"SELECT request_id, reply FROM requests WHERE request_id IN "
        f"({placeholders(len(request_ids))})",
        list(request_ids),
    )
    return {request_id: json.loads(reply) for request_id, reply in rows}


class SQLiteStore:
    """A :class:`hms_mgmt.store.base.Store` in one SQLite file."""

    def __init__(self, url: str) -> None:
        self.path = path_of(url)
        # Named by its absolute path wherever it is logged or recorded (the vhost's record
        # above all): ``sqlite:///hms_mgmt.db`` means a different file in each folder.
        relative = self.path != ":memory:" and not os.path.isabs(self.path)
        self.url = f"sqlite:///{os.path.abspath(self.path)}" if relative else url
        self._thread: StoreThread | None = None
        self._connection: sqlite3.Connection | None = None
        # Checkpoints run on a thread and connection of their own: a checkpoint syncs the
        # file (7 to 40 ms here), and on the store's thread every commit waited behind it.
        # A PASSIVE checkpoint takes no lock a writer needs, so commits go on meanwhile.
        self._checkpointer: StoreThread | None = None
        self._checkpoint_connection: sqlite3.Connection | None = None
        self.identity = StoreIdentity("", b"", fresh=False)
        self._file: tuple[int, int] | None = None  # (device, inode) of the file we opened
        self._checkpointed_size = 0  # the file's size after our last complete checkpoint
        self._upkeep = 0
        self._owner: str | None = None  # the engine that claimed the store (fencing)
        self._held: int | None = None  # the descriptor holding the file's engine lock

    async def open(self) -> None:
        if self._thread is not None:
            return
        memory = self.path == ":memory:"
        try:
            if not memory:
                await asyncio.to_thread(make_folder, self.path)
            self._thread = StoreThread()
            self.identity = await self._in_thread(prepare)
            if not memory:
                stat = os.stat(self.path)
                self._file = (stat.st_dev, stat.st_ino)
                self._checkpointed_size = stat.st_size
                self._checkpointer = StoreThread()
                self._checkpoint_connection = await self._checkpointer.run(self._connect)
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
            problem = await self._in_thread(lambda db: self._upkeep_step(db, probe))
            if problem is None:
                await self._checkpoint()
            return problem
        except StoreError as exc:
            return exc

    def _upkeep_step(self, db: sqlite3.Connection, probe: bool) -> StoreError | None:
        """On the store's thread: prove a commit, spot truncation, hand back space."""
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
        return None

    async def _checkpoint(self) -> None:
        """Copy the WAL into the file, on the checkpoint thread, beside the commits."""
        thread, connection = self._checkpointer, self._checkpoint_connection
        if thread is None or connection is None:
            return

        def checkpoint() -> None:
            known, self._checkpointed_size = self._checkpointed_size, 0
            try:
                busy, frames, done = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except BaseException:
                self._checkpointed_size = known
                raise
            size = os.stat(self.path).st_size
            # Complete: the file holds everything, at its full size. Not (a backup reading
            # beside us, or a commit going on): it may have grown, but cannot have shrunk.
            self._checkpointed_size = size if busy == 0 and frames == done else max(known, size)

        try:
            await thread.run(checkpoint)
        except sqlite3.Error as exc:
            raise store_error(self.path, exc) from None

    async def claim(self, owner: str) -> None:
        def take(db: sqlite3.Connection) -> None:
            write(
                db, [("INSERT OR REPLACE INTO meta (key, value) VALUES ('owner', ?)", [(owner,)])]
            )

        await self._in_thread(take)
        self._owner = owner

    def _write(
        self, db: sqlite3.Connection, statements: list[tuple[str, list[tuple[Any, ...]]]]
    ) -> None:
        """One transaction, refused if another engine has claimed the store since we did."""
        write(db, statements, owner=self._owner)

    async def rescue(self) -> str:
        """A copy of what the (deleted or damaged) store holds, written under a partial name
        and renamed when whole, so that no one finds and moves back a half-written copy."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        destination, partial = f"{self.path}.rescued-{stamp}", f"{self.path}.rescuing-{stamp}"

        def copy(db: sqlite3.Connection) -> None:
            target = sqlite3.connect(partial)
            try:
                db.backup(target)
            finally:
                target.close()
            os.replace(partial, destination)

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
            marks = placeholders(len(ids))
            self._write(
                db,
                [
                    (f"DELETE FROM {table} WHERE {column} IN ({marks})", [tuple(ids)])
                    for table, column in (
                        ("step_runs", "workflow_id"),
                        ("history", "workflow_id"),
                        ("workflow_attributes", "workflow_id"),
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

    def _connect(self) -> sqlite3.Connection:
        """On the store's thread: the one connection, used only there."""
        return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)

    async def exclude_others(self, wait: float) -> None:
        if self.path == ":memory:" or self._held is not None:
            return
        try:
            await asyncio.to_thread(make_folder, self.path)
            self._held = await file_lock.hold(self.path, wait)
        except OSError as exc:
            raise StoreError(
                f"cannot open the store {self.path}: {exc.strerror or exc}", kind="unopenable"
            ) from None

    async def close(self) -> None:
        for thread, connection in (
            (self._checkpointer, self._checkpoint_connection),
            (self._thread, self._connection),
        ):
            if thread is not None:
                if connection is not None:
                    await thread.run(connection.close)
                await asyncio.to_thread(thread.stop)
        self._thread = self._connection = None
        self._checkpointer = self._checkpoint_connection = None
        if self._held is not None:  # after the connection: another engine may come in
            os.close(self._held)
            self._held = None

    async def discard(self) -> None:
        await self.close()
        if self._file is not None and self.identity.fresh:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.remove(self.path + suffix)

    async def _all(
        self, sql: str, params: Iterable[Any] = (), *, inline: bool = False
    ) -> list[Any]:
        values = tuple(params)
        return await self._in_thread(lambda db: db.execute(sql, values).fetchall(), inline=inline)

    async def definitions(self) -> list[WorkflowDefinition | UnloadableDefinition]:
        rows = await self._all("SELECT body, version FROM definitions ORDER BY name, version")
        return [load_stored(json.loads(body), version) for body, version in rows]

    async def save_definition(self, definition: WorkflowDefinition, now: float) -> None:
        row = (definition.name, definition.version, as_json(definition.to_json()), now)
        sql = "INSERT OR IGNORE INTO definitions (name, version, body, created_at) VALUES (?, ?, ?, ?)"
        await self._in_thread(lambda db: self._write(db, [(sql, [row])]))

    async def load(self, workflow_ids: Sequence[str]) -> dict[str, tuple[Workflow, StepRun | None]]:
        return await self._in_thread(lambda db: _loaded(db, workflow_ids))

    async def reads_for_batch(
        self, workflow_ids: Sequence[str], keys: Sequence[str], request_ids: Sequence[str]
    ) -> BatchReads:
        """Everything a batch needs from the store, in one trip to its thread."""

        def read(db: sqlite3.Connection) -> BatchReads:
            return BatchReads(
                _loaded(db, workflow_ids), _keyed(db, keys), _answered(db, request_ids)
            )

        few = len(workflow_ids) + len(keys) + len(request_ids) <= INLINE_READS  # a lone start's
        return await self._in_thread(read, inline=few)

    async def count_prefixed(self, prefixes: Sequence[str]) -> dict[str, int]:
        def read(db: sqlite3.Connection) -> dict[str, int]:
            sql = "SELECT count(*) FROM workflows WHERE id >= ? AND id < ?"  # the key's range
            return {p: db.execute(sql, prefix_range(p)).fetchone()[0] for p in prefixes}

        return await self._in_thread(read, inline=len(prefixes) <= 1)

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

        workflow_rows, run_rows = await self._in_thread(read, inline=True)  # one workflow
        if not workflow_rows:
            return None
        return workflow_of(workflow_rows[0]), [run_of(row) for row in run_rows]

    async def _in_thread(
        self, work: Callable[[sqlite3.Connection], T], *, inline: bool = False
    ) -> T:
        """Run several statements in one trip to the store's thread; SQLite errors as StoreError.

        The first trip opens the connection, there. ``inline``: small work, run on the
        loop's thread if the store's is idle (never on both at once: see StoreThread).
        """
        if self._thread is None:
            raise StoreError(f"the store {self.path} is not open")

        def run() -> T:
            if self._connection is None:
                self._connection = self._connect()
            return work(self._connection)

        try:
            return await self._thread.run(run, inline=inline)
        except sqlite3.Error as exc:
            raise store_error(self.path, exc) from None

    async def find_by_idempotency_key(self, keys: Sequence[str]) -> dict[str, str]:
        return await self._in_thread(lambda db: _keyed(db, keys))

    async def run(self, workflow_id: str, seq: int) -> StepRun | None:
        rows = await self._all(
            f"SELECT {RUN_COLUMNS} FROM step_runs WHERE workflow_id = ? AND seq = ?",
            (workflow_id, seq),
        )
        return run_of(rows[0]) if rows else None

    async def history(self, workflow_id: str) -> list[HistoryEntry]:
        rows = await self._all(
            "SELECT at, kind, detail FROM history WHERE workflow_id = ? ORDER BY id", (workflow_id,)
        )
        return [HistoryEntry(at, kind, json.loads(detail)) for at, kind, detail in rows]

    async def request_replies(self, request_ids: Sequence[str]) -> dict[str, Any]:
        return await self._in_thread(lambda db: _answered(db, request_ids))

    async def commit(self, batch: Batch) -> None:
        if not batch:
            return
        rows = statements(batch)
        # One trip to the store's thread for the whole transaction, not one per statement;
        # a small one (a lone workflow's) on the loop's thread, without the trip.
        small = sum(len(values) for _, values in rows) <= INLINE_ROWS
        await self._in_thread(lambda db: self._write(db, rows), inline=small)

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

    async def attributes(self, workflow_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {}
        ids = list(dict.fromkeys(workflow_ids))
        for start in range(0, len(ids), 500):  # under SQLite's limit on parameters
            chunk = ids[start : start + 500]
            rows = await self._all(
                "SELECT workflow_id, key, value FROM workflow_attributes "
                f"WHERE workflow_id IN ({placeholders(len(chunk))}) ORDER BY workflow_id, key",
                chunk,
                inline=len(chunk) == 1,  # one workflow's keys (a status or a finished wait)
            )
            for workflow_id, key, value in rows:
                found.setdefault(workflow_id, {})[key] = value
        return found

    async def list_workflows(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        limit: int = 50,
        attributes: Mapping[str, str] | None = None,
        before: tuple[float, str] | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[Workflow]:
        clause, params = listing(
            status=status,
            name=name,
            attributes=attributes,
            before=before,
            since=since,
            until=until,
        )
        rows = await self._all(
            f"SELECT {WORKFLOW_COLUMNS} FROM workflows {clause.replace('{}', '?')} "
            "ORDER BY created_at DESC, id DESC LIMIT ?",
            [*params, limit],
        )
        return [workflow_of(row) for row in rows]

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
            Schedule(i, w, c, tz, unjson(p), cu, n, ca, lt)
            for i, w, c, tz, p, cu, n, ca, lt in rows
        ]

    async def type_pauses(self) -> list[TypePause]:
        rows = await self._all(
            "SELECT workflow, step, since, reason FROM type_pauses ORDER BY workflow, step"
        )
        return [TypePause(w, step or None, since, reason) for w, step, since, reason in rows]

    async def stuck_counts(self, before: float) -> dict[tuple[str, str], int]:
        rows = await self._all(
            "SELECT w.name, r.step, count(*) FROM workflows w JOIN step_runs r "
            "ON r.workflow_id = w.id AND r.seq = w.seq "
            "WHERE w.status IN ('pending', 'running') AND r.status = 'pending' "
            "AND max(r.created_at, coalesce(r.due_at, 0)) < ? GROUP BY w.name, r.step",
            (before,),
        )
        return {(name, step): count for name, step, count in rows}

    async def limited_runs(self, name: str, step: str) -> list[str]:
        rows = await self._all(
            "SELECT w.id FROM workflows w JOIN step_runs r "
            "ON r.workflow_id = w.id AND r.seq = w.seq "
            "WHERE w.name = ? AND r.step = ? "
            "AND w.status NOT IN ('succeeded', 'failed', 'cancelled', 'compensated') "
            "AND r.status IN ('pending', 'running', 'queued')",
            (name, step),
        )
        return [workflow_id for (workflow_id,) in rows]

    async def overdue_timers(self, now: float) -> dict[tuple[str, str], float]:
        rows = await self._all(  # the partial index on timer_at: only the due rows are read
            "SELECT name, timer_kind, min(timer_at) FROM workflows "
            "WHERE timer_at IS NOT NULL AND timer_at <= ? GROUP BY name, timer_kind",
            (now,),
        )
        return {(name, kind): due for name, kind, due in rows}

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._all("SELECT status, count(*) FROM workflows GROUP BY status")
        return {status: count for status, count in rows}
