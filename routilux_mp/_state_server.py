"""The state server: one process holding every WorkerState, behind a BaseManager.

``StateStore`` is the only registered referent. Every method does a whole
operation server-side (read-modify-write included) and returns copies; clients
never hold nested proxies. One condition variable guards the store. Values are
mutated in place (an increment costs what it changes, not the size of the
state) and every read returns a pickle made under the lock, which the client
unpickles: a copy, made once. A routine state locked with ``worker_state.lock()`` has a holder (token + pid), and other
writers wait for it. A holder that dies releases its locks: the supervisor says
so when it reaps a worker (``release_pid``), and waiters also check the
holder's liveness themselves while they wait.

The server listens on a unix socket in a private 0700 directory, with a random
32-byte authkey; the manager checks the key before it reads a single message.
Messages are pickled with the C pickler rather than ``multiprocess``'s default
dill-based one (several times faster for these small messages).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import cloudpickle
from multiprocess import connection, managers

from . import _jsonvalue, _process
from ._messages import ServerConfig, dumps, read_frame
from .errors import (
    LockTimeoutError,
    RoutiluxError,
    StaleStateError,
    StateNotSerializableError,
    StateTooLargeError,
)
from .state import _Lost, _Timeout

if TYPE_CHECKING:
    from typing_extensions import Self

#: Serializer name under which our pickle-based connections are registered.
SERIALIZER = "routilux-mp"

#: How often a writer waiting on a lock checks that the holder is still alive.
HOLDER_CHECK_INTERVAL = 0.5


class _PickleConnection:
    """A ``multiprocess`` connection that pickles with the C pickler."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def send(self, obj: Any) -> None:
        self._conn.send_bytes(dumps(obj))

    def recv(self) -> Any:
        return pickle.loads(self._conn.recv_bytes())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.close()


#: In the state-server process: the listening socket the supervisor bound and passed on.
_ADOPTED_SOCKET: socket.socket | None = None


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
        if _ADOPTED_SOCKET is None:
            super().__init__(address, family, backlog, authkey)
            return
        self._listener = _AdoptedSocketListener(_ADOPTED_SOCKET)
        self._authkey = authkey

    def accept(self) -> _PickleConnection:  # type: ignore[override]
        return _PickleConnection(super().accept())


#: Seconds allowed to connect to the state server and finish the authkey handshake.
CONNECT_TIMEOUT = 10.0


def _pickle_client(address: Any, family: Any = None, authkey: bytes | None = None) -> _PickleConnection:
    """Connect and authenticate, with a deadline (``multiprocess.connection.Client`` has none)."""
    if not isinstance(address, str):
        return _PickleConnection(connection.Client(address, family, authkey))
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(address)
        sock.settimeout(None)
        conn = connection.Connection(sock.detach())
    finally:
        sock.close()
    if authkey is not None:
        # The server speaks first; a stopped server never does.
        if not conn.poll(CONNECT_TIMEOUT):
            conn.close()
            raise TimeoutError(f"the state server at {address} did not answer within {CONNECT_TIMEOUT:g}s")
        connection.answer_challenge(conn, authkey)
        connection.deliver_challenge(conn, authkey)
    return _PickleConnection(conn)


managers.listener_client[SERIALIZER] = (_PickleListener, _pickle_client)


def _pid_alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class _Cell:
    """One routine state of one worker."""

    __slots__ = ("holder", "holder_pid", "lost", "size", "value", "version")

    def __init__(self) -> None:
        self.value: dict | None = None
        self.version = 0
        self.size = 2
        self.holder: str | None = None
        self.holder_pid = 0
        self.lost = 0


