"""routilux 1.1.0's ``routilux.core`` path: ``from routilux_mp.core import Flow, Routine, Runtime``.

The names are routilux-mp's own classes (the same objects as
``routilux_mp.Flow`` and so on); each submodule mirrors the routilux module
users import from (``core.routine``, ``core.flow``, ``core.runtime``,
``core.registry``, ``core.error``, ``core.context``, ``core.worker``,
``core.slot``, ``core.event``, ``core.connection``, ``core.status``).
``docs/migrating.md`` lists what routilux 1.1.0 exported here and routilux-mp
does not provide, and why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..error_handling import ErrorHandler, ErrorStrategy
from ..errors import SlotQueueFullError, WorkerNotRunningError
from ..flow import Connection, Flow, RoutineConfig
from ..job import ExecutionStatus, JobContext, JobStatus, get_current_job, get_current_job_id
from ..monitoring.flow_registry import FlowRegistry, get_flow_registry
from ..routine import Event, Routine, Slot
from ..state import WorkerState

if TYPE_CHECKING:
    from ..runtime import Runtime


def __getattr__(name: str) -> Any:
    # As in the top-level package: the supervisor is imported on first use only.
    if name == "Runtime":
        from ..runtime import Runtime

        return Runtime
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Connection",
    "ErrorHandler",
    "ErrorStrategy",
    "Event",
    "ExecutionStatus",
    "Flow",
    "FlowRegistry",
    "JobContext",
    "JobStatus",
    "Routine",
    "RoutineConfig",
    "Runtime",
    "Slot",
    "SlotQueueFullError",
    "WorkerNotRunningError",
    "WorkerState",
    "get_current_job",
    "get_current_job_id",
    "get_flow_registry",
]
