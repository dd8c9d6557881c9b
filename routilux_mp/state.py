"""WorkerState: one worker's shared JSON state, seen identically from every process.

The state lives in the state-server process (see ``_state_server``). A
``WorkerState`` is a thin handle: every method is one call to the server over
this process's kept-open connection, and every read returns a copy.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import pickle
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle

from . import _jsonvalue
from .errors import RoutiluxError, RuntimeClosedError, SerializationError, StateServerLostError

__all__ = ["WorkerState"]

logger = logging.getLogger("routilux_mp.state")

class _Timeout(Exception):
    """The state server did not answer in time."""


class _Lost(Exception):
    """The connection to the state server broke."""


#: Errors that mean the connection to the state server could not be made.
_CONNECT_ERRORS = (EOFError, OSError)


class _StoreClient:
    """This process's link to the state server.

    One connection per thread, opened on first use and kept open. After the
    server is lost every call fails fast with ``StateServerLostError`` (no
    retry loop, no log flood).
    """

    def __init__(self, address: str, authkey: bytes, timeout: float, lock_timeout: float) -> None:
        self.address = address
        self._authkey = authkey
        self.timeout = timeout
        self.lock_timeout = lock_timeout
        self._proxy: Any = None  # a _state_server.StoreProxy, made on first use
        self._lock = threading.Lock()
        self.lost: str | None = None
        #: Set by the runtime at shutdown: reads are served from it afterwards.
        self.snapshot: dict[str, dict] | None = None
        #: In the supervisor: ``fn(worker_id) -> meta dict | None`` giving exact local counters.
        self.local_meta: Callable[[str], dict | None] | None = None
        self.local = threading.local()

    # -- per-thread bookkeeping for lost-update detection and lock ownership --

    def reads(self) -> dict[tuple[str, str], int]:
        reads = getattr(self.local, "reads", None)
        if reads is None:
            reads = self.local.reads = {}
        return reads

    def held(self) -> dict[tuple[str, str], str]:
        held = getattr(self.local, "held", None)
        if held is None:
            held = self.local.held = {}
        return held

    def begin_activation(self) -> None:
        """Forget what the previous activation read (workers call this)."""
        self.local.reads = {}

    # -- calls -----------------------------------------------------------------

    def _connect(self) -> Any:
        # Imported here: multiprocess (and dill) cost a worker ~100 ms of start-up,
        # paid only by processes whose logic touches state.
        from ._state_server import SERIALIZER, StoreManager

        with self._lock:
            if self._proxy is None:
                manager = StoreManager(address=self.address, authkey=self._authkey, serializer=SERIALIZER)
                manager.connect()
                self._proxy = manager.get_store()  # type: ignore[attr-defined]
            return self._proxy

    def mark_lost(self, why: str) -> None:
        if self.lost is None:
            self.lost = why

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        if self.lost is not None:
            raise StateServerLostError(self.lost)
        deadline = self.timeout if timeout is None else timeout
        try:
            proxy = self._proxy or self._connect()
        except _CONNECT_ERRORS as exc:
            error: Exception = _Lost(f"{type(exc).__name__}: {exc}")
        else:
            try:
                return proxy.call(method, args, deadline)
            except (_Timeout, _Lost) as exc:
                error = exc
        if isinstance(error, _Timeout):
            self.mark_lost(
                f"the state server did not answer {method}() within {deadline:g}s; it is hung or "
                "overloaded, so shared worker state is no longer available"
            )
        else:
            if self.snapshot is not None:
                raise RuntimeClosedError("the runtime was shut down; its worker state is read-only") from None
            self.mark_lost(
                f"the state server is gone ({error}); shared worker state was lost "
                "with it. Jobs in flight fail; start a new Runtime to go on"
            )
        raise StateServerLostError(self.lost) from error


class StatePusher:
    """Sends fire-and-forget updates to the state server from its own thread.

    The supervisor's dispatcher must never wait on the state server (it may
    still be starting, or be slow): job counters, worker registrations and
    lock releases of dead processes go through here, in order.
    """

    def __init__(self, client: _StoreClient) -> None:
        self._client = client
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="routilux-mp state pusher", daemon=True)
        self._thread.start()

    def push(self, method: str, *args: Any) -> None:
        self._queue.put((method, args))

    def close(self, timeout: float) -> None:
        """Send what is queued (within ``timeout``), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
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
            except Exception:
                logger.exception("the state server refused %s()", method)