class _Worker:
    __slots__ = ("cells", "flow_id", "jobs_failed", "jobs_processed", "status")

    def __init__(self, flow_id: str, status: str) -> None:
        self.flow_id = flow_id
        self.status = status
        self.jobs_processed = 0
        self.jobs_failed = 0
        self.cells: dict[str, _Cell] = {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class StateStore:
    """Every worker's routine states, counters and status (lives in the state server)."""

    def __init__(self, max_state_bytes: int, strict: bool, lock_timeout: float) -> None:
        self._max_bytes = max_state_bytes
        self._strict = strict
        self._lock_timeout = lock_timeout
        self._cond = threading.Condition()
        self._workers: dict[str, _Worker] = {}

    # -- helpers (call with self._cond held) --------------------------------

    def _worker(self, wid: str) -> _Worker:
        worker = self._workers.get(wid)
        if worker is None:
            # The supervisor registers workers without waiting for an answer, so a
            # worker process may get here first.
            worker = self._workers[wid] = _Worker("", "running")
        return worker

    def _cell(self, wid: str, rid: str) -> _Cell:
        cells = self._worker(wid).cells
        cell = cells.get(rid)
        if cell is None:
            cell = cells[rid] = _Cell()
        return cell

    def _wait_free(self, cell: _Cell, rid: str, token: str | None, timeout: float | None) -> None:
        """Wait until ``cell`` is not locked by someone other than ``token``."""
        if cell.holder is None or cell.holder == token:
            return
        limit = self._lock_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while cell.holder is not None and cell.holder != token:
            if not _pid_alive(cell.holder_pid):
                cell.holder = None
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeoutError(
                    f"routine state {rid!r} stayed locked by process {cell.holder_pid} for {limit:g}s; "
                    "keep `with worker_state.lock(...)` blocks short, or pass a longer timeout"
                )
            self._cond.wait(min(remaining, HOLDER_CHECK_INTERVAL))

    def _check_size(self, rid: str, size: int) -> None:
        if size > self._max_bytes:
            raise StateTooLargeError(
                f"state of routine {rid!r} would be {size} bytes as JSON, over max_state_bytes="
                f"{self._max_bytes}; nothing was written. Trim it, or raise Runtime(max_state_bytes=...)"
            )

    def _store(self, cell: _Cell, value: dict, size: int) -> int:
        cell.value = value
        cell.size = size
        cell.version += 1
        return cell.version

    # -- workers -------------------------------------------------------------

    def register_worker(self, wid: str, flow_id: str, status: str) -> None:
        with self._cond:
            worker = self._worker(wid)
            worker.flow_id = flow_id
            worker.status = status

    def meta(self, wid: str) -> dict:
        with self._cond:
            w = self._worker(wid)
            return {"flow_id": w.flow_id, "status": w.status, "jobs_processed": w.jobs_processed,
                    "jobs_failed": w.jobs_failed}

    def add_job_counts(self, deltas: dict[str, tuple[int, int]]) -> None:
        with self._cond:
            for wid, (processed, failed) in deltas.items():
                worker = self._workers.get(wid)
                if worker is not None:
                    worker.jobs_processed += processed
                    worker.jobs_failed += failed

    # -- routine states ------------------------------------------------------

    def get(self, wid: str, rid: str) -> tuple[bytes | None, int]:
        """``(pickled state or None, version)``."""
        with self._cond:
            cell = self._worker(wid).cells.get(rid)
            if cell is None or cell.value is None:
                return None, 0 if cell is None else cell.version
            return dumps(cell.value), cell.version

    def get_all(self, wid: str) -> tuple[bytes, dict[str, int]]:
        """``(pickled {rid: state}, {rid: version})``."""
        with self._cond:
            cells = self._worker(wid).cells
            values = {rid: c.value for rid, c in cells.items() if c.value is not None}
            return dumps(values), {rid: cells[rid].version for rid in values}

    def replace(self, wid: str, rid: str, value: dict, size: int, expected: int | None,
                token: str | None) -> tuple[int, int]:
        """Replace a state. Returns ``(version, lost)``; ``lost`` counts lost updates so far (0: none now)."""
        with self._cond:
            cell = self._cell(wid, rid)
            self._wait_free(cell, rid, token, None)
            self._check_size(rid, size)
            lost = 0
            if expected is not None and expected != cell.version:
                if self._strict:
                    raise StaleStateError(
                        f"routine state {rid!r} of worker {wid!r} changed (version {expected} -> "
                        f"{cell.version}) between this activation's read and its write; nothing was "
                        "written. Use increment/merge_routine_state/modify_routine_state or "
                        "worker_state.lock() for read-modify-write"
                    )
                cell.lost += 1
                lost = cell.lost
            return self._store(cell, value, size), lost

    def merge(self, wid: str, rid: str, partial: dict, token: str | None) -> tuple[bytes, int]:
        with self._cond:
            cell = self._cell(wid, rid)
            self._wait_free(cell, rid, token, None)
            merged = dict(cell.value) if cell.value else {}
            merged.update(partial)
            size = len(_jsonvalue._encode(merged))
            self._check_size(rid, size)
            version = self._store(cell, merged, size)
            return dumps(merged), version

    def increment(self, wid: str, rid: str, amounts: dict[str, int | float],
                  token: str | None) -> tuple[dict[str, int | float], int]:
        """Add each amount to its key (missing keys count as 0); return the new values."""
        with self._cond:
            cell = self._cell(wid, rid)
            self._wait_free(cell, rid, token, None)
            old = cell.value if cell.value is not None else {}
            result = {}
            growth = 0
            for key, amount in amounts.items():
                current = old.get(key, 0)
                if not _is_number(current):
                    raise TypeError(
                        f"state[{key!r}] of routine {rid!r} is {type(current).__name__}, not a number; "
                        "increment() only adds to numbers (or missing keys)"
                    )
                total = current + amount
                if isinstance(total, float) and not math.isfinite(total):
                    raise StateNotSerializableError(
                        f"state[{key!r}] of routine {rid!r} would become {total!r}, which JSON refuses; nothing was written"
                    )
                result[key] = total
                growth += len(key) + 32
            size = cell.size + growth
            if size > self._max_bytes:
                new = dict(old)
                new.update(result)
                size = len(_jsonvalue._encode(new))
                self._check_size(rid, size)
            old.update(result)  # in place: nothing outside the lock holds this dict
            self._store(cell, old, size)
            return result, cell.version

    def modify(self, wid: str, rid: str, fn_blob: bytes, token: str | None) -> tuple[bytes, int]:
        """Run ``fn(copy_of_state) -> new_state`` with the state locked; write its result."""
        fn = cloudpickle.loads(fn_blob)
        internal = f"modify-{threading.get_ident()}-{time.monotonic_ns()}"
        with self._cond:
            cell = self._cell(wid, rid)
            self._wait_free(cell, rid, token, None)
            previous = (cell.holder, cell.holder_pid)
            cell.holder, cell.holder_pid = internal, os.getpid()
            working = copy.deepcopy(cell.value) if cell.value else {}
        try:
            try:
                result = fn(working)
            except BaseException as exc:  # noqa: BLE001 - the user's function: report it, never kill the server
                raise _portable_error(exc, f"modify_routine_state({rid!r}) function raised") from None
            if result is None:
                result = working
            if not isinstance(result, dict):
                raise TypeError(
                    f"modify_routine_state({rid!r}) function returned {type(result).__name__}; "
                    "it must return the new state (a dict) or None to keep its changes to the copy"
                )
            value, size = _jsonvalue.normalize(result)
            with self._cond:
                self._check_size(rid, size)
                version = self._store(cell, value, size)
                return dumps(value), version
        finally:
            with self._cond:
                cell.holder, cell.holder_pid = previous
                self._cond.notify_all()

    def acquire(self, wid: str, rid: str, token: str, pid: int, timeout: float | None) -> tuple[bytes | None, int]:
        with self._cond:
            cell = self._cell(wid, rid)
            self._wait_free(cell, rid, token, timeout)
            cell.holder, cell.holder_pid = token, pid
            return (None if cell.value is None else dumps(cell.value)), cell.version

    def release(self, wid: str, rid: str, token: str, value: dict | None, size: int) -> int:
        with self._cond:
            cell = self._cell(wid, rid)
            if cell.holder != token:
                raise RoutiluxError(
                    f"the lock on routine state {rid!r} was lost (its holder was presumed dead); nothing was written"
                )
            try:
                if value is not None:
                    self._check_size(rid, size)
                    self._store(cell, value, size)
            finally:
                cell.holder = None
                self._cond.notify_all()
            return cell.version

    def release_pid(self, pid: int) -> int:
        """Release every lock held by process ``pid`` (it died); returns how many."""
        released = 0
        with self._cond:
            for worker in self._workers.values():
                for cell in worker.cells.values():
                    if cell.holder is not None and cell.holder_pid == pid:
                        cell.holder = None
                        released += 1
            if released:
                self._cond.notify_all()
        return released

    # -- reporting -----------------------------------------------------------

    def lost_updates(self) -> dict[str, int]:
        """Lost updates per routine id, summed over workers."""
        totals: dict[str, int] = {}
        with self._cond:
            for worker in self._workers.values():
                for rid, cell in worker.cells.items():
                    if cell.lost:
                        totals[rid] = totals.get(rid, 0) + cell.lost
        return totals

    def snapshot(self) -> bytes:
        """Everything (pickled), for the runtime's final snapshot at shutdown."""
        with self._cond:
            return dumps({
                wid: {
                    "meta": {"flow_id": w.flow_id, "status": w.status, "jobs_processed": w.jobs_processed,
                             "jobs_failed": w.jobs_failed},
                    "states": {rid: c.value for rid, c in w.cells.items() if c.value is not None},
                }
                for wid, w in self._workers.items()
            })


def _portable_error(exc: BaseException, context: str) -> BaseException:
    """``exc`` if it survives a pickle round trip, else a RoutiluxError carrying its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure to round-trip means: send a portable copy
        err = RoutiluxError(f"{context}: {type(exc).__qualname__}: {exc}")
        err.remote_traceback = "".join(traceback.format_exception(exc))
        return err


#: Methods clients may call.
EXPOSED = tuple(
    name for name, value in vars(StateStore).items() if callable(value) and not name.startswith("_")
)

_STORE: StateStore | None = None


def _get_store() -> StateStore:
    assert _STORE is not None, "the state store exists only in the state-server process"
    return _STORE


class StoreManager(managers.BaseManager):
    """The manager serving :class:`StateStore` (typeid ``get_store``)."""


class StoreProxy(managers.BaseProxy):
    """Client side of :class:`StateStore`: one kept-open connection per thread, calls with deadlines."""

    _exposed_ = EXPOSED

    def call(self, method: str, args: tuple, timeout: float | None) -> Any:
        """Call ``method(*args)`` in the server.

        Raises what the server raised; ``_Timeout`` when no answer came in
        time; ``_Lost`` when the connection broke.
        """
        tls = self._tls
        try:
            try:
                conn = tls.connection
                poller = tls.poller
            except AttributeError:
                self._connect()
                conn = tls.connection
                # One poll object per connection: Connection.poll() builds a selector per call.
                poller = tls.poller = select.poll()
                poller.register(conn.fileno(), select.POLLIN)
            conn.send((self._id, method, args, {}))
            if not poller.poll(None if timeout is None else timeout * 1000):
                # The reply may still come; this connection is out of step for good.
                del tls.connection, tls.poller
                conn.close()
                raise _Timeout(method)
            kind, result = conn.recv()
        except (EOFError, OSError) as exc:
            raise _Lost(f"{type(exc).__name__}: {exc}") from exc
        if kind == "#RETURN":
            return result
        raise managers.convert_to_error(kind, result)


StoreManager.register("get_store", callable=_get_store, proxytype=StoreProxy, exposed=EXPOSED)


def main() -> None:
    """Entry point of the state-server process (``routilux-mp state-server``).

    Reads a pickled :class:`ServerConfig` from stdin (never the command line:
    the authkey must not show in ``ps``), adopts the listening socket the
    supervisor bound, then serves until stdin reaches EOF (the supervisor
    closed it, or died).
    """
    global _STORE, _ADOPTED_SOCKET
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _process.set_process_name("rmp-state")
    stdin = sys.stdin.fileno()
    try:
        config: ServerConfig = pickle.loads(read_frame(stdin))
    except (EOFError, OSError):  # the supervisor died before sending it
        os._exit(_process.EXIT_PARENT_GONE)
    _process.arm_parent_death(config.parent_pid)
    # EOF on stdin is both the supervisor's stop request and the sign of its death.
    _process.watch_for_eof(stdin, "routilux-mp parent watchdog", exit_code=0)
    sys.path[:] = config.sys_path
    _ADOPTED_SOCKET = socket.socket(fileno=config.listen_fd)
    _STORE = StateStore(config.max_state_bytes, config.strict, config.lock_timeout)
    manager = StoreManager(address=config.address, authkey=config.authkey, serializer=SERIALIZER)
    manager.get_server().serve_forever()
