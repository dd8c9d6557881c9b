"""Jobs: one posted item and everything it causes downstream."""

from __future__ import annotations

import enum
import functools
import logging
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _context
from .errors import RoutiluxError

__all__ = ["ExecutionStatus", "JobContext", "JobStatus", "get_current_job", "get_current_job_id", "job_of", "jobs_of"]

logger = logging.getLogger("routilux_mp.job")



class PlainStrEnum(str, enum.Enum):
    """A ``str`` enum whose members print as their values (base of the status enums)."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        # Printed in lists and dicts it reads as the string it equals.
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class JobStatus(PlainStrEnum):
    """A job's status. Each member equals its plain string: ``JobStatus.COMPLETED == "completed"``.

    routilux 1.1.0 code compares with the enum and reads ``.value``; code written
    for routilux-mp compares with strings. Both work, and ``str()``, f-strings
    and ``repr()`` give the plain value.
    """

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ExecutionStatus(PlainStrEnum):
    """A worker's status: ``worker_state.status == ExecutionStatus.RUNNING`` works.

    routilux-mp's ``WorkerState.status`` is one of ``STARTING``, ``RUNNING``,
    ``STOPPED`` (its runtime shut down) and ``FAILED`` (the runtime broke).
    ``PENDING``, ``IDLE``, ``PAUSED``, ``COMPLETED`` and ``CANCELLED`` are
    routilux 1.1.0's and never occur here: a routilux-mp worker serves jobs
    until its runtime stops; "all my jobs are done" is
    ``runtime.wait_until_all_jobs_finished(worker_id=...)``.
    """

    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"
    PENDING = "pending"
    IDLE = "idle"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


#: Each status by its value (members hash and compare as their strings: either finds it).
_STATUSES = {status.value: status for status in JobStatus}

#: Job statuses that never change again.
TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

#: Trace entries kept per job (oldest dropped beyond).
MAX_TRACES = 1000

# Guards the moment a job finishes against waiters arriving: a job's latch is
# made only when somebody waits (most jobs are never waited on one by one).
_finish_lock = threading.Lock()


class _MadeOnUse:
    """A job attribute kept as ``None`` until first read (then ``factory()``), in ``_<name>``."""

    def __init__(self, factory: Callable[[], Any], doc: str) -> None:
        self.factory = factory
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, job: Any, owner: type | None = None) -> Any:
        if job is None:
            return self
        value = getattr(job, self.slot)
        if value is None:
            value = self.factory()
            setattr(job, self.slot, value)
        return value

    def __set__(self, job: Any, value: Any) -> None:
        setattr(job, self.slot, value)


class JobContext:
    """The life of one posted item, as the supervisor sees it.

    A job is finished when nothing it caused (downstream emits included) is
    queued, running or being retried; it then ends in exactly one terminal
    status: ``completed``, ``failed`` or ``cancelled``.

    Attributes:
        job_id, worker_id, flow_id: identifiers.
        metadata: the dict given to ``post(metadata=...)``.
        data: a JSON dict shared by the job's activations; changes made in
            logic (through ``get_current_job().data``) travel back.
        status: a :class:`JobStatus` (equal to its string): ``pending`` |
            ``running`` | ``completed`` | ``failed`` | ``cancelled``.
        error: ``None`` or a dict with ``type``, ``message``, ``traceback``,
            ``routine``, and for crashes ``exitcode``/``signal``.
        outputs: emits on unconnected events, as ``{"routine", "event", "data"}``
            dicts, oldest dropped past the runtime's ``max_outputs_per_job``
            (``outputs_dropped`` counts them).
        attempts: the highest attempt number any of its activations reached.
        input: a copy of the data given to ``post()`` (re-post a failed job with it).
        created_at, completed_at: ``time.time()`` stamps.
    """

    def __init__(self, job_id: str, worker_id: str, flow_id: str, metadata: dict | None = None,
                 data: dict | None = None, *, _in_worker: bool = False, _input: bytes | None = None) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.flow_id = flow_id
        # metadata, data, outputs and traces are made on first use: most jobs never need them, and
        # thousands of kept jobs with four empty containers each are work for the garbage collector.
        self._metadata = metadata
        self._data = data
        self._status = JobStatus.RUNNING if _in_worker else JobStatus.PENDING
        self.error: dict | None = None
        self._outputs: list[dict] | None = None
        self.outputs_dropped = 0
        self.attempts = 0
        self.created_at = time.time()
        self.completed_at: float | None = None
        self._traces: list[dict] | None = None
        self._in_worker = _in_worker
        #: The posted data, pickled (``input`` decodes a copy): kept so a failed job can be posted again.
        self._input = _input
        #: Held while somebody waits for the job to finish (``wait``): released when it does.
        self._done: threading.Lock | None = None
        self._callbacks: list[Callable[[JobContext], Any]] | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_done", None)
        state.pop("_callbacks", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._done = None
        self._callbacks = None

    #: Made on first use (see ``__init__``); assigning works as for a plain attribute.
    metadata = _MadeOnUse(dict, "The dict given to ``post(metadata=...)`` (``{}`` if none).")
    data = _MadeOnUse(dict, "A JSON dict shared by the job's activations (see the class docstring).")
    outputs = _MadeOnUse(list, "Emits on unconnected events, oldest first (see the class docstring).")
    traces = _MadeOnUse(list, "Trace entries, oldest first (``trace()``; at most ``MAX_TRACES``).")

    @property
    def status(self) -> JobStatus:
        """The job's :class:`JobStatus` (equal to its plain string)."""
        return self._status

    @status.setter
    def status(self, value: str) -> None:
        # The runtime sets plain strings; reading back always gives the enum. (A dict lookup: an enum
        # call costs microseconds, and the supervisor sets a status several times per job.)
        status = _STATUSES.get(value)
        self._status = JobStatus(value) if status is None else status

    @property
    def input(self) -> dict | None:
        """A copy of the data given to ``post()`` for this job (``None`` inside logic).

        To run a failed job again: ``runtime.post(flow, routine_id, slot, job.input)``.
        """
        return None if self._input is None else pickle.loads(self._input)

    def set_data(self, key: str, value: Any) -> None:
        """``job.data[key] = value`` (routilux 1.1.0's spelling); in logic the change travels back."""
        self.data[key] = value

    def get_data(self, key: str, default: Any = None) -> Any:
        """``job.data.get(key, default)`` (routilux 1.1.0's spelling)."""
        return self.data.get(key, default)

    def trace(self, routine_id: str, action: str, details: Any = None) -> None:
        """Record a trace entry (in logic too: entries travel back with the activation's result)."""
        entry = {"time": time.time(), "routine": routine_id, "action": action, "details": details}
        self.traces.append(entry)
        if len(self.traces) > MAX_TRACES:
            del self.traces[0]

    @property
    def done(self) -> bool:
        """Whether the job reached a terminal status."""
        return self._status in TERMINAL  # (not through ``status``: the supervisor asks this per activation)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the job is finished; return False if ``timeout`` passed first."""
        if self._in_worker:
            raise RoutiluxError(
                "job.wait() cannot be called inside logic: the job includes the running activation"
            )
        if _context.on_dispatcher():
            raise RoutiluxError(
                f"job.wait() on job {self.job_id!r} was called from a job done-callback: callbacks run in the "
                "runtime's dispatcher thread, the thread that finishes jobs, so it would wait forever. "
                "Use add_done_callback() on that job, or wait from another thread"
            )
        with _finish_lock:
            if self._status in TERMINAL:
                return True
            latch = self._done
            if latch is None:  # held until the job finishes (cheaper to wake than an Event: one lock)
                latch = self._done = threading.Lock()
                latch.acquire()
        if timeout is None:
            woken = latch.acquire()
        else:
            woken = latch.acquire(True, timeout) if timeout > 0 else latch.acquire(False)
        if woken:
            _release(latch)  # the next waiter's turn
            return True
        return self._status in TERMINAL

    def add_done_callback(self, fn: Callable[[JobContext], Any]) -> None:
        """Call ``fn(job)`` once the job is finished (at once if it already is).

        Callbacks run in the runtime's dispatcher thread: keep them quick.
        """
        with _finish_lock:
            if self.status not in TERMINAL:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(self, status: str, error: dict | None = None) -> list[Callable[[], Any]]:
        """Enter a terminal status (supervisor side); return what to run once the supervisor's lock is
        released: first the wake-up of ``wait()`` callers (see :func:`is_wake_up`), then the callbacks.

        Woken while the finishing thread still holds that lock, a waiter that posts its next job at
        once would block on it: one more thread switch per job posted and waited for one at a time.
        """
        with _finish_lock:
            if error is not None:
                self.error = error
            self.completed_at = time.time()
            self.status = status
            callbacks, self._callbacks = self._callbacks, None
            latch = self._done
        out: list[Callable[[], Any]] = [] if latch is None else [functools.partial(_release, latch)]
        if callbacks:
            out.extend(lambda fn=fn: fn(self) for fn in callbacks)
        return out

    def to_dict(self) -> dict:
        """A JSON-able summary."""
        return {
            "job_id": self.job_id,
            "worker_id": self.worker_id,
            "flow_id": self.flow_id,
            "status": self.status.value,
            "metadata": self.metadata,
            "data": self.data,
            "error": self.error,
            "outputs": self.outputs,
            "outputs_dropped": self.outputs_dropped,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
        }

    def __repr__(self) -> str:
        return f"<JobContext {self.job_id!r} {self.status} worker={self.worker_id!r} outputs={len(self.outputs)}>"


