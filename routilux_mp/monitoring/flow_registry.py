"""The process-wide registry of named flows."""

from __future__ import annotations

import logging
import threading
import weakref

from ..errors import FlowError
from ..flow import Flow

__all__ = ["FlowRegistry", "get_flow_registry"]

logger = logging.getLogger("routilux_mp.flow_registry")


class FlowRegistry:
    """Named flows, shared by every runtime in this process. Use :meth:`get_instance`.

    Besides the names given to :meth:`register_by_name`, every :class:`Flow`
    is known by its ``flow_id`` while it exists (a weak reference, as in
    routilux 1.1.0): :meth:`get` and ``Runtime.exec``/``post`` find it by
    either, a registered name first.
    """

    _instance: FlowRegistry | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._flows: dict[str, Flow] = {}
        self._by_id: weakref.WeakValueDictionary[str, Flow] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    @classmethod
    def get_instance(cls) -> FlowRegistry:
        """The singleton registry."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def register_by_name(self, name: str, flow: Flow) -> None:
        """Register ``flow`` as ``name``; registering a name again replaces it (with a warning)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"flow name must be a non-empty string, got {name!r}")
        if not isinstance(flow, Flow):
            raise TypeError(f"register_by_name() needs a Flow, got {flow!r}")
        with self._lock:
            old = self._flows.get(name)
            self._flows[name] = flow
        if old is not None and old is not flow:
            logger.warning("flow %r was registered again; the new flow replaces the old one", name)

    def register(self, flow: Flow) -> None:
        """Register ``flow`` under its ``flow_id``."""
        self.register_by_name(flow.flow_id, flow)

    def _remember(self, flow: Flow) -> None:
        """Know ``flow`` by its ``flow_id`` while it exists (every new Flow calls this)."""
        with self._lock:
            self._by_id[flow.flow_id] = flow

    def get_by_name(self, name: str) -> Flow | None:
        """The flow registered as ``name``, or ``None``."""
        with self._lock:
            return self._flows.get(name)

    def get(self, name: str) -> Flow:
        """The flow registered as ``name``, else the live flow whose ``flow_id`` it is.

        Unlike routilux 1.1.0 (which returned ``None``), an unknown name raises
        ``ValueError`` (:class:`~routilux_mp.errors.FlowError`) naming the
        registered flows; use :meth:`get_by_name` for ``None``.
        """
        flow = self._flows.get(name)  # a dict read is atomic; the lock guards writers
        if flow is None:
            with self._lock:
                flow = self._by_id.get(name)
        if flow is None:
            listed = ", ".join(repr(n) for n in self.list_names()) or "none"
            raise FlowError(f"no flow is registered as {name!r} (registered: {listed}); register it with "
                            "FlowRegistry.get_instance().register_by_name(name, flow), or keep the Flow object "
                            "alive to find it by its flow_id")
        return flow

    def list_all(self) -> list[Flow]:
        """Every flow this process knows, registered by name or alive under its ``flow_id``."""
        with self._lock:
            flows = list(self._flows.values())
            flows += [f for f in self._by_id.values() if all(f is not g for g in flows)]
        return flows

    def unregister_by_name(self, name: str) -> bool:
        """Forget ``name``; returns whether it was registered."""
        with self._lock:
            return self._flows.pop(name, None) is not None

    def list_names(self) -> list[str]:
        """Registered names, sorted."""
        with self._lock:
            return sorted(self._flows)

    def clear(self) -> None:
        """Forget every flow (handy in tests and notebooks)."""
        with self._lock:
            self._flows.clear()
            self._by_id.clear()


def get_flow_registry() -> FlowRegistry:
    """The process's :class:`FlowRegistry` (routilux 1.1.0's shortcut for ``FlowRegistry.get_instance()``)."""
    return FlowRegistry.get_instance()
