"""The whole grant flow in one process, on the in-memory bus: no broker needed.

``python -m examples.grant_approval.demo``. The engine runs in-process with
its state in a temporary SQLite file; the step service is the same one that
runs against RabbitMQ.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import hms_mgmt
from examples.grant_approval import service
from examples.grant_approval.workflow import WORKFLOW, inspect, sample_application
from hms_mgmt.logs import configure


async def main(count: int = 3) -> int:
    # The in-process engine's info lines would be noise here.
    configure(level=os.environ.get("HMS_LOG_LEVEL", "warning"))
    with tempfile.TemporaryDirectory() as folder:
        store_url = f"sqlite:///{Path(folder) / 'grant-demo.db'}"
        # One management object hosts the engine (store_url) and serves the handlers.
        mgmt = hms_mgmt.init(
            service_name="GrantDemo", broker_url="memory://grant-demo", store_url=store_url
        )
        mgmt.definitions.update(service.mgmt.definitions)
        mgmt.handlers.update(service.mgmt.handlers)
        async with mgmt:
            await mgmt.serve()
            started = [
                await mgmt.start(WORKFLOW, sample_application(n)) for n in range(1, count + 1)
            ]
            for s in started:  # each waits for its site inspection; the report resumes it
                await inspect(mgmt, s.workflow_id)
            states = [await mgmt.wait(s.workflow_id, timeout=30) for s in started]
            # One more whose payout fails: the credit hold placed by creditCheck is released.
            bounced = await mgmt.start(
                WORKFLOW, {**sample_application(count + 1), "payout_account": "closed"}
            )
            await inspect(mgmt, bounced.workflow_id)
            saga = await mgmt.wait(bounced.workflow_id, timeout=30)
    for state in states:
        print(state.describe())
    succeeded = sum(s.status == "succeeded" for s in states)
    print(f"{succeeded}/{count} grant workflows succeeded (in-memory bus, one process)")
    print(saga.describe())
    released = saga.steps[-1].output if saga.steps else None
    print(f"a grant whose payout failed: {saga.status}, credit hold released: {released}")
    return 0 if succeeded == count and saga.status == "compensated" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
