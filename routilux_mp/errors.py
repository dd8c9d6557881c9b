"""Every exception routilux-mp raises on purpose.

All derive from :class:`RoutiluxError`. Two families matter when handling them:

* *closed* (:class:`RuntimeClosedError`): you shut the runtime down; calling
  it again is a programming error.
* *broken* (:class:`RuntimeBrokenError`, :class:`StateServerLostError`,
  :class:`WorkerCrashedError`, ...): something outside your logic died.

Errors that happen inside a worker process reach the supervisor as data (type
name, message, traceback text); :attr:`RoutiluxError.remote_traceback` carries
that text when an error is re-raised on this side.
"""

from __future__ import annotations

__all__ = [
    "ActivationError",
    "ActivationTimeoutError",
    "FlowError",
    "LockTimeoutError",
    "ModifyTimeoutError",
    "RoutiluxError",
    "RuntimeBrokenError",
    "RuntimeClosedError",
    "SerializationError",
    "SlotQueueFullError",
    "StaleStateError",
    "StateNotSerializableError",
    "StateServerLostError",
    "StateTooLargeError",
    "WorkerCrashedError",
    "WorkerMemoryError",
]


class RoutiluxError(Exception):
    """Raised for every error routilux-mp reports on purpose (base class)."""

    #: Traceback text from the worker process where the error happened, if any.
    remote_traceback: str | None = None


class FlowError(RoutiluxError, ValueError):
    """Raised when a flow, routine, slot, event or worker name is unknown or duplicated."""


class RuntimeClosedError(RoutiluxError):
    """Raised when ``exec``/``post`` is called after ``Runtime.shutdown()``."""


class RuntimeBrokenError(RoutiluxError):
    """Raised when the runtime cannot go on (worker processes keep failing to start)."""


class SerializationError(RoutiluxError, TypeError):
    """Raised when data that must cross a process boundary cannot be pickled."""


class StateNotSerializableError(RoutiluxError, TypeError):
    """Raised when a value written to WorkerState (or job data) is not plain JSON."""


class StateTooLargeError(RoutiluxError, ValueError):
    """Raised when a routine state would exceed ``max_state_bytes``."""


class StaleStateError(RoutiluxError):
    """Raised (with ``strict_state=True``) when a write would lose another activation's update."""


class LockTimeoutError(RoutiluxError, TimeoutError):
    """Raised when ``worker_state.lock(rid, timeout=...)`` could not get the lock in time."""


class ModifyTimeoutError(RoutiluxError, TimeoutError):
    """Raised when a ``modify_routine_state`` function ran past its time budget; nothing was written."""


class StateServerLostError(RoutiluxError):
    """Raised when the state-server process died or stopped answering; shared state is gone."""


class SlotQueueFullError(RoutiluxError):
    """Raised by ``post(..., block=False)`` when the target slot queue is full."""


class ActivationError(RoutiluxError):
    """Raised when a routine's logic raised; the worker's traceback is in ``remote_traceback``."""


class WorkerCrashedError(RoutiluxError):
    """Raised when a worker process died (exit, signal, segfault, OOM kill) while running an activation."""


class ActivationTimeoutError(RoutiluxError, TimeoutError):
    """Raised when an activation ran longer than its routine's ``set_timeout()``."""


class WorkerMemoryError(RoutiluxError, MemoryError):
    """Raised when a worker process was killed for passing the hard memory limit."""
