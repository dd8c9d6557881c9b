"""routilux-mp: routilux-style event-driven flows on a pool of worker processes.

Routines with slots and events, activation policies, flows and jobs, run on
long-lived worker processes; every worker's ``WorkerState`` lives in a state
server process, shared by all of them as JSON with atomic operations.

Code written for routilux 1.1.0 runs with the import prefix changed:
``routilux_mp.core`` and ``routilux_mp.exceptions`` mirror its modules, and
``routine`` (this package's submodule) is also callable as its ``@routine()``
decorator. ``docs/migrating.md`` lists the deliberate differences.
"""

# How the code is laid out (three processes, two seams):
# - The public model: routine, flow, activation_policies, job, error_handling, errors, monitoring/,
#   state (WorkerState), runtime (Runtime: a facade over the supervisor), cli. This file pulls them together.
# - The supervisor, in your process: _supervisor (what Runtime calls) composes _ledger (jobs, holds, retries;
#   its records in _records) and _loop (the dispatcher thread: _routing runs policies and routes emits,
#   _dispatch places activations on worker lanes, _timers, _lifecycle).
# - _exec/, the execution seam: base (WorkerBackend and its events), local (worker processes fed through
#   pipes; _child is such a process's loop), ray (lanes on a Ray cluster: _raysession connects, a _raylane
#   nanny actor per lane runs _raychild, the same loop on a socket), stub (lanes in the calling thread, for tests).
# - The worker side: _worker (ActivationRunner: runs logic, no transport of its own), _context.
# - _state/, the state seam: protocol, client (what WorkerState calls), server and store (the state-server
#   process), backend (StateBackend: where states are kept), launcher and service (the supervisor's side).
# - dashboard/ (optional, the [dashboard] extra; imported only when asked for): the live web page of a run,
#   a collector thread reading stats() and a Starlette app served by uvicorn in a thread of the supervisor.
# - Shared: _messages (wire messages; the one owner of error data), _process (spawning, signals, parent death).

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import activation_policies, errors, routine
from .error_handling import ErrorHandler, ErrorStrategy
from .errors import (
    ActivationError,
    ActivationTimeoutError,
    ClusterError,
    ConfigurationError,
    DashboardError,
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
from .job import ExecutionStatus, JobContext, JobStatus, get_current_job, get_current_job_id, job_of, jobs_of
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
    "job_of",
    "jobs_of",
    # modules (routine is also routilux's @routine() decorator)
    "activation_policies",
    "errors",
    "routine",
    "routine_class",
    # exceptions
    "ActivationError",
    "ActivationTimeoutError",
    "ClusterError",
    "ConfigurationError",
    "DashboardError",
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