def _check_rid(routine_id: Any) -> str:
    if not isinstance(routine_id, str):
        raise TypeError(f"routine id must be a str, got {routine_id!r}")
    return routine_id


def _check_amount(key: Any, amount: Any) -> None:
    if not isinstance(key, str):
        raise TypeError(f"increment() keys must be str, got {key!r}")
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or (
        isinstance(amount, float) and not math.isfinite(amount)
    ):
        raise TypeError(f"increment() amounts must be finite numbers, got {amount!r} for key {key!r}")


class WorkerState:
    """Shared state of one worker (one ``runtime.exec``), held by the state server.

    Every routine of the worker, in every process, sees the same state. Values
    are JSON only; every operation is atomic with respect to every other, from
    any process. Reads return copies: mutating one changes nothing until it is
    written back.

    Attributes:
        worker_id: this worker's id.
        flow_id: the id of the flow it runs.
    """

    def __init__(self, worker_id: str, flow_id: str, client: _StoreClient) -> None:
        self.worker_id = worker_id
        self.flow_id = flow_id
        self._client = client

    def __reduce__(self) -> Any:
        raise SerializationError(
            "a WorkerState cannot be pickled or sent in an emit: logic receives its own worker_state "
            "argument in every process"
        )

    def __repr__(self) -> str:
        return f"<WorkerState worker_id={self.worker_id!r} flow_id={self.flow_id!r}>"

    @staticmethod
    def wait_for_completion(flow: Any, worker_state: WorkerState, timeout: float | None = None,
                            check_interval: float = 0.1) -> bool:
        """Wait until every job of ``worker_state``'s worker has finished (routilux 1.1.0's helper).

        Returns False if ``timeout`` seconds (``None``: 300, as in routilux
        1.1.0) passed first. Partial batches are flushed as by
        ``runtime.wait_until_all_jobs_finished(worker_id=...)``, which this
        calls. ``flow`` must be the worker's flow (or ``None``);
        ``check_interval`` is accepted and unused (this waits on a condition).
        Call it in the process that runs the Runtime, not inside logic.
        """
        if flow is not None and getattr(flow, "flow_id", None) != worker_state.flow_id:
            raise ValueError(f"worker {worker_state.worker_id!r} runs flow {worker_state.flow_id!r}, "
                             f"not {getattr(flow, 'flow_id', flow)!r}")
        if worker_state._client.snapshot is not None:
            return True  # its runtime was shut down: every job of it has ended
        from .runtime import _runtime_of

        runtime = _runtime_of(worker_state)
        if runtime is None:
            raise RoutiluxError(
                f"WorkerState.wait_for_completion(): no Runtime of this process runs worker "
                f"{worker_state.worker_id!r}; call it where the runtime was started, not inside logic"
            )
        return runtime.wait_until_all_jobs_finished(300.0 if timeout is None else timeout,
                                                    worker_id=worker_state.worker_id)

    # -- internals -----------------------------------------------------------

    def _snapshot(self) -> dict | None:
        snap = self._client.snapshot
        if snap is None:
            return None
        return snap.get(self.worker_id, {"meta": {}, "states": {}})

    def _write_guard(self) -> None:
        if self._client.snapshot is not None:
            raise RuntimeClosedError(
                f"the runtime was shut down: worker {self.worker_id!r}'s state is read-only now "
                "(start a new Runtime to change state)"
            )

    def _token(self, rid: str) -> str | None:
        return self._client.held().get((self.worker_id, rid))

    def _meta(self) -> dict:
        snap = self._snapshot()
        if snap is not None:
            return snap["meta"]
        if self._client.local_meta is not None:
            meta = self._client.local_meta(self.worker_id)
            if meta is not None:
                return meta
        return self._client.call("meta", self.worker_id)

    def _saw(self, rid: str, version: int) -> None:
        """This activation read version ``version`` of the state."""
        self._client.reads()[(self.worker_id, rid)] = version

    def _moved(self, rid: str, version: int) -> None:
        """This activation wrote ``version`` without reading the whole state.

        If it had read the state, what it knows is now its own write; if it
        never read it, it sets no expectation (blind writes are not lost updates).
        """
        reads = self._client.reads()
        key = (self.worker_id, rid)
        if key in reads:
            reads[key] = version

    # -- reading ---------------------------------------------------------------

    @property
    def status(self) -> str:
        """``"starting"`` -> ``"running"`` -> ``"stopped"`` (or ``"failed"``)."""
        return self._meta().get("status", "stopped")

    @property
    def jobs_processed(self) -> int:
        """Jobs of this worker that finished (completed or failed)."""
        return self._meta().get("jobs_processed", 0)

    @property
    def jobs_failed(self) -> int:
        """Jobs of this worker that failed."""
        return self._meta().get("jobs_failed", 0)

    @property
    def routine_states(self) -> dict[str, dict]:
        """A deep copy of every routine state of this worker."""
        snap = self._snapshot()
        if snap is not None:
            return _jsonvalue.normalize(snap["states"])[0]
        blob, versions = self._client.call("get_all", self.worker_id)
        for rid, version in versions.items():
            self._saw(rid, version)
        return pickle.loads(blob)

    def get_routine_state(self, routine_id: str) -> dict | None:
        """A deep copy of ``routine_id``'s state, or ``None`` if it was never set."""
        rid = _check_rid(routine_id)
        snap = self._snapshot()
        if snap is not None:
            value = snap["states"].get(rid)
            return None if value is None else _jsonvalue.normalize(value)[0]
        blob, version = self._client.call("get", self.worker_id, rid)
        self._saw(rid, version)
        return None if blob is None else pickle.loads(blob)

    # -- writing ---------------------------------------------------------------

    def update_routine_state(self, routine_id: str, state: dict) -> None:
        """Replace ``routine_id``'s state atomically (JSON only; nothing written on error).

        If this activation read the state and another activation changed it
        since, the update would be lost: a warning names the routine once,
        ``stats()`` counts it, and with ``Runtime(strict_state=True)``
        :class:`~routilux_mp.errors.StaleStateError` is raised instead.
        """
        rid = _check_rid(routine_id)
        self._write_guard()
        if not isinstance(state, dict):
            raise TypeError(f"a routine state must be a dict, got {type(state).__name__}")
        value, size = _jsonvalue.normalize(state)
        key = (self.worker_id, rid)
        expected = self._client.reads().get(key)
        version, lost = self._client.call(
            "replace", self.worker_id, rid, value, size, expected, self._token(rid),
            timeout=self._client.lock_timeout + self._client.timeout,
        )
        self._moved(rid, version)
        if lost == 1:
            logger.warning(
                "lost update on routine state %r of worker %r: another activation changed it between this "
                "activation's read and its write, and this write replaced that change. Use increment(), "
                "merge_routine_state(), modify_routine_state() or worker_state.lock() for read-modify-write "
                "(this warning is shown once per routine state; stats() counts every occurrence)",
                rid, self.worker_id,
            )

    def merge_routine_state(self, routine_id: str, partial: dict) -> dict:
        """Atomically merge ``partial`` into the state (shallow) and return the new state."""
        rid = _check_rid(routine_id)
        self._write_guard()
        if not isinstance(partial, dict):
            raise TypeError(f"merge_routine_state() needs a dict, got {type(partial).__name__}")
        value, _ = _jsonvalue.normalize(partial)
        blob, version = self._client.call(
            "merge", self.worker_id, rid, value, self._token(rid),
            timeout=self._client.lock_timeout + self._client.timeout,
        )
        self._saw(rid, version)
        return pickle.loads(blob)

    def increment(self, routine_id: str, key: str, amount: float = 1) -> int | float:
        """Atomically add ``amount`` to ``state[key]`` (a missing key counts as 0); return the new value."""
        rid = _check_rid(routine_id)
        self._write_guard()
        _check_amount(key, amount)
        result, version = self._client.call(
            "increment", self.worker_id, rid, {key: amount}, self._token(rid),
            timeout=self._client.lock_timeout + self._client.timeout,
        )
        self._moved(rid, version)
        return result[key]

    def increment_many(self, routine_id: str, amounts: dict[str, int | float]) -> dict[str, int | float]:
        """Atomically add several amounts at once, in one call; return the new values by key."""
        rid = _check_rid(routine_id)
        self._write_guard()
        if not isinstance(amounts, dict):
            raise TypeError(f"increment_many() needs a dict of key -> amount, got {type(amounts).__name__}")
        for key, amount in amounts.items():
            _check_amount(key, amount)
        if not amounts:
            return {}
        result, version = self._client.call(
            "increment", self.worker_id, rid, amounts, self._token(rid),
            timeout=self._client.lock_timeout + self._client.timeout,
        )
        self._moved(rid, version)
        return result

    def modify_routine_state(self, routine_id: str, fn: Callable[[dict], dict | None]) -> dict:
        """Atomic read-modify-write: ``fn(copy) -> new_state`` runs in the state server under the lock.

        ``fn`` gets a copy of the state (``{}`` if never set) and returns the
        new state, or ``None`` to keep the changes it made to the copy. It is
        shipped with cloudpickle, so a closure or lambda works; keep it quick,
        it blocks other writers of this routine state.
        """
        rid = _check_rid(routine_id)
        self._write_guard()
        if not callable(fn):
            raise TypeError(f"modify_routine_state() needs a callable, got {fn!r}")
        try:
            blob = cloudpickle.dumps(fn)
        except Exception as exc:
            raise SerializationError(f"the function given to modify_routine_state({rid!r}) cannot be pickled: {exc}") from exc
        result, version = self._client.call(
            "modify", self.worker_id, rid, blob, self._token(rid),
            timeout=2 * self._client.lock_timeout + self._client.timeout,
        )
        self._saw(rid, version)
        return pickle.loads(result)

    @contextlib.contextmanager
    def lock(self, routine_id: str, timeout: float | None = None) -> Iterator[dict]:
        """Hold ``routine_id``'s lock; the yielded dict is written back on normal exit.

        Other writers of this routine state (in any process) wait meanwhile;
        this thread's own calls on it go through. The changes are discarded if
        the block raises. If the holder dies, the lock is released.

        Raises:
            LockTimeoutError: the lock was not free within ``timeout`` seconds
                (default: the runtime's ``lock_timeout``).
        """
        rid = _check_rid(routine_id)
        self._write_guard()
        key = (self.worker_id, rid)
        held = self._client.held()
        if key in held:
            raise RoutiluxError(f"this thread already holds the lock on routine state {rid!r} (locks are not reentrant)")
        token = uuid.uuid4().hex
        wait = self._client.lock_timeout if timeout is None else float(timeout)
        blob, version = self._client.call(
            "acquire", self.worker_id, rid, token, os.getpid(), wait, timeout=wait + self._client.timeout
        )
        held[key] = token
        state = pickle.loads(blob) if blob is not None else {}
        try:
            yield state
        except BaseException:
            held.pop(key, None)
            with contextlib.suppress(StateServerLostError):
                self._client.call("release", self.worker_id, rid, token, None, 0)
            raise
        held.pop(key, None)
        try:
            new_value, size = _jsonvalue.normalize(state)
        except BaseException:
            self._client.call("release", self.worker_id, rid, token, None, 0)
            raise
        version = self._client.call("release", self.worker_id, rid, token, new_value, size)
        self._saw(rid, version)

    # -- per-process resources ---------------------------------------------------

    def resource(self, name: str, factory: Callable[[], Any]) -> Any:
        """A per-process object (connection pool, model, client), made once per process.

        ``factory()`` runs the first time a process asks for ``name``; later
        calls in that process return the same object. It is never shared or
        serialized, and is closed (if it has ``close()``) when the process
        exits. This is the working form of the page's "connection pool in
        state" pattern: state holds only JSON.
        """
        return get_resource(name, factory)


_resources: dict[str, Any] = {}
_resources_lock = threading.Lock()


def get_resource(name: str, factory: Callable[[], Any]) -> Any:
    """The process-wide resource ``name``, made by ``factory()`` on first use."""
    if not isinstance(name, str):
        raise TypeError(f"resource name must be a str, got {name!r}")
    try:
        return _resources[name]
    except KeyError:
        pass
    with _resources_lock:
        if name not in _resources:
            _resources[name] = factory()
        return _resources[name]


def close_resources() -> None:
    """Close every resource of this process that has ``close()`` (newest first)."""
    with _resources_lock:
        items = list(_resources.items())
        _resources.clear()
    for name, obj in reversed(items):
        close = getattr(obj, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                logger.exception("closing resource %r failed", name)


atexit.register(close_resources)
