"""The state server's wire: framed pickles over a private unix socket, every wait with a deadline.

Client side, one :class:`Channel` per thread of a process::

    connect -> authkey handshake -> "accept_connection" -> the server's limits      (one deadline)
    then per call: send (method, args, alive_every) -> read frames until "#RETURN" or "#ERROR"

While the server works on a call that may take long (waiting for a routine
state's lock, running a ``modify_routine_state`` function) it sends ``"#ALIVE"``
frames every ``alive_every`` seconds. So a call fails with ``_Timeout`` when
the server is silent for ``timeout`` seconds, whatever it was doing and
wherever it stopped (before the reply, or mid-reply), and in any case once
the call as a whole passes ``timeout + patience``; it fails with ``_Lost``
when the connection breaks or carries a frame no server of ours would send.

Server side: multiprocess's manager ``Server`` listens, runs one thread per
connection and checks the authkey before it reads a single pickle;
:class:`StoreServer` serves the requests that follow. A frame header over the
request limit closes that connection (nothing is allocated for it); every
other error goes back to the caller as data.
"""

from __future__ import annotations

import os
import pickle
import select
import socket
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from multiprocess import connection, managers

from ._messages import READ_CHUNK, FrameError, dumps, parse_header
from ._state_client import _Lost, _Timeout
from .errors import RoutiluxError, StateTooLargeError

if TYPE_CHECKING:
    from typing_extensions import Self

#: Serializer name under which our pickle-based connections are registered.
SERIALIZER = "routilux-mp"

#: Seconds allowed to connect and authenticate (at least): the server may still be starting.
CONNECT_TIMEOUT = 10.0

#: Largest message accepted before a connection is authenticated and serving (handshake, first request).
HANDSHAKE_LIMIT = 1 << 16

#: Requests may exceed the state they carry (pickle vs JSON, a modify function's closure) by this much.
REQUEST_SLACK = 64 << 20

#: Largest reply a client accepts (a snapshot of every worker's state, at worst).
REPLY_LIMIT = 1 << 40

#: Keepalives are sent at most this often, and at least this often while a call waits.
KEEPALIVE_MIN, KEEPALIVE_MAX = 0.02, 0.5

#: Bytes asked of the kernel per read of a large frame.
BIG_READ = 1 << 20

_HEADER = struct.Struct("!i")


def request_limit(max_state_bytes: int) -> int:
    """Largest request frame the server reads: a state's pickle is at most ~2.5x its JSON."""
    return 3 * max_state_bytes + REQUEST_SLACK


def frame(data: bytes) -> bytes:
    """``data`` with its 4-byte length header (requests and replies stay under 2 GiB)."""
    return _HEADER.pack(len(data)) + data


def take_frame(buf: bytearray, limit: int) -> tuple[bytes | None, int]:
    """Remove and return the first whole frame's body from ``buf``, else ``(None, bytes to ask for next)``.

    Raises:
        FrameError: the header announces a negative size or more than ``limit`` bytes.
    """
    header = parse_header(buf, 0, limit)
    if header is None:
        return None, READ_CHUNK
    size, head = header
    end = head + size
    if len(buf) < end:
        # Ask for what is missing (a large frame in large reads), never for what a header merely claims.
        return None, min(max(end - len(buf), READ_CHUNK), BIG_READ)
    body = bytes(buf[head:end])
    del buf[:end]
    return body, 0


# -- client -------------------------------------------------------------------


