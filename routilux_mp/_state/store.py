"""``StateStore``: the state server's one served object, the live semantics over a ``StateBackend``.

Every method does a whole operation server-side (read-modify-write included)
and returns copies; clients never hold nested proxies. One condition
variable guards the store and its backend (see ``backend`` for what a
backend keeps and how it is called). Values are mutated in place where that
is safe (an increment costs what it changes, not the size of the state) and
every read returns a pickle made under the condition, which the client
unpickles: a copy, made once.

What lives here and never in a backend:

* **Versions and lost updates.** Each write bumps a cell's version; a
  ``replace`` that expected another version lost someone's update: counted
  (``lost_updates``), or refused with ``strict``.
* **Size and JSON rules.** Clients send values already normalized with their
  exact size; the store checks the bound before anything is written.
* **Lock leases and their waiters.** A routine state locked with
  ``worker_state.lock()`` has a lease (token + owner pid); other writers wait
  for it, at most ``lock_timeout``. A holder that dies releases its leases:
  the supervisor says so when it reaps a worker (``release_pid``), and
  waiters also check the owner's liveness themselves while they wait.
* **``modify``**: the function runs on a runner thread (``modify``) within its
  budget, with the cell's lease held by the store itself.

While a call waits (for a lease, or a ``modify`` function) the server thread
serving it tells its client it is alive (:func:`set_heartbeat`), so a client
tells "busy" from "hung".

Every write that a retried call or a re-run activation may repeat first asks
``replay.Replays`` whether it was applied before (then its kept reply is
returned), and otherwise stages its reply with it: over a backend that
survives a restart, nothing is applied twice (see ``replay``). The store
also keeps the **journal** of a resumable CLI run (:meth:`StateStore.journal_begin`,
:meth:`~StateStore.journal_record`): the lines that ended, and where the
run's output files end, committed with the state writes they follow.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .. import _jsonvalue
from .._messages import dumps
from ..errors import LockLostError, LockTimeoutError, ModifyTimeoutError, StaleStateError, StateTooLargeError
from .backend import JournalLine, JournalView, StateBackend, StoredCell, WorkerMeta
from .modify import FnRunners, FnTask
from .replay import MISS, Replays

#: How often a writer waiting on a lock checks that the holder is still alive.
HOLDER_CHECK_INTERVAL = 0.5
#: Longest wait for the store's condition when the server stops (then it exits without closing the backend).
CLOSE_TIMEOUT = 2.0


class Heartbeat(Protocol):
    """How a waiting call tells its client it is alive (the server's keepalive for the call)."""

    interval: float

    def due(self) -> bool:
        """True when the client should hear from us now."""

    def send(self) -> None:
        """Tell the client we are alive (blocking: never called with the store's condition held)."""


_serving = threading.local()


def set_heartbeat(heartbeat: Heartbeat | None) -> None:
    """Set the heartbeat of the call this thread serves now (``None`` when the call ends)."""
    _serving.heartbeat = heartbeat


def current_heartbeat() -> Heartbeat | None:
    """The heartbeat of the call this thread serves, if any."""
    return getattr(_serving, "heartbeat", None)


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


class Lease:
    """Who holds a routine state's lock: a token and the owner (a pid on this machine, or ``(node, pid)``).

    An owner on this machine is alive while ``/proc`` says so. A remote owner
    (a worker on another node of a cluster) cannot be checked from here: its
    leases last until the supervisor, which learns of every worker's death,
    releases them (``release_pid`` with the same owner).
    """

    __slots__ = ("pid", "token")

    def __init__(self, token: str, pid: int | tuple[str, int]) -> None:
        """A lease for ``token``, held by process ``pid`` (or ``(node, pid)``)."""
        self.token = token
        self.pid = pid

    def owner_alive(self) -> bool:
        """False once the owner process is gone (its lease may then be taken over)."""
        return _pid_alive(self.pid) if isinstance(self.pid, int) else True


class FnRaised(Exception):
    """A ``modify`` function raised ``error``: the server reports ``error`` itself, as data."""

    def __init__(self, error: BaseException) -> None:
        """Carry the function's ``error``."""
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


def _copy(value: dict | None) -> dict:
    """A deep copy of a stored value (a pickle round trip: several times faster than deepcopy)."""
    return pickle.loads(dumps(value)) if value else {}


class StateStore:
    """Every worker's routine states, counters and status (lives in the state server)."""

    def __init__(self, backend: StateBackend, max_state_bytes: int, strict: bool, lock_timeout: float,
                 session: str = "") -> None:
        """A store over ``backend`` with the runtime's state rules; ``session`` names the runtime (see ``replay``)."""
        self._backend = backend
        self._max_bytes = max_state_bytes
        self._strict = strict
        self._lock_timeout = lock_timeout
        #: A backend that commits outside our condition must never see a saved value change: copy first.
        self._in_place = backend.in_place
        # A plain lock: _breathe() must release it entirely to send a keepalive.
        self._cond = threading.Condition(threading.Lock())
        #: Replays of retried calls and re-run activations; the seals and syncs of a durable backend.
        self._log = Replays(backend, session)
        #: ``{(worker_id, routine_id): Lease}``: locked routine states (live only, never stored).
        self._leases: dict[tuple[str, str], Lease] = {}
        #: ``{(worker_id, routine_id): count}``: lost updates so far (live only).
        self._lost: dict[tuple[str, str], int] = {}
        self._runners = FnRunners()

    # -- helpers (call with self._cond held) -----------------------------------
    #
    # Every write: ask ``_log.replayed()`` (a call applied before gets its kept
    # reply), else load the cell, check, ``backend.save(...)`` the next version
    # (``cell.version + 1``, or 1), then ``_log.done(reply)`` stages the reply
    # and seals the operation; release the condition, then ``_log.sync`` the
    # ticket before returning: a write is acknowledged once it is durable.

    def _wait_free(self, key: tuple[str, str], timeout: float | None) -> None:
        """Wait until nobody holds ``key``'s lease, at most ``timeout`` (default ``lock_timeout``).

        The hot paths call it only ``if self._leases`` (most stores hold none).
        """
        lease = self._leases.get(key)
        if lease is None:
            return
        limit = self._lock_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        heartbeat = current_heartbeat()
        step = HOLDER_CHECK_INTERVAL if heartbeat is None else min(HOLDER_CHECK_INTERVAL, heartbeat.interval)
        while lease is not None:
            if not lease.owner_alive():
                del self._leases[key]
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeoutError(
                    f"routine state {key[1]!r} stayed locked by process {lease.pid} for {limit:g}s; "
                    "keep `with worker_state.lock(...)` blocks short, or pass a longer timeout"
                )
            self._cond.wait(min(remaining, step))
            if heartbeat is not None and heartbeat.due():
                self._breathe(heartbeat)
            lease = self._leases.get(key)

    def _breathe(self, heartbeat: Heartbeat) -> None:
        """Tell the waiting client we are alive, without holding the store's condition while we write."""
        self._cond.release()
        try:
            heartbeat.send()
        finally:
            self._cond.acquire()

    def _check_size(self, rid: str, size: int) -> None:
        """Refuse a routine state over ``max_state_bytes`` (nothing is written)."""
        if size > self._max_bytes:
            raise StateTooLargeError(
                f"state of routine {rid!r} would be {size} bytes as JSON, over max_state_bytes="
                f"{self._max_bytes}; nothing was written. Trim it, or raise Runtime(max_state_bytes=...)"
            )

    def _read(self, reply: Any) -> Any:
        """Return what a read found once the writes it may have seen are durable (condition released)."""
        ticket = self._log.read_ticket()
        if ticket:
            self._cond.release()
            try:
                self._log.sync(ticket)
            finally:
                self._cond.acquire()
        return reply

    # -- workers -------------------------------------------------------------

    def register_worker(self, wid: str, flow_id: str, status: str) -> None:
        """Set worker ``wid``'s flow id and status (its counters are kept)."""
        with self._cond:
            reply, ticket = self._log.replayed()
            if reply is MISS:
                meta = self._backend.load_meta(wid)
                if meta is None:
                    meta = WorkerMeta(flow_id, status)
                else:
                    meta.flow_id, meta.status = flow_id, status
                self._backend.save_meta(wid, meta)
                ticket = self._log.done(None)
        self._log.sync(ticket)

    def meta(self, wid: str) -> dict:
        """Worker ``wid``'s flow id, status and job counters (defaults if it is unknown)."""
        with self._cond:
            return self._read((self._backend.load_meta(wid) or WorkerMeta()).as_dict())

    def add_job_counts(self, deltas: dict[str, tuple[int, int]]) -> None:
        """Add ``(processed, failed)`` to each worker's job counters."""
        with self._cond:
            reply, ticket = self._log.replayed()
            if reply is MISS:
                self._backend.add_job_counts(deltas)
                ticket = self._log.done(None)
        self._log.sync(ticket)

    # -- routine states ------------------------------------------------------

    def get(self, wid: str, rid: str) -> tuple[bytes | None, int]:
        """``(pickled state or None, version)``; never waits for a lock."""
        with self._cond:
            cell = self._backend.load(wid, rid)
            return self._read((None, 0) if cell is None else (dumps(cell.value), cell.version))

    def get_all(self, wid: str) -> tuple[bytes, dict[str, int]]:
        """``(pickled {rid: state}, {rid: version})`` of every routine state of worker ``wid``."""
        with self._cond:
            cells = self._backend.load_worker(wid)
            return self._read((dumps({rid: c.value for rid, c in cells.items()}),
                               {rid: c.version for rid, c in cells.items()}))

    def replace(self, wid: str, rid: str, value: dict, size: int, expected: int | None) -> tuple[int, int]:
        """Replace a state. Returns ``(version, lost)``; ``lost`` counts lost updates so far (0: none now).

        ``expected`` is the version the caller's activation read (``None``: it
        did not read it, a blind write, never a lost update).
        """
        self._check_size(rid, size)

        def change(cell: StoredCell | None) -> tuple[int, int]:
            """Write ``value`` over ``cell``, counting a lost update when its version moved since the read."""
            current = 0 if cell is None else cell.version
            lost = 0
            if expected is not None and expected != current:
                if self._strict:
                    raise StaleStateError(
                        f"routine state {rid!r} of worker {wid!r} changed (version {expected} -> "
                        f"{current}) between this activation's read and its write; nothing was "
                        "written. Use increment/merge_routine_state/modify_routine_state or "
                        "worker_state.lock() for read-modify-write"
                    )
                lost = self._lost[(wid, rid)] = self._lost.get((wid, rid), 0) + 1
            self._backend.save(wid, rid, value, current + 1, size)
            return current + 1, lost

        return self._write(wid, rid, change)

    def merge(self, wid: str, rid: str, partial: dict) -> tuple[bytes, int]:
        """Merge ``partial`` into the state (shallow); return ``(pickled new state, version)``."""

        def change(cell: StoredCell | None) -> tuple[bytes, int]:
            """``cell``'s value updated with ``partial``, saved."""
            merged = dict(cell.value) if cell is not None else {}
            merged.update(partial)
            size = _jsonvalue.encoded_size(merged)
            self._check_size(rid, size)
            version = 1 if cell is None else cell.version + 1
            self._backend.save(wid, rid, merged, version, size)
            return dumps(merged), version

        return self._write(wid, rid, change)

    def increment(self, wid: str, rid: str, amounts: dict[str, int | float]) -> tuple[list[int | float], int]:
        """Add each amount to its key (missing keys count as 0); return ``(new values, version)``.

        The new values are a list in the order of ``amounts`` (the client
        knows the keys: a list of numbers pickles several times quicker than
        a dict of thousands of keys, both ways).
        """

        def change(cell: StoredCell | None) -> tuple[list[int | float], int]:
            """``cell``'s numbers plus ``amounts``, saved."""
            result, size = _jsonvalue.add_numbers(cell.value if cell is not None else {},
                                                  cell.size if cell is not None else 2, amounts, rid)
            self._check_size(rid, size)
            # In place (an increment costs what it changes) only where the backend allows it.
            value = {} if cell is None else cell.value if self._in_place else dict(cell.value)
            value.update(zip(amounts, result))
            version = 1 if cell is None else cell.version + 1
            self._backend.save(wid, rid, value, version, size)
            return result, version

        return self._write(wid, rid, change)

    def _write(self, wid: str, rid: str, change: Callable[[StoredCell | None], Any]) -> Any:
        """One write of a cell: ``change(cell)`` saves it and returns the reply.

        A retried call or a re-run activation whose write was applied before
        gets that reply again (``replayed``), and nothing is applied twice;
        otherwise the write waits for a lock held on the cell, and the reply
        returns once the write is committed (``sync``, after the condition is
        released so commits of several writers group).
        """
        with self._cond:
            reply, ticket = self._log.replayed()
            if reply is MISS:
                if self._leases:
                    self._wait_free((wid, rid), None)
                reply = change(self._backend.load(wid, rid))
                ticket = self._log.done(reply)
        if ticket:
            self._log.sync(ticket)
        return reply

    def modify(self, wid: str, rid: str, fn_blob: bytes, budget: float) -> tuple[bytes, int]:
        """Run ``fn(copy_of_state) -> new_state`` with the state locked, within ``budget`` seconds."""
        key = (wid, rid)
        with self._cond:
            reply, ticket = self._log.replayed()
            if reply is MISS:
                self._wait_free(key, None)
                lease = self._leases[key] = Lease(f"modify-{threading.get_ident()}", os.getpid())
                cell = self._backend.load(wid, rid)
                working = _copy(cell.value if cell is not None else None)
        if reply is not MISS:  # a retried call or a re-run activation: the function ran before
            self._log.sync(ticket)
            return reply
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
                cell = self._backend.load(wid, rid)
                version = 1 if cell is None else cell.version + 1
                self._backend.save(wid, rid, value, version, size)
                reply = (dumps(value), version)
                ticket = self._log.done(reply)
        finally:
            with self._cond:
                if self._leases.get(key) is lease:
                    del self._leases[key]
                self._cond.notify_all()
        self._log.sync(ticket)
        return reply

    def _run_fn(self, rid: str, task: FnTask, budget: float) -> Any:
        """The function's result; abandoned (ModifyTimeoutError) past ``budget``; FnRaised if it raised."""
        self._runners.submit(task)
        deadline = time.monotonic() + budget
        heartbeat = current_heartbeat()
        step = HOLDER_CHECK_INTERVAL if heartbeat is None else heartbeat.interval
        while not task.done.wait(max(0.0, min(step, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                if self._runners.abandon(task):
                    raise ModifyTimeoutError(
                        f"the modify_routine_state({rid!r}) function ran past its time budget of {budget:g}s; "
                        "nothing was written and the routine state is unlocked. Make the function quicker, or "
                        "pass modify_routine_state(..., timeout=seconds)"
                    )
                break  # its outcome arrived just in time
            if heartbeat is not None and heartbeat.due():
                heartbeat.send()
        if task.error is not None:
            raise FnRaised(task.error)
        return task.result

    def acquire(self, wid: str, rid: str, token: str, pid: int | tuple[str, int], timeout: float | None) -> tuple[bytes | None, int]:
        """Take the lease of a routine state for ``(token, pid)``; return ``(pickled state or None, version)``."""
        key = (wid, rid)
        with self._cond:
            self._wait_free(key, timeout)
            self._leases[key] = Lease(token, pid)
            cell = self._backend.load(wid, rid)
            return self._read((None, 0) if cell is None else (dumps(cell.value), cell.version))

    def release(self, wid: str, rid: str, token: str, value: dict | None, size: int) -> int:
        """Give back the lease ``token`` holds, writing ``value`` first unless it is ``None``; return the version.

        Raises:
            LockLostError: ``token`` no longer holds the lease (the server
                restarted since it was taken, or its holder was presumed dead).
        """
        key = (wid, rid)
        with self._cond:
            reply, ticket = self._log.replayed()
            if reply is MISS:
                lease = self._leases.get(key)
                if lease is None or lease.token != token:
                    raise LockLostError(
                        f"the lock on routine state {rid!r} was lost while its block ran: the state server "
                        "restarted (locks do not survive a restart), or the holder was presumed dead. Nothing "
                        "of the block was written: run it again"
                    )
                try:
                    cell = self._backend.load(wid, rid)
                    reply = 0 if cell is None else cell.version
                    if value is not None:
                        self._check_size(rid, size)
                        reply += 1
                        self._backend.save(wid, rid, value, reply, size)
                    ticket = self._log.done(reply)
                finally:
                    del self._leases[key]
                    self._cond.notify_all()
            elif self._leases.get(key) is not None and self._leases[key].token == token:
                del self._leases[key]  # a re-run activation's block: written before, unlock all the same
                self._cond.notify_all()
        self._log.sync(ticket)
        return reply

    def release_pid(self, pid: int | tuple[str, int]) -> int:
        """Release every lease held by process ``pid`` (or ``(node, pid)``: it died) and forget its requests;
        returns how many leases."""
        with self._cond:
            dead = [key for key, lease in self._leases.items() if lease.pid == pid]
            for key in dead:
                del self._leases[key]
            if dead:
                self._cond.notify_all()
            if self._backend.survives_restart:
                self._backend.drop_requests(pid)
                ticket = self._log.done(None)
            else:
                ticket = 0
        self._log.sync(ticket)
        return len(dead)

    # -- the journal of a resumable run --------------------------------------------

    def journal_begin(self, run: dict, new_run: bool) -> None:
        """Journal a run (``new_run``: forget an earlier one's lines); record effects from now on."""
        with self._cond:
            reply, ticket = self._log.replayed()
            if reply is MISS:
                self._backend.save_journal(dict(run, session=self._log.session), [], None, new_run=new_run)
                self._log.effects = bool(self._log.session)
                ticket = self._log.done(None)
        self._log.sync(ticket)

    def journal_read(self, lines: bool) -> JournalView | None:
        """The journal (``None``: no run was journaled in this file)."""
        with self._cond:
            return self._read(self._backend.load_journal(lines))

    def journal_record(self, lines: list[tuple[int, str, str, str | None]], offsets: dict[str, int]) -> None:
        """Record ended lines and the output offsets; drop the effects of the completed ones' jobs."""
        with self._cond:
            reply, ticket = self._log.replayed()
            if reply is MISS:
                records = [JournalLine(*line) for line in lines]
                self._backend.save_journal(None, records, offsets)
                self._backend.drop_effects([rec.job_id for rec in records if rec.status == "completed"])
                ticket = self._log.done(None)
        self._log.sync(ticket)

    # -- reporting -----------------------------------------------------------

    def lost_updates(self) -> dict[str, int]:
        """Lost updates per routine id, summed over workers."""
        totals: dict[str, int] = {}
        with self._cond:
            for (_wid, rid), count in self._lost.items():
                totals[rid] = totals.get(rid, 0) + count
        return totals

    def snapshot(self) -> bytes:
        """Everything (pickled), for the runtime's final snapshot at shutdown."""
        with self._cond:
            return self._read(dumps({
                wid: {
                    "meta": (meta or WorkerMeta()).as_dict(),
                    "states": {rid: c.value for rid, c in cells.items()},
                }
                for wid, (meta, cells) in self._backend.snapshot().items()
            }))

    def close(self) -> None:
        """Close the backend (the server is stopping); not exposed to clients.

        Gives up after ``CLOSE_TIMEOUT`` if a call holds the condition that
        long: the process is about to exit, and must.
        """
        if not self._cond.acquire(timeout=CLOSE_TIMEOUT):
            return
        try:
            self._backend.close()
        finally:
            self._cond.release()
