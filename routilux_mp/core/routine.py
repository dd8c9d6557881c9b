"""routilux 1.1.0's ``routilux.core.routine``."""

from ..routine import Routine

__all__ = ["Routine"]