class Channel:
    """One thread's kept-open connection to the state server; every wait has a deadline."""

    __slots__ = ("_buf", "_rpoll", "_sock", "_wpoll", "max_request", "pid")

    def __init__(self, address: str, authkey: bytes, timeout: float) -> None:
        self.pid = os.getpid()  # a forked child must not share this socket: it reconnects
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.settimeout(timeout)
                sock.connect(address)
                sock.settimeout(None)
                # multiprocess's handshake reads with blocking calls: the socket's own
                # receive/send timeouts bound each of them.
                _io_timeouts(sock, max(deadline - time.monotonic(), 0.001))
                conn = connection.Connection(os.dup(sock.fileno()))
                try:
                    connection.answer_challenge(conn, authkey)
                    connection.deliver_challenge(conn, authkey)
                    conn.send_bytes(dumps((None, "accept_connection", ("routilux-mp client",), {})))
                    kind, limits = pickle.loads(conn.recv_bytes(HANDSHAKE_LIMIT))
                finally:
                    conn.close()  # only the duplicate descriptor
            except (TimeoutError, BlockingIOError) as exc:
                raise _Timeout("connect") from exc
            if kind != "#RETURN":
                raise _Lost(f"the state server refused the connection: {limits}")
            _io_timeouts(sock, 0.0)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.max_request: int = limits["max_request_bytes"]
        self._buf = bytearray()
        self._rpoll = select.poll()
        self._rpoll.register(sock.fileno(), select.POLLIN)
        self._wpoll = select.poll()
        self._wpoll.register(sock.fileno(), select.POLLOUT)

    def close(self) -> None:
        self._sock.close()

    def call(self, method: str, args: tuple, timeout: float, patience: float) -> tuple[str, Any]:
        """Call ``method(*args)``; return the server's ``(kind, result)``.

        The server must show life at least every ``timeout`` seconds: bytes of
        the request taken, bytes of a frame arriving, or an ``"#ALIVE"``
        frame; and its reply must begin within ``timeout + patience``.

        Raises:
            StateTooLargeError: the request is over the server's limit (nothing was sent).
            _Timeout: the server was silent for ``timeout`` seconds, or its reply did not begin in time.
            _Lost: the connection broke or carried a frame no server sends.
        """
        data = dumps((method, args, timeout / 4))
        if len(data) > self.max_request:
            raise StateTooLargeError(
                f"{method}() would send {len(data)} bytes to the state server, over its limit of "
                f"{self.max_request} (3 x max_state_bytes + 64 MiB); nothing was written. A state must stay "
                "under max_state_bytes, and a modify_routine_state function must not capture large data"
            )
        self._send(frame(data), timeout)
        cap = time.monotonic() + timeout + patience
        deadline = min(time.monotonic() + timeout, cap)
        while True:
            reply = self._recv(deadline, timeout)
            try:
                kind, result = pickle.loads(reply)
            except Exception as exc:  # noqa: BLE001 - the frame was whole: the connection is in step
                return "#ERROR", RoutiluxError(f"the state server's answer to {method}() could not be read: {exc!r}")
            if kind != "#ALIVE":
                return kind, result
            deadline = min(time.monotonic() + timeout, cap)

    def _send(self, data: bytes, timeout: float) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                view = view[self._sock.send(view):]
                deadline = time.monotonic() + timeout  # the server is reading: alive
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _Lost(f"{type(exc).__name__}: {exc}") from exc
            if not self._wpoll.poll(_ms(deadline)):
                raise _Timeout("send")

    def _recv(self, deadline: float, timeout: float) -> bytes:
        """The next whole frame; bytes of a frame in progress count as life (a large reply takes long)."""
        buf = self._buf
        while True:
            try:
                reply, want = take_frame(buf, REPLY_LIMIT)
            except FrameError as exc:
                raise _Lost(f"a corrupt reply: {exc}") from exc
            if reply is not None:
                return reply
            if not self._rpoll.poll(_ms(deadline)):
                raise _Timeout("recv")
            try:
                chunk = self._sock.recv(want)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise _Lost(f"{type(exc).__name__}: {exc}") from exc
            if not chunk:
                raise _Lost("EOFError: the state server closed the connection")
            buf += chunk
            deadline = max(deadline, time.monotonic() + timeout)


def _ms(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000) + 1)


