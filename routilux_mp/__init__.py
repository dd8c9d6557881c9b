"""routilux-mp: routilux-style event-driven flows on a pool of worker processes.

Routines with slots and events, activation policies, flows and jobs, run on
long-lived worker processes; every worker's ``WorkerState`` lives in a state
server process, shared by all of them as JSON with atomic operations.
"""

from __future__ import annotations

from . import activation_policies, errors
from .error_handling import ErrorHandler, ErrorStrategy
from .errors import (
    ActivationError,
    ActivationTimeoutError,
    FlowError,
    LockTimeoutError,
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
from .runtime import Runtime
from .state import WorkerState

__version__ = "0.1.0"

__all__ = [
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
