"""The workflows in flight, kept in memory between batches so most events need no store read.

Only a workflow with a step out or a timer due soon is kept: a workflow parked on a
far timer or a signal, or finished, is left to the store. The engine's memory thus grows
with the work in flight, however many workflows wait for months.
"""

from __future__ import annotations

from collections import OrderedDict

from hms_mgmt.records import StepRun, StepStatus, Workflow

Loaded = tuple[Workflow, StepRun | None]


class InFlight:
    def __init__(self, size: int = 20_000) -> None:
        self.size = size
        self._kept: OrderedDict[str, Loaded] = OrderedDict()

    def __contains__(self, workflow_id: object) -> bool:
        return workflow_id in self._kept

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, workflow_id: str) -> Loaded | None:
        return self._kept.get(workflow_id)

    def drop(self, workflow_id: str) -> None:
        self._kept.pop(workflow_id, None)

    def update(self, state: dict[str, Loaded], horizon: float) -> None:
        """After a commit: keep what is still in flight, forget the rest; oldest go first."""
        for workflow_id, (workflow, run) in state.items():
            if in_flight(workflow, run, horizon):
                self._kept[workflow_id] = (workflow, run)
                self._kept.move_to_end(workflow_id)
            else:
                self._kept.pop(workflow_id, None)
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)


def in_flight(workflow: Workflow, run: StepRun | None, horizon: float) -> bool:
    """Whether a workflow is worth keeping in memory: a step out, or a timer due by ``horizon``."""
    if workflow.terminal:
        return False
    if run is not None and run.status in (StepStatus.PENDING, StepStatus.RUNNING):
        return True
    return workflow.timer_at is not None and workflow.timer_at <= horizon
