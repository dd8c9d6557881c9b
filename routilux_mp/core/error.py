"""routilux 1.1.0's ``routilux.core.error``."""

from ..error_handling import ErrorHandler, ErrorStrategy

__all__ = ["ErrorHandler", "ErrorStrategy"]
