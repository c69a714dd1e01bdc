"""What reading a child family's size costs (the bound ``machine.children.MAX_FAMILY``).

``.venv/bin/python benchmarks/family_count.py [--family 9999] [--others 20000] [--postgres URL]``

Stores a root with ``--family`` descendants (ids ``<root>.s.1.<n>``) beside ``--others``
unrelated workflows, in a fresh SQLite file (and, with ``--postgres``, a fresh database on
that server, dropped after), then times ``Store.count_prefixed`` for the root's prefix, the
read the engine makes once per root for a batch whose step starts children. Reports the
median and p99 of 200 reads, in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hms_mgmt import machine  # noqa: E402
from hms_mgmt.definitions import WorkflowDefinition  # noqa: E402
from hms_mgmt.machine.children import family_prefix  # noqa: E402
from hms_mgmt.store import open_store  # noqa: E402
from hms_mgmt.store.base import Batch, Store  # noqa: E402

DEFINITION = WorkflowDefinition.build("family", ["s"]).with_version(1)


async def seed(store: Store, root: str, family: int, others: int) -> None:
    ids = [root] + [f"{root}.s.1.{n}" for n in range(family)]
    ids += [uuid.uuid4().hex for _ in range(others)]
    for chunk in range(0, len(ids), 2000):
        batch = Batch()
        for workflow_id in ids[chunk : chunk + 2000]:
            t = machine.start(DEFINITION, workflow_id, {}, time.time())
            assert t.workflow is not None
            batch.workflows[workflow_id] = t.workflow
        await store.commit(batch)


async def timed(store: Store, root: str) -> tuple[float, float, int]:
    prefix = family_prefix(root)
    took, count = [], 0
    for _ in range(200):
        begun = time.perf_counter()
        count = (await store.count_prefixed([prefix]))[prefix]
        took.append((time.perf_counter() - begun) * 1000)
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.99) - 1], count


async def measure(url: str, name: str, family: int, others: int) -> None:
    store = open_store(url)
    await store.open()
    try:
        root = uuid.uuid4().hex
        await seed(store, root, family, others)
        median, p99, count = await timed(store, root)
        print(f"{name}: {count} ids under the root's prefix; {median:.2f} ms median, {p99:.2f} p99")
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=int, default=9999)
    parser.add_argument("--others", type=int, default=20000)
    parser.add_argument("--postgres", help="a server URL, e.g. postgresql://postgres@127.0.0.1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        await measure(f"sqlite:///{folder}/family.db", "SQLite", args.family, args.others)
    if args.postgres:
        import asyncpg

        database = f"hms_bench_{uuid.uuid4().hex[:8]}"
        server = await asyncpg.connect(f"{args.postgres.rstrip('/')}/postgres")
        await server.execute(f'CREATE DATABASE "{database}"')
        try:
            url = f"{args.postgres.rstrip('/')}/{database}"
            await measure(url, "PostgreSQL", args.family, args.others)
        finally:
            await server.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
            await server.close()


if __name__ == "__main__":
    asyncio.run(main())
