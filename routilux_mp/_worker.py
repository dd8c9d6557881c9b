"""The worker side: run activations, one result each (no transport here).

:class:`ActivationRunner` is what every worker lane runs: it loads flows
(cloudpickle, by value, the first time a lane runs one of their activations),
sets the current job and activation, calls logic, collects emits and job
changes, and reports anything logic raises (``SystemExit`` and
``KeyboardInterrupt`` included) as data. How messages reach it is its owner's
business: the local backend's child process (``_exec._child``) reads them from
a pipe; the in-thread stub backend (``_exec.stub``) calls it directly.

After an activation that emitted on a fused connection (``_fusion``), the
runner runs the connection's target on that item itself, right after sending
the activation's result (which names the emit), so the supervisor knows which
stage a crash interrupted; each fused run sends a result of its own.

Only the lane's own process speaks for an activation: a child that logic forks
and that returns into the runner exits instead (``os._exit``), and nothing it
emits is taken. A worker whose stdin/stdout/stderr logic closed or replaced is
recycled after that activation, so later activations never print into a
reused fd.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import sys
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import _context, _jsonvalue
from ._messages import _Activation, _LoadFlow, _Result, _Stop, describe_exception, encode, is_plain, loads
from ._state.client import StoreClient
from .activation_policies import IMMEDIATE_MESSAGE
from .errors import RoutiluxError, SerializationError, StateNotSerializableError
from .job import JobContext
from .state import WorkerState

#: The immediate policy's message, pickled once (what a fused target gets as ``policy_message``).
_IMMEDIATE_BLOB = encode(IMMEDIATE_MESSAGE)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    """This process's resident memory in bytes (from /proc, cheaply)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


class _ActivationContext:
    """What ``emit``, ``get_current_job`` and ``job_of`` see while an activation runs."""

    __slots__ = ("earlier", "emits", "item_jobs", "items", "job", "jobs", "routine", "routine_id", "thread")

    def __init__(self, routine: Any, routine_id: str, job: JobContext, jobs: list[JobContext] | None = None,
                 item_jobs: dict | None = None) -> None:
        self.routine = routine
        self.routine_id = routine_id
        #: The current job (``get_current_job()``), and every job of the activation (a batch has several).
        self.job = job
        self.jobs = jobs if jobs is not None else [job]
        #: Per slot, per item, the indices in ``jobs`` of the item's jobs (``None`` for one job); and
        #: ``slot_data`` once logic has it (``job_of`` finds an item there by identity).
        self.item_jobs = item_jobs
        self.items: dict[str, list] | None = None
        self.emits: list[tuple[str, bytes, tuple[int, ...] | None]] = []
        #: Set by ``_context.set_current``: the activation's thread, and the threads alive before it.
        self.thread: Any = None
        self.earlier: frozenset = frozenset()

    def jobs_of(self, item: Any) -> list[JobContext]:
        """The jobs an item of this activation's ``slot_data`` belongs to (found by identity)."""
        for name, items in (self.items or {}).items():
            for position, candidate in enumerate(items):
                if candidate is item:
                    if self.item_jobs is None:
                        return list(self.jobs)
                    indices = self.item_jobs.get(name, [])
                    chosen = indices[position] if position < len(indices) else None
                    return list(self.jobs) if chosen is None else [self.jobs[i] for i in chosen]
        raise RoutiluxError(
            f"job_of(): {_short(item)} is not an item of the running activation of {self.routine_id!r}: pass "
            "the item object from slot_data itself (a copy of it, or a value taken from it, has no job)"
        )

    def _indices(self, event: str, job: Any) -> tuple[int, ...]:
        """The indices of the job(s) ``emit(event, job=...)`` names; refused when one is not of this activation."""
        named = [job] if isinstance(job, JobContext) else list(job)
        indices = []
        for each in named:
            for i, mine in enumerate(self.jobs):
                if each is mine or (isinstance(each, JobContext) and each.job_id == mine.job_id):
                    indices.append(i)
                    break
            else:
                mine_ids = ", ".join(repr(j.job_id) for j in self.jobs)
                raise RoutiluxError(
                    f"emit({event!r}, job=...) named {getattr(each, 'job_id', each)!r}, which is not a job of "
                    f"this activation of {self.routine_id!r} (its jobs: {mine_ids}); name a job that "
                    "job_of(item) gave for one of its items"
                )
        return tuple(sorted(set(indices)))

    def emit(self, routine: Any, event: str, data: dict, job: Any = None) -> None:
        """Record an emit of the running routine (pickled now, so later changes to ``data`` do not count)."""
        if routine is not self.routine:
            raise RoutiluxError(
                f"emit({event!r}) was called on another routine ({type(routine).__name__}) while "
                f"{self.routine_id!r} is running; a routine can only emit its own events"
            )
        indices = None if job is None else self._indices(event, job)
        try:
            blob = encode(data)
        except Exception as exc:
            raise SerializationError(
                f"emit({event!r}) from routine {self.routine_id!r}: the data cannot be pickled "
                f"({type(exc).__name__}: {exc}); emit only picklable values"
            ) from exc
        if not is_plain(data):
            # An object that pickles but does not unpickle (an exception whose __init__
            # wants other arguments) would fail wherever it lands: fail this emit instead.
            try:
                loads(blob)
            except Exception as exc:
                raise SerializationError(
                    f"emit({event!r}) from routine {self.routine_id!r}: the data cannot be unpickled "
                    f"({type(exc).__name__}: {exc}); emit plain values (e.g. an exception's type and "
                    "message as strings)"
                ) from exc
        self.emits.append((event, blob, indices))


