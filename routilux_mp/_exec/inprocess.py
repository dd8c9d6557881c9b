"""InProcessBackend: ``Runtime(processes=0)``, the debug mode: logic runs in the caller's process.

One worker lane, run by the supervisor's dispatcher thread inside
:meth:`InProcessBackend.poll`: one activation at a time, in this process, so
``breakpoint()`` in logic stops there (pdb on your terminal) and a debugger
attached to your process sees every frame. Everything else is as with worker
processes: the flow is shipped as a copy (a pickle round trip, so ``self`` in
logic is a copy, as in a worker), messages and results are pickled as on the
wire, and ``worker_state`` talks to the real state server.

What differs, by necessity: nothing can be killed, so ``set_timeout`` and the
memory limits are not enforced (a warning says so at start), and logic that
exits the process (``os._exit``) ends yours. While logic runs, the dispatcher
waits for it: done-callbacks and timers run after it returns.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from .._messages import _Activation, dumps, loads
from .._state.client import StoreClient
from .._worker import ActivationRunner, _rss
from . import base
from .base import Usage, WorkerBackend, WorkerEvent, WorkerSettings

__all__ = ["InProcessBackend"]

logger = logging.getLogger("routilux_mp.runtime")


class InProcessBackend(WorkerBackend):
    """One lane whose activations run in this process, on the dispatcher thread (see the module docstring)."""

    fusion = inline = True

    def __init__(self, slots: int, settings: WorkerSettings) -> None:
        #: Always one lane: activations run one at a time.
        self.slots = 1
        #: How to reach the state server (the lane's WorkerState calls go there, as a worker's would).
        self.settings = settings
        #: The lane's runner (``None`` before start and after stop), and what it holds, in order.
        self._runner: ActivationRunner | None = None
        self._inbox: collections.deque[Any] = collections.deque()
        #: Events to report at the next poll.
        self._events: list[WorkerEvent] = []
        #: Guards the inbox and events (posting threads send while the dispatcher polls); notified on news.
        self._cond = threading.Condition()
        self._woken = False
        self._stopped = False

    def start(self) -> list[str | None]:
        """Make the lane; it reports Ready at the first poll."""
        self._runner = ActivationRunner(
            StoreClient(self.settings.state_address, self.settings.authkey, self.settings.state_timeout,
                        self.settings.lock_timeout),
            max_rss=None, max_activations=None)
        with self._cond:
            self._events.append(base.Ready(0, os.getpid()))
        return [None]

    def respawn(self, slot: int) -> str | None:
        """The lane never dies (it is this process); nothing to start."""
        return "the in-process lane cannot be replaced (processes=0)"

    def send(self, slot: int, message: Any) -> bool:
        """Queue ``message`` (after a pickle round trip, as on the wire); one activation at a time."""
        message = loads(dumps(message))
        with self._cond:
            if self._stopped or self._runner is None:
                return False
            if type(message) is _Activation and any(type(m) is _Activation for m in self._inbox):
                return False
            self._inbox.append(message)
            self._cond.notify_all()
        return True

    def poll(self, timeout: float | None) -> list[WorkerEvent]:
        """Run what the lane holds (logic runs here, in this thread), or wait up to ``timeout`` for news."""
        with self._cond:
            if timeout != 0 and not self._woken and not self._inbox and not self._events:
                self._cond.wait(timeout)
            self._woken = False
            events, self._events = self._events, []
        runner = self._runner

        def reply(result: Any) -> None:
            """The result, as the supervisor would read it off the wire."""
            events.append(base.Finished(0, loads(dumps(result))))

        while runner is not None:
            with self._cond:
                if not self._inbox or self._stopped:
                    break
                message = self._inbox.popleft()
            runner.step(message, reply)  # (recycling does not apply: this process is not replaced)
        return events

    def wake(self) -> None:
        """Make a waiting ``poll`` return (any thread)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def kill(self, slot: int, reason: str, hard: bool) -> None:
        """Nothing can be killed in this process: say so (the supervisor asked for a timeout or a memory limit)."""
        logger.warning("routilux-mp: processes=0 cannot stop running logic (%s); it runs to its end", reason)

    def taken(self, slot: int) -> bool:
        """What the lane holds runs at the next poll."""
        return True

    def pid(self, slot: int) -> int | None:
        """This process."""
        return os.getpid()

    def usage(self) -> list[Usage | None]:
        """This process's memory (its CPU is yours, not measured)."""
        return [Usage(os.getpid(), _rss(), None)]

    def rss(self, slot: int) -> int | None:
        """This process's resident memory."""
        return _rss()

    def stop(self, grace: float, output: Callable[[base.Output], None]) -> None:
        """Drop what was not run; the lane ends."""
        with self._cond:
            self._stopped = True
            self._inbox.clear()
            self._cond.notify_all()
        self._runner = None  # (its state connection closes with it)

    def abort(self) -> None:
        """As :meth:`stop`."""
        self.stop(0.0, lambda piece: None)
