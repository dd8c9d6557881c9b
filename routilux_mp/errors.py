"""Every exception routilux-mp raises on purpose.

All derive from :class:`RoutiluxError`. Two families matter when handling them:

* *closed* (:class:`RuntimeClosedError`): you shut the runtime down; calling
  it again is a programming error.
* *broken* (:class:`RuntimeBrokenError`, :class:`StateServerLostError`,
  :class:`WorkerCrashedError`, ...): something outside your logic died.

routilux 1.1.0's exception names are here too, as the bases of ours, so code
that catches them keeps working: :class:`ConfigurationError` (bad flow
wiring: :class:`FlowError`), :class:`ExecutionError` (an activation failed:
:class:`ActivationError`, :class:`WorkerCrashedError`,
:class:`ActivationTimeoutError`, :class:`WorkerMemoryError`),
:class:`StateError` (a WorkerState write refused), :class:`SerializationError`,
:class:`SlotHandlerError` and :class:`ValidationError`.

Errors that happen inside a worker process reach the supervisor as data (type
name, message, traceback text); :attr:`RoutiluxError.remote_traceback` carries
that text when an error is re-raised on this side.
"""

from __future__ import annotations

__all__ = [
    "ActivationError",
    "ActivationTimeoutError",
    "ClusterError",
    "ConfigurationError",
    "DashboardError",
    "ExecutionError",
    "FlowError",
    "LockLostError",
    "LockTimeoutError",
    "ModifyTimeoutError",
    "RoutiluxError",
    "RuntimeBrokenError",
    "RuntimeClosedError",
    "SerializationError",
    "SlotHandlerError",
    "SlotQueueFullError",
    "StaleStateError",
    "StateError",
    "StateFileError",
    "StateNotSerializableError",
    "StateServerLostError",
    "StateTooLargeError",
    "ValidationError",
    "WorkerCrashedError",
    "WorkerMemoryError",
    "WorkerNotRunningError",
]


class RoutiluxError(Exception):
    """Raised for every error routilux-mp reports on purpose (base class)."""

    #: Traceback text from the worker process where the error happened, if any.
    remote_traceback: str | None = None


def _with_context(exc: RoutiluxError, message: str, label: str, value: str) -> None:
    # routilux 1.1.0 puts the context into the message: "boom (routine_id=parse)".
    if value:
        exc.args = (f"{message} ({label}={value})",)


# -- routilux 1.1.0's families (bases of the specific errors below) ---------------


class ConfigurationError(RoutiluxError):
    """Raised when a flow or routine is set up wrongly (routilux 1.1.0's name; base of FlowError)."""


class ClusterError(ConfigurationError):
    """Raised when ``backend="ray"`` cannot be used (Ray not installed, an unsupported address, no cluster)."""


class ExecutionError(RoutiluxError):
    """Raised when running a routine failed (routilux 1.1.0's name; base of the activation errors).

    Args:
        message: what happened.
        routine_id: the routine, added to the message as ``(routine_id=...)``.
    """

    def __init__(self, message: str = "", routine_id: str = "") -> None:
        super().__init__(message)
        self.routine_id = routine_id
        _with_context(self, message, "routine_id", routine_id)


class StateError(RoutiluxError):
    """Raised when a WorkerState write is refused (routilux 1.1.0's name; base of the state errors)."""


class SlotHandlerError(RoutiluxError):
    """Raised by your code to mark a failure of a routine's input handling (routilux 1.1.0's name).

    Args:
        message: what happened.
        slot_name: the slot, added to the message as ``(slot=...)``.
    """

    def __init__(self, message: str = "", slot_name: str = "") -> None:
        super().__init__(message)
        self.slot_name = slot_name
        _with_context(self, message, "slot", slot_name)


class ValidationError(RoutiluxError, ValueError):
    """Raised by your code when input fails validation (routilux 1.1.0's name, kept for ported code)."""


# -- routilux-mp's errors ---------------------------------------------------------


class FlowError(ConfigurationError, ValueError):
    """Raised when a flow, routine, slot, event or worker name is unknown or duplicated."""


class WorkerNotRunningError(FlowError):
    """Raised when a call names a worker this runtime does not run (routilux 1.1.0's name; a FlowError)."""


class RuntimeClosedError(RoutiluxError, RuntimeError):
    """Raised when ``exec``/``post`` is called after ``Runtime.shutdown()`` (a ``RuntimeError`` too)."""


class RuntimeBrokenError(RoutiluxError):
    """Raised when the runtime cannot go on (worker processes keep failing to start)."""


class SerializationError(RoutiluxError, TypeError):
    """Raised when data that must cross a process boundary cannot be pickled.

    Args:
        message: what happened.
        object_type: the type that failed, added to the message as ``(type=...)``
            (routilux 1.1.0's signature).
    """

    def __init__(self, message: str = "", object_type: str = "") -> None:
        super().__init__(message)
        self.object_type = object_type
        _with_context(self, message, "type", object_type)


class StateNotSerializableError(StateError, SerializationError):
    """Raised when a value written to WorkerState (or job data) is not plain JSON."""


class StateTooLargeError(StateError, ValueError):
    """Raised when a routine state would exceed ``max_state_bytes``."""


class StaleStateError(StateError):
    """Raised (with ``strict_state=True``) when a write would lose another activation's update."""


class LockTimeoutError(RoutiluxError, TimeoutError):
    """Raised when ``worker_state.lock(rid, timeout=...)`` could not get the lock in time."""


class ModifyTimeoutError(StateError, TimeoutError):
    """Raised when a ``modify_routine_state`` function ran past its time budget; nothing was written."""


class LockLostError(StateError):
    """Raised when a ``worker_state.lock()`` block's lock was taken from it (server restart, holder presumed dead).

    Nothing of the block was written: run it again.
    """


class StateServerLostError(RoutiluxError):
    """Raised when the state-server process died or stopped answering and could not be restarted."""


class StateFileError(RoutiluxError):
    """Raised when a ``state_path`` file cannot be used (held by a live runtime, another format, unreadable)."""


class DashboardError(RoutiluxError):
    """Raised when the dashboard cannot start: its ``[dashboard]`` extra is missing, or its address cannot be bound."""


class SlotQueueFullError(RoutiluxError):
    """Raised by ``post(..., block=False)`` when the target slot queue is full."""


class ActivationError(ExecutionError, SlotHandlerError):
    """Raised when a routine's logic raised; the worker's traceback is in ``remote_traceback``."""


class WorkerCrashedError(ExecutionError):
    """Raised when a worker process died (exit, signal, segfault, OOM kill) while running an activation."""


class ActivationTimeoutError(ExecutionError, TimeoutError):
    """Raised when an activation ran longer than its routine's ``set_timeout()``."""


class WorkerMemoryError(ExecutionError, MemoryError):
    """Raised when a worker process was killed for passing the hard memory limit."""
