"""The execution seam: how the supervisor reaches the processes that run activations.

A :class:`WorkerBackend` owns ``slots`` worker lanes (a lane is a process
running the ``_worker`` loop, or a stand-in for one) and moves wire messages
(``_messages``) between the supervisor and them. It knows nothing of jobs,
routines or retries: the supervisor's ledger decides what an event means.

Who calls what (trio's IOManager shape: ``get_events`` / ``process_events`` /
``force_wakeup``):

* :meth:`~WorkerBackend.poll` and every method but ``send``/``wake``/``pid``/
  ``usage``/``rss``/``abort`` are called by the supervisor's dispatcher thread
  only.
  ``poll`` is called *without* the supervisor's lock (it waits); the others
  with it held.
* :meth:`~WorkerBackend.send` is called with the supervisor's lock held, by the
  dispatcher or by a thread that posts work (so a post reaches an idle worker
  without waking the dispatcher). It may run while ``poll`` runs on the
  dispatcher: a backend guards what both touch with a lock of its own.
* :meth:`~WorkerBackend.wake`, :meth:`~WorkerBackend.pid`,
  :meth:`~WorkerBackend.usage`, :meth:`~WorkerBackend.rss` and
  :meth:`~WorkerBackend.abort` may be called from any thread.

Events for one slot come out of ``poll`` in the order they happened, and
:class:`Died` is the last event of a process: the slot then stays empty until
:meth:`~WorkerBackend.respawn`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._messages import ExitInfo, _Result

__all__ = [
    "Broken",
    "Died",
    "Event",
    "ExitInfo",
    "Exiting",
    "Finished",
    "Output",
    "Ready",
    "Stalled",
    "Usage",
    "WorkerBackend",
    "WorkerSettings",
]


class WorkerSettings:
    """What every worker process needs to know, whatever backend runs it."""

    __slots__ = ("authkey", "lock_timeout", "max_activations", "max_rss", "state_address", "state_timeout",
                 "sys_path")

    def __init__(self, *, state_address: str, authkey: bytes, state_timeout: float, lock_timeout: float,
                 max_rss: int | None, max_activations: int | None, sys_path: list[str]) -> None:
        #: Where the state server listens, and the key its clients authenticate with.
        self.state_address = state_address
        self.authkey = authkey
        #: Deadlines of the worker's state calls (see ``Runtime``).
        self.state_timeout = state_timeout
        self.lock_timeout = lock_timeout
        #: Recycle the worker between activations past this RSS (bytes), or after this many activations.
        self.max_rss = max_rss
        self.max_activations = max_activations
        #: The supervisor's ``sys.path``, so flows shipped by reference import the same modules.
        self.sys_path = sys_path

    def __repr__(self) -> str:
        return f"WorkerSettings(state_address={self.state_address!r})"


class Usage:
    """What one worker process uses now (``Runtime.stats()["processes"]``)."""

    __slots__ = ("cpu_percent", "pid", "rss")

    def __init__(self, pid: int | None, rss: int | None, cpu_percent: float | None) -> None:
        #: Its process id (``None`` when the backend has none to show).
        self.pid = pid
        #: Resident memory in bytes, ``None`` when it could not be read (it just died).
        self.rss = rss
        #: CPU use since the previous ``usage()`` call, in percent of one CPU.
        self.cpu_percent = cpu_percent

    def __repr__(self) -> str:
        return f"Usage(pid={self.pid}, rss={self.rss}, cpu_percent={self.cpu_percent})"


# -- events ------------------------------------------------------------------------------------------


class Event:
    """Something that happened to the worker in ``slot``."""

    __slots__ = ("slot",)

    def __init__(self, slot: int) -> None:
        self.slot = slot

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}(slot={self.slot}, {fields})"


class Ready(Event):
    """The worker started and serves: messages sent to it from now on are read promptly."""

    __slots__ = ("pid",)

    def __init__(self, slot: int, pid: int | None) -> None:
        super().__init__(slot)
        self.pid = pid


class Finished(Event):
    """The worker sent the result of the activation it held first."""

    __slots__ = ("result",)

    def __init__(self, slot: int, result: _Result) -> None:
        super().__init__(slot)
        self.result = result


class Exiting(Event):
    """The worker exits on purpose (stop, recycling): it ran nothing it holds after its last result."""

    __slots__ = ("reason",)

    def __init__(self, slot: int, reason: str) -> None:
        super().__init__(slot)
        self.reason = reason


class Died(Event):
    """The worker's process is gone (always the last event of a process): how it ended."""

    __slots__ = ("info",)

    def __init__(self, slot: int, info: ExitInfo) -> None:
        super().__init__(slot)
        self.info = info


