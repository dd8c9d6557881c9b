"""routilux 1.1.0's ``routilux.core.worker``."""

from ..state import WorkerState

__all__ = ["WorkerState"]
