"""A local worker process: the command-pipe loop around :class:`~routilux_mp._worker.ActivationRunner`.

Started by :class:`~routilux_mp._exec.local.LocalProcessBackend` as a fresh
interpreter (``routilux-mp worker N``) that never imports the user's
``__main__``. It reads ``_WorkerConfig`` and then one message after another
from its command pipe (a ``_Batch`` holds several activations), and writes
``_Ready``, one ``_Result`` per activation as soon as it has it, and
``_Exiting`` on its result pipe.

EOF on the command pipe means the supervisor is gone. A watchdog thread and a
group guard process (see ``_process``) block on a second pipe that only the
supervisor holds open, so the worker's whole process group goes, and the
runtime's socket directory with it, while logic runs if the supervisor dies.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from .. import _context, _logs, _process
from .._messages import _Activation, _Batch, _Exiting, _Ready, _WorkerConfig, dumps, loads, read_frame, write_frame
from .._state.client import StoreClient
from .._worker import ActivationRunner, forked_child_exit
from ..state import close_resources


def serve(commands: int, results: int, life_fd: int, config: _WorkerConfig, *, cleanup_dir: str | None,
          node: str | None = None, write: Callable[[bytes], None] | None = None,
          on_take: Callable[[], None] | None = None) -> None:
    """Serve activations until told to stop (or the supervisor disappears); never returns.

    ``cleanup_dir`` is the runtime's socket directory, removed if the
    supervisor dies (``None``: not this process's to remove). ``node``: the
    cluster node this worker runs on, when it is not the supervisor's
    machine (its state locks are owned by ``(node, pid)``). ``write``: how
    a message goes back (default: a frame on ``results``); ``on_take``: called
    as each activation is read (a socket does not tell its writer what was
    read, a pipe does).
    """
    _process.watch_for_eof(life_fd, "routilux-mp parent watchdog",
                           on_eof=lambda: _process.kill_group_tree(cleanup_dir))
    _process.set_process_name(f"rmp-worker-{config.index}")
    _context.enter_worker()
    sys.path[:] = config.sys_path
    faulthandler.enable()
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    me = os.getpid()

    def send(message: Any) -> None:
        """Write a message on the result pipe, or with ``write`` (only this process may)."""
        if os.getpid() != me:  # a child that logic forked came back here: it must not speak for us
            forked_child_exit(1)
        if write is None:
            write_frame(results, dumps(message))
        else:
            write(dumps(message))

    # Threads that logic starts may log while the main thread writes a result: one frame at a time.
    reply = _logs.locked(send)
    _logs.forward_from_worker(reply, config.log_levels)

    client = StoreClient(config.state_address, config.authkey, config.state_timeout, config.lock_timeout)
    client.node = node
    runner = ActivationRunner(client, max_rss=config.max_rss, max_activations=config.max_activations)
    reply(_Ready(me))
    reason = None
    while reason is None:
        try:
            raw = read_frame(commands)
        except (EOFError, OSError):  # only the supervisor's end of this pipe is gone: so is the supervisor
            _process.kill_group_tree(cleanup_dir)
            os._exit(_process.EXIT_PARENT_GONE)
        message = loads(raw)
        # A batch's activations run in order, each result written before the next starts: a crash
        # loses none, and the ones after the crash (or a recycle) were never started.
        for each in message.acts if type(message) is _Batch else (message,):
            if on_take is not None and type(each) is _Activation:
                on_take()
            reason = runner.step(each, reply)
            if reason is not None:
                break
    close_resources()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing more to say
            stream.flush()
    reply(_Exiting(reason))
    os._exit(0)


def main() -> None:
    """Entry point: ``python -c ... "routilux-mp worker N" CMD_FD RESULT_FD LIFE_FD``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    commands, results, life_fd = (int(fd) for fd in sys.argv[2:5])
    try:
        config = loads(read_frame(commands))
    except (EOFError, OSError):
        os._exit(_process.EXIT_PARENT_GONE)
    _process.exit_if_orphaned(config.parent_pid)
    # Before any thread starts (forking a threaded process is unsafe).
    cleanup_dir = os.path.dirname(config.state_address)
    _process.start_group_guard(life_fd, f"rmp-guard-{config.index}", cleanup_dir)
    serve(commands, results, life_fd, config, cleanup_dir=cleanup_dir)
