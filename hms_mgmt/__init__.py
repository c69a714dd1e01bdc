"""HMS-MGMT: durable multi-step workflows over RabbitMQ.

>>> mgmt = hms_mgmt.init(service_name="GrantWorkflow")
>>> mgmt.define_workflow("grantApproval", ["validateApp", "creditCheck", "finalize"])

``init``, ``Management`` and ``StartResult`` are imported on first use, so that importing a
lower part (the pure state machine, the wire format, the store) does not load the client,
the step runtime and aio-pika with it.
"""

from typing import TYPE_CHECKING, Any

from hms_mgmt.context import StepContext
from hms_mgmt.definitions import Parallel, RetryPolicy, Step, WorkflowDefinition
from hms_mgmt.errors import (
    BrokerUnavailableError,
    DefinitionError,
    EngineUnavailableError,
    HmsError,
    InvalidMessageError,
    InvalidStateError,
    NonRetryableError,
    PayloadError,
    Retry,
    ScheduleNotFoundError,
    StepTimeout,
    UnknownStepError,
    UnknownWorkflowError,
    WorkflowNotFoundError,
    WorkflowTimeoutError,
)
from hms_mgmt.records import StepRecord, StepStatus, WorkflowState, WorkflowStatus
from hms_mgmt.results import StepResult

if TYPE_CHECKING:
    from hms_mgmt.client import StartResult
    from hms_mgmt.management import Management, init

__version__ = "0.1.0"

_LAZY = {"Management": "hms_mgmt.management", "init": "hms_mgmt.management"}
_LAZY["StartResult"] = "hms_mgmt.client"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hms_mgmt' has no attribute {name!r}")


__all__ = (
    "BrokerUnavailableError",
    "DefinitionError",
    "EngineUnavailableError",
    "HmsError",
    "InvalidMessageError",
    "InvalidStateError",
    "Management",
    "NonRetryableError",
    "Parallel",
    "PayloadError",
    "Retry",
    "RetryPolicy",
    "ScheduleNotFoundError",
    "StartResult",
    "Step",
    "StepContext",
    "StepRecord",
    "StepResult",
    "StepStatus",
    "StepTimeout",
    "UnknownStepError",
    "UnknownWorkflowError",
    "WorkflowDefinition",
    "WorkflowNotFoundError",
    "WorkflowState",
    "WorkflowStatus",
    "WorkflowTimeoutError",
    "init",
)
