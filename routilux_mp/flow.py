"""Flows: routines wired together, event -> slot."""

from __future__ import annotations

import uuid
from typing import Any

from .error_handling import ErrorHandler
from .errors import FlowError
from .routine import Routine

__all__ = ["Connection", "Flow"]


def _names(items: Any) -> str:
    names = ", ".join(repr(n) for n in items)
    return names or "none"


class Connection:
    """``source_id.event`` feeds ``target_id.slot``."""

    __slots__ = ("event", "slot", "source_id", "target_id")

    def __init__(self, source_id: str, event: str, target_id: str, slot: str) -> None:
        self.source_id = source_id
        self.event = event
        self.target_id = target_id
        self.slot = slot

    def __repr__(self) -> str:
        return f"{self.source_id}.{self.event} -> {self.target_id}.{self.slot}"


class Flow:
    """A graph of routines. Register it with ``FlowRegistry`` and run it with ``Runtime``.

    Args:
        flow_id: a name for the flow; a random one when omitted.
    """

    def __init__(self, flow_id: str | None = None) -> None:
        self.flow_id = flow_id if flow_id is not None else f"flow-{uuid.uuid4().hex[:8]}"
        self.routines: dict[str, Routine] = {}
        self.connections: list[Connection] = []
        self.error_handler: ErrorHandler | None = None

    def add_routine(self, routine: Routine, routine_id: str | None = None) -> str:
        """Add ``routine`` under ``routine_id`` (a fresh id when omitted) and return the id."""
        if not isinstance(routine, Routine):
            raise TypeError(f"add_routine() needs a Routine instance, got {routine!r}")
        if routine_id is None:
            routine_id = f"{type(routine).__name__.lower()}_{len(self.routines) + 1}"
        if not isinstance(routine_id, str) or not routine_id:
            raise TypeError(f"routine_id must be a non-empty string, got {routine_id!r}")
        if routine_id in self.routines:
            raise FlowError(f"flow {self.flow_id!r} already has a routine {routine_id!r}")
        self.routines[routine_id] = routine
        return routine_id

    def get_routine(self, routine_id: str) -> Routine:
        """The routine with this id; ``ValueError`` naming the ids that exist otherwise."""
        try:
            return self.routines[routine_id]
        except KeyError:
            raise FlowError(
                f"flow {self.flow_id!r} has no routine {routine_id!r} (routines: {_names(self.routines)})"
            ) from None

    def check_slot(self, routine_id: str, slot: str) -> None:
        """Raise ``ValueError`` unless ``routine_id.slot`` exists."""
        routine = self.get_routine(routine_id)
        if slot not in routine._slots:
            raise FlowError(
                f"routine {routine_id!r} of flow {self.flow_id!r} has no slot {slot!r} "
                f"(slots: {_names(routine._slots)})"
            )

    def connect(self, source_id: str, event: str, target_id: str, slot: str) -> Connection:
        """Connect ``source_id``'s ``event`` to ``target_id``'s ``slot``."""
        source = self.get_routine(source_id)
        if event not in source._events:
            raise FlowError(
                f"routine {source_id!r} of flow {self.flow_id!r} has no event {event!r} "
                f"(events: {_names(source._events)})"
            )
        self.check_slot(target_id, slot)
        for conn in self.connections:
            if (conn.source_id, conn.event, conn.target_id, conn.slot) == (source_id, event, target_id, slot):
                raise FlowError(f"{conn!r} is already connected in flow {self.flow_id!r}")
        conn = Connection(source_id, event, target_id, slot)
        self.connections.append(conn)
        return conn

    def set_error_handler(self, handler: ErrorHandler | None) -> None:
        """The error handler of routines that have none of their own."""
        if handler is not None and not isinstance(handler, ErrorHandler):
            raise TypeError(f"expected an ErrorHandler, got {handler!r}")
        self.error_handler = handler

    def entry_slots(self) -> list[tuple[str, str]]:
        """``(routine_id, slot)`` pairs that no connection feeds."""
        fed = {(c.target_id, c.slot) for c in self.connections}
        return [(rid, s) for rid, r in self.routines.items() for s in r._slots if (rid, s) not in fed]

    def validate(self) -> None:
        """Check the flow can run: every routine has logic."""
        if not self.routines:
            raise FlowError(f"flow {self.flow_id!r} has no routines: add some with add_routine()")
        for rid, routine in self.routines.items():
            if routine._logic is None:
                raise FlowError(f"routine {rid!r} of flow {self.flow_id!r} has no logic: call set_logic() in its __init__")

    def __repr__(self) -> str:
        return f"<Flow {self.flow_id!r} routines={list(self.routines)} connections={self.connections}>"
