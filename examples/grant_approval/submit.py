"""Submit grant applications and wait for their outcome.

``python -m examples.grant_approval.submit [count]``, with the engine and the
step service running.
"""

from __future__ import annotations

import asyncio
import sys
import time

import hms_mgmt
from examples.grant_approval.workflow import WORKFLOW, define, inspect, sample_application


async def submit(count: int, mgmt: hms_mgmt.Management) -> list[hms_mgmt.WorkflowState]:
    started = await asyncio.gather(
        *(mgmt.start(WORKFLOW, sample_application(n)) for n in range(1, count + 1))
    )
    # Each workflow waits for its site inspection; the inspector's report resumes it.
    await asyncio.gather(*(inspect(mgmt, s.workflow_id) for s in started))
    return list(await asyncio.gather(*(mgmt.wait(s.workflow_id, timeout=60) for s in started)))


async def main(count: int) -> int:
    async with hms_mgmt.init(service_name="GrantService") as mgmt:
        define(mgmt)
        began = time.perf_counter()
        states = await submit(count, mgmt)
        took = time.perf_counter() - began
    for state in states[:3]:
        print(state.describe())
    succeeded = sum(s.status == "succeeded" for s in states)
    print(f"{succeeded}/{count} grant workflows succeeded in {took:.2f}s")
    return 0 if succeeded == count else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
