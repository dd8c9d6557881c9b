"""The state server: one process holding every WorkerState, behind a BaseManager.

``StateStore`` is the only object served. Every method does a whole operation
server-side (read-modify-write included) and returns copies; clients never
hold nested proxies. One condition variable guards the store. Values are
mutated in place (an increment costs what it changes, not the size of the
state) and every read returns a pickle made under the lock, which the client
unpickles: a copy, made once.

A routine state locked with ``worker_state.lock()`` has a holder (token +
pid), and other writers wait for it, at most ``lock_timeout`` seconds. A
holder that dies releases its locks: the supervisor says so when it reaps a
worker (``release_pid``), and waiters also check the holder's liveness
themselves while they wait. While a call waits (for a lock, or for a
``modify_routine_state`` function, see ``_state_fn``), the serving thread
tells its client it is alive, so a client tells "busy" from "hung".

The server listens on a unix socket in a private 0700 directory, with a random
32-byte authkey; the manager checks the key before it reads a single message.
Messages are pickled with the C pickler (see ``_state_rpc``).
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from multiprocess import managers

from . import _jsonvalue, _process
from ._messages import ServerConfig, dumps, read_frame
from ._state_fn import FnRunners, FnTask
from ._state_rpc import ADOPTED_SOCKET, StoreServer, current_keepalive, request_limit
from .errors import (
    LockTimeoutError,
    ModifyTimeoutError,
    RoutiluxError,
    StaleStateError,
    StateTooLargeError,
)

#: How often a writer waiting on a lock checks that the holder is still alive.
HOLDER_CHECK_INTERVAL = 0.5


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
        self.size = 2  # len("{}"): kept exact, the size of the value as compact JSON
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


def _copy(value: dict | None) -> dict:
    """A deep copy of a stored value (a pickle round trip: several times faster than deepcopy)."""
    return pickle.loads(dumps(value)) if value else {}


class StateStore:
    """Every worker's routine states, counters and status (lives in the state server)."""

    def __init__(self, max_state_bytes: int, strict: bool, lock_timeout: float) -> None:
        self._max_bytes = max_state_bytes
        self._strict = strict
        self._lock_timeout = lock_timeout
        # A plain lock: _breathe() must release it entirely to send a keepalive.
        self._cond = threading.Condition(threading.Lock())
        self._workers: dict[str, _Worker] = {}
        self._runners = FnRunners()

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

    def _wait_free(self, cell: _Cell, rid: str, timeout: float | None) -> None:
        """Wait until nobody holds ``cell``'s lock, at most ``timeout`` (default ``lock_timeout``)."""
        if cell.holder is None:
            return
        limit = self._lock_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        keepalive = current_keepalive()
        step = HOLDER_CHECK_INTERVAL if keepalive is None else min(HOLDER_CHECK_INTERVAL, keepalive.interval)
        while cell.holder is not None:
            if not _pid_alive(cell.holder_pid):
                cell.holder = None
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeoutError(
                    f"routine state {rid!r} stayed locked by process {cell.holder_pid} for {limit:g}s; "
                    "keep `with worker_state.lock(...)` blocks short, or pass a longer timeout"
                )
            self._cond.wait(min(remaining, step))
            if keepalive is not None and keepalive.due():
                self._breathe(keepalive)

    def _breathe(self, keepalive: Any) -> None:
        """Tell the waiting client we are alive, without holding the store's lock while we write."""
        self._cond.release()
        try:
            keepalive.send()
        finally:
            self._cond.acquire()

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

    def replace(self, wid: str, rid: str, value: dict, size: int, expected: int | None) -> tuple[int, int]:
        """Replace a state. Returns ``(version, lost)``; ``lost`` counts lost updates so far (0: none now)."""
        with self._cond:
            cell = self._cell(wid, rid)
            self._wait_free(cell, rid, None)
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

    def merge(self, wid: str, rid: str, partial: dict) -> tuple[bytes, int]:
        with self._cond:
            cell = self._cell(wid, rid)
            self._wait_free(cell, rid, None)
            merged = dict(cell.value) if cell.value else {}
            merged.update(partial)
            size = _jsonvalue.encoded_size(merged)
            self._check_size(rid, size)
            version = self._store(cell, merged, size)
            return dumps(merged), version

    def increment(self, wid: str, rid: str, amounts: dict[str, int | float]) -> tuple[dict[str, int | float], int]:
        """Add each amount to its key (missing keys count as 0); return the new values.

        The new size is computed exactly from what changes (each key's JSON
        text, escapes included), so the size bound holds without re-encoding
        the whole state.
        """
        with self._cond:
            cell = self._cell(wid, rid)
            self._wait_free(cell, rid, None)
            old = cell.value if cell.value is not None else {}
            result = {}
            size = cell.size
            count = len(old)
            for key, amount in amounts.items():
                path = f"state[{key!r}] of routine {rid!r}"
                if key in old:
                    current = old[key]
                    total, text = _jsonvalue.add_number(current, amount, path)
                    size += len(text) - _jsonvalue.encoded_size(current, path)
                else:
                    total, text = _jsonvalue.add_number(0, amount, path)
                    size += _jsonvalue.encoded_size(key) + 1 + len(text) + (1 if count else 0)  # "key":text,
                    count += 1
                result[key] = total
            self._check_size(rid, size)
            old.update(result)  # in place: nothing outside the lock holds this dict
            self._store(cell, old, size)
            return result, cell.version

    def modify(self, wid: str, rid: str, fn_blob: bytes, budget: float) -> tuple[bytes, int]:
        """Run ``fn(copy_of_state) -> new_state`` with the state locked, within ``budget`` seconds."""
        with self._cond:
            cell = self._cell(wid, rid)
            self._wait_free(cell, rid, None)
            cell.holder, cell.holder_pid = f"modify-{threading.get_ident()}", os.getpid()
            working = _copy(cell.value)
        try:
            result = self._run_fn(rid, FnTask(fn_blob, working), budget)
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
                cell.holder, cell.holder_pid = None, 0
                self._cond.notify_all()

    def _run_fn(self, rid: str, task: FnTask, budget: float) -> Any:
        """The function's result; abandoned (ModifyTimeoutError) past ``budget``."""
        self._runners.submit(task)
        deadline = time.monotonic() + budget
        keepalive = current_keepalive()
        step = HOLDER_CHECK_INTERVAL if keepalive is None else keepalive.interval
        while not task.done.wait(max(0.0, min(step, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                if self._runners.abandon(task):
                    raise ModifyTimeoutError(
                        f"the modify_routine_state({rid!r}) function ran past its time budget of {budget:g}s; "
                        "nothing was written and the routine state is unlocked. Make the function quicker, or "
                        "pass modify_routine_state(..., timeout=seconds)"
                    )
                break  # its outcome arrived just in time
            if keepalive is not None and keepalive.due():
                keepalive.send()
        if task.error is not None:
            raise _portable_error(task.error, f"modify_routine_state({rid!r}) function raised")
        return task.result

    def acquire(self, wid: str, rid: str, token: str, pid: int, timeout: float | None) -> tuple[bytes | None, int]:
        with self._cond:
            cell = self._cell(wid, rid)
            self._wait_free(cell, rid, timeout)
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


class StoreManager(managers.BaseManager):
    """The manager of the state server's socket: it serves one :class:`StateStore` (see ``_state_rpc``)."""


def main() -> None:
    """Entry point of the state-server process (``routilux-mp state-server``).

    Reads a pickled :class:`ServerConfig` from stdin (never the command line:
    the authkey must not show in ``ps``), adopts the listening socket the
    supervisor bound, then serves until stdin reaches EOF (the supervisor
    closed it, or died).
    """
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
    ADOPTED_SOCKET.append(socket.socket(fileno=config.listen_fd))
    store = StateStore(config.max_state_bytes, config.strict, config.lock_timeout)
    limits = {"max_request_bytes": request_limit(config.max_state_bytes), "max_state_bytes": config.max_state_bytes}
    StoreServer(store, EXPOSED, limits, config.address, config.authkey).serve_forever()
