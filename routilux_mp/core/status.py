"""routilux 1.1.0's ``routilux.core.status``: status enums, each member equal to its plain string."""

from __future__ import annotations

import enum

from ..job import JobStatus

__all__ = ["ExecutionStatus", "JobStatus"]


class ExecutionStatus(str, enum.Enum):
    """A worker's status: ``worker_state.status == ExecutionStatus.RUNNING`` works.

    routilux-mp's ``WorkerState.status`` is one of ``STARTING``, ``RUNNING``,
    ``STOPPED`` (its runtime shut down) and ``FAILED`` (the runtime broke).
    ``PENDING``, ``IDLE``, ``PAUSED``, ``COMPLETED`` and ``CANCELLED`` are
    routilux 1.1.0's and never occur here: a routilux-mp worker serves jobs
    until its runtime stops; "all my jobs are done" is
    ``runtime.wait_until_all_jobs_finished(worker_id=...)``.
    """

    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"
    PENDING = "pending"
    IDLE = "idle"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        # Printed in lists and dicts it reads as the string it equals.
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
