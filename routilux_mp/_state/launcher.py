"""The supervisor's side of the state server: its private socket, its key, its start, death and stop.

One :class:`StateServerLauncher` per runtime, driven by the supervisor's
dispatcher thread (the one thread that spawns children, see ``_process``)::

    launcher = StateServerLauncher(max_state_bytes=..., strict=..., lock_timeout=...)
    launcher.listen()              # bind: clients may connect now (they wait in the backlog)
    fd = launcher.start()          # later (deferred), once: spawn the server on that socket
    ... watch fd: readable when the server died -> launcher.reap() says how ...
    launcher.stop()                # stop request -> join -> SIGTERM -> SIGKILL
    launcher.cleanup()             # remove the private directory

After ``reap()``, :meth:`StateServerLauncher.restart` (``listen()`` and
``start()`` again) starts a new server on the same address with the same key,
so clients reconnect to it. It does so only when the store survives it
(:attr:`~StateServerLauncher.restartable`: the state is in a file) and the
server has not died too often (:data:`MAX_RESTARTS` within
:data:`RESTART_WINDOW`): otherwise the state is lost.

* **Where the state is kept.** ``state_path``: an SQLite file (see
  ``statefile``) the launcher locks for this runtime, and whose lock it hands
  to every server it starts (so the lock outlives the supervisor while a
  server runs, and neither outlives the other's death for long). Without
  it, by default (:data:`DEFAULT_BACKEND`), a private SQLite file in the
  runtime's private directory, written without ``fsync`` (it only has to
  outlive the server, not the machine) and removed with the directory.

* **Create**: a private 0700 directory (``tempfile.mkdtemp``) holding the
  socket ``state.sock`` (0600), and a random 32-byte authkey. Nothing listens
  on TCP, unless a ``host`` is given (the Ray backend gives this machine's
  address on the cluster: workers on other nodes connect there): the server
  then listens on ``(host, port)``, one address never ``0.0.0.0``, and every
  connection must still pass the authkey's challenge before anything is
  unpickled.
* **Start** is deferred by the supervisor (the server starts once the first
  worker is ready, ``_loop.STATE_START_GRACE`` later, so neither the
  workers' start-up nor the first results wait for its spawn or compete with
  its start-up for CPU). Binding first lets clients connect at once: the
  kernel holds their connections until the server accepts them. The server gets the bound socket
  as an inherited descriptor and its :class:`~.protocol.ServerConfig` (the
  authkey included) on stdin, never on the command line.
* **Death** shows on a *sentinel* descriptor: the server's pidfd, or (without
  pidfd support) its stdout pipe, which reads EOF when it exits.
* **Stop** escalates with named timeouts, as ``multiprocessing.managers``'
  ``_finalize_manager`` does: close its stdin (the stop request; EOF is also
  how the server notices the supervisor's death) -> wait ``STOP_TIMEOUT`` ->
  SIGTERM its group -> wait ``TERM_TIMEOUT`` -> SIGKILL.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .. import _process
from .._messages import ExitInfo, dumps, write_frame
from .backends import check_backend
from .client import HUNG
from .protocol import ServerConfig
from .statefile import StateFile

#: Seconds the state server gets to exit after its stdin closes, before SIGTERM.
STOP_TIMEOUT = 5.0
#: Seconds the state server gets after SIGTERM before SIGKILL (and to be reaped once its sentinel fired).
TERM_TIMEOUT = 2.0
#: Seconds after the workers' start at which the supervisor starts the state server, if no worker was ready sooner.
START_DELAY = 0.3
#: Connections the kernel queues on the socket before the server accepts them.
LISTEN_BACKLOG = 128
#: A server that died more than this many times within :data:`RESTART_WINDOW` seconds is not restarted again.
MAX_RESTARTS = 3
RESTART_WINDOW = 60.0
#: The store of a runtime without ``state_path``: ``"sqlite"`` (a private temporary file) or ``"memory"``.
DEFAULT_BACKEND = "memory"
#: ``state_path`` that keeps the state in the server's memory only (SQLite's name for an in-memory database).
MEMORY = ":memory:"
#: ``synchronous`` of the private temporary file: it must survive the server, never the machine.
TEMP_SYNC = "OFF"
#: Values of ``state_sync``: SQLite's ``synchronous`` for a ``state_path`` file.
STATE_SYNC = {"normal": "NORMAL", "full": "FULL"}


class StateServerLauncher:
    """Starts, watches and stops one state-server process on a private unix socket.

    Attributes:
        address: the socket path clients connect to.
        authkey: the random key every connection must prove it holds.
        socket_dir: the private 0700 directory holding the socket (workers
            remove it if the supervisor dies; see ``_process``).
        popen: the server process once started, else ``None``.
    """

    def __init__(self, *, max_state_bytes: int, strict: bool, lock_timeout: float, backend: str | None = None,
                 state_path: str | None = None, state_sync: str = "normal", host: str | None = None) -> None:
        """Make the private directory and the key, lock the state file; nothing listens yet.

        ``backend`` overrides the choice (``"memory"``, or ``"sqlite"`` which
        needs no ``state_path``: a private temporary file). With ``host``, a
        TCP port is reserved there (workers on other machines connect to it).

        Raises:
            ValueError: ``backend`` names no state backend, or ``state_sync`` is unknown.
            StateFileError: ``state_path`` is held by another live runtime, or cannot be used.
        """
        if state_sync not in STATE_SYNC:
            raise ValueError(f"state_sync must be one of {', '.join(map(repr, STATE_SYNC))}, got {state_sync!r}")
        if state_path == MEMORY:
            backend, state_path = "memory", None
        name = backend or ("sqlite" if state_path is not None else DEFAULT_BACKEND)
        check_backend(name)
        if state_path is not None and name != "sqlite":
            raise ValueError(f"state_path needs the 'sqlite' state backend, not {name!r}")
        self._sys_path = list(sys.path)  # the server imports what modify functions refer to, as we do
        self.socket_dir = tempfile.mkdtemp(prefix=_process.SOCKET_DIR_PREFIX)  # mode 0700
        self.address: str | tuple[str, int] = os.path.join(self.socket_dir, "state.sock")
        self.authkey = os.urandom(32)
        #: The state file held for this runtime (``None`` for the memory backend).
        self.state_file: StateFile | None = None
        options: dict = {}
        if name == "sqlite":
            path = state_path if state_path is not None else os.path.join(self.socket_dir, "state.db")
            try:
                self.state_file = StateFile(path)
            except BaseException:
                shutil.rmtree(self.socket_dir, ignore_errors=True)
                raise
            sync = STATE_SYNC[state_sync] if state_path is not None else TEMP_SYNC
            options = {"path": self.state_file.path, "synchronous": sync}
        self._settings = (max_state_bytes, strict, lock_timeout, name, options)
        #: With a host: the TCP socket bound at once (so the address is known), listened on by listen().
        self._tcp: socket.socket | None = None
        if host is not None:
            self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self._tcp.bind((host, 0))
            except OSError:
                self._tcp.close()
                self.cleanup()
                raise
            self.address = self._tcp.getsockname()[:2]
        #: What the state file held when the runtime started: ``{worker_id: flow_id}``, and their job counters.
        self.stored_workers: dict[str, str] = dict(self.state_file.workers) if state_path is not None else {}
        self.stored_counts: dict[str, tuple[int, int]] = dict(self.state_file.counts) if state_path is not None else {}
        #: The file the user named (``None``: the state is private to this runtime).
        self.state_path = None if state_path is None else self.state_file.path
        self.popen: subprocess.Popen | None = None
        #: The bound socket until the server takes it over (or it is closed unused).
        self._listener: socket.socket | None = None
        #: Readable once the server died: its pidfd, or its stdout (EOF) without pidfd support.
        self._sentinel: int | None = None
        self._pidfd: int | None = None
        #: When the server died, for the restart budget.
        self._deaths: collections.deque[float] = collections.deque()
        self._started_at = 0.0

    @property
    def started(self) -> bool:
        """True once the server process was spawned (alive or not)."""
        return self.popen is not None

    @property
    def pid(self) -> int | None:
        """The server's pid once started."""
        return None if self.popen is None else self.popen.pid

    @property
    def restartable(self) -> bool:
        """True when a new server gets back everything acknowledged (the state is in a file)."""
        return self.state_file is not None

    @property
    def sentinel(self) -> int | None:
        """The descriptor to watch for the server's death while it runs (``None`` before start, after reap)."""
        return self._sentinel

    @property
    def sentinel_is_pidfd(self) -> bool:
        """True when the sentinel is the server's pidfd (readable once it died), not its stdout (EOF then)."""
        return self._pidfd is not None and self._pidfd == self._sentinel

    def listen(self) -> None:
        """Bind the socket (mode 0600) and listen: clients may connect from now on.

        Also after :meth:`reap`, for a restart: the dead server's socket file is replaced.

        Raises:
            OSError: the socket could not be bound.
            RuntimeError: a server still runs on it, or the socket is bound already.
        """
        if self._listener is not None or (self.popen is not None and self.popen.poll() is None):
            raise RuntimeError("the state server's socket is bound already, or its server still runs")
        if isinstance(self.address, tuple):
            self._listener = self._listen_tcp()
            return
        if self.popen is not None and os.path.exists(self.address):
            os.unlink(self.address)  # the dead server's; clients connect to the new one at the same path
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.address)
            os.chmod(self.address, 0o600)
            listener.listen(LISTEN_BACKLOG)
        except OSError:
            listener.close()
            raise
        self._listener = listener

    def _listen_tcp(self) -> socket.socket:
        """Listen on the reserved TCP port (after a restart: bind it again, the same address)."""
        listener, self._tcp = self._tcp, None
        if listener is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind(self.address)
            except OSError:
                listener.close()
                raise
        listener.listen(LISTEN_BACKLOG)
        return listener

    def start(self) -> int | None:
        """Spawn the server on the bound socket, once; return the sentinel to watch for its death.

        Returns ``None`` when there is nothing to start: it started already,
        or the socket was closed unused (:meth:`close_listener`).

        Raises:
            OSError: no process could be started (the socket is closed: clients fail fast).
        """
        listener = self._listener
        if listener is None:
            return None
        self._listener = None
        fds = [listener.fileno()]
        if self.state_file is not None:
            fds.append(self.state_file.fd)  # the server shares the file's lock while it runs
        try:
            popen = _process.spawn(
                "routilux_mp._state.server", "routilux-mp state-server", pass_fds=fds,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            )
            max_state_bytes, strict, lock_timeout, backend, options = self._settings
            config = ServerConfig(self.address, listener.fileno(), self.authkey, os.getpid(), self._sys_path,
                                  max_state_bytes, strict, lock_timeout, backend, options, self.socket_dir)
        finally:
            listener.close()  # the server holds its own copy now
        self.popen = popen
        self._started_at = time.monotonic()
        assert popen.stdin is not None and popen.stdout is not None
        try:
            write_frame(popen.stdin.fileno(), dumps(config))
        except OSError:  # it died at once: its sentinel says so, and how
            pass
        self._pidfd = _process.open_pidfd(popen.pid)
        self._sentinel = self._pidfd if self._pidfd is not None else popen.stdout.fileno()
        return self._sentinel

    def close_listener(self) -> None:
        """Close the socket if the server never took it over: connections waiting in its backlog are refused."""
        for sock in (self._listener, self._tcp):
            if sock is not None:
                sock.close()
        self._listener = self._tcp = None

    def reap(self) -> str:
        """After the sentinel fired: stop watching it, wait for the exit, and say how the server died.

        Unwatch the sentinel before calling this (it is closed here, and fd
        numbers are reused). Returns e.g. ``"the state server (pid 4121) was
        killed by SIGKILL"``.
        """
        popen = self.popen
        assert popen is not None, "reap() before start()"
        self._close_sentinel()
        try:
            code = popen.wait(TERM_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None  # it closed its stdout but lives on: lost all the same
        said = self._last_words(popen) if code is not None else ""
        self._deaths.append(time.monotonic())
        how = ExitInfo.from_returncode(popen.pid, code).how()
        return f"the state server (pid {popen.pid}) {how}" + (f": {said}" if said else "")

    @staticmethod
    def _last_words(popen: subprocess.Popen) -> str:
        """What a dead server wrote on its stdout (why it could not start), and close that pipe."""
        if popen.stdout is None or popen.stdout.closed:
            return ""
        try:
            os.set_blocking(popen.stdout.fileno(), False)
            said = (popen.stdout.read(4096) or b"").decode(errors="replace").strip()
        except (OSError, ValueError):
            said = ""
        popen.stdout.close()
        return said

    def restart(self) -> tuple[int | None, str]:
        """After :meth:`reap`: start a new server from the state file; ``(sentinel, "")`` or ``(None, why not)``.

        Refused when the store does not survive a restart (memory), or when
        the server died more than :data:`MAX_RESTARTS` times within
        :data:`RESTART_WINDOW` seconds (it cannot run: a broken file, a full
        disk). Raises ``OSError`` if no process could be started.
        """
        if not self.restartable:
            return None, "its state was in its memory"
        now = time.monotonic()
        while self._deaths and self._deaths[0] < now - RESTART_WINDOW:
            self._deaths.popleft()
        if len(self._deaths) > MAX_RESTARTS:
            return None, f"it died {len(self._deaths)} times within {RESTART_WINDOW:g} s, so it was not restarted"
        if self.popen is not None and self.popen.stdin is not None:
            self.popen.stdin.close()
        self.listen()
        return self.start(), ""

    def kill_if_hung(self, why: str, silence: float) -> None:
        """SIGKILL the server if ``why`` says a call found it hung and it has run for ``silence`` seconds.

        A server started since that call began is not the one that hung: it is left alone.
        """
        if HUNG in why and self.popen is not None and time.monotonic() - self._started_at >= silence:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server's group now if it runs (its state is declared lost); does not wait."""
        if self.popen is not None and self.popen.poll() is None:
            _process.signal_group(self.popen.pid, signal.SIGKILL)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop the server: close its stdin, wait ``timeout``, SIGTERM, wait ``TERM_TIMEOUT``, SIGKILL.

        Unwatch the sentinel before calling this. Also closes an unused
        socket. Returns the exit code (negative: killed by that signal;
        ``None``: it never started).
        """
        self.close_listener()
        popen = self.popen
        code = None
        if popen is not None:
            def close_stdin() -> None:
                """The stop request: EOF on the server's stdin."""
                if popen.stdin is not None:
                    popen.stdin.close()

            code = _process.stop_process(popen, join_timeout=timeout, term_timeout=TERM_TIMEOUT, ask=close_stdin)
            if popen.stdout is not None:
                popen.stdout.close()
        self._close_sentinel()
        return code

    def cleanup(self) -> None:
        """Release the state file and remove the private directory (after :meth:`stop`, or after killing the server)."""
        if self.state_file is not None:
            self.state_file.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _close_sentinel(self) -> None:
        """Close the pidfd (the stdout sentinel is closed with the pipe, by :meth:`stop`)."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._sentinel = None
