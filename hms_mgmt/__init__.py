"""HMS-MGMT: durable multi-step workflows over RabbitMQ.

>>> mgmt = hms_mgmt.init(service_name="GrantWorkflow")
>>> mgmt.define_workflow("grantApproval", ["validateApp", "creditCheck", "finalize"])
"""

from hms_mgmt.client import StartResult
from hms_mgmt.context import StepContext
from hms_mgmt.definitions import RetryPolicy, Step, WorkflowDefinition
from hms_mgmt.errors import (
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
    UnknownWorkflowError,
    WorkflowNotFoundError,
)
from hms_mgmt.management import Management, init
from hms_mgmt.records import StepRecord, StepStatus, WorkflowState, WorkflowStatus
from hms_mgmt.results import StepResult

__version__ = "0.1.0"

__all__ = (
    "DefinitionError",
    "EngineUnavailableError",
    "HmsError",
    "InvalidMessageError",
    "InvalidStateError",
    "Management",
    "NonRetryableError",
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
    "UnknownWorkflowError",
    "WorkflowDefinition",
    "WorkflowNotFoundError",
    "WorkflowState",
    "WorkflowStatus",
    "init",
)
