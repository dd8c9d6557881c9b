"""Monitoring helpers (the seed page's ``routilux.monitoring`` path)."""

from .flow_registry import FlowRegistry

__all__ = ["FlowRegistry"]
