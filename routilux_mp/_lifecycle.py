"""The runtime's life-cycle flags, and how done-callbacks run.

:class:`Lifecycle` holds closed / broken / stop-requested in one small object
(loky's ``_ExecutorFlags``): the supervisor, its dispatcher thread and the
dispatcher read it, and it says what a call into a runtime that cannot take
work must raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from . import _context
from ._exec.local import TERM_GRACE
from .errors import RoutiluxError, RuntimeClosedError, StateServerLostError

logger = logging.getLogger("routilux_mp.runtime")


class Lifecycle:
    """Where the runtime is in its life, in one small object (loky's ``_ExecutorFlags``)."""

    __slots__ = ("broken", "closed", "stop_grace", "stop_requested")

    def __init__(self) -> None:
        #: ``shutdown()`` began (or the runtime stopped): no new work.
        self.closed = False
        #: Why the runtime cannot go on (error class, message), once something it needs died.
        self.broken: tuple[type[RoutiluxError], str] | None = None
        #: The dispatcher must stop now; running activations get ``stop_grace`` seconds.
        self.stop_requested = False
        self.stop_grace = TERM_GRACE

    def flag_closed(self) -> bool:
        """Refuse new work from now on; whether it was refused already."""
        was, self.closed = self.closed, True
        return was

    def flag_stop(self, grace: float) -> None:
        """Ask the dispatcher to stop everything."""
        self.closed = True
        self.stop_requested = True
        self.stop_grace = grace

    def flag_broken(self, cls: type[RoutiluxError], message: str) -> bool:
        """Mark the runtime broken with ``cls(message)``; False if it already was."""
        if self.broken is not None:
            return False
        self.broken = (cls, message)
        return True

    def check_usable(self, lost: str | None) -> None:
        """Raise what a call into a broken, closed (or state-less) runtime must raise."""
        if self.broken is not None:
            cls, message = self.broken
            raise cls(message)
        if self.closed:
            raise RuntimeClosedError("this runtime was shut down; start a new Runtime to run more work")
        if lost is not None:  # found by a call; the dispatcher breaks the runtime next
            raise StateServerLostError(lost)


def run_callbacks(callbacks: list[Callable[[], Any]]) -> None:
    """Run job done-callbacks: whatever one raises (``SystemExit`` too) is logged and stops nothing else.

    Only a ``KeyboardInterrupt`` in a user's thread (a real Ctrl-C there) is
    raised again, once every callback ran.
    """
    interrupt = None
    for callback in callbacks:
        try:
            callback()
        except KeyboardInterrupt as exc:
            if _context.on_dispatcher():
                logger.exception("a job done-callback raised KeyboardInterrupt; ignored")
            else:
                interrupt = exc
        except BaseException:
            logger.exception("a job done-callback raised; ignored (it fails nothing else)")
    if interrupt is not None:
        raise interrupt
