"""routilux 1.1.0's ``routilux.core.runtime``."""

from ..runtime import Runtime

__all__ = ["Runtime"]
