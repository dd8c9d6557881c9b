"""This process's link to the state server: a client with deadlines, and a fire-and-forget pusher.

``WorkerState`` (in ``state``) is the public handle; it calls the state server
through the :class:`StoreClient` of its process, which keeps one
:class:`Channel` (connection) per thread. The wire is in ``protocol``.

Deadlines, per call: the server must show life (bytes of the request taken,
bytes of a reply arriving, or an ``"#ALIVE"`` frame) at least every
``timeout`` seconds, and its reply must begin within ``timeout + patience``.
A call that breaks either rule fails with ``_Timeout``; a broken connection or
a frame no server of ours would send fails with ``_Lost``.

Restarts. When the server keeps its state in a file (its handshake says
``retries``), the supervisor restarts it after a crash on the same address:
a call whose connection broke (``_Lost``) reconnects and sends the *same*
request again, until its deadline. Each write carries a request id
``(client, pid, seq)`` (and, in an activation, its effect key), so a write
that was applied before the crash is answered from the server's record, never
applied twice (``replay``). A call that fails anyway raises
``StateServerLostError``; only a client whose server cannot be restarted
(memory) then reports the server lost for good and fails every later call
fast.

``multiprocess`` (and ``dill``) cost ~100 ms of start-up: they are imported on
the first connection, so only processes whose logic touches state pay it.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .._messages import FrameError, exception_from, frame
from ..errors import RoutiluxError, RuntimeClosedError, StateServerLostError, StateTooLargeError
from .protocol import (
    ALIVE,
    CONNECT_TIMEOUT,
    EFFECTS,
    HANDSHAKE_LIMIT,
    REPLY_LIMIT,
    RETURN,
    WRITES,
    Method,
    encode_request,
    io_timeouts,
    take_frame,
)

logger = logging.getLogger("routilux_mp.state")


class _Timeout(Exception):
    """The state server did not answer in time."""


class _Lost(Exception):
    """The connection to the state server broke (``retry``: as a crash does; False: garbage came on it)."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


#: Errors that mean the connection to the state server could not be made.
_CONNECT_ERRORS = (EOFError, OSError)
#: Those of them that a server restarting on the same address causes.
_RESTART_ERRORS = (EOFError, ConnectionError, FileNotFoundError)
#: Pauses between reconnection attempts while the server restarts (doubling up to a quarter second).
RETRY_FIRST, RETRY_MAX = 0.01, 0.25
#: Words of every message about a server that stopped answering (the supervisor kills and restarts it).
HUNG = "gave no sign of life"


