"""The state-server process: accept, authenticate, and serve :class:`~.protocol.Method` calls on the store.

``multiprocess``'s manager ``Server`` listens, runs one thread per connection
and checks the authkey before it reads a single pickle; its only public call
here is ``accept_connection``, after which :class:`StoreServer` serves the
connection's requests on one :class:`~.store.StateStore`. A frame header over
the request limit closes that connection (nothing is allocated for it);
every other failure goes back to the caller as error data, never as an
exception object.

The process (``routilux-mp state-server``, see :func:`main`) is started by
``launcher`` on a socket the supervisor already bound, reads its
:class:`~.protocol.ServerConfig` from stdin, ignores SIGINT, and exits when
its stdin reaches EOF: the supervisor's stop request, or its death.

Two more exits, both for the supervisor to restart it from its state file:
the backend cannot be opened (:data:`EXIT_START_FAILED`, the reason on
stdout, where the launcher reads it), or a commit failed
(:data:`EXIT_STORE_FAILED`): what the server holds in memory may then be
ahead of the file, and no write of that commit was acknowledged.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from multiprocess import connection, managers

from .. import _process
from .._messages import FrameError, dumps, error_data, read_frame
from ..errors import StateFileError
from .backend import BackendFailed
from .backends import open_backend
from .protocol import (
    ALIVE,
    CONNECT_TIMEOUT,
    ERROR,
    EXPOSED,
    HANDSHAKE_LIMIT,
    KEEPALIVE_MAX,
    KEEPALIVE_MIN,
    RETURN,
    SERIALIZER,
    ServerConfig,
    encode_reply,
    io_timeouts,
    request_limit,
    take_frame,
)
from .replay import set_call
from .store import FnRaised, StateStore, set_heartbeat

#: Exit code when the backend could not be opened (the reason is the server's last line on stdout).
EXIT_START_FAILED = 3
#: Exit code when a commit failed: the supervisor restarts the server from what the file holds.
EXIT_STORE_FAILED = 4

if TYPE_CHECKING:
    from typing_extensions import Self


class Keepalive:
    """Tells a connection's client that the server is alive (the store's heartbeat while a call waits)."""

    __slots__ = ("_fd", "_last", "interval")

    _FRAME = encode_reply(ALIVE, None)

    def __init__(self, fd: int) -> None:
        """A keepalive on connection ``fd``; :meth:`begin` sets it up for each call."""
        self._fd = fd
        self.interval = KEEPALIVE_MAX
        self._last = time.monotonic()

    def begin(self, interval: float) -> None:
        """A call begins: keep alive at the interval its client asked for (within bounds)."""
        self.interval = min(max(interval, KEEPALIVE_MIN), KEEPALIVE_MAX)
        self._last = time.monotonic()

    def due(self) -> bool:
        """True once ``interval`` passed since the call began or the last keepalive."""
        return time.monotonic() - self._last >= self.interval

    def send(self) -> None:
        """Send one keepalive (blocking: call it without holding the store's condition)."""
        _write_all(self._fd, self._FRAME)
        self._last = time.monotonic()


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the blocking connection ``fd``."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _FrameSocketReader:
    """Reads request frames from a blocking socket; a header over ``limit`` raises FrameError."""

    __slots__ = ("_buf", "_fd", "_limit")

    def __init__(self, fd: int, limit: int) -> None:
        """A reader of connection ``fd`` taking frames of at most ``limit`` bytes."""
        self._fd = fd
        self._limit = limit
        self._buf = bytearray()

    def read(self) -> bytes:
        """The next request's body; ``EOFError`` when the client is gone."""
        buf = self._buf
        while True:
            request, want = take_frame(buf, self._limit)
            if request is not None:
                return request
            chunk = os.read(self._fd, want)
            if not chunk:
                raise EOFError
            buf += chunk


class StoreServer(managers.Server):
    """multiprocess's manager server, serving one store's exposed methods with bounded frames and keepalives."""

    #: The manager's own calls a connection may make: only the one that turns it into ours.
    public = ("accept_connection",)

    def __init__(self, store: StateStore, limits: dict, address: Any, authkey: bytes) -> None:
        """Serve ``store`` at ``address`` (the socket is adopted, see ``_PickleListener``)."""
        super().__init__({}, address, authkey, SERIALIZER)
        self.store = store
        self.limits = limits
        #: Request method name -> the store's bound method: the explicit exposed list.
        self.handlers = {name: getattr(store, name) for name in EXPOSED}

    def accept_connection(self, c: Any, name: str) -> None:
        """The manager's handshake call: send our limits, then serve this connection until it closes."""
        c.send((RETURN, self.limits))
        self.serve_client(c)

    def serve_client(self, conn: Any) -> None:
        """Answer the connection's requests one by one until it closes or sends a bogus header."""
        fd = conn.fileno()
        reader = _FrameSocketReader(fd, self.limits["max_request_bytes"])
        keepalive = Keepalive(fd)
        set_heartbeat(keepalive)  # this thread serves this one connection, one call at a time
        while not self.stop_event.is_set():
            try:
                request = reader.read()
            except FrameError as exc:
                sys.stderr.write(f"routilux-mp state server: closed a client connection: {exc}\n")
                break
            except (EOFError, OSError):
                break
            try:
                _write_all(fd, self.answer(request, keepalive))
            except OSError:
                break
        sys.exit(0)  # the manager's handle_request() closes the connection

    def answer(self, request: bytes, keepalive: Keepalive | None = None) -> bytes:
        """The reply frame to one request: the result, or error data (``keepalive``: the connection's)."""
        try:
            method, args, alive_every, request_id, effect = pickle.loads(request)
            handler = self.handlers.get(method)
            if handler is None:
                raise AttributeError(f"the state server has no method {method!r} (it serves {', '.join(EXPOSED)})")
            if keepalive is not None:
                keepalive.begin(alive_every)
            set_call(request_id, effect)
            return encode_reply(RETURN, handler(*args))
        except FnRaised as exc:  # the user's modify function raised: report its error, not ours
            return encode_reply(ERROR, error_data(exc.error, keep_args=True))
        except BackendFailed as exc:  # memory and file disagree now: only a restart from the file is safe
            sys.stderr.write(f"routilux-mp state server: {exc}; exiting so that the runtime restarts it from "
                             "the file (no write of the failed commit was acknowledged)\n")
            sys.stderr.flush()
            os._exit(EXIT_STORE_FAILED)
        except Exception as exc:  # noqa: BLE001 - every error goes back to the caller, as data
            return encode_reply(ERROR, error_data(exc, keep_args=True))
        finally:
            set_call(None, None)


# -- the manager's connections (handshake phase) --------------------------------


class _PickleConnection:
    """A ``multiprocess`` connection that pickles with the C pickler, with bounded messages."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        """Wrap ``conn``."""
        self._conn = conn

    def send(self, obj: Any) -> None:
        """Send ``obj`` pickled."""
        self._conn.send_bytes(dumps(obj))

    def recv(self) -> Any:
        """Receive one handshake-sized message, unpickled (the peer is authenticated by then)."""
        return pickle.loads(self._conn.recv_bytes(HANDSHAKE_LIMIT))

    def __getattr__(self, name: str) -> Any:
        """Everything else is the wrapped connection's."""
        return getattr(self._conn, name)

    def __enter__(self) -> Self:
        """Use as a context manager (the manager does)."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the connection."""
        self._conn.close()


#: In the state-server process: the listening socket the supervisor bound and passed on.
ADOPTED_SOCKET: list[socket.socket] = []


class _AdoptedSocketListener(connection.SocketListener):
    """A ``SocketListener`` around a socket the supervisor already bound and listens on.

    Binding in the supervisor lets clients connect at once: the kernel queues
    their connections until this process is up and accepting.
    """

    def __init__(self, sock: socket.socket) -> None:  # nothing to bind: no super().__init__
        """Listen on ``sock`` as it is."""
        self._socket = sock
        self._address = sock.getsockname()
        self._family = "AF_INET" if sock.family == socket.AF_INET else "AF_UNIX"
        self._last_accepted = None
        self._unlink = None  # the supervisor removes its private directory

    def accept(self) -> Any:
        """The next connection; on TCP with Nagle's algorithm off (small replies must not wait for an ACK)."""
        s, self._last_accepted = self._socket.accept()
        s.setblocking(True)
        if s.family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection.Connection(s.detach())


class _PickleListener(connection.Listener):
    """The manager's listener for our serializer: the adopted socket, connections that pickle with C."""

    def __init__(self, address: Any = None, family: Any = None, backlog: int = 1,
                 authkey: bytes | None = None) -> None:
        """Adopt the supervisor's socket if there is one (the server), else bind as usual."""
        if not ADOPTED_SOCKET:
            super().__init__(address, family, backlog, authkey)
            return
        self._listener = _AdoptedSocketListener(ADOPTED_SOCKET[0])
        self._authkey = authkey

    def accept(self) -> _PickleConnection:  # type: ignore[override]
        """The next authenticated connection."""
        return _PickleConnection(super().accept())


def _pickle_client(address: Any, family: Any = None, authkey: bytes | None = None) -> _PickleConnection:
    """Connect and authenticate, with a deadline (``multiprocess.connection.Client`` has none)."""
    if not isinstance(address, str):
        return _PickleConnection(connection.Client(address, family, authkey))
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(address)
        sock.settimeout(None)
        io_timeouts(sock, CONNECT_TIMEOUT)
        conn = connection.Connection(sock.detach())
    finally:
        sock.close()
    if authkey is not None:
        connection.answer_challenge(conn, authkey)
        connection.deliver_challenge(conn, authkey)
    return _PickleConnection(conn)


managers.listener_client[SERIALIZER] = (_PickleListener, _pickle_client)


class StoreManager(managers.BaseManager):
    """A manager for the state server's socket (its serializer is ours): what a test's intruder connects with."""


def main() -> None:
    """Entry point of the state-server process (``routilux-mp state-server``).

    Reads a pickled :class:`ServerConfig` from stdin (never the command line:
    the authkey must not show in ``ps``), adopts the listening socket the
    supervisor bound, then serves until stdin reaches EOF (the supervisor
    closed it, or died); the store's backend is closed first. A guard process
    forked first removes the runtime's private directory if the supervisor
    dies (``_process.start_dir_guard``).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _process.set_process_name("rmp-state")
    stdin = sys.stdin.fileno()
    try:
        config: ServerConfig = pickle.loads(read_frame(stdin))
    except (EOFError, OSError):  # the supervisor died before sending it
        os._exit(_process.EXIT_PARENT_GONE)
    if config.cleanup_dir is not None:  # (before any thread starts: it forks)
        _process.start_dir_guard(config.parent_pid, config.cleanup_dir, "rmp-state-guard")
    _process.arm_parent_death(config.parent_pid)
    sys.path[:] = config.sys_path
    try:
        backend = open_backend(config.backend, **config.backend_options)
    except StateFileError as exc:
        os.write(sys.stdout.fileno(), f"{exc}\n".encode(errors="replace"))
        os._exit(EXIT_START_FAILED)
    # The session names this runtime in the journal: its key is the same for every server it starts.
    session = hashlib.blake2b(config.authkey, digest_size=8, person=b"rmp-session").hexdigest()
    store = StateStore(backend, config.max_state_bytes, config.strict, config.lock_timeout, session)
    # EOF on stdin is both the supervisor's stop request and the sign of its death.
    _process.watch_for_eof(stdin, "routilux-mp parent watchdog", exit_code=0, on_eof=store.close)
    ADOPTED_SOCKET.append(socket.socket(fileno=config.listen_fd))
    limits = {"max_request_bytes": request_limit(config.max_state_bytes), "max_state_bytes": config.max_state_bytes,
              "retries": backend.survives_restart}
    StoreServer(store, limits, config.address, config.authkey).serve_forever()
