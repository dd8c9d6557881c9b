"""routilux 1.1.0's ``routilux.core.event``."""

from ..routine import Event

__all__ = ["Event"]
