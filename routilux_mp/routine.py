"""Routines: units of logic with input slots and output events.

A :class:`Routine` is declared in the supervisor (your process) and shipped by
value to every worker process. Its logic always runs in a worker process as
``logic(slot_data, policy_message, worker_state)``; ``self`` there is that
process's copy of the routine, so instance attributes changed in logic do not
travel back. Shared memory is ``worker_state``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from . import _context
from .error_handling import ErrorHandler
from .errors import FlowError, RoutiluxError

__all__ = ["Event", "Routine", "Slot"]

#: Default bound of a slot queue (items waiting for an activation).
DEFAULT_MAX_QUEUE_LENGTH = 1000


class Slot:
    """An input of a routine. Items posted or emitted to it wait in a bounded queue."""

    __slots__ = ("max_queue_length", "name")

    def __init__(self, name: str, max_queue_length: int = DEFAULT_MAX_QUEUE_LENGTH) -> None:
        self.name = name
        self.max_queue_length = max_queue_length

    def __repr__(self) -> str:
        return f"Slot({self.name!r}, max_queue_length={self.max_queue_length})"


class Event:
    """An output of a routine; ``params`` documents the keyword arguments it carries."""

    __slots__ = ("name", "params")

    def __init__(self, name: str, params: Iterable[str] | None = None) -> None:
        self.name = name
        self.params = list(params) if params is not None else []

    def __repr__(self) -> str:
        return f"Event({self.name!r}, params={self.params!r})"


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{kind} name must be a non-empty string, got {name!r}")
    return name


class Routine:
    """Base class for routines. Subclass it and declare everything in ``__init__``.

    Example::

        class Square(Routine):
            def __init__(self):
                super().__init__()
                self.add_slot("input")
                self.add_event("output", ["value"])

                def logic(slot_data, policy_message, worker_state):
                    for item in slot_data["input"]:
                        self.emit("output", value=item["x"] ** 2)

                self.set_logic(logic)
    """

    def __init__(self) -> None:
        self._slots: dict[str, Slot] = {}
        self._events: dict[str, Event] = {}
        self._logic: Callable[..., Any] | None = None
        self._activation_policy: Any = None
        self._error_handler: ErrorHandler | None = None
        self._config: dict[str, Any] = {}
        self._max_concurrency: int | None = 1
        self._timeout: float | None = None

    # -- declaration ---------------------------------------------------------

    def add_slot(self, name: str, max_queue_length: int = DEFAULT_MAX_QUEUE_LENGTH) -> Slot:
        """Declare an input slot. Duplicate names raise ``ValueError``."""
        _check_name("slot", name)
        if name in self._slots:
            raise FlowError(f"{type(self).__name__} already has a slot named {name!r}")
        if not isinstance(max_queue_length, int) or max_queue_length < 1:
            raise ValueError(f"max_queue_length must be a positive int, got {max_queue_length!r}")
        slot = Slot(name, max_queue_length)
        self._slots[name] = slot
        return slot

    def add_event(self, name: str, params: Iterable[str] | None = None) -> Event:
        """Declare an output event. Duplicate names raise ``ValueError``."""
        _check_name("event", name)
        if name in self._events:
            raise FlowError(f"{type(self).__name__} already has an event named {name!r}")
        event = Event(name, params)
        self._events[name] = event
        return event

    def set_logic(self, logic: Callable[..., Any]) -> None:
        """Set ``logic(slot_data, policy_message, worker_state)``; a closure, lambda or method."""
        if not callable(logic):
            raise TypeError(f"logic must be callable, got {logic!r}")
        self._logic = logic

    def set_activation_policy(self, policy: Any) -> None:
        """Set when the logic runs (see :mod:`routilux_mp.activation_policies`)."""
        if not callable(policy):
            raise TypeError(f"an activation policy must be callable, got {policy!r}")
        self._activation_policy = policy

    def set_error_handler(self, handler: ErrorHandler | None) -> None:
        """Set what a failure of this routine does to its job (default: the flow's, else STOP)."""
        if handler is not None and not isinstance(handler, ErrorHandler):
            raise TypeError(f"expected an ErrorHandler, got {handler!r}")
        self._error_handler = handler

    def set_config(self, **config: Any) -> None:
        """Store configuration values, readable in logic with :meth:`get_config`."""
        self._config.update(config)

    def get_config(self, key: str, default: Any = None) -> Any:
        """Return a configuration value set with :meth:`set_config`."""
        return self._config.get(key, default)

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the configuration set with :meth:`set_config`."""
        return dict(self._config)

    def set_max_concurrency(self, limit: int | None) -> None:
        """How many activations of this routine may run at once per worker.

        The default, 1, makes the routine behave like an actor: its
        read-modify-write of its own state is race-free. ``None`` means as many
        as there are worker processes; use it for stateless CPU-heavy stages.
        """
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"max concurrency must be a positive int or None, got {limit!r}")
        self._max_concurrency = limit

    def set_timeout(self, seconds: float | None) -> None:
        """Kill an activation (and replace its worker process) after ``seconds``.

        The activation fails with :class:`~routilux_mp.errors.ActivationTimeoutError`,
        which the error handler sees like any other failure.
        """
        if seconds is not None:
            seconds = float(seconds)
            if not seconds > 0 or math.isinf(seconds):
                raise ValueError(f"timeout must be a positive number of seconds, got {seconds!r}")
        self._timeout = seconds

    # -- introspection -------------------------------------------------------

    @property
    def slots(self) -> dict[str, Slot]:
        """The declared slots by name."""
        return dict(self._slots)

    @property
    def events(self) -> dict[str, Event]:
        """The declared events by name."""
        return dict(self._events)

    def get_slot(self, name: str) -> Slot | None:
        """The slot called ``name``, or None."""
        return self._slots.get(name)

    def get_event(self, name: str) -> Event | None:
        """The event called ``name``, or None."""
        return self._events.get(name)

    @property
    def activation_policy(self) -> Any:
        """The policy set by ``set_activation_policy()`` (None: the default, immediate)."""
        return self._activation_policy

    @property
    def error_handler(self) -> ErrorHandler | None:
        """The handler set by ``set_error_handler()`` (None: the flow's handler, else STOP)."""
        return self._error_handler

    @property
    def max_concurrency(self) -> int | None:
        """Activations that may run at once per worker (1 by default; None: as many as processes)."""
        return self._max_concurrency

    @property
    def timeout(self) -> float | None:
        """Seconds an activation may run before it is stopped (None: no limit)."""
        return self._timeout

    # -- inside logic --------------------------------------------------------

    def emit(self, event: str, **data: Any) -> None:
        """Send ``data`` to every slot connected to ``event`` (inside logic only).

        Emits on an event with no connection become the job's ``outputs``. The
        data is copied (pickled) at the moment of the call.
        """
        if event not in self._events:
            known = ", ".join(repr(e) for e in self._events) or "none"
            raise FlowError(f"{type(self).__name__} has no event {event!r} (events: {known})")
        ctx = _context.current()
        if ctx is None:
            raise RoutiluxError(
                f"emit({event!r}) was called outside logic: events can only be emitted by logic "
                "running on a worker; use runtime.post() to feed a flow from your code"
            )
        ctx.emit(self, event, data)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} slots={list(self._slots)} events={list(self._events)} "
            f"max_concurrency={self._max_concurrency}>"
        )
