"""routilux 1.1.0's ``routilux.core.status``: status enums, each member equal to its plain string."""

from ..job import ExecutionStatus, JobStatus

__all__ = ["ExecutionStatus", "JobStatus"]
