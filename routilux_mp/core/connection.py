"""routilux 1.1.0's ``routilux.core.connection``."""

from ..flow import Connection

__all__ = ["Connection"]