def _io_timeouts(sock: socket.socket, seconds: float) -> None:
    """Bound every blocking read and write on ``sock`` (0: no bound)."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


# -- server -------------------------------------------------------------------

_serving = threading.local()


class Keepalive:
    """Tells a waiting client the server is alive (used by the store while a call waits)."""

    __slots__ = ("_fd", "_last", "interval")

    _FRAME = frame(dumps(("#ALIVE", None)))

    def __init__(self, fd: int, interval: float) -> None:
        self._fd = fd
        self.interval = min(max(interval, KEEPALIVE_MIN), KEEPALIVE_MAX)
        self._last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval

    def send(self) -> None:
        """Send one keepalive (blocking: call it without holding the store's lock)."""
        _write_all(self._fd, self._FRAME)
        self._last = time.monotonic()


def current_keepalive() -> Keepalive | None:
    """The keepalive of the call this server thread is serving, if any."""
    return getattr(_serving, "keepalive", None)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _FrameSocketReader:
    """Reads request frames from a blocking socket; a header over ``limit`` raises FrameError."""

    __slots__ = ("_buf", "_fd", "_limit")

    def __init__(self, fd: int, limit: int) -> None:
        self._fd = fd
        self._limit = limit
        self._buf = bytearray()

    def read(self) -> bytes:
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
    """multiprocess's manager server, serving one store object with bounded frames and keepalives."""

    def __init__(self, store: Any, exposed: tuple[str, ...], limits: dict, address: Any, authkey: bytes) -> None:
        super().__init__({}, address, authkey, SERIALIZER)
        self.store = store
        self.exposed = frozenset(exposed)
        self.limits = limits

    def accept_connection(self, c: Any, name: str) -> None:
        c.send(("#RETURN", self.limits))
        self.serve_client(c)

    def serve_client(self, conn: Any) -> None:
        fd = conn.fileno()
        reader = _FrameSocketReader(fd, self.limits["max_request_bytes"])
        while not self.stop_event.is_set():
            try:
                request = reader.read()
            except FrameError as exc:
                sys.stderr.write(f"routilux-mp state server: closed a client connection: {exc}\n")
                break
            except (EOFError, OSError):
                break
            try:
                _write_all(fd, self._answer(fd, request))
            except OSError:
                break
        sys.exit(0)  # the manager's handle_request() closes the connection

    def _answer(self, fd: int, request: bytes) -> bytes:
        method = "?"
        try:
            method, args, alive_every = pickle.loads(request)
            if method not in self.exposed:
                raise AttributeError(f"the state server has no method {method!r}")
            _serving.keepalive = Keepalive(fd, alive_every)
            reply = ("#RETURN", getattr(self.store, method)(*args))
        except Exception as exc:  # noqa: BLE001 - every error goes back to the caller
            reply = ("#ERROR", exc)
        finally:
            _serving.keepalive = None
        try:
            return frame(dumps(reply))
        except Exception as exc:  # noqa: BLE001 - e.g. an exception that does not pickle
            return frame(dumps(("#ERROR", RoutiluxError(
                f"the state server could not send its answer to {method}(): {type(exc).__name__}: {exc}"))))


# -- the manager's connections (handshake phase) --------------------------------


class _PickleConnection:
    """A ``multiprocess`` connection that pickles with the C pickler, with bounded messages."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def send(self, obj: Any) -> None:
        self._conn.send_bytes(dumps(obj))

    def recv(self) -> Any:
        return pickle.loads(self._conn.recv_bytes(HANDSHAKE_LIMIT))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.close()


#: In the state-server process: the listening socket the supervisor bound and passed on.
ADOPTED_SOCKET: list[socket.socket] = []


class _AdoptedSocketListener(connection.SocketListener):
    """A ``SocketListener`` around a socket the supervisor already bound and listens on.

    Binding in the supervisor lets clients connect at once: the kernel queues
    their connections until this process is up and accepting.
    """

    def __init__(self, sock: socket.socket) -> None:  # nothing to bind: no super().__init__
        self._socket = sock
        self._address = sock.getsockname()
        self._family = "AF_UNIX"
        self._last_accepted = None
        self._unlink = None  # the supervisor removes its private directory


class _PickleListener(connection.Listener):
    def __init__(self, address: Any = None, family: Any = None, backlog: int = 1,
                 authkey: bytes | None = None) -> None:
        if not ADOPTED_SOCKET:
            super().__init__(address, family, backlog, authkey)
            return
        self._listener = _AdoptedSocketListener(ADOPTED_SOCKET[0])
        self._authkey = authkey

    def accept(self) -> _PickleConnection:  # type: ignore[override]
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
        _io_timeouts(sock, CONNECT_TIMEOUT)
        conn = connection.Connection(sock.detach())
    finally:
        sock.close()
    if authkey is not None:
        connection.answer_challenge(conn, authkey)
        connection.deliver_challenge(conn, authkey)
    return _PickleConnection(conn)


managers.listener_client[SERIALIZER] = (_PickleListener, _pickle_client)