def _release(latch: Any) -> None:
    """Release a job's ``wait()`` latch (already released: by a wake-up run twice, nothing to do)."""
    try:
        latch.release()
    except RuntimeError:
        pass


def is_wake_up(callback: Callable[[], Any]) -> bool:
    """Whether ``callback`` (one that ``JobContext._finish`` returned) wakes ``wait()`` callers: the
    supervisor runs these even when a done-callback keeps it from running the others."""
    return type(callback) is functools.partial and callback.func is _release


def get_current_job() -> JobContext | None:
    """The job of the activation running now (inside logic); ``None`` elsewhere."""
    ctx = _context.current()
    return None if ctx is None else ctx.job


def get_current_job_id() -> str | None:
    """The id of :func:`get_current_job`'s job (inside logic); ``None`` elsewhere."""
    job = get_current_job()
    return None if job is None else job.job_id


def jobs_of(item: Any) -> list[JobContext]:
    """The jobs an item of the running activation belongs to (inside logic), oldest first.

    ``item`` is one of the objects in the logic's ``slot_data`` lists (found
    by identity, so pass the item itself, not a copy). An item posted as a job
    belongs to that job; an item emitted upstream by an activation of several
    jobs without naming one belongs to all of them.
    """
    ctx = _context.current()
    if ctx is None:
        raise RoutiluxError("job_of()/jobs_of() was called outside logic: items have jobs only while the "
                            "activation that received them runs")
    return ctx.jobs_of(item)


def job_of(item: Any) -> JobContext:
    """The job an item of the running activation belongs to (inside logic).

    Use it to attribute what logic emits per item in a batch:
    ``self.emit("out", job=job_of(item), **result)``. An item of several jobs
    (see :func:`jobs_of`) raises ``RoutiluxError``: use :func:`jobs_of` there.
    """
    jobs = jobs_of(item)
    if len(jobs) != 1:
        ids = ", ".join(repr(job.job_id) for job in jobs)
        raise RoutiluxError(f"job_of(): this item belongs to {len(jobs)} jobs ({ids}), not one; use jobs_of(item) "
                            "and emit(..., job=jobs_of(item)) to give an emit to all of them")
    return jobs[0]
