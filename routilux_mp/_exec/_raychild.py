"""A worker process on a Ray node: the local worker's loop, on a socket instead of two pipes.

Started by the lane's nanny actor (``_raylane``) as a fresh interpreter
(``routilux-mp worker N``), with the *wire*: a connection to the supervisor
that the nanny opened and authenticated. It carries the same frames as a
local worker's command and result pipes, so the argument layout is the
same (``WIRE_FD WIRE_FD LIFE_FD``). The life pipe's other end is held by
the nanny: EOF on it (the nanny died, or its node is going) kills this
worker's process group. The supervisor's socket directory is on another
machine, or not this process's to remove: nothing is cleaned up but the
group.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from .. import _process
from .._messages import dumps, loads, read_frame, write_frame
from ._child import serve

#: The environment variable in which the nanny tells its worker the Ray node it runs on.
NODE_VARIABLE = "ROUTILUX_MP_RAY_NODE"
#: What the worker writes back when it reads an activation: it took it (a pickled ``None``: no other message is).
TOOK = dumps(None)
#: Seconds a taken activation may run before the worker says it took it: a shorter one's result says so, and
#: saves the supervisor a frame per activation.
TOOK_DELAY = 0.02


class TakeReporter:
    """Writes the worker's frames on the wire, and TOOK for an activation still running ``TOOK_DELAY`` after its read.

    Its thread and the worker's loop write under one lock, so TOOK never
    follows the result of the activation it is about.
    """

    def __init__(self, wire: int) -> None:
        self.wire = wire
        self.cond = threading.Condition()
        #: When the running activation was read (``None``: none runs, or TOOK or its result went already).
        self.read_at: float | None = None
        threading.Thread(target=self._report, name="routilux-mp take reporter", daemon=True).start()

    def took(self) -> None:
        """An activation was just read (the worker's loop)."""
        with self.cond:
            self.read_at = time.monotonic()
            self.cond.notify()

    def write(self, data: bytes) -> None:
        """Write one message of the worker (a result says its activation was taken)."""
        with self.cond:
            self.read_at = None
            write_frame(self.wire, data)

    def _report(self) -> None:
        """Write TOOK for an activation that runs past ``TOOK_DELAY`` (the thread)."""
        with self.cond:
            while True:
                if self.read_at is None:
                    self.cond.wait()
                    continue
                wait = self.read_at + TOOK_DELAY - time.monotonic()
                if wait > 0:
                    self.cond.wait(wait)
                    continue
                self.read_at = None
                try:
                    write_frame(self.wire, TOOK)
                except OSError:  # the supervisor is gone: the worker's loop sees it too
                    return


def main() -> None:
    """Entry point: ``python -c ... "routilux-mp worker N" WIRE_FD WIRE_FD LIFE_FD``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wire, _same, life_fd = (int(fd) for fd in sys.argv[2:5])
    os.set_blocking(wire, True)
    try:
        config = loads(read_frame(wire))  # from the authenticated supervisor
    except (EOFError, OSError):
        os._exit(_process.EXIT_PARENT_GONE)
    _process.exit_if_orphaned(config.parent_pid)  # the nanny
    # Before any thread starts (forking a threaded process is unsafe).
    _process.start_group_guard(life_fd, f"rmp-guard-{config.index}", None)
    reporter = TakeReporter(wire)
    serve(wire, wire, life_fd, config, cleanup_dir=None, node=os.environ.get(NODE_VARIABLE), write=reporter.write,
          on_take=reporter.took)
