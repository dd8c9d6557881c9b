"""routilux 1.1.0's ``routilux.core.flow``."""

from ..errors import WorkerNotRunningError
from ..flow import Flow, RoutineConfig

__all__ = ["Flow", "RoutineConfig", "WorkerNotRunningError"]
