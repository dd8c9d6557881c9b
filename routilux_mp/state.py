"""WorkerState: one worker's shared JSON state, seen identically from every process.

The state lives in the state-server process (see the ``_state`` package). A
``WorkerState`` is a thin handle: every method is one call to the server over
this process's kept-open connection, and every read returns a copy.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import math
import pickle
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle

from . import _jsonvalue
from ._state.client import StoreClient, _Held
from ._state.protocol import Method
from .errors import RoutiluxError, RuntimeClosedError, SerializationError, StateServerLostError

__all__ = ["WorkerState"]

logger = logging.getLogger("routilux_mp.state")

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


def _check_amounts(amounts: dict) -> None:
    """:func:`_check_amount` for every item; the common case (str keys, plain ints) in C-speed passes."""
    values = amounts.values()
    kinds = set(map(type, values))
    if set(map(type, amounts)) <= _STR and kinds <= _NUMBERS:
        if float not in kinds:
            return
        try:
            if all(map(math.isfinite, values)):
                return
        except OverflowError:  # an int too large for a float, among floats: checked one by one below
            pass
    for key, amount in amounts.items():
        _check_amount(key, amount)


_STR, _NUMBERS = frozenset({str}), frozenset({int, float})


class WorkerState:
    """Shared state of one worker (one ``runtime.exec``), held by the state server.

    Every routine of the worker, in every process, sees the same state. Values
    are JSON only, each routine state at most ``max_state_bytes`` as compact
    JSON; every operation is atomic with respect to every other, from any
    process. Reads return copies: mutating one changes nothing until it is
    written back.

    Deadlines: every call ends within ``state_timeout`` seconds of the state
    server's last sign of life, or raises
    :class:`~routilux_mp.errors.StateServerLostError`. A write to a routine
    state locked by someone else first waits for the lock, at most
    ``lock_timeout`` (:class:`~routilux_mp.errors.LockTimeoutError`); a
    ``modify_routine_state`` function has its own budget
    (:class:`~routilux_mp.errors.ModifyTimeoutError`). While the server waits
    on those, it tells the caller it is alive, so a hung server is still found
    within ``state_timeout``.

    Trust: a WorkerState is not a security boundary. All flows of a runtime
    share one trust domain: logic runs as your user with the state server's key
    in its process, so logic of one flow can build a handle on another flow's
    worker and read or write its state. Run flows that must not see each
    other in separate runtimes.

    Attributes:
        worker_id: this worker's id.
        flow_id: the id of the flow it runs.
    """

    def __init__(self, worker_id: str, flow_id: str, client: StoreClient) -> None:
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

    def _dict_write(self, routine_id: str, data: Any, refusal: str) -> tuple[str, dict, int, _Held | None]:
        """Checks every write of a dict makes: ``(routine id, JSON value, its size, the lock held on it)``.

        Raises ``TypeError`` (``refusal``) when ``data`` is not a dict, and
        what ``_jsonvalue.normalize`` raises when it is not JSON.
        """
        rid = _check_rid(routine_id)
        self._write_guard()
        if not isinstance(data, dict):
            raise TypeError(f"{refusal}, got {type(data).__name__}")
        value, size = _jsonvalue.normalize(data)
        return rid, value, size, self._held(rid)

    def _held(self, rid: str) -> _Held | None:
        """The lock this thread holds on ``rid`` (its calls on ``rid`` then act on the held dict)."""
        return self._client.held().get((self.worker_id, rid))

    def _meta(self) -> dict:
        snap = self._snapshot()
        if snap is not None:
            return snap["meta"]
        meta = None if self._client.local_meta is None else self._client.local_meta(self.worker_id)
        if meta is None:
            meta = self._client.call(Method.META, self.worker_id)
        if self._client.lost is not None:
            meta = dict(meta, status="failed")
        return meta

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
        """``"starting"`` -> ``"running"`` -> ``"stopped"`` (or ``"failed"``: the runtime broke, or its state was lost)."""
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
        """A deep copy of every routine state of this worker.

        Raises:
            StateServerLostError: the state server was lost (also after shutdown:
                lost state is never reported as empty).
        """
        snap = self._snapshot()
        if snap is not None:
            return _jsonvalue.normalize(snap["states"])[0]
        blob, versions = self._client.call(Method.GET_ALL, self.worker_id)
        for rid, version in versions.items():
            self._saw(rid, version)
        states = pickle.loads(blob)
        for (wid, rid), held in self._client.held().items():
            if wid == self.worker_id:
                states[rid] = copy.deepcopy(held.state)
        return states

    def get_routine_state(self, routine_id: str) -> dict | None:
        """A deep copy of ``routine_id``'s state, or ``None`` if it was never set.

        Inside this thread's ``with lock(routine_id) as state:`` block it is a
        copy of ``state``, changes made so far included.

        Raises:
            StateServerLostError: the state server was lost (also after shutdown:
                lost state is never reported as ``None``).
        """
        rid = _check_rid(routine_id)
        held = self._held(rid)
        if held is not None:
            return copy.deepcopy(held.state)
        snap = self._snapshot()
        if snap is not None:
            value = snap["states"].get(rid)
            return None if value is None else _jsonvalue.normalize(value)[0]
        blob, version = self._client.call(Method.GET, self.worker_id, rid)
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
        rid, value, size, held = self._dict_write(routine_id, state, "a routine state must be a dict")
        if held is not None:
            held.state.clear()
            held.state.update(value)
            return
        key = (self.worker_id, rid)
        expected = self._client.reads().get(key)
        version, lost = self._client.call(
            Method.REPLACE, self.worker_id, rid, value, size, expected, patience=self._client.lock_timeout
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
        rid, value, _, held = self._dict_write(routine_id, partial, "merge_routine_state() needs a dict")
        if held is not None:
            held.state.update(value)
            return copy.deepcopy(held.state)
        blob, version = self._client.call(Method.MERGE, self.worker_id, rid, value, patience=self._client.lock_timeout)
        self._saw(rid, version)
        return pickle.loads(blob)

    def increment(self, routine_id: str, key: str, amount: float = 1) -> int | float:
        """Atomically add ``amount`` to ``state[key]`` (a missing key counts as 0); return the new value.

        Raises:
            TypeError: ``state[key]`` is not a number, or ``amount`` is not a finite number.
            StateNotSerializableError: the sum JSON cannot hold (an infinite
                float, an int over Python's 4,300-digit limit); nothing written.
            StateTooLargeError: the state would grow past ``max_state_bytes``.
        """
        return self.increment_many(routine_id, {key: amount})[key]

    def increment_many(self, routine_id: str, amounts: dict[str, int | float]) -> dict[str, int | float]:
        """Atomically add several amounts at once, in one call; return the new values by key.

        All or nothing: if one key fails (see :meth:`increment`), none is changed.
        """
        rid = _check_rid(routine_id)
        self._write_guard()
        if not isinstance(amounts, dict):
            raise TypeError(f"increment_many() needs a dict of key -> amount, got {type(amounts).__name__}")
        _check_amounts(amounts)
        if not amounts:
            return {}
        held = self._held(rid)
        if held is not None:
            totals = {
                key: _jsonvalue.add_number(held.state.get(key, 0), amount, f"state[{key!r}] of routine {rid!r}")[0]
                for key, amount in amounts.items()
            }
            held.state.update(totals)
            return totals
        totals, version = self._client.call(
            Method.INCREMENT, self.worker_id, rid, amounts, patience=self._client.lock_timeout
        )
        self._moved(rid, version)
        # The server answers the new values in the order of the keys sent (a reply kept in a state file by an
        # earlier version, replayed to a resumed run, is a dict).
        return totals if type(totals) is dict else dict(zip(amounts, totals))

    def modify_routine_state(self, routine_id: str, fn: Callable[[dict], dict | None],
                             timeout: float | None = None) -> dict:
        """Atomic read-modify-write: ``fn(copy) -> new_state`` runs in the state server under the lock.

        ``fn`` gets a copy of the state (``{}`` if never set) and returns the
        new state, or ``None`` to keep the changes it made to the copy. It is
        shipped with cloudpickle, so a closure or lambda works. It holds this
        routine state's lock while it runs, so it has a time budget:
        ``timeout`` seconds (default: the runtime's ``state_timeout``). Past
        it the call raises :class:`~routilux_mp.errors.ModifyTimeoutError`,
        nothing is written and the lock is released at once; the function is
        stopped at its next Python instruction (one blocked in a C call such as
        ``time.sleep`` finishes that call first) and its result discarded.
        Other routine states, and the server, carry on meanwhile.

        Inside this thread's ``with lock(routine_id)`` block, ``fn`` runs here
        on the held dict instead (the lock is already held), without a budget.
        """
        rid = _check_rid(routine_id)
        self._write_guard()
        if not callable(fn):
            raise TypeError(f"modify_routine_state() needs a callable, got {fn!r}")
        budget = self._client.timeout if timeout is None else timeout
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(f"modify_routine_state() timeout must be a positive number of seconds, got {timeout!r}")
        held = self._held(rid)
        if held is not None:
            working = copy.deepcopy(held.state)
            result = fn(working)
            value, _ = _jsonvalue.normalize(working if result is None else _check_new_state(rid, result))
            held.state.clear()
            held.state.update(value)
            return copy.deepcopy(value)
        try:
            blob = cloudpickle.dumps(fn)
        except Exception as exc:
            raise SerializationError(f"the function given to modify_routine_state({rid!r}) cannot be pickled: {exc}") from exc
        result, version = self._client.call(
            Method.MODIFY, self.worker_id, rid, blob, float(budget), patience=self._client.lock_timeout + budget
        )
        self._saw(rid, version)
        return pickle.loads(result)

    @contextlib.contextmanager
    def lock(self, routine_id: str, timeout: float | None = None) -> Iterator[dict]:
        """Hold ``routine_id``'s lock; the yielded dict is written back on normal exit.

        Other writers of this routine state (in any process) wait meanwhile.
        The block is a transaction on the yielded dict: this thread's own
        calls on ``routine_id`` inside it (``increment``, ``merge``, ``update``,
        ``modify``, ``get``) act on that dict, so they are written back with it
        on normal exit, and discarded with it if the block raises. If the
        holder dies, the lock is released and nothing is written.

        Raises:
            LockTimeoutError: the lock was not free within ``timeout`` seconds
                (default: the runtime's ``lock_timeout``).
            StateNotSerializableError, StateTooLargeError: at exit, the dict is
                not JSON or too large; nothing was written, the lock is released.
        """
        rid = _check_rid(routine_id)
        self._write_guard()
        key = (self.worker_id, rid)
        held = self._client.held()
        if key in held:
            raise RoutiluxError(f"this thread already holds the lock on routine state {rid!r} (locks are not reentrant)")
        token = uuid.uuid4().hex
        wait = self._client.lock_timeout if timeout is None else float(timeout)
        blob, version = self._client.call(Method.ACQUIRE, self.worker_id, rid, token, self._client.owner(), wait, patience=wait)
        state = pickle.loads(blob) if blob is not None else {}
        held[key] = _Held(token, state)
        try:
            yield state
        except BaseException:
            held.pop(key, None)
            with contextlib.suppress(StateServerLostError):
                self._client.call(Method.RELEASE, self.worker_id, rid, token, None, 0)
            raise
        held.pop(key, None)
        try:
            new_value, size = _jsonvalue.normalize(state)
        except BaseException:
            self._client.call(Method.RELEASE, self.worker_id, rid, token, None, 0)
            raise
        version = self._client.call(Method.RELEASE, self.worker_id, rid, token, new_value, size)
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


def _check_new_state(rid: str, result: Any) -> dict:
    if not isinstance(result, dict):
        raise TypeError(
            f"modify_routine_state({rid!r}) function returned {type(result).__name__}; "
            "it must return the new state (a dict) or None to keep its changes to the copy"
        )
    return result


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