def _short(value: Any) -> str:
    """A short repr of a user value for a message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ActivationRunner:
    """Runs the activations of one worker lane; it has no transport of its own.

    Its owner (a process's command loop, or the in-thread stub backend) hands
    it each message with :meth:`step` and a ``reply`` function that sends the
    result back.
    """

    def __init__(self, client: StoreClient, *, max_rss: int | None, max_activations: int | None) -> None:
        #: This process's link to the state server (every WorkerState here uses it).
        self.client = client
        #: Recycle past this RSS (bytes), or after this many activations.
        self.max_rss = max_rss
        self.max_activations = max_activations
        #: flow key -> the flow (loaded once), or the error data of a flow that failed to load.
        self.flows: dict[int, Any] = {}
        #: worker_id -> its WorkerState handle.
        self.states: dict[str, WorkerState] = {}
        self.activations = 0
        self.pid = os.getpid()
        #: What fds 0-2 were at start: logic that closes or replaces them gets the process recycled.
        self.std_fds = _std_fds()

    def step(self, message: Any, reply: Callable[[Any], None]) -> str | None:
        """Handle one message (``reply`` sends a result back); return a reason to exit, or ``None`` to go on.

        An activation may send several results: its own, then one per fused
        stage it led to (see :meth:`run_fused`). ``reply`` must have handed
        each to the supervisor's side before it returns.
        """
        if isinstance(message, _Activation):
            self.run_fused(message, reply)
            return self.recycle_reason()
        if isinstance(message, _LoadFlow):
            try:
                self.flows[message.flow_key] = cloudpickle.loads(message.blob)
            except BaseException as exc:  # noqa: BLE001 - unpickling runs user code; report it
                error = describe_exception(exc, None)
                error["message"] = (
                    f"the flow could not be loaded in worker process {os.getpid()}: {error['type']}: "
                    f"{error['message']}. Modules the flow refers to by name must be importable there "
                    "(same sys.path as yours)"
                )
                self.flows[message.flow_key] = error
            return None
        if isinstance(message, _Stop):
            return "stop"
        raise RoutiluxError(f"unexpected message {message!r}")

    def recycle_reason(self) -> str | None:
        """Why this process should be replaced now (between activations), or ``None``."""
        fds = _std_fds()
        if fds != self.std_fds:
            changed = [name for name, a, b in zip(("stdin", "stdout", "stderr"), self.std_fds, fds, strict=True)
                       if a != b]
            return f"recycled: logic closed or replaced its {' and '.join(changed)}"
        if self.max_activations is not None and self.activations >= self.max_activations:
            return f"recycled after {self.activations} activations (max_activations_per_process)"
        if self.max_rss is not None:
            rss = _rss()
            if rss > self.max_rss:
                gc.collect()
                rss = _rss()
                if rss > self.max_rss:
                    return f"recycled: RSS {rss // 2**20} MiB over max_worker_rss {self.max_rss // 2**20} MiB"
        return None

    def run_fused(self, act: _Activation, reply: Callable[[Any], None]) -> None:
        """Run ``act``, then the fused stage each result leads to; ``reply`` once per activation run.

        A result that leads to a fused run is sent *before* that run starts:
        if the process dies in it, the supervisor already holds the earlier
        stage's outcome and fails the fused stage's activation, as it would
        have unfused. Nothing is fused once this process is due to be
        recycled: unfused, the next stage would run in its replacement.
        """
        chain = 0
        while True:
            # Metadata does not travel back: a fused stage must see it as posted, whatever logic did to it.
            metadata = pickle.loads(pickle.dumps(act.job_metadata)) if act.fuse and act.job_metadata else None
            result, before = self._execute(act)
            self.activations += 1
            follow = _follow_up(act, result, before, metadata) if act.fuse else None
            if follow is None or self.recycle_reason() is not None:
                reply(result._replace(chain=chain) if chain else result)
                return
            index, act = follow
            reply(result._replace(fused=index, chain=chain))
            chain += 1

    def run(self, act: _Activation) -> _Result:
        """Run one activation's logic; its outcome (emits, job changes, or the error as data)."""
        return self._execute(act)[0]

    def _execute(self, act: _Activation) -> tuple[_Result, dict]:
        """:meth:`run`, and what the current job's data was before logic ran (a deep copy)."""
        flow = self.flows.get(act.flow_key)
        if isinstance(flow, dict) or flow is None:
            error = flow or {"type": "routilux_mp.errors.RoutiluxError", "mro": [], "traceback": "",
                             "message": f"flow #{act.flow_key} was never sent to this process"}
            return _Result(act.act_id, dict(error, routine=act.routine_id), [], None, None, None, 0.0), {}
        routine = flow.routines[act.routine_id]
        ws = self.states.get(act.worker_id)
        if ws is None:
            ws = self.states[act.worker_id] = WorkerState(act.worker_id, act.flow_id, self.client)
        jobs = None
        if act.jobs is None:
            job = JobContext(act.job_id or "", act.worker_id, act.flow_id, act.job_metadata, act.job_data,
                             _in_worker=True)
        else:
            jobs = [JobContext(jid, act.worker_id, act.flow_id, md, data, _in_worker=True) for jid, md, data in act.jobs]
            job = jobs[act.lead]
        for each in jobs or (job,):
            each.attempts = act.attempt
        # Deep copies: logic may change nested values of job.data in place.
        before = [pickle.loads(pickle.dumps(each.data)) if each.data else {} for each in jobs or (job,)]
        ctx = _ActivationContext(routine, act.routine_id, job, jobs, act.item_jobs)
        # Names this activation's state writes: an exactly-once run replays them if it runs again.
        self.client.begin_activation(act.job_id, act.routine_id, act.slots, act.message)
        error = None
        started = time.perf_counter()
        _context.set_current(ctx)
        try:
            slot_data = ctx.items = {name: [loads(blob) for blob in act.slots.get(name, ())] for name in routine._slots}
            routine._logic(slot_data, loads(act.message), ws)
        except BaseException as exc:  # noqa: BLE001 - logic may raise anything; the process keeps serving
            error = describe_exception(exc, act.routine_id)
        finally:
            _context.set_current(None)
            ctx.items = None
        if os.getpid() != self.pid:  # a child that logic forked came back here: it must not go on
            forked_child_exit(0 if error is None else 1)
        seconds = time.perf_counter() - started
        changes = []
        for index, (each, old) in enumerate(zip(jobs or (job,), before, strict=True)):
            try:
                data_set, data_deleted = _data_changes(each, old)
            except Exception as exc:  # noqa: BLE001 - job.data is user data; report it
                if error is None:
                    error = describe_exception(exc, act.routine_id)
                data_set, data_deleted = None, None
            changes.append((index, data_set, data_deleted, _traces(each)))
        _, data_set, data_deleted, traces = changes[act.lead]
        others = [change for change in changes if change[0] != act.lead and any(change[1:])] or None
        return _Result(act.act_id, error, ctx.emits, data_set, data_deleted, traces, seconds, others), before[act.lead]


def _follow_up(act: _Activation, result: _Result, before: dict, metadata: dict | None) -> tuple[int, _Activation] | None:
    """The fused run ``result`` leads to: (index of its emit, the target's activation), or ``None``.

    Only the first emit on a fused connection of a successful activation of
    one job: others (and a failed activation's emits, which its error
    strategy decides on) go through the supervisor, so other processes share
    them. The target's job data is what the supervisor will hold once it
    applied ``result``: ``before`` with the keys logic set and deleted; its
    metadata, ``metadata`` (a copy of the job's, taken before logic ran).
    """
    fuse = act.fuse
    if fuse is None or result.error is not None or act.jobs is not None:
        return None
    targets = fuse.get(act.routine_id)
    if not targets:
        return None
    for index, (event, blob, _named) in enumerate(result.emits):
        found = targets.get(event)
        if found is None:
            continue
        target, slot = found
        data = before
        if result.data_set or result.data_deleted:
            data = dict(before)
            data.update(result.data_set or {})
            for key in result.data_deleted or ():
                data.pop(key, None)
        return index, _Activation(act.act_id, act.flow_key, act.worker_id, act.flow_id, target, {slot: [blob]},
                                  _IMMEDIATE_BLOB, act.job_id, metadata, data or None, 1, fuse=fuse)
    return None


def _data_changes(job: JobContext, before: dict) -> tuple[dict | None, list | None]:
    """What logic changed in ``job.data`` since ``before``: keys set and keys deleted (``None``, ``None``: nothing)."""
    if job.data == before:
        return None, None
    if not isinstance(job.data, dict):
        raise StateNotSerializableError(f"job.data must stay a dict, got {type(job.data).__name__}")
    new, _ = _jsonvalue.normalize(job.data, root="job.data")
    return ({k: v for k, v in new.items() if k not in before or before[k] != v},
            [k for k in before if k not in new])


def _traces(job: JobContext) -> list | None:
    """The trace entries logic added to ``job``, made picklable (user details may not pickle)."""
    traces = job.traces or None
    if traces:
        try:
            pickle.dumps(traces)
        except Exception:  # noqa: BLE001 - user details may fail to pickle in any way
            traces = [dict(t, details=repr(t.get("details"))) for t in traces]
    return traces


def _std_fds() -> tuple:
    """What fds 0, 1 and 2 are now (device and inode, or None when closed)."""
    found = []
    for fd in (0, 1, 2):
        try:
            st = os.fstat(fd)
            found.append((st.st_dev, st.st_ino))
        except OSError:
            found.append(None)
    return tuple(found)


def forked_child_exit(code: int) -> None:
    """End a child that logic forked and that came back into the worker loop."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"routilux-mp: process {os.getpid()}, forked by logic, returned into the worker loop; "
                         "it exits (a forked child must end with os._exit())\n")
        sys.stderr.flush()
    os._exit(code)


__all__ = ["ActivationRunner", "forked_child_exit"]
