"""routilux-mp: routilux-style event-driven flows on a pool of worker processes.

Routines with slots and events, activation policies, flows and jobs, run on
long-lived worker processes; every worker's ``WorkerState`` lives in a state
server process, shared by all of them as JSON with atomic operations.

Code written for routilux 1.1.0 runs with the import prefix changed:
``routilux_mp.core`` and ``routilux_mp.exceptions`` mirror its modules, and
``routine`` (this package's submodule) is also callable as its ``@routine()``
decorator. ``docs/migrating.md`` lists the deliberate differences.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import activation_policies, errors, routine
from .error_handling import ErrorHandler, ErrorStrategy
from .errors import (
    ActivationError,
    ActivationTimeoutError,
    ConfigurationError,
    ExecutionError,
    FlowError,
    LockLostError,
    LockTimeoutError,
    ModifyTimeoutError,
    RoutiluxError,
    RuntimeBrokenError,
    RuntimeClosedError,
    SerializationError,
    SlotHandlerError,
    SlotQueueFullError,
    StaleStateError,
    StateError,
    StateFileError,
    StateNotSerializableError,
    StateServerLostError,
    StateTooLargeError,
    ValidationError,
    WorkerCrashedError,
    WorkerMemoryError,
    WorkerNotRunningError,
)
from .flow import Connection, Flow, RoutineConfig
from .job import ExecutionStatus, JobContext, JobStatus, get_current_job, get_current_job_id
from .monitoring.flow_registry import FlowRegistry, get_flow_registry
from .routine import Event, Routine, Slot
from .state import WorkerState

if TYPE_CHECKING:
    from .decorators import routine_class
    from .runtime import Runtime

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Runtime pulls in the supervisor, which worker processes never need (nor the
    # decorators): importing them on first use keeps a worker's start-up (it
    # imports this package) short.
    if name == "Runtime":
        from .runtime import Runtime

        return Runtime
    if name == "routine_class":
        from .decorators import routine_class

        return routine_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [  # noqa: RUF022 - grouped by kind, sorted within a group
    # the core
    "Connection",
    "Flow",
    "FlowRegistry",
    "Routine",
    "RoutineConfig",
    "Runtime",
    "Slot",
    "Event",
    "get_flow_registry",
    # state, jobs, errors
    "ErrorHandler",
    "ErrorStrategy",
    "ExecutionStatus",
    "JobContext",
    "JobStatus",
    "WorkerState",
    "get_current_job",
    "get_current_job_id",
    # modules (routine is also routilux's @routine() decorator)
    "activation_policies",
    "errors",
    "routine",
    "routine_class",
    # exceptions
    "ActivationError",
    "ActivationTimeoutError",
    "ConfigurationError",
    "ExecutionError",
    "FlowError",
    "LockLostError",
    "LockTimeoutError",
    "ModifyTimeoutError",
    "RoutiluxError",
    "RuntimeBrokenError",
    "RuntimeClosedError",
    "SerializationError",
    "SlotHandlerError",
    "SlotQueueFullError",
    "StaleStateError",
    "StateError",
    "StateFileError",
    "StateNotSerializableError",
    "StateServerLostError",
    "StateTooLargeError",
    "ValidationError",
    "WorkerCrashedError",
    "WorkerMemoryError",
    "WorkerNotRunningError",
    "__version__",
]
