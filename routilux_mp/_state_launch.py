"""The state server's process, seen from the supervisor: its socket, start, death and stop.

The supervisor composes one :class:`StateServerLauncher` (kept apart so the
state service's own launcher can take its place behind the same few methods).

* Open: the supervisor binds the server's unix socket itself, in a private
  0700 directory, before any worker starts, so clients may connect at once:
  the kernel holds their connections until the server accepts them.
* Start: the server is spawned on that socket once the first worker is ready
  (or after ``STATE_START_DELAY``), so on a small machine it does not compete
  with the workers' start-up for CPU; always from the dispatcher thread (its
  ``PR_SET_PDEATHSIG`` is tied to the spawning thread). Nothing waits for it.
* Watch: a thread blocks on the server's pidfd (or its stdout's EOF) and
  wakes the dispatcher when it dies; the dispatcher then breaks the runtime.
* Stop: last of all processes: stdin closed (its stop request), join,
  SIGTERM, SIGKILL; the socket directory removed.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable

from . import _process
from ._messages import ExitInfo, ServerConfig, dumps, write_frame
from .state import StatePusher, _StoreClient

#: Seconds the state server gets to exit after its stdin closes, before SIGTERM / SIGKILL.
STATE_STOP_TIMEOUT = 5.0
#: Seconds after the workers' start at which the state server starts, if no worker was ready sooner.
STATE_START_DELAY = 0.3
#: Seconds the state server gets after SIGTERM before SIGKILL, and to be reaped after SIGKILL.
STATE_TERM_GRACE = 2.0


class StateServerLauncher:
    """Starts, watches and stops the state-server process of one runtime; holds this process's client."""

    def __init__(self, *, max_state_bytes: int, strict: bool, state_timeout: float, lock_timeout: float,
                 local_meta: Callable[[str], dict | None], on_lost: Callable[[], None]) -> None:
        #: Limits the server enforces.
        self.max_state_bytes = max_state_bytes
        self.strict = strict
        self.lock_timeout = lock_timeout
        #: The private directory holding the socket (workers remove it if the supervisor dies).
        self.socket_dir = tempfile.mkdtemp(prefix=_process.SOCKET_DIR_PREFIX)
        #: Where the server listens, and the random key every client authenticates with.
        self.address = os.path.join(self.socket_dir, "state.sock")
        self.authkey = os.urandom(32)
        #: This process's client (WorkerState handles of the supervisor use it).
        self.client = _StoreClient(self.address, self.authkey, state_timeout, lock_timeout)
        # WorkerStates in this process read status and job counters from the supervisor, exactly.
        self.client.local_meta = local_meta
        # A call from any thread of this process that finds the server lost wakes the dispatcher.
        self.client.on_lost = on_lost
        #: Sends what workers need to know, but nobody waits for, off the dispatcher thread.
        self.pusher = StatePusher(self.client)
        #: Wakes the dispatcher when the server dies.
        self._on_death = on_lost
        self._listener: socket.socket | None = None
        self._popen: subprocess.Popen | None = None
        self._pidfd: int | None = None
        self._watcher: threading.Thread | None = None
        #: How the server died, once it did (set by the watcher thread).
        self._died: str | None = None
        #: stop() began: its death is expected.
        self._stopping = False
        self._sys_path = list(sys.path)

    @property
    def pid(self) -> int | None:
        """The server's process id, once started."""
        return None if self._popen is None else self._popen.pid

    @property
    def lost(self) -> str | None:
        """Why the server is lost (a call found it hung or gone), if it is."""
        return self.client.lost

    def open(self) -> None:
        """Bind the server's socket (clients may connect from now on; they wait in its backlog)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.address)
            os.chmod(self.address, 0o600)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._listener = listener

    def start_server(self) -> str | None:
        """Spawn the server on the bound socket (once; dispatcher thread); why it could not start, or ``None``."""
        listener = self._listener
        if listener is None:
            return None
        self._listener = None
        try:
            popen = _process.spawn(
                "routilux_mp._state_server", "routilux-mp state-server", pass_fds=(listener.fileno(),),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            )
            config = ServerConfig(self.address, listener.fileno(), self.authkey, os.getpid(), self._sys_path,
                                  self.max_state_bytes, self.strict, self.lock_timeout)
        except OSError as exc:
            return f"the state server could not be started ({exc})"
        finally:
            listener.close()
        self._popen = popen
        assert popen.stdin is not None and popen.stdout is not None
        write_frame(popen.stdin.fileno(), dumps(config))
        # Its death shows on its pidfd, or (without pidfd support) as EOF on its stdout.
        self._pidfd = _process.open_pidfd(popen.pid)
        fd = self._pidfd if self._pidfd is not None else popen.stdout.fileno()
        self._watcher = threading.Thread(target=self._watch, args=(popen, fd), name="routilux-mp state watcher",
                                         daemon=True)
        self._watcher.start()
        return None

    def _watch(self, popen: subprocess.Popen, fd: int) -> None:
        """Wait (watcher thread) for the server to die; record how and wake the dispatcher."""
        poller = select.poll()  # (not select(): a descriptor number may be over FD_SETSIZE)
        poller.register(fd, select.POLLIN)
        try:
            while True:
                poller.poll()
                if fd == self._pidfd or not os.read(fd, 65536):  # its pidfd, or (without) EOF on its stdout
                    break
        except (OSError, ValueError):  # closed under us by stop(): it is gone
            pass
        try:
            code = popen.wait(STATE_TERM_GRACE)
        except subprocess.TimeoutExpired:
            code = None  # it closed its stdout but lives on: lost all the same
        if self._stopping:
            return
        self._died = f"the state server (pid {popen.pid}) {ExitInfo.from_returncode(popen.pid, code).how()}"
        self._on_death()

    def died(self) -> str | None:
        """How the server died, if it died (and was not stopped)."""
        return None if self._stopping else self._died

    def push(self, method: str, *args: object) -> None:
        """Send ``method(*args)`` to the server without waiting (in order, from the pusher thread)."""
        self.pusher.push(method, *args)

    def mark_lost(self, message: str) -> None:
        """The server is lost for good: every call fails fast from now on; kill what is left of it."""
        self.client.mark_lost(message)
        if self._popen is not None and self._popen.poll() is None:
            _process.signal_group(self._popen.pid, signal.SIGKILL)

    def finish(self, metas: dict[str, dict], timeout: float) -> None:
        """Send what is queued and take the final snapshot that reads are served from after shutdown."""
        if self.client.snapshot is not None:  # taken already (by shutdown() while the dispatcher was stuck)
            return
        started = self._popen is not None
        if not started:
            # Stopped before the server started: nothing was ever stored. Closing the listener
            # refuses the connections waiting in its backlog, so nobody waits for it.
            self._close_listener()
        self.pusher.close(timeout)
        self.client.freeze(metas, server_started=started)

    def stop(self) -> None:
        """Stop the server (stdin closed, join, SIGTERM, SIGKILL) and remove the socket directory."""
        self._stopping = True
        self._close_listener()
        popen = self._popen
        if popen is not None:
            def close_stdin() -> None:
                """The server's stop request: EOF on its stdin."""
                if popen.stdin is not None:
                    popen.stdin.close()

            _process.stop_process(popen, join_timeout=STATE_STOP_TIMEOUT, term_timeout=STATE_TERM_GRACE,
                                  ask=close_stdin)
            if self._watcher is not None:
                self._watcher.join(STATE_TERM_GRACE)  # it returns once the process is gone
            if popen.stdout is not None:
                popen.stdout.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server now and remove the socket directory (any thread: shutdown's last resort)."""
        self._stopping = True
        popen = self._popen
        if popen is not None and popen.poll() is None:
            _process.signal_group(popen.pid, signal.SIGKILL)
            try:
                popen.wait(STATE_TERM_GRACE)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _close_listener(self) -> None:
        """Close the server's socket if the server never started to take it over."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
