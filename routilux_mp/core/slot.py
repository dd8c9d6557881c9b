"""routilux 1.1.0's ``routilux.core.slot``."""

from ..errors import SlotQueueFullError
from ..routine import Slot

__all__ = ["Slot", "SlotQueueFullError"]
