"""routilux 1.1.0's ``routilux.core.registry``."""

from ..monitoring.flow_registry import FlowRegistry, get_flow_registry

__all__ = ["FlowRegistry", "get_flow_registry"]
