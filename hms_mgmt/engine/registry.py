"""The workflow definitions the engine knows: every stored version, and the latest of each.

Step services and clients send their ``define_workflow``s as requests; defining one that
differs from the latest stores it as the next version and declares its queues first, so a
step message is never published to a queue that does not exist. A workflow runs on the
version it started with.
"""

from __future__ import annotations

from typing import Any

from bus_adapters.base import Bus, BusError
from hms_mgmt.definitions import UnloadableDefinition, WorkflowDefinition
from hms_mgmt.errors import HmsError, UnknownWorkflowError
from hms_mgmt.logs import get_logger
from hms_mgmt.records import Workflow
from hms_mgmt.store.base import Store
from hms_mgmt.topology import (
    DEFAULT_STEP_QUEUE_TYPE,
    ENGINE_QUEUES,
    declare_step,
    declare_workflow,
    dlq_name,
)

log = get_logger("engine")


class Registry:
    def __init__(
        self, bus: Bus, store: Store, step_queue_type: str | None = DEFAULT_STEP_QUEUE_TYPE
    ) -> None:
        self._bus = bus
        self.step_queue_type = step_queue_type
        self._store = store
        self.versions: dict[tuple[str, int], WorkflowDefinition] = {}
        self.latest: dict[str, WorkflowDefinition] = {}
        # Stored versions that no longer pass the checks, left out at start-up: their
        # workflows can only be cancelled (without compensation)
        self.left_out: dict[tuple[str, int], UnloadableDefinition] = {}

    async def load(self) -> None:
        """Every stored version, and the latest ones' queues declared."""
        for definition in await self._store.definitions():
            if isinstance(definition, UnloadableDefinition):  # the engine starts without it
                log.error(
                    "stored definition left out: it no longer passes the checks; "
                    "define the workflow again to start new ones, and cancel its workflows",
                    workflow=definition.name,
                    version=definition.version,
                    problem=definition.problem,
                )
                self.left_out[(definition.name, definition.version)] = definition
                continue
            self.remember(definition)
        for definition in self.latest.values():
            await declare_workflow(self._bus, definition, self.step_queue_type)

    def remember(self, definition: WorkflowDefinition) -> None:
        self.versions[(definition.name, definition.version)] = definition
        latest = self.latest.get(definition.name)
        if latest is None or latest.version < definition.version:
            self.latest[definition.name] = definition

    def of(self, workflow: Workflow) -> WorkflowDefinition:
        """The version a workflow runs on."""
        found = self.find(workflow)
        if found is None:
            left_out = self.left_out.get((workflow.name, workflow.version))
            if left_out is not None:
                raise UnknownWorkflowError(
                    f"workflow {workflow.name!r} version {workflow.version} was left out at "
                    f"start-up: its stored definition no longer passes the checks "
                    f"({left_out.problem}). Workflow {workflow.id} can only be cancelled, "
                    f"without compensation (hms workflow cancel {workflow.id}); define a fixed "
                    f"version of {workflow.name!r} to start new ones (a workflow keeps the "
                    "version it started with)"
                )
            raise UnknownWorkflowError(
                f"workflow {workflow.name!r} version {workflow.version} is not stored"
            )
        return found

    def find(self, workflow: Workflow) -> WorkflowDefinition | None:
        """The version a workflow runs on; None if it is not loaded (left out at start-up)."""
        return self.versions.get((workflow.name, workflow.version))

    def named(self, name: str) -> WorkflowDefinition:
        """The latest version of ``name``: what a new start runs on."""
        definition = self.latest.get(name)
        if definition is None:
            raise UnknownWorkflowError(
                f"workflow {name!r} is not defined: no step service or client has defined it "
                f"with this engine yet (known: {', '.join(sorted(self.latest)) or 'none'})"
            )
        return definition

    async def define(self, definition: WorkflowDefinition, now: float) -> dict[str, Any]:
        """Store ``definition`` as a new version unless the latest is the same; its answer."""
        latest = self.latest.get(definition.name)
        if latest is not None and latest.to_json() == definition.to_json():
            return {"name": latest.name, "version": latest.version}
        # After the latest version loaded, and after any left out: a version number is
        # never stored twice (the store keeps the first).
        versions = [v for (name, v) in self.left_out if name == definition.name]
        version = max([0 if latest is None else latest.version, *versions]) + 1
        definition = definition.with_version(version)
        try:
            await declare_workflow(self._bus, definition, self.step_queue_type)
        except BusError as exc:
            raise HmsError(f"cannot declare the queues of {definition.name!r}: {exc}") from exc
        await self._store.save_definition(definition, now)
        self.remember(definition)
        log.info(
            "workflow defined",
            workflow=definition.name,
            version=version,
            steps=definition.step_names,
        )
        return {"name": definition.name, "version": version}

    async def redeclare(self, routing_key: str) -> None:
        """Declare a step's queue again (an operator deleted or unbound it)."""
        workflow, _, step = routing_key.partition(".")
        if workflow in self.latest and step:
            await declare_step(self._bus, workflow, step, queue_type=self.step_queue_type)

    def dead_letter_queues(self) -> list[str]:
        """The ``.dlq`` of the engine's own queues and of every step of every known version."""
        queues = {dlq_name(queue) for queue in ENGINE_QUEUES}
        for definition in self.versions.values():
            queues.update(dlq_name(f"{definition.name}.{s.name}") for s in definition.all_steps)
        return sorted(queues)
