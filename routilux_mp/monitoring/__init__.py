"""Monitoring helpers (the seed page's ``routilux.monitoring`` path)."""

from .flow_registry import FlowRegistry, get_flow_registry

__all__ = ["FlowRegistry", "get_flow_registry"]
