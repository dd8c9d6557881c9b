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

import contextlib
import os
import selectors
from collections.abc import Callable
from typing import Any, NamedTuple, Union

from .._messages import ExitInfo, _Result

__all__ = [
    "Broken",
    "Died",
    "ExitInfo",
    "Exiting",
    "Finished",
    "Log",
    "Output",
    "Ready",
    "Stalled",
    "Usage",
    "WorkerBackend",
    "WorkerEvent",
    "WorkerSettings",
]


class WorkerSettings(NamedTuple):
    """What every worker process needs to know, whatever backend runs it."""

    #: Where the state server listens, and the key its clients authenticate with.
    state_address: str
    authkey: bytes
    #: Deadlines of the worker's state calls (see ``Runtime``).
    state_timeout: float
    lock_timeout: float
    #: Recycle the worker between activations past this RSS (bytes), or after this many activations.
    max_rss: int | None
    max_activations: int | None
    #: The supervisor's ``sys.path``, so flows shipped by reference import the same modules.
    sys_path: list[str]
    #: The supervisor's logging levels at start (``_logs.parent_levels``): workers send only what it would log.
    log_levels: tuple = ()

    def __repr__(self) -> str:  # never the authkey
        return f"WorkerSettings(state_address={self.state_address!r})"


class Usage(NamedTuple):
    """What one worker process uses now (``Runtime.stats()["processes"]``)."""

    #: Its process id (``None`` when the backend has none to show).
    pid: int | None
    #: Resident memory in bytes, ``None`` when it could not be read (it just died).
    rss: int | None
    #: CPU use since the previous ``usage()`` call, in percent of one CPU.
    cpu_percent: float | None


# -- events: what ``poll`` returns, dispatched by type -------------------------------------------------


class Ready(NamedTuple):
    """The worker in ``slot`` started and serves: messages sent to it from now on are read promptly."""

    slot: int
    pid: int | None


class Finished(NamedTuple):
    """The worker in ``slot`` sent the result of the activation it held first."""

    slot: int
    result: _Result


class Exiting(NamedTuple):
    """The worker in ``slot`` exits on purpose (stop, recycling): it ran nothing it holds after its last result."""

    slot: int
    reason: str


class Died(NamedTuple):
    """The process of the worker in ``slot`` is gone (always its last event): how it ended."""

    slot: int
    info: ExitInfo


class Output(NamedTuple):
    """Text the worker in ``slot`` wrote to ``stream`` (``"stdout"``/``"stderr"``): whole lines, or a long line's piece."""

    slot: int
    stream: str
    text: str


class Log(NamedTuple):
    """A logging record of the worker in ``slot``, as data (see ``_logs``): the supervisor replays it."""

    slot: int
    record: dict


class Stalled(NamedTuple):
    """The worker in ``slot`` has not taken the activation it holds first ``seconds`` after it went first.

    It is stopped (SIGSTOP), frozen, or stuck loading the flow; the backend
    leaves it alone: the supervisor decides (it kills and replaces it).
    """

    slot: int
    seconds: float


class Broken(NamedTuple):
    """The worker in ``slot`` wrote something that is not a message of the protocol; ``what`` says what.

    The backend reads nothing more from it (the stream is out of step); the
    supervisor kills it.
    """

    slot: int
    what: str


#: Any event ``poll`` returns (each has the ``slot`` it happened to first).
WorkerEvent = Union[Ready, Finished, Exiting, Died, Output, Log, Stalled, Broken]  # noqa: UP007 - a runtime alias on 3.10


# -- the protocol ------------------------------------------------------------------------------------


class WorkerBackend:
    """Runs worker lanes and carries messages to and from them (see the module docstring for threads).

    Attributes:
        slots: the number of worker lanes, numbered ``0 .. slots - 1``.
        fusion: whether its workers may run fused stages (``_fusion``): a lane
            may then send, after an activation's result that names an emit to
            run fused, the result of that run (``_Result.chain``), with no
            activation sent for it; the lane runs it before anything it
            holds, and ``taken`` is True meanwhile.
    """

    slots: int
    #: Whether a worker runs the target of a fused connection itself (see ``_fusion``).
    fusion: bool = False
    #: Whether ``send`` takes a ``_Batch`` (several activations in one frame, see ``_batching``).
    batches: bool = False
    #: Whether logic runs on the dispatcher thread (in ``poll``): the state server must then be started before
    #: the first activation is sent, as nothing else could start it while logic waits for it.
    inline: bool = False

    def start(self) -> list[str | None]:
        """Start a worker in every slot; wait for none of them to be ready.

        Returns, per slot, ``None`` or why no worker could be started there
        (that slot stays empty; the supervisor calls :meth:`respawn` later).
        Each started worker reports :class:`Ready`, or :class:`Died`.
        """
        raise NotImplementedError

    def send(self, slot: int, message: Any) -> bool:
        """Hand ``message`` (a wire message: ``_LoadFlow``, ``_Activation``, ``_Batch``) to the worker in ``slot``.

        Never blocks. Returns False, having sent nothing, when the worker has
        no room for it now (its queue is full, it is not reading, or it is
        dying): the supervisor keeps the message for another worker or later.
        Messages to one slot are delivered in the order they were sent.
        """
        raise NotImplementedError

    def poll(self, timeout: float | None) -> list[WorkerEvent]:
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


class WakeUp:
    """A self-pipe registered on a backend's selector: :meth:`wake` (any thread) ends the dispatcher's
    ``select`` in ``poll``, which then empties it (the handler registered for it)."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        selector.register(self._r, selectors.EVENT_READ, (self._drain, None))

    def wake(self) -> None:
        """Make the ``select`` return now."""
        try:
            os.write(self._w, b"x")
        except OSError:  # full (plenty of wake-ups pending), or closed at the backend's stop
            pass

    def _drain(self, *_args: Any) -> None:
        """Empty the pipe (its only job was to end the select); called as a selector handler."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 65536)

    def close(self) -> None:
        """Close both ends (after the selector was closed)."""
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
