"""routilux-mp: routilux-style event-driven flows on a pool of worker processes.

Routines with slots and events, activation policies, flows and jobs, run on
long-lived worker processes; every worker's ``WorkerState`` lives in a state
server process, shared by all of them as JSON with atomic operations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import activation_policies, errors
from .error_handling import ErrorHandler, ErrorStrategy
from .errors import (
    ActivationError,
    ActivationTimeoutError,
    FlowError,
    LockTimeoutError,
    ModifyTimeoutError,
    RoutiluxError,
    RuntimeBrokenError,
    RuntimeClosedError,
    SerializationError,
    SlotQueueFullError,
    StaleStateError,
    StateNotSerializableError,
    StateServerLostError,
    StateTooLargeError,
    WorkerCrashedError,
    WorkerMemoryError,
)
from .flow import Flow
from .job import JobContext, get_current_job
from .monitoring.flow_registry import FlowRegistry
from .routine import Event, Routine, Slot
from .state import WorkerState

if TYPE_CHECKING:
    from .runtime import Runtime

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Runtime pulls in the supervisor, which worker processes never need: importing
    # it on first use keeps a worker's start-up (it imports this package) short.
    if name == "Runtime":
        from .runtime import Runtime

        return Runtime
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [  # noqa: RUF022 - grouped by kind, sorted within a group
    # the core
    "Flow",
    "FlowRegistry",
    "Routine",
    "Runtime",
    "Slot",
    "Event",
    # state, jobs, errors
    "ErrorHandler",
    "ErrorStrategy",
    "JobContext",
    "WorkerState",
    "get_current_job",
    # modules
    "activation_policies",
    "errors",
    # exceptions
    "ActivationError",
    "ActivationTimeoutError",
    "FlowError",
    "LockTimeoutError",
    "ModifyTimeoutError",
    "RoutiluxError",
    "RuntimeBrokenError",
    "RuntimeClosedError",
    "SerializationError",
    "SlotQueueFullError",
    "StaleStateError",
    "StateNotSerializableError",
    "StateServerLostError",
    "StateTooLargeError",
    "WorkerCrashedError",
    "WorkerMemoryError",
    "__version__",
]
