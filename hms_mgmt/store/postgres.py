"""The PostgreSQL store (asyncpg): the SQLite store's tables and meaning, in a database.

``HMS_STORE_URL=postgresql://user:password@host:5432/db`` (or ``postgres://``), with the
``postgres`` extra installed (``pip install 'hms-mgmt[postgres]'``, which brings asyncpg).
The database must exist; the store creates its tables in it (in the connection's
``search_path``, usually ``public``). One engine writes it, as with SQLite: the vhost's
lock still says which one, and every write checks, in its own transaction, that no other
engine has claimed the store since (``meta.owner``, read ``FOR SHARE``; a claim updates it).

A batch is one transaction and one round trip: ``hms_commit``, a function the schema
defines, takes one array per column of each table (rows go in with ``unnest``), checks the
owner and writes every table in one statement, prepared once per connection by asyncpg's
statement cache. With a round trip per statement instead (begin, fence, one per table,
commit) one engine on PostgreSQL ran 70% of SQLite's workflows/s here; with hms_commit, 88
to 95% (three pairs of ``benchmarks/hms.py --n 2000 --runs 3`` on a busy two-core machine).

The schema, its migrations and ``hms_commit`` are in :mod:`hms_mgmt.store.postgres_schema`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from bus_adapters.base import redact_url
from hms_mgmt.definitions import UnloadableDefinition, WorkflowDefinition, load_stored
from hms_mgmt.errors import StoreError
from hms_mgmt.records import StepRun, TypePause, Workflow
from hms_mgmt.schedules import Schedule
from hms_mgmt.store.base import (
    Batch,
    BatchReads,
    HistoryEntry,
    OutboxRow,
    StoreIdentity,
    prefix_range,
)
from hms_mgmt.store.postgres_schema import (
    COMMAND_TIMEOUT,
    COMMIT,
    CONNECT_TIMEOUT,
    FENCE,
    IDLE_IN_TRANSACTION,
    POOL_SIZE,
    TABLES,
    TAKEN,
    affected,
    commit_arguments,
    prepare,
)
from hms_mgmt.store.rows import (
    FINISHED,
    RUN_COLUMNS,
    WORKFLOW_AND_RUN,
    WORKFLOW_COLUMNS,
    WORKFLOW_WIDTH,
    as_json,
    listing,
    run_of,
    unjson,
    workflow_of,
)


class PostgresStore:
    """A :class:`hms_mgmt.store.base.Store` in a PostgreSQL database, through asyncpg."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = redact_url(url)
        self.identity = StoreIdentity("", b"", fresh=False)
        self._pool: Any = None
        self._errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)
        self._owner: str | None = None  # the engine that claimed the store (fencing)
        self._byte_ordered: bool | None = None  # the database's collation sorts ids by bytes

    # -- opening and closing ----------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            import asyncpg
        except ImportError:
            raise StoreError(
                f"cannot open the store {self.where}: the PostgreSQL store needs asyncpg "
                "(pip install 'hms-mgmt[postgres]')",
                kind="unopenable",
            ) from None
        # InternalClientError: a connection the server cut while the driver was using it.
        self._errors = (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
            OSError,
            TimeoutError,
        )
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=POOL_SIZE,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={
                    "application_name": "hms-mgmt",
                    # A session frozen inside a transaction (SIGSTOP between its statements)
                    # would hold its FOR SHARE on the owner row, and a standby's claim would
                    # wait for it for ever: the server ends such a session after this.
                    "idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION,
                },
            )
        except (*self._errors, ValueError) as exc:
            raise StoreError(
                f"cannot open the store {self.where}: {_reason(exc)}", kind="unopenable"
            ) from None
        try:
            async with self._connection() as db:
                self.identity = await prepare(db)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, StoreError) and self.where not in str(exc):
                raise StoreError(
                    f"cannot use the store {self.where}: {exc}", kind=exc.kind
                ) from None
            raise

    async def exclude_others(self, wait: float) -> None:
        """Engines share a PostgreSQL store: one is active, the others stand by."""

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await pool.close()  # waits for connections in use (bounded by COMMAND_TIMEOUT)
        except Exception:  # a connection already lost: nothing left to close cleanly
            pool.terminate()
        except BaseException:
            pool.terminate()
            raise

    async def discard(self) -> None:
        """Drop the tables this process has just created (a refused start); the database stays."""
        if self._pool is not None and self.identity.fresh:
            with contextlib.suppress(StoreError):
                async with self._connection() as db:
                    await db.execute(f"DROP TABLE IF EXISTS {', '.join(TABLES)}")
                    await db.execute("DROP FUNCTION IF EXISTS hms_commit")
        await self.close()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A connection of the pool; the driver's and the network's errors as StoreError."""
        if self._pool is None:
            raise StoreError(f"the store {self.where} is not open")
        try:
            async with self._pool.acquire(timeout=COMMAND_TIMEOUT) as db:
                yield db
        except self._errors as exc:
            raise _store_error(self.where, exc) from None

    # -- what the engine watches -------------------------------------------------------------

    def check_file(self) -> StoreError | None:
        """Nothing to check: a PostgreSQL commit that returned is durable in the database."""
        return None

    async def watch(self, *, probe: bool) -> StoreError | None:
        """With ``probe``, commit a tiny fenced write; the server does its own upkeep (autovacuum)."""
        if not probe:
            return None
        try:
            await self._write(
                [
                    (
                        "INSERT INTO meta (key, value) VALUES ('probe', $1) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        [repr(time.time())],
                    )
                ]
            )
        except StoreError as exc:
            return exc
        return None

    async def rescue(self) -> str:
        raise StoreError(
            f"the store {self.where} is a database, not a file: there is nothing to rescue "
            "(back it up with pg_dump)"
        )

    async def size(self) -> int:
        """Bytes of the store's tables, with their indexes and TOAST."""
        async with self._connection() as db:
            total = await db.fetchval(
                "SELECT coalesce(sum(pg_total_relation_size(to_regclass(t))), 0)::bigint "
                "FROM unnest($1::text[]) AS t",
                list(TABLES),
            )
        return int(total)

    # -- ownership (fencing) -------------------------------------------------------------------

    async def claim(self, owner: str) -> None:
        async with self._connection() as db:
            await db.execute(
                "INSERT INTO meta (key, value) VALUES ('owner', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                owner,
            )
        self._owner = owner

    async def owner(self) -> str | None:
        async with self._connection() as db:
            value = await db.fetchval("SELECT value FROM meta WHERE key = 'owner'")
        return None if value is None else str(value)

    async def _write(self, work: list[tuple[str, list[Any]]]) -> list[str]:
        """One transaction, refused if another engine has claimed the store since we did."""
        async with self._connection() as db, db.transaction():
            await self._fence(db)
            return [await db.execute(sql, *args) for sql, args in work]

    async def _fence(self, db: Any) -> None:
        if self._owner is None:
            return
        owner = await db.fetchval(FENCE)
        if owner != self._owner:
            raise _taken(owner or "unknown")

    # -- writes ----------------------------------------------------------------------------

    async def commit(self, batch: Batch) -> None:
        """The batch in one statement (``hms_commit``), fenced: one round trip."""
        if not batch:
            return
        arguments = commit_arguments(batch, self._owner)  # encoded before taking a connection
        async with self._connection() as db:
            try:
                await db.execute(COMMIT, *arguments)
            except self._errors[0] as exc:  # asyncpg.PostgresError
                if getattr(exc, "sqlstate", None) == TAKEN:
                    raise _taken(str(getattr(exc, "message", exc))) from None
                raise

    async def save_definition(self, definition: WorkflowDefinition, now: float) -> None:
        await self._write(
            [
                (
                    "INSERT INTO definitions (name, version, body, created_at) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    [definition.name, definition.version, as_json(definition.to_json()), now],
                )
            ]
        )

    async def prune(self, before: float, limit: int) -> int:
        async with self._connection() as db, db.transaction():
            await self._fence(db)
            ids = [
                row[0]
                for row in await db.fetch(
                    f"SELECT id FROM workflows WHERE {FINISHED} AND updated_at < $1 LIMIT $2",
                    before,
                    limit,
                )
            ]
            if ids:
                await db.execute("DELETE FROM step_runs WHERE workflow_id = ANY($1::text[])", ids)
                await db.execute("DELETE FROM history WHERE workflow_id = ANY($1::text[])", ids)
                await db.execute(
                    "DELETE FROM workflow_attributes WHERE workflow_id = ANY($1::text[])", ids
                )
                await db.execute("DELETE FROM workflows WHERE id = ANY($1::text[])", ids)
        return len(ids)

    async def forget_requests(self, before: float, limit: int = 1000) -> int:
        (status,) = await self._write(
            [
                (
                    "DELETE FROM requests WHERE request_id IN "
                    "(SELECT request_id FROM requests WHERE at < $1 LIMIT $2)",
                    [before, limit],
                )
            ]
        )
        return affected(status)

    # -- reads -----------------------------------------------------------------------------

    async def _all(self, sql: str, *args: Any) -> list[Any]:
        async with self._connection() as db:
            return list(await db.fetch(sql, *args))

    async def definitions(self) -> list[WorkflowDefinition | UnloadableDefinition]:
        rows = await self._all("SELECT body, version FROM definitions ORDER BY name, version")
        return [load_stored(unjson(body), version) for body, version in rows]

    async def load(self, workflow_ids: Sequence[str]) -> dict[str, tuple[Workflow, StepRun | None]]:
        async with self._connection() as db:
            return await _loaded(db, workflow_ids)

    async def reads_for_batch(
        self, workflow_ids: Sequence[str], keys: Sequence[str], request_ids: Sequence[str]
    ) -> BatchReads:
        async with self._connection() as db:
            return BatchReads(
                await _loaded(db, workflow_ids),
                await _keyed(db, keys),
                await _answered(db, request_ids),
            )

    async def count_prefixed(self, prefixes: Sequence[str]) -> dict[str, int]:
        """A range of the primary key in byte order: under a database collation that sorts
        so (C, POSIX, C.UTF-8) an index range scan; under another, the range compared with
        ``COLLATE "C"``, which is right but reads every id (the index sorts otherwise)."""
        counts = {}
        async with self._connection() as db:
            if self._byte_ordered is None:
                collation = await db.fetchval(
                    "SELECT datcollate FROM pg_database WHERE datname = current_database()"
                )
                self._byte_ordered = str(collation).split(".")[0] in ("C", "POSIX")
            collate = "" if self._byte_ordered else ' COLLATE "C"'
            sql = f"SELECT count(*) FROM workflows WHERE id >= $1{collate} AND id < $2{collate}"
            for prefix in prefixes:
                counts[prefix] = await db.fetchval(sql, *prefix_range(prefix))
        return counts

    async def find_by_idempotency_key(self, keys: Sequence[str]) -> dict[str, str]:
        async with self._connection() as db:
            return await _keyed(db, keys)

    async def request_replies(self, request_ids: Sequence[str]) -> dict[str, Any]:
        async with self._connection() as db:
            return await _answered(db, request_ids)

    async def workflow_with_runs(self, workflow_id: str) -> tuple[Workflow, list[StepRun]] | None:
        async with self._connection() as db:
            workflow = await db.fetchrow(
                f"SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE id = $1", workflow_id
            )
            if workflow is None:
                return None
            runs = await db.fetch(
                f"SELECT {RUN_COLUMNS} FROM step_runs WHERE workflow_id = $1 ORDER BY seq",
                workflow_id,
            )
        return workflow_of(workflow), [run_of(row) for row in runs]

    async def run(self, workflow_id: str, seq: int) -> StepRun | None:
        rows = await self._all(
            f"SELECT {RUN_COLUMNS} FROM step_runs WHERE workflow_id = $1 AND seq = $2",
            workflow_id,
            seq,
        )
        return run_of(rows[0]) if rows else None

    async def history(self, workflow_id: str) -> list[HistoryEntry]:
        rows = await self._all(
            "SELECT at, kind, detail FROM history WHERE workflow_id = $1 ORDER BY id", workflow_id
        )
        return [HistoryEntry(at, kind, unjson(detail)) for at, kind, detail in rows]

    async def unsent(self) -> list[OutboxRow]:
        rows = await self._all(
            "SELECT message_id, exchange, routing_key, body, headers, created_at FROM outbox "
            "ORDER BY created_at"
        )
        return [
            OutboxRow(mid, exchange, key, bytes(body), unjson(headers), created)
            for mid, exchange, key, body, headers, created in rows
        ]

    async def due_timers(self, until: float, limit: int) -> list[tuple[str, str, float]]:
        rows = await self._all(
            "SELECT id, timer_kind, timer_at FROM workflows WHERE timer_at IS NOT NULL "
            "AND timer_at <= $1 ORDER BY timer_at LIMIT $2",
            until,
            limit,
        )
        return [(row[0], row[1], row[2]) for row in rows]

    async def attributes(self, workflow_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        if not workflow_ids:
            return {}
        rows = await self._all(
            "SELECT workflow_id, key, value FROM workflow_attributes "
            "WHERE workflow_id = ANY($1::text[]) ORDER BY workflow_id, key",
            list(dict.fromkeys(workflow_ids)),
        )
        found: dict[str, dict[str, str]] = {}
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
        numbered = clause.split("{}")  # $1, $2, ... in the order of the parameters
        clause = "".join(f"{part}${n}" for n, part in enumerate(numbered[:-1], 1)) + numbered[-1]
        params.append(limit)
        rows = await self._all(
            f"SELECT {WORKFLOW_COLUMNS} FROM workflows {clause} "
            f"ORDER BY created_at DESC, id DESC LIMIT ${len(params)}",
            *params,
        )
        return [workflow_of(row) for row in rows]

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._all("SELECT status, count(*) FROM workflows GROUP BY status")
        return {status: count for status, count in rows}

    async def stuck_counts(self, before: float) -> dict[tuple[str, str], int]:
        rows = await self._all(
            "SELECT w.name, r.step, count(*) FROM workflows w JOIN step_runs r "
            "ON r.workflow_id = w.id AND r.seq = w.seq "
            "WHERE w.status IN ('pending', 'running') AND r.status = 'pending' "
            "AND greatest(r.created_at, coalesce(r.due_at, 0)) < $1 GROUP BY w.name, r.step",
            before,
        )
        return {(name, step): count for name, step, count in rows}

    async def limited_runs(self, name: str, step: str) -> list[str]:
        rows = await self._all(
            "SELECT w.id FROM workflows w JOIN step_runs r "
            "ON r.workflow_id = w.id AND r.seq = w.seq "
            "WHERE w.name = $1 AND r.step = $2 "
            "AND w.status NOT IN ('succeeded', 'failed', 'cancelled', 'compensated') "
            "AND r.status IN ('pending', 'running', 'queued')",
            name,
            step,
        )
        return [workflow_id for (workflow_id,) in rows]

    async def overdue_timers(self, now: float) -> dict[tuple[str, str], float]:
        rows = await self._all(  # the partial index on timer_at: only the due rows are read
            "SELECT name, timer_kind, min(timer_at) FROM workflows "
            "WHERE timer_at IS NOT NULL AND timer_at <= $1 GROUP BY name, timer_kind",
            now,
        )
        return {(name, kind): due for name, kind, due in rows}

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


async def _loaded(
    db: Any, workflow_ids: Sequence[str]
) -> dict[str, tuple[Workflow, StepRun | None]]:
    if not workflow_ids:
        return {}
    rows = await db.fetch(
        f"SELECT {WORKFLOW_AND_RUN} FROM workflows w LEFT JOIN step_runs r "
        "ON r.workflow_id = w.id AND r.seq = w.seq WHERE w.id = ANY($1::text[])",
        list(dict.fromkeys(workflow_ids)),
    )
    found: dict[str, tuple[Workflow, StepRun | None]] = {}
    for record in rows:
        row = tuple(record)
        run = None if row[WORKFLOW_WIDTH] is None else run_of(row[WORKFLOW_WIDTH:])
        found[row[0]] = (workflow_of(row[:WORKFLOW_WIDTH]), run)
    return found


async def _keyed(db: Any, keys: Sequence[str]) -> dict[str, str]:
    if not keys:
        return {}
    rows = await db.fetch(
        "SELECT idempotency_key, id FROM workflows WHERE idempotency_key = ANY($1::text[])",
        list(keys),
    )
    return {key: workflow_id for key, workflow_id in rows}


async def _answered(db: Any, request_ids: Sequence[str]) -> dict[str, Any]:
    if not request_ids:
        return {}
    rows = await db.fetch(
        "SELECT request_id, reply FROM requests WHERE request_id = ANY($1::text[])",
        list(request_ids),
    )
    return {request_id: unjson(reply) for request_id, reply in rows}


def _taken(owner: str) -> StoreError:
    return StoreError(
        f"another engine ({owner}) has taken over this store while this one was cut off; "
        "this engine must stop",
        kind="taken",
        lasting=True,
    )


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    name = type(exc).__name__
    if name == "InvalidCatalogNameError":
        return f"{text} (create it first: createdb, or CREATE DATABASE)"
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:.0f} s"
    return text


def _store_error(where: str, exc: BaseException) -> StoreError:
    """What a driver or network error says about the store, in words an operator can act on."""
    name = type(exc).__name__
    text = str(exc) or name
    if name == "DiskFullError":
        return StoreError(f"the disk of the store {where} is full ({text})", kind="full")
    if name in ("ReadOnlySQLTransactionError", "InsufficientPrivilegeError"):
        return StoreError(f"the store {where} cannot be written ({text})", kind="read_only")
    if isinstance(exc, TimeoutError):
        return StoreError(f"the store {where} did not answer within {COMMAND_TIMEOUT:.0f} s")
    return StoreError(f"the store {where} failed: {name}: {text}", kind="io")