class Channel:
    """One thread's kept-open connection to the state server; every wait has a deadline."""

    __slots__ = ("_buf", "_rpoll", "_sock", "_wpoll", "max_request", "pid", "retries")

    def __init__(self, address: str, authkey: bytes, timeout: float) -> None:
        """Connect and authenticate within ``timeout`` seconds.

        Raises:
            _Timeout: the server did not complete the handshake in time.
            _Lost: the server refused the connection.
            OSError, EOFError: the connection could not be made.
        """
        import select
        import socket

        from multiprocess import connection

        self.pid = os.getpid()  # a forked child must not share this socket: it reconnects
        deadline = time.monotonic() + timeout
        # A unix socket path on this machine, or (host, port) on a cluster's network.
        sock = socket.socket(socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX, socket.SOCK_STREAM)
        if sock.family == socket.AF_INET:  # small requests must not wait for the previous one's ACK (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            try:
                sock.settimeout(timeout)
                sock.connect(address)
                sock.settimeout(None)
                # multiprocess's handshake reads with blocking calls: the socket's own
                # receive/send timeouts bound each of them.
                io_timeouts(sock, max(deadline - time.monotonic(), 0.001))
                conn = connection.Connection(os.dup(sock.fileno()))
                try:
                    connection.answer_challenge(conn, authkey)
                    connection.deliver_challenge(conn, authkey)
                    conn.send_bytes(pickle.dumps((None, "accept_connection", ("routilux-mp client",), {})))
                    kind, limits = pickle.loads(conn.recv_bytes(HANDSHAKE_LIMIT))
                finally:
                    conn.close()  # only the duplicate descriptor
            except (TimeoutError, BlockingIOError) as exc:
                raise _Timeout("connect") from exc
            if kind != RETURN:
                raise _Lost(f"the state server refused the connection: {limits}")
            io_timeouts(sock, 0.0)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.max_request: int = limits["max_request_bytes"]
        #: The server is restarted after a crash with its state: retry calls whose connection broke.
        self.retries: bool = limits.get("retries", False)
        self._buf = bytearray()
        self._rpoll = select.poll()
        self._rpoll.register(sock.fileno(), select.POLLIN)
        self._wpoll = select.poll()
        self._wpoll.register(sock.fileno(), select.POLLOUT)

    def close(self) -> None:
        """Close the connection (the server then ends its thread for it)."""
        self._sock.close()

    def call(self, method: Method, args: tuple, timeout: float, patience: float, request: tuple | None = None,
             effect: tuple | None = None) -> tuple[str, Any]:
        """Call ``method(*args)`` (a write named by ``request`` and ``effect``); return ``(kind, result or error)``.

        Raises:
            StateTooLargeError: the request is over the server's limit (nothing was sent).
            RoutiluxError: the reply arrived whole but could not be unpickled.
            _Timeout: the server was silent for ``timeout`` seconds, or its reply did not begin in time.
            _Lost: the connection broke or carried a frame no server sends.
        """
        data = encode_request(method, args, timeout / 4, request, effect)
        if len(data) > self.max_request:
            raise StateTooLargeError(
                f"{method.value}() would send {len(data)} bytes to the state server, over its limit of "
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
                raise RoutiluxError(f"the state server's answer to {method.value}() could not be read: {exc!r}") \
                    from None
            if kind != ALIVE:
                return kind, result
            deadline = min(time.monotonic() + timeout, cap)

    def _send(self, data: bytes, timeout: float) -> None:
        """Write all of ``data``; the server taking bytes counts as life."""
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
                raise _Lost(f"a corrupt reply: {exc}", retry=False) from exc
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
    """Milliseconds until ``deadline``, rounded up, for ``poll``."""
    return max(0, int((deadline - time.monotonic()) * 1000) + 1)


class _Held:
    """A routine-state lock this thread holds, and the dict it writes back on release."""

    __slots__ = ("state", "token")

    def __init__(self, token: str, state: dict) -> None:
        """The lock ``token`` holds, and the dict the block works on."""
        self.token = token
        self.state = state


class StoreClient:
    """This process's link to the state server.

    One connection per thread, opened on first use and kept open. A call that
    may wait for a lock or run a modify function gets ``patience`` on top of
    ``timeout`` (state_timeout), during which the server keeps telling it it
    is alive. A call whose connection breaks is sent again while the server
    restarts, within that deadline (see the module docstring). Once the
    server is lost for good every call fails fast with
    ``StateServerLostError`` (no retry loop, no log flood).
    """

    def __init__(self, address: str | tuple[str, int], authkey: bytes, timeout: float, lock_timeout: float) -> None:
        """A client of the server at ``address`` (a socket path, or ``(host, port)``); nothing connects yet."""
        self.address = address
        #: The node this process runs on when it is not the state server's machine (``None``: the same machine).
        self.node: str | None = None
        self._authkey = authkey
        self.timeout = timeout
        self.lock_timeout = lock_timeout
        self.lost: str | None = None
        #: Called once when this client finds the server lost (the supervisor then stops taking work).
        self.on_lost: Callable[[], None] | None = None
        #: Called before this process opens a connection (the supervisor starts its server first when its
        #: dispatcher thread needs it; see ``StateService``).
        self.on_connect: Callable[[], None] | None = None
        #: Set at shutdown (see :meth:`freeze`): reads are served from it afterwards.
        self.snapshot: dict[str, dict] | None = None
        #: In the supervisor: ``fn(worker_id) -> meta dict | None`` giving exact local counters.
        self.local_meta: Callable[[str], dict | None] | None = None
        #: Called (in the supervisor) with the reason when a call found the server hung or gone.
        self.on_failure: Callable[[str], None] | None = None
        #: The server restarts after a crash (learnt at the first handshake; until then, assumed).
        self.retries = True
        self.local = threading.local()

    # -- per-thread bookkeeping for lost-update detection and lock ownership --

    def reads(self) -> dict[tuple[str, str], int]:
        """``{(worker, routine): version}`` this thread's current activation read."""
        reads = getattr(self.local, "reads", None)
        if reads is None:
            reads = self.local.reads = {}
        return reads

    def held(self) -> dict[tuple[str, str], _Held]:
        """The routine-state locks this thread holds."""
        held = getattr(self.local, "held", None)
        if held is None:
            held = self.local.held = {}
        return held

    def owner(self) -> int | tuple[str, int]:
        """Who holds a lock taken by this process: its pid, or ``(node, pid)`` on another machine.

        The server checks the liveness of a pid on its own machine only; a
        remote owner's leases are released by the supervisor when it reaps it.
        """
        return os.getpid() if self.node is None else (self.node, os.getpid())

    def begin_activation(self, job_id: str | None = None, routine_id: str = "", slots: dict | None = None,
                         message: bytes = b"") -> None:
        """Forget what the previous activation read, and name this one's writes (workers call this).

        The writes this thread makes until the next call are the effects of
        the activation of ``routine_id`` for job ``job_id`` on this input
        (``slots``: pickled items by slot, ``message``: the pickled policy
        message), numbered in order: an exactly-once run replays them when
        the same activation runs again (see ``replay``).
        """
        self.local.reads = {}
        self.local.scope = None if not job_id else (job_id, routine_id, slots or {}, message)
        self.local.activation = None
        self.local.writes = 0

    def _effect(self) -> tuple[str, str, bytes, int] | None:
        """The effect key of this thread's next write in the current activation, or ``None`` outside one."""
        scope = getattr(self.local, "scope", None)
        if scope is None:
            return None
        job_id, routine_id, slots, message = scope
        digest = self.local.activation
        if digest is None:  # once per activation, on its first write: the same input gives the same digest
            import hashlib  # (here: it loads OpenSSL, which a worker whose logic writes no state never needs)

            h = hashlib.blake2b(digest_size=16, person=b"rmp-activation")
            for name in sorted(slots):
                h.update(f"{name}:{len(slots[name])}".encode())
                for blob in slots[name]:
                    h.update(len(blob).to_bytes(8, "big"))
                    h.update(blob)
            h.update(message)
            digest = self.local.activation = h.digest()
        op = self.local.writes
        self.local.writes = op + 1
        return job_id, routine_id, digest, op

    def _request(self) -> tuple[str, int, int]:
        """The next request id of this thread: ``(client, pid, seq)``."""
        client = getattr(self.local, "client", None)
        if client is None or client[1] != os.getpid():
            client = self.local.client = [f"{os.getpid()}-{threading.get_ident():x}-{os.urandom(6).hex()}",
                                          os.getpid(), 0]
        client[2] += 1
        return client[0], client[1], client[2]

    # -- calls -----------------------------------------------------------------

    def _channel(self, timeout: float) -> Channel:
        """This thread's connection, opened now (within ``timeout``) if it has none or was inherited across a fork."""
        chan = getattr(self.local, "channel", None)
        if chan is None or chan.pid != os.getpid():
            if self.on_connect is not None:
                self.on_connect()
            chan = self.local.channel = Channel(self.address, self._authkey, timeout)
            self.retries = chan.retries
        return chan

    def _drop_channel(self) -> None:
        """Close this thread's connection: after a timeout it is out of step for good."""
        chan, self.local.channel = getattr(self.local, "channel", None), None
        if chan is not None:
            chan.close()

    def mark_lost(self, why: str) -> None:
        """Record that the server is lost for good (the first reason wins) and tell ``on_lost``."""
        if self.lost is None:
            self.lost = why
            if self.on_lost is not None:
                self.on_lost()

    def call(self, method: Method, *args: Any, patience: float = 0.0) -> Any:
        """Call ``method(*args)`` in the state server; raise what it raised (rebuilt from error data).

        Ends within ``state_timeout`` of the server's last sign of life, and
        within ``state_timeout + patience`` in all, retries included.

        Raises:
            StateServerLostError: the server is gone or hung (now or before).
            RuntimeClosedError: the runtime was shut down and the server stopped.
        """
        if self.lost is not None:
            raise StateServerLostError(self.lost)
        deadline = time.monotonic() + self.timeout + patience
        effect = self._effect() if method in EFFECTS else None
        request = None
        pause = RETRY_FIRST
        while True:
            remaining = deadline - time.monotonic()
            try:
                chan = self._channel(max(min(max(self.timeout, CONNECT_TIMEOUT), remaining), 0.05))
                if request is None and chan.retries and method in WRITES:
                    request = self._request()
                kind, result = chan.call(method, args, min(self.timeout, max(remaining, 0.05)),
                                         max(remaining - self.timeout, 0.0), request, effect)
            except _Timeout as exc:
                self._drop_channel()
                error: Exception = exc
            except (_Lost, *_CONNECT_ERRORS) as exc:
                self._drop_channel()
                # A restart shows as a refused, reset or missing socket; garbage on the wire is no restart.
                error = exc if isinstance(exc, _Lost) else _Lost(f"{type(exc).__name__}: {exc}",
                                                                 retry=isinstance(exc, _RESTART_ERRORS))
                if self.snapshot is None and self.retries and error.retry and time.monotonic() + pause < deadline:
                    time.sleep(pause)  # the supervisor is restarting the server on the same address
                    pause = min(pause * 2, RETRY_MAX)
                    continue
            else:
                if kind == RETURN:
                    return result
                raise exception_from(result, f"the state server's {method.value}()")
            break
        raise StateServerLostError(self._failed(method, error)) from error

    def _failed(self, method: Method, error: Exception) -> str:
        """Why a call failed; a server that cannot restart is reported lost for good."""
        if isinstance(error, _Timeout):
            why = (f"the state server {HUNG} for {self.timeout:g}s (state_timeout) during "
                   f"{method.value}(); it is hung or overloaded")
        else:
            if self.snapshot is not None:
                raise RuntimeClosedError("the runtime was shut down; its worker state is read-only") from None
            why = f"the state server is gone ({error})"
        if self.on_failure is not None:
            self.on_failure(why)
        if self.retries:
            return f"{why}; this call failed (the server is restarted from its state file)"
        self.mark_lost(f"{why}; shared worker state was lost with it. Jobs in flight fail; start a new Runtime "
                       "to go on")
        return self.lost or why

    def freeze(self, metas: dict[str, dict], server_started: bool) -> None:
        """Serve reads from a final snapshot from now on (the runtime is shutting down).

        ``metas`` gives each known worker's final ``flow_id`` and ``status``.
        When the state server was lost there is no snapshot to take: reads
        keep raising ``StateServerLostError``, so lost state is never
        reported as empty.
        """
        snapshot: dict[str, dict] = {}
        if server_started:  # else nothing was ever stored: empty is the truth
            try:
                snapshot = pickle.loads(self.call(Method.SNAPSHOT))
            except StateServerLostError:
                return
            except RoutiluxError as exc:
                self.mark_lost(f"the state server could not take the final snapshot of worker state ({exc})")
                return
        for wid, meta in metas.items():
            entry = snapshot.setdefault(wid, {"meta": {"jobs_processed": 0, "jobs_failed": 0}, "states": {}})
            entry["meta"].update(meta)
        self.snapshot = snapshot


class StatePusher:
    """Sends fire-and-forget updates to the state server from its own thread.

    The supervisor's dispatcher must never wait on the state server (it may
    still be starting, or be slow): job counters, worker registrations and
    lock releases of dead processes go through here, in order.
    """

    def __init__(self, client: StoreClient) -> None:
        """Start the pusher's thread; it calls through ``client``."""
        self._client = client
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        #: How many calls were queued so far.
        self.pushed = 0
        self._thread = threading.Thread(target=self._run, name="routilux-mp state pusher", daemon=True)
        self._thread.start()

    def push(self, method: Method, *args: Any) -> None:
        """Queue ``method(*args)``; it is sent after everything queued before it."""
        self.pushed += 1
        self._queue.put((method, args))

    def close(self, timeout: float) -> None:
        """Send what is queued (within ``timeout``), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        """Send queued calls in order until :meth:`close`; a lost server drops them quietly."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._client.lost is not None:
                continue
            method, args = item
            try:
                self._client.call(method, *args)
            except StateServerLostError:
                pass  # the dispatcher notices (the server's pidfd) and reports it once
            except RuntimeClosedError:
                pass  # shut down before the server ever started: there was nothing to send it to
            except Exception:
                logger.exception("the state server refused %s()", method.value)
