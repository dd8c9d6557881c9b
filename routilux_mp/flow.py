"""Flows: routines wired together, event -> slot."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from .error_handling import ErrorHandler
from .errors import FlowError
from .routine import Event, Routine, Slot

__all__ = ["Connection", "Flow", "RoutineConfig"]

logger = logging.getLogger("routilux_mp.flow")


def _names(items: Any) -> str:
    names = ", ".join(repr(n) for n in items)
    return names or "none"


class Connection:
    """``source_id.event`` feeds ``target_id.slot``.

    Made by :meth:`Flow.connect`, which also fills :attr:`source_event` and
    :attr:`target_slot` (routilux 1.1.0's attributes) with the declared objects.
    """

    __slots__ = ("event", "slot", "source_event", "source_id", "target_id", "target_slot")

    def __init__(self, source_id: str, event: str, target_id: str, slot: str,
                 source_event: Event | None = None, target_slot: Slot | None = None) -> None:
        self.source_id = source_id
        self.event = event
        self.target_id = target_id
        self.slot = slot
        #: The source routine's :class:`~routilux_mp.routine.Event` object.
        self.source_event = source_event
        #: The target routine's :class:`~routilux_mp.routine.Slot` object.
        self.target_slot = target_slot

    def __repr__(self) -> str:
        return f"{self.source_id}.{self.event} -> {self.target_id}.{self.slot}"


class Flow:
    """A graph of routines. Register it with ``FlowRegistry`` and run it with ``Runtime``.

    A new flow is also known to ``FlowRegistry`` by its ``flow_id`` (weakly,
    as in routilux 1.1.0), so ``runtime.exec(flow.flow_id)`` works without
    ``register_by_name``; a name registered with ``register_by_name`` wins.

    Args:
        flow_id: a name for the flow; a random one when omitted.
        execution_timeout: routilux 1.1.0's limit on a worker's lifetime; refused
            with a ``TypeError`` saying what to use instead.
    """

    def __init__(self, flow_id: str | None = None, execution_timeout: float | None = None) -> None:
        if execution_timeout is not None:
            raise TypeError(
                "Flow(execution_timeout=...) limited a routilux 1.1.0 worker's lifetime; a routilux-mp worker "
                "serves jobs until its runtime shuts down. Bound each activation with routine.set_timeout(seconds)"
            )
        self.flow_id = flow_id if flow_id is not None else f"flow-{uuid.uuid4().hex[:8]}"
        self.routines: dict[str, Routine] = {}
        self.connections: list[Connection] = []
        self.error_handler: ErrorHandler | None = None
        #: The routine ``pipe()`` connects the next one from.
        self._last_routine_id: str | None = None
        from .monitoring.flow_registry import FlowRegistry  # the registry module imports this one

        FlowRegistry.get_instance()._remember(self)

    def add_routine(self, routine: Routine, routine_id: str | None = None) -> str:
        """Add ``routine`` under ``routine_id`` and return the id.

        Without an id, one is made from the class name (``square_1``,
        ``square_2``, ...) that no routine of the flow uses yet.
        """
        if not isinstance(routine, Routine):
            raise TypeError(f"add_routine() needs a Routine instance, got {routine!r}")
        if routine_id is None:
            base = type(routine).__name__.lower()
            number = len(self.routines) + 1
            while f"{base}_{number}" in self.routines:
                number += 1
            routine_id = f"{base}_{number}"
        if not isinstance(routine_id, str) or not routine_id:
            raise TypeError(f"routine_id must be a non-empty string, got {routine_id!r}")
        if routine_id in self.routines:
            raise FlowError(f"flow {self.flow_id!r} already has a routine {routine_id!r}")
        self.routines[routine_id] = routine
        return routine_id

    def pipe(self, routine: Routine, routine_id: str | None = None, *, from_routine: str | None = None,
             from_event: str = "output", to_slot: str = "input") -> Flow:
        """Add ``routine`` and connect the previous one to it; returns the flow, for chaining.

        ``from_routine.from_event`` (default: the routine piped last, its
        ``"output"``) is connected to ``to_slot`` (default ``"input"``) of the
        new routine. The first routine piped is only added. Example::

            flow = Flow("etl").pipe(Parse(), "parse").pipe(Clean(), "clean").pipe(Store(), "store")
        """
        rid = self.add_routine(routine, routine_id)
        source = from_routine if from_routine is not None else self._last_routine_id
        if source is not None:
            try:
                self.connect(source, from_event, rid, to_slot)
            except FlowError:
                del self.routines[rid]  # leave the flow as it was
                raise
        self._last_routine_id = rid
        return self

    def find_routines_by_type(self, routine_type: type) -> list[tuple[str, Routine]]:
        """``(routine_id, routine)`` pairs of the routines that are instances of ``routine_type``."""
        return [(rid, r) for rid, r in self.routines.items() if isinstance(r, routine_type)]

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
        conn = Connection(source_id, event, target_id, slot, source._events[event],
                          self.routines[target_id]._slots[slot])
        self.connections.append(conn)
        return conn

    def set_error_handler(self, handler: ErrorHandler | None) -> None:
        """The error handler of routines that have none of their own."""
        if handler is not None and not isinstance(handler, ErrorHandler):
            raise TypeError(f"expected an ErrorHandler, got {handler!r}")
        self.error_handler = handler

    def get_error_handler(self) -> ErrorHandler | None:
        """The handler set by :meth:`set_error_handler` (``None``: routines without one STOP)."""
        return self.error_handler

    def entry_slots(self) -> list[tuple[str, str]]:
        """``(routine_id, slot)`` pairs that no connection feeds."""
        fed = {(c.target_id, c.slot) for c in self.connections}
        return [(rid, s) for rid, r in self.routines.items() for s in r._slots if (rid, s) not in fed]

    def validate(self) -> None:
        """Check the flow can run: it has routines, and each one's logic can be called.

        A routine without logic is a sink (it consumes its items). Items put on
        a declaration slot with ``Slot.enqueue`` are logged: the runtime never
        sees them.
        """
        if not self.routines:
            raise FlowError(f"flow {self.flow_id!r} has no routines: add some with add_routine()")
        for rid, routine in self.routines.items():
            problem = routine._check_logic()
            if problem is not None:
                raise FlowError(f"routine {rid!r} of flow {self.flow_id!r} {problem}")
            for name, slot in routine._slots.items():
                if slot.get_unconsumed_count():
                    logger.warning("slot %r of routine %r holds %d items put there with Slot.enqueue(): the runtime "
                                   "does not process them; send data with runtime.post()", name, rid,
                                   slot.get_unconsumed_count())

    def __repr__(self) -> str:
        return f"<Flow {self.flow_id!r} routines={list(self.routines)} connections={self.connections}>"


class RoutineConfig:
    """routilux 1.1.0's chaining helper: ``RoutineConfig(r).config("k", v).error_handler(h)``."""

    def __init__(self, routine: Routine) -> None:
        self._routine = routine

    def config(self, key: str, value: Any) -> RoutineConfig:
        """``routine.set_config(key=value)``; returns self."""
        self._routine.set_config(**{key: value})
        return self

    def error_handler(self, handler: ErrorHandler) -> RoutineConfig:
        """``routine.set_error_handler(handler)``; returns self."""
        self._routine.set_error_handler(handler)
        return self