class Output(Event):
    """Text the worker wrote to its ``stream`` (``"stdout"`` or ``"stderr"``): whole lines, or a long line's piece."""

    __slots__ = ("stream", "text")

    def __init__(self, slot: int, stream: str, text: str) -> None:
        super().__init__(slot)
        self.stream = stream
        self.text = text


class Stalled(Event):
    """The worker has not taken the activation it holds first ``seconds`` after it went first.

    It is stopped (SIGSTOP), frozen, or stuck loading the flow; the backend
    leaves it alone: the supervisor decides (it kills and replaces it).
    """

    __slots__ = ("seconds",)

    def __init__(self, slot: int, seconds: float) -> None:
        super().__init__(slot)
        self.seconds = seconds


class Broken(Event):
    """The worker wrote something that is not a message of the protocol; ``what`` says what.

    The backend reads nothing more from it (the stream is out of step); the
    supervisor kills it.
    """

    __slots__ = ("what",)

    def __init__(self, slot: int, what: str) -> None:
        super().__init__(slot)
        self.what = what


# -- the protocol ------------------------------------------------------------------------------------


class WorkerBackend:
    """Runs worker lanes and carries messages to and from them (see the module docstring for threads).

    Attributes:
        slots: the number of worker lanes, numbered ``0 .. slots - 1``.
    """

    slots: int

    def start(self) -> list[str | None]:
        """Start a worker in every slot; wait for none of them to be ready.

        Returns, per slot, ``None`` or why no worker could be started there
        (that slot stays empty; the supervisor calls :meth:`respawn` later).
        Each started worker reports :class:`Ready`, or :class:`Died`.
        """
        raise NotImplementedError

    def send(self, slot: int, message: Any) -> bool:
        """Hand ``message`` (a wire message: ``_LoadFlow``, ``_Activation``) to the worker in ``slot``.

        Never blocks. Returns False, having sent nothing, when the worker has
        no room for it now (its queue is full, it is not reading, or it is
        dying): the supervisor keeps the message for another worker or later.
        Messages to one slot are delivered in the order they were sent.
        """
        raise NotImplementedError

    def poll(self, timeout: float | None) -> list[Event]:
        """Wait up to ``timeout`` seconds (``None``: no limit) for events, and return them.

        Returns early, possibly with no event, when :meth:`wake` is called or
        when the backend's own deadlines (kill escalation, hang checks) are due.
        """
        raise NotImplementedError

    def wake(self) -> None:
        """Make a ``poll`` that waits now (or the next one) return at once. Any thread."""
        raise NotImplementedError

    def kill(self, slot: int, reason: str, hard: bool) -> None:
        """Stop the worker in ``slot`` now: ``hard`` kills it at once, else it gets a short grace first.

        Whatever it started goes with it. Its :class:`Died` event follows;
        events it sent before dying may still come first.
        """
        raise NotImplementedError

    def respawn(self, slot: int) -> str | None:
        """Start a new worker in the empty ``slot`` (after its :class:`Died`); why it failed, or ``None``."""
        raise NotImplementedError

    def taken(self, slot: int) -> bool:
        """Whether the worker in ``slot`` has taken the activation it holds first (read it, and runs it).

        An activation's timeout counts from then, so a worker still starting or
        loading a flow is not blamed for it (a worker that never takes it is
        reported :class:`Stalled`). True when it holds none.
        """
        raise NotImplementedError

    def pid(self, slot: int) -> int | None:
        """The process id of the worker in ``slot`` (for messages), ``None`` when there is none or it is unknown."""
        raise NotImplementedError

    def usage(self) -> list[Usage | None]:
        """Per slot, what its worker uses now (``None``: no worker there). Any thread."""
        raise NotImplementedError

    def rss(self, slot: int) -> int | None:
        """Resident memory of the worker in ``slot``, in bytes; ``None`` if unknown. Any thread."""
        raise NotImplementedError

    def stop(self, grace: float, output: Callable[[Output], None]) -> None:
        """Stop every worker: ask, wait up to ``grace`` seconds, then terminate, then kill.

        Workers finish what they were sent before they exit. Their last output
        goes to ``output`` as it arrives. Returns once every process is gone
        and the backend's resources are released; the backend is then unusable.
        """
        raise NotImplementedError

    def abort(self) -> None:
        """Kill every worker now and wait for them (any thread: shutdown's last resort when the dispatcher hangs)."""
        raise NotImplementedError
