"""Worker processes started ahead: a spare that replaces a dead worker in milliseconds.

Used by :class:`~routilux_mp._exec.local.LocalProcessBackend` only.

A fresh interpreter takes about 100 ms to start and import what a worker
runs (more on a busy machine): too long for a crashed or recycled worker's
lane to stay empty. So once every lane has a ready worker, the backend starts
one more process, a *spare*: it imports everything and then blocks reading
its config, the first frame of its command pipe (``_child.main``). A lane
that needs a new worker takes the spare and sends it the config; it is ready
as soon as it has started its guard and connected to the state server. The
next spare starts once every lane is ready again and the pool is idle (or
``SPARE_DELAY`` later).

A spare is a worker with no lane yet: started the same way (own session,
the life pipe), it exits on its own if the supervisor dies (EOF on its
command pipe, which only the supervisor holds), and is killed when the pool
stops (it runs no user code and holds nothing).
Its environment is the one at the time it started.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

from .. import _process

logger = logging.getLogger("routilux_mp.runtime")

#: Seconds to wait for a spare to exit after SIGKILL.
SPARE_EXIT_WAIT = 1.0
#: Seconds after the pool got ready at which the spare starts even if the pool is busy (an idle pool
#: starts it at once): its start-up would otherwise take CPU from the pool's first activations.
SPARE_DELAY = 1.0


class Started:
    """A worker process and the supervisor's ends of its command and result pipes (no config sent yet)."""

    __slots__ = ("commands", "popen", "results")

    def __init__(self, popen: subprocess.Popen, commands: int, results: int) -> None:
        self.popen = popen
        self.commands = commands
        self.results = results

    def discard(self) -> None:
        """SIGKILL it (its group; it runs no user code and holds nothing) and close its pipes."""
        _process.signal_group(self.popen.pid, signal.SIGKILL)
        try:
            self.popen.wait(SPARE_EXIT_WAIT)
        except subprocess.TimeoutExpired:  # (only a process stuck in the kernel outlives SIGKILL)
            logger.error("the spare worker (pid %d) survived SIGKILL for %gs", self.popen.pid, SPARE_EXIT_WAIT)
        os.close(self.commands)
        os.close(self.results)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


def start_worker(title: str, life_r: int) -> Started:
    """Start a worker interpreter (``_child.main``) waiting for its config; ``OSError`` if none could start."""
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()
    try:
        popen = _process.spawn("routilux_mp._exec._child", title, pass_fds=(cmd_r, res_w, life_r))
    except OSError:
        for fd in (cmd_r, cmd_w, res_r, res_w):
            os.close(fd)
        raise
    os.close(cmd_r)
    os.close(res_w)
    return Started(popen, cmd_w, res_r)


class Spare:
    """The backend's spare worker: when one is due, starting it, handing it to a lane, stopping it.

    Called from the dispatcher thread, except :meth:`kill` (any thread, when the pool is aborted).
    """

    def __init__(self, life_r: int, *, enabled: bool) -> None:
        #: The read end of the life pipe every worker holds.
        self.life_r = life_r
        self.enabled = enabled
        #: The spare process, if one is started.
        self.started: Started | None = None
        #: When the next spare starts at the latest (None: none is due).
        self.due: float | None = None

    def want(self, children: list) -> None:
        """A worker reported ready: once every lane's worker is, a spare is due (if there is none)."""
        if self.enabled and self.started is None and all(c is not None and c.ready for c in children):
            self.due = time.monotonic() + SPARE_DELAY

    def start_if_due(self, children: list) -> None:
        """Start the spare if it is due: the pool is idle, or ``SPARE_DELAY`` passed."""
        if self.due is None:
            return
        if time.monotonic() < self.due and any(c is not None and c.acts for c in children):
            return  # (a busy pool polls again soon)
        self.due = None
        if self.started is not None:
            return
        try:
            self.started = start_worker("routilux-mp worker (spare)", self.life_r)
        except OSError:  # (no harm: a lane that needs a worker starts one itself)
            logger.debug("routilux-mp: could not start a spare worker process", exc_info=True)

    def take(self) -> Started | None:
        """The spare, for a lane that needs a worker (None if there is none, or it died waiting)."""
        started, self.started = self.started, None
        if started is not None and started.popen.poll() is not None:
            started.discard()
            return None
        return started

    def discard(self) -> None:
        """Stop the spare, if any (the pool stops)."""
        started, self.started = self.started, None
        self.due = None
        if started is not None:
            started.discard()

    def kill(self) -> None:
        """SIGKILL the spare and wait for it (any thread; its pipes are the dispatcher's to close)."""
        started = self.started
        if started is None:
            return
        _process.signal_group(started.popen.pid, signal.SIGKILL)
        try:
            started.popen.wait(SPARE_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            logger.error("the spare worker (pid %d) survived SIGKILL", started.popen.pid)
