"""routilux 1.1.0's ``routilux.core.context``."""

from ..job import JobContext, get_current_job, get_current_job_id

__all__ = ["JobContext", "get_current_job", "get_current_job_id"]
