"""The state service as the supervisor holds it: the server's process, this process's client, the death watch.

The dispatch loop talks to one :class:`StateService` (unit tests give it
``_exec.stub.StubState`` instead, with the same methods):

* ``open()`` binds the server's socket before any worker starts, so clients
  may connect at once (the kernel holds their connections until the server
  accepts them); ``start_server()`` spawns the server on it later, once the
  first worker is ready (``_loop.STATE_START_GRACE`` later),
  always from the dispatcher thread (the thread that spawns children, see
  ``_process``). Nothing waits for it.
* A watcher thread blocks on the launcher's sentinel (the server's pidfd, or
  its stdout's EOF) and wakes the dispatcher when the server dies; so does a
  call of this process that finds the server hung or gone. The loop then
  calls :meth:`check` (its thread): a server whose state is in a file is
  restarted from it (a hung one is killed first, and its death restarts
  it); otherwise the state is lost and the loop breaks the runtime.
* ``finish()`` sends what is queued and freezes the client on a final snapshot
  (reads after shutdown are served from it); ``stop()`` stops the server and
  removes the socket directory; ``kill()`` is shutdown's last resort.

The process itself (socket, key, spawn, reap, stop escalation) is the
:class:`~.launcher.StateServerLauncher`'s; this class adds what a running
runtime needs around it.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from .. import _context
from .client import HUNG, StatePusher, StoreClient
from .launcher import TERM_TIMEOUT, StateServerLauncher
from .protocol import Method

logger = logging.getLogger("routilux_mp.runtime")


class StateService:
    """Starts, watches and stops the state server of one runtime; holds this process's client of it."""

    def __init__(self, *, max_state_bytes: int, strict: bool, state_timeout: float, lock_timeout: float,
                 local_meta: Callable[[str], dict | None], on_lost: Callable[[], None],
                 state_path: str | None = None, state_sync: str = "normal", backend: str | None = None,
                 host: str | None = None) -> None:
        """Make the socket directory and key, lock the state file (nothing listens yet), and the client.

        ``local_meta`` answers WorkerState reads of status and job counters in
        this process, exactly; ``on_lost`` wakes the dispatcher (any thread)
        when the server dies or a call finds it hung or gone. ``state_path``,
        ``state_sync`` and ``backend``: see :class:`~.launcher.StateServerLauncher`;
        ``host``: listen on TCP there too, for workers on other machines.

        Raises:
            StateFileError: ``state_path`` is held by another live runtime, or cannot be used.
            ValueError: ``backend`` or ``state_sync`` is unknown.
        """
        # First: a state file in use or unusable refuses the runtime before anything is made.
        self.launcher = StateServerLauncher(max_state_bytes=max_state_bytes, strict=strict,
                                            lock_timeout=lock_timeout, backend=backend, state_path=state_path,
                                            state_sync=state_sync, host=host)
        self.state_timeout = state_timeout
        #: This process's client (WorkerState handles of the supervisor use it).
        self.client = StoreClient(self.launcher.address, self.launcher.authkey, state_timeout, lock_timeout)
        self.client.local_meta = local_meta
        self.client.on_lost = on_lost
        self.client.on_failure = self._call_failed
        self.client.on_connect = self._connecting
        #: Why a call of this process found the server hung or gone (the dispatcher restarts it or breaks).
        self._trouble: str | None = None
        #: Guards ``_died`` and ``_trouble``, set by other threads and taken by the dispatcher.
        self._news = threading.Lock()
        #: Sends what workers need to know, but nobody waits for, off the dispatcher thread.
        self.pusher = StatePusher(self.client)
        self._on_death = on_lost
        self._watcher: threading.Thread | None = None
        #: How the server died, once it did (set by the watcher thread).
        self._died: str | None = None
        #: stop() or kill() began: the server's death is expected.
        self._stopping = False

    @property
    def address(self) -> str | tuple[str, int]:
        """The socket path clients connect to (``(host, port)`` on a cluster)."""
        return self.launcher.address

    @property
    def authkey(self) -> bytes:
        """The random key every client proves it holds."""
        return self.launcher.authkey

    @property
    def socket_dir(self) -> str:
        """The private directory holding the socket."""
        return self.launcher.socket_dir

    @property
    def pid(self) -> int | None:
        """The server's process id, once started."""
        return self.launcher.pid

    @property
    def state_path(self) -> str | None:
        """The state file the user named (``None``: the state is private to this runtime)."""
        return self.launcher.state_path

    @property
    def stored_workers(self) -> dict[str, str]:
        """What the state file held when the runtime started: ``{worker_id: flow_id}``."""
        return self.launcher.stored_workers

    @property
    def stored_counts(self) -> dict[str, tuple[int, int]]:
        """The job counters ``(processed, failed)`` the state file held per worker when the runtime started."""
        return self.launcher.stored_counts

    @property
    def lost(self) -> str | None:
        """Why the server is lost (a call found it hung or gone), if it is."""
        return self.client.lost

    def open(self) -> None:
        """Bind the server's socket: clients may connect from now on (they wait in its backlog)."""
        self.launcher.listen()

    def start_server(self) -> str | None:
        """Spawn the server on the bound socket (once; dispatcher thread); why it could not start, or ``None``."""
        try:
            sentinel = self.launcher.start()
        except OSError as exc:
            return f"the state server could not be started ({exc})"
        if sentinel is not None:
            self._start_watch(sentinel)
        return None

    def _connecting(self) -> None:
        """A thread of this process opens a connection: on the dispatcher thread (a done-callback or a
        policy that uses WorkerState), start the server first if it is not yet; nothing else would start it
        while that thread waits for it (other threads wait for the dispatcher to start it)."""
        if not self.launcher.started and _context.on_dispatcher():
            self.start_server()

    def _start_watch(self, sentinel: int) -> None:
        """Watch ``sentinel`` for the server's death, on a thread of its own."""
        self._watcher = threading.Thread(target=self._watch, args=(sentinel,), daemon=True,
                                         name="routilux-mp state watcher")
        self._watcher.start()

    def _watch(self, sentinel: int) -> None:
        """Wait (watcher thread) for the server to die; record how, and wake the dispatcher."""
        poller = select.poll()  # (not select(): a descriptor number may be over FD_SETSIZE)
        poller.register(sentinel, select.POLLIN)
        is_pidfd = self.launcher.sentinel_is_pidfd
        try:
            while True:
                poller.poll()
                # Once stopping, stop() owns the sentinel (it may be closed and its number reused).
                if self._stopping or is_pidfd or not os.read(sentinel, 65536):
                    break
        except (OSError, ValueError):  # closed under us: the server is gone
            pass
        if self._stopping:
            return
        how = self.launcher.reap()
        with self._news:
            self._died = how
        self._on_death()

    def _call_failed(self, why: str) -> None:
        """A call of this process found the server hung or gone (any thread): the dispatcher acts."""
        with self._news:
            if self._trouble is None or HUNG not in self._trouble:  # a hang must not be hidden by a later report
                self._trouble = why
        self._on_death()

    def check(self, stopping: bool) -> str | None:
        """Dispatcher thread: restart a dead server whose state is in a file; why the state is lost, else ``None``.

        A hung server whose state is in a file is killed (its death then
        restarts it). A server that died more than the launcher's restart
        budget allows, or whose state was in its memory, is lost.
        """
        with self._news:
            died, self._died = self._died, None
            trouble, self._trouble = self._trouble, None
        if self._stopping or stopping:
            return None
        if died is not None:
            if not self.launcher.restartable:
                return died
            try:
                sentinel, refused = self.launcher.restart()
            except OSError as exc:
                sentinel, refused = None, f"it could not be started again ({exc})"
            if sentinel is None:
                return f"{died}; {refused}"
            self._start_watch(sentinel)
            logger.warning("routilux-mp: %s; restarted it from %s (calls in flight are sent again, held "
                           "worker_state.lock() blocks fail with LockLostError)", died,
                           self.launcher.state_path or "its private state file")
            return None
        if trouble is not None and self.launcher.restartable:
            # Hung: kill it, and its death restarts it; gone: its death is (being) handled.
            self.launcher.kill_if_hung(trouble, self.state_timeout)
        return self.client.lost

    def push(self, method: Method, *args: Any) -> None:
        """Send ``method(*args)`` to the server without waiting (in order, from the pusher thread)."""
        self.pusher.push(method, *args)

    def mark_lost(self, message: str) -> None:
        """The server is lost for good: every call fails fast from now on; kill what is left of it."""
        self.client.mark_lost(message)
        self.launcher.kill()

    def finish(self, metas: dict[str, dict], timeout: float) -> None:
        """Send what is queued and take the final snapshot that reads are served from after shutdown."""
        if self.client.snapshot is not None:  # taken already (by shutdown() while the dispatcher was stuck)
            return
        if not self.launcher.started and self.state_path is not None and self.pusher.pushed:
            # Shut down before the server started, with workers registered in the user's state file:
            # start it now, so the file holds them (``list_workers()`` of the next runtime shows them).
            self.start_server()
        if not self.launcher.started:
            # Nothing was ever stored, and nothing has to be. Closing the listener refuses the
            # connections waiting in its backlog, and the snapshot (taken first) ends the retries of
            # a push queued meanwhile: nobody waits for a server that never comes.
            self.launcher.close_listener()
            self.client.freeze(metas, server_started=False)
            self.pusher.close(timeout)
            return
        self.pusher.close(timeout)
        self.client.freeze(metas, server_started=True)

    def stop(self) -> None:
        """Stop the server (stop request, join, SIGTERM, SIGKILL) and remove the socket directory."""
        self._stopping = True
        self.launcher.stop()
        if self._watcher is not None:
            self._watcher.join(TERM_TIMEOUT)  # it returns once the process is gone
        self.launcher.cleanup()

    def kill(self) -> None:
        """SIGKILL the server now and remove the socket directory (any thread: shutdown's last resort)."""
        self._stopping = True
        self.launcher.kill()
        popen = self.launcher.popen
        if popen is not None:
            try:
                popen.wait(TERM_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        self.launcher.cleanup()
