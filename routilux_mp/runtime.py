"""Runtime: run flows on a pool of worker processes with a shared state server.

::

    Runtime(processes=N)
      ├── supervisor (this process): slot queues, policies, job ledger,
      │   one dispatcher thread (see routilux_mp._supervisor)
      ├── N worker processes: run routine logic, one activation at a time
      └── 1 state-server process: every WorkerState, behind a private socket

Worker processes are fresh interpreters: they never re-run your ``__main__``
(scripts without a main guard are fine). Flows reach them by value with
cloudpickle.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _jsonvalue
from ._exec.inprocess import InProcessBackend
from ._messages import encode
from ._state.protocol import Method
from ._state.service import StateService
from ._supervisor import Settings, Supervisor, TestHooks
from .errors import SerializationError
from .job import JobContext
from .monitoring.flow_registry import FlowRegistry
from .state import WorkerState

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Runtime"]

logger = logging.getLogger("routilux_mp.runtime")

#: Most worker processes per CPU this process may use. Each worker is a Python interpreter (about
#: 17 MB) competing for those CPUs: past a few per CPU, CPU-bound work only gets slower, and
#: thousands of processes exhaust memory and the process table. I/O-bound logic that needs more
#: concurrency than this should use threads or asyncio inside its logic.
MAX_PROCESSES_PER_CPU = 32

_live: set[Runtime] = set()
_live_lock = threading.Lock()


def _cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


#: Seconds running activations get to finish after a Ctrl-C (leaving a ``with`` block by it, or a script
#: dying of it) before their processes are stopped; queued and downstream work is cancelled at once.
INTERRUPT_GRACE = 2.0


class Runtime:
    """The supervisor of a pool of worker processes running flows.

    Args:
        thread_pool_size: alias of ``processes`` (so code written for routilux runs unchanged).
        processes: number of worker processes (default: the CPUs this process may use).
            ``0`` is the debug mode: logic runs in this process (on the
            runtime's dispatcher thread), one activation at a time, with the
            same state API, so ``breakpoint()`` and debuggers work; routine
            timeouts are not enforced there (nothing can be killed).
        strict_state: raise :class:`~routilux_mp.errors.StaleStateError` on a lost
            update instead of warning and counting it.
        max_state_bytes: largest routine state, as compact JSON bytes (default 16 MiB).
        state_timeout: seconds of silence from the state server after which a
            call declares it lost (hung or dead); also the default time budget
            of a ``modify_routine_state`` function.
        lock_timeout: default seconds to wait for a routine state locked by
            someone else (``worker_state.lock()`` and writers), on top of
            ``state_timeout``; the server tells waiters it is alive meanwhile.
        prefetch: activations sent ahead to a busy process (0 or more), so
            it never waits for the supervisor between short activations. One
            sent ahead waits behind the one running there, even if another
            process goes idle meanwhile; none is sent behind an activation
            that has already run 50 ms. A routine that runs one at a time
            (``max_concurrency=1``, the default) also gets its short
            activations queued further ahead on its one process (about 2 ms of
            them, at most 8), where they run one after another. Other routines
            get their short activations batched: when several are ready, a
            process with nothing to do gets several in one message (about 2 ms
            of them by their measured length, at most its share of those
            ready), and runs them one after another (a crash fails only the one
            it was running; the rest run elsewhere). ``prefetch=0`` turns all
            of this off (with activations of very uneven length, it keeps every
            short one off a long one's process; so does an activation that
            waits for another of its own routine).
        max_crash_retries: a crashing activation is retried (with the ``retry``
            strategy) at most this many times.
        max_worker_rss: recycle a worker between activations when its RSS
            exceeds this many bytes after a garbage collection.
        kill_worker_rss: kill a worker mid-activation past this many bytes
            (``WorkerMemoryError``); default 1.5 x ``max_worker_rss``.
        max_activations_per_process: recycle a worker after this many activations.
        max_outputs_per_job: outputs kept per job (oldest dropped beyond).
        max_finished_jobs: finished jobs kept for ``get_job``/``list_jobs``.
        worker_output: ``fn(stream, text)`` receiving complete lines workers
            print (``stream`` is ``"stdout"`` or ``"stderr"``); default: this
            process's ``sys.stdout``/``sys.stderr``.
        backend: ``"local"`` (worker processes on this machine) or ``"ray"``
            (worker lanes on a Ray cluster, see "Run on a cluster" in the
            README; needs ``pip install 'routilux-mp[ray]'``). Default: the
            ``ROUTILUX_MP_BACKEND`` environment variable, else ``"local"``
            (so an unchanged script runs on a cluster).
        address: with ``backend="ray"``: ``None`` (``RAY_ADDRESS``, else a
            private Ray instance on this machine), ``"auto"`` or
            ``"host:port"`` of a running cluster. ``processes`` then defaults
            to the cluster's CPUs.
        state_path: keep every WorkerState in this SQLite file (created if
            missing): a write is acknowledged once committed, so it survives
            the SIGKILL of any process, and a later runtime on the file gets a
            worker's states back with ``exec(flow, worker_id=...)``
            (``list_workers(stored=True)`` lists them). One runtime at a time:
            a file held by a live runtime is refused with
            :class:`~routilux_mp.errors.StateFileError`. A state server that
            dies is restarted from the file with everything acknowledged.
            Without it, state is kept in the state server's memory (faster;
            lost with that process: ``StateServerLostError``).
        state_sync: ``"normal"`` (default): commits survive any process
            dying, not a power cut; ``"full"``: each commit is also
            ``fsync``'d (survives a power cut; slower).
        dashboard: serve a live web page of the run (the ``[dashboard]``
            extra): ``True`` on port 8789, or a port number (0: a free one).
            Its address, with a random token, is printed on stderr as
            ``dashboard: http://127.0.0.1:PORT/?token=...`` and is
            :attr:`dashboard_url`. Read-only; it stops at ``shutdown()``
            after sending the page the run's summary. A busy port or a
            missing extra raises :class:`~routilux_mp.errors.DashboardError`
            before any process starts.
        dashboard_host: the address the dashboard listens on (default
            ``127.0.0.1``: this machine only; reach it from elsewhere with
            an SSH tunnel). Another address is warned about on stderr.

    Use it as a context manager; leaving the block calls ``shutdown()``.
    """

    def __init__(
        self,
        thread_pool_size: int | None = None,
        *,
        processes: int | None = None,
        strict_state: bool = False,
        max_state_bytes: int = 16 * 2**20,
        state_timeout: float = 10.0,
        lock_timeout: float = 30.0,
        prefetch: int = 1,
        max_crash_retries: int = 3,
        max_worker_rss: int | None = None,
        kill_worker_rss: int | None = None,
        max_activations_per_process: int | None = None,
        max_outputs_per_job: int = 10_000,
        max_finished_jobs: int = 10_000,
        worker_output: Callable[[str, str], None] | None = None,
        backend: str | None = None,
        address: str | None = None,
        state_path: str | os.PathLike | None = None,
        state_sync: str = "normal",
        dashboard: bool | int | None = None,
        dashboard_host: str = "127.0.0.1",
    ) -> None:
        if thread_pool_size is not None and processes is not None and thread_pool_size != processes:
            raise ValueError(f"thread_pool_size={thread_pool_size} and processes={processes} disagree; give one")
        count = processes if processes is not None else thread_pool_size
        backend = _choose_backend(backend, address, count)
        port = _dashboard_port(dashboard)
        make_backend = None
        if backend == "ray":
            count, make_backend = _ray_backend(address, count)
        if count is None:
            count = _cpu_count()
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"processes must be a positive int (or 0: run logic in this process, to debug it), "
                             f"got {count!r}")
        if backend == "local":
            _check_local_count(count)
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if max_worker_rss is not None and kill_worker_rss is None:
            kill_worker_rss = int(max_worker_rss * 1.5)
        self._registry = FlowRegistry.get_instance()
        self._processes = count
        in_process = count == 0
        if in_process and (max_worker_rss is not None or max_activations_per_process is not None):
            raise ValueError("processes=0 runs logic in this process, which cannot be recycled: drop max_worker_rss "
                             "and max_activations_per_process, or use processes >= 1")
        if in_process:
            parts: dict[str, Any] = {"backend": InProcessBackend}
        elif make_backend is not None:  # workers on other machines reach the state server at this machine's address
            parts = {"backend": make_backend,
                     "state": functools.partial(StateService, host=make_backend.keywords["session"].node_ip())}
        else:
            parts = {}
        self._dashboard: Any = None
        try:
            if port is not None:  # bound before any process starts: a busy port fails with nothing to clean up
                from .dashboard import bind
                self._dashboard = bind(dashboard_host, port)
            self._start(Settings(
                processes=max(count, 1), prefetch=0 if in_process else prefetch, strict_state=strict_state,
                max_state_bytes=max_state_bytes, state_timeout=state_timeout, lock_timeout=lock_timeout,
                max_crash_retries=max_crash_retries, max_worker_rss=max_worker_rss, kill_worker_rss=kill_worker_rss,
                max_activations_per_process=max_activations_per_process, max_outputs_per_job=max_outputs_per_job,
                max_finished_jobs=max_finished_jobs, worker_output=worker_output,
                state_path=None if state_path is None else os.fspath(state_path), state_sync=state_sync,
            ), parts)
        except BaseException:
            if self._dashboard is not None:
                self._dashboard.stop()
            if make_backend is not None:
                make_backend.keywords["session"].close()
            raise
        #: Hooks for this package's tests (see :class:`~routilux_mp._supervisor.TestHooks`).
        self._testing: TestHooks = self._sup.testing()
        with _live_lock:
            _live.add(self)

    def _start(self, settings: Settings, parts: dict[str, Any]) -> None:
        """Start the supervisor (state server, workers, dispatcher) built with ``parts``, then the dashboard."""
        self._sup = Supervisor(settings, **parts)
        self._sup.start()
        if self._dashboard is not None:
            try:
                self._dashboard.start(self)
            except BaseException:
                self._sup.shutdown(False, 0.0, False)
                raise

    # ------------------------------------------------------------------ basics

    @property
    def processes(self) -> int:
        """Number of worker processes."""
        return self._processes

    @property
    def closed(self) -> bool:
        """True once ``shutdown()`` started."""
        return self._sup.closed

    @property
    def dashboard_url(self) -> str | None:
        """The dashboard's address with its token (``None`` without ``dashboard=``)."""
        return None if self._dashboard is None else self._dashboard.url

    def _dashboard_expect(self, total: int | None, describe_job: Callable[[JobContext], dict] | None) -> None:
        """Tell the dashboard how many jobs to expect and what to show with a failed job (the CLI: its line)."""
        if self._dashboard is not None:
            self._dashboard.expect(total, describe_job)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            # Ctrl-C or SystemExit: start nothing new; what runs gets a short grace.
            self.shutdown(wait=True, timeout=INTERRUPT_GRACE, cancel_pending=True)
        else:
            self.shutdown(wait=True)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running"
        return f"<Runtime processes={self.processes} workers={len(self._sup.list_workers())} {state}>"

    # ------------------------------------------------------------------ workers

    def exec(self, flow_name: str, worker_id: str | None = None) -> WorkerState:
        """Start a worker: a live instance of flow ``flow_name`` with its own WorkerState.

        It becomes the flow's current worker (where ``post`` without
        ``worker_id`` goes). Unknown flow -> ``ValueError``. With
        ``state_path``, a ``worker_id`` the file holds resumes that worker:
        its routine states and job counters are those last acknowledged
        (a worker of another flow in the file is refused with ``FlowError``);
        ids made up for ``worker_id=None`` skip the ones the file holds.
        """
        self._sup.check_usable()
        flow = self._registry.get(flow_name)
        flow.validate()
        if worker_id is not None and (not isinstance(worker_id, str) or not worker_id):
            raise TypeError(f"worker_id must be a non-empty string, got {worker_id!r}")
        return self._sup.add_worker(flow_name, flow, worker_id)

    def get_worker_state(self, worker_id: str) -> WorkerState:
        """The WorkerState of an existing worker."""
        return self._sup.worker_state(worker_id)

    def list_workers(self, stored: bool = False) -> list[str]:
        """Ids of the workers started with ``exec`` (or on demand by ``post``).

        With ``stored=True``: every worker the ``state_path`` file holds, those
        of earlier runtimes first (resume one with ``exec(flow, worker_id=...)``),
        then the ones started here.
        """
        return self._sup.list_workers(stored)

    def _state_call(self, method: Method, *args: Any) -> Any:
        """Call the state server directly (the CLI journals a resumable run in the state file this way)."""
        return self._sup.state_call(method, *args)

    # ------------------------------------------------------------------ posting

    def post(
        self,
        flow_name: str,
        routine_id: str | None = None,
        slot_name: str | None = None,
        data: dict | None = None,
        worker_id: str | None = None,
        job_id: str | None = None,
        metadata: dict | None = None,
        *,
        routine_name: str | None = None,
        block: bool = True,
        timeout: float | None = None,
    ) -> tuple[WorkerState, JobContext]:
        """Post ``data`` to ``routine_id.slot_name``: a new job.

        Names are validated before anything is created (unknown ->
        ``ValueError`` listing what exists). Without ``worker_id`` the job goes
        to the flow's current worker (started on demand). Returns at once
        unless the slot queue is full: then it waits for room (back-pressure),
        or raises :class:`~routilux_mp.errors.SlotQueueFullError` with
        ``block=False``, after ``timeout`` seconds, or when nothing is left
        running that could make room. ``routine_name=`` is routilux 1.1.0's
        keyword for ``routine_id``.

        Returns:
            ``(worker_state, job)``.
        """
        if routine_name is not None:
            if routine_id is not None and routine_id != routine_name:
                raise TypeError(f"post() got routine_id={routine_id!r} and routine_name={routine_name!r}; give one")
            routine_id = routine_name
        for arg, value in (("routine_id", routine_id), ("slot_name", slot_name), ("data", data)):
            if value is None:
                raise TypeError(f"post() missing required argument {arg!r}")
        sup = self._sup
        sup.check_usable()
        flow = self._registry.get(flow_name)
        flow.check_slot(routine_id, slot_name)
        if not isinstance(data, dict):
            raise SerializationError(f"post() data must be a dict, got {type(data).__name__}")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise SerializationError(f"post() metadata must be a dict, got {type(metadata).__name__}")
            metadata = _jsonvalue.normalize(metadata, root="metadata")[0]
        if job_id is not None and (not isinstance(job_id, str) or not job_id):
            raise TypeError(f"job_id must be a non-empty string, got {job_id!r}")
        try:  # before anything is created (a worker on demand)
            blob = encode(data)
        except Exception as exc:
            raise SerializationError(f"post() data cannot be pickled: {type(exc).__name__}: {exc}") from exc
        if worker_id is None and not sup.has_current(flow_name):
            self.exec(flow_name)
        return sup.post(flow_name, flow, routine_id, slot_name, blob, worker_id=worker_id, job_id=job_id,
                        metadata=metadata, block=block, timeout=timeout)

    # ------------------------------------------------------------------ waiting

    def wait_until_all_jobs_finished(self, timeout: float | None = None, *, worker_id: str | None = None) -> bool:
        """Wait until every posted item has been processed; False if ``timeout`` passed first.

        Runnable work goes first; when nothing runs any more, what policies
        hold back (partial batches, pending intervals) is flushed and waited
        for too. Items a join (``all_slots_ready``, custom) still waits on keep
        their jobs open: then this returns False at the timeout, and
        ``stats()["waiting"]`` shows what waits where. With ``worker_id``, only
        that worker's jobs are waited for (and only its policies flushed).
        """
        return self._sup.wait_idle(timeout, worker_id)

    def flush(self, flow_name: str | None = None) -> None:
        """Deliver now what batch and interval policies hold back (of one flow, or all)."""
        self._sup.check_usable()
        if flow_name is not None:
            self._registry.get(flow_name)
        self._sup.flush(flow_name)

    # ------------------------------------------------------------------ jobs and stats

    def get_job(self, job_id: str) -> JobContext | None:
        """The job with this id, or ``None`` (finished jobs are kept up to ``max_finished_jobs``)."""
        return self._sup.get_job(job_id)

    def list_jobs(self, worker_id: str | None = None) -> list[JobContext]:
        """Jobs in the ledger, oldest first (of one worker, or all)."""
        return self._sup.list_jobs(worker_id)

    def wait_until_all_workers_idle(self, timeout: float | None = None, check_interval: float = 0.1) -> bool:
        """routilux 1.1.0's name for :meth:`wait_until_all_jobs_finished`.

        As there, ``timeout=None`` means 300 seconds. ``check_interval`` is
        accepted and unused: this waits on a condition, it does not poll.
        """
        return self.wait_until_all_jobs_finished(300.0 if timeout is None else timeout)

    def complete_job(self, job_id: str, status: str = "completed", error: str | None = None) -> bool:
        """End a job now with ``status`` (``completed``, ``failed`` or ``cancelled``), as routilux 1.1.0 let you.

        routilux-mp jobs finish by themselves; use this to abandon one early.
        Its items still queued are dropped; activations of it already running
        finish, but their emits and outputs are dropped. ``error`` becomes
        ``job.error["message"]``. Returns False when there is no such job or
        it already finished.
        """
        if status not in ("completed", "failed", "cancelled"):
            raise ValueError(f"complete_job() status must be 'completed', 'failed' or 'cancelled', got {status!r}")
        return self._sup.complete_job(job_id, status, error)

    def stats(self) -> dict:
        """A JSON-able snapshot: per-routine counters, per-process usage, jobs by status, waiting items."""
        return self._sup.stats()

    # ------------------------------------------------------------------ shutdown

    def shutdown(self, wait: bool = True, timeout: float = 30.0, *, cancel_pending: bool = False) -> None:
        """Stop taking work, then stop every process: workers first, the state server last.

        With ``wait``, queued and running work may finish within ``timeout``
        seconds (partial batches are flushed). With ``cancel_pending`` too,
        nothing new starts (what a Ctrl-C handler wants): jobs with no
        activation running are cancelled at once, queued and downstream work of
        the others is dropped, and only activations already handed to a worker
        finish (within ``timeout``); their outputs are kept, and their jobs end
        ``completed`` if that was all they had to do, else ``cancelled``. Jobs not
        finished end ``cancelled``. Running activations then get a short grace before
        their processes are terminated (SIGTERM, then SIGKILL). No process of
        ours outlives this call. WorkerState objects stay readable afterwards
        (a snapshot taken at shutdown); writing raises ``RuntimeClosedError``.

        Calling it again while a call is waiting (say from a second Ctrl-C
        handler, in another thread) is safe: the new call skips the wait and
        stops everything now; both return once every process is gone. A
        KeyboardInterrupt during the wait stops everything at once, then
        propagates.

        It always returns, within ``timeout`` plus the time to stop processes:
        if a done-callback keeps the dispatcher thread busy, the processes are
        killed from this thread after a short grace.
        """
        sup = self._sup
        try:
            sup.shutdown(wait, timeout, cancel_pending)
        finally:
            if self._dashboard is not None:  # after the processes: the page gets the final numbers
                self._dashboard.stop()
            if not sup.on_dispatcher():  # (from a done-callback, the dispatcher stops once it returns)
                with _live_lock:
                    _live.discard(self)


def _choose_backend(backend: str | None, address: str | None, count: int | None) -> str:
    """The backend to run on (the argument, else ``ROUTILUX_MP_BACKEND``, else local); refuses what does not fit."""
    if backend is None:
        backend = os.environ.get(BACKEND_VARIABLE) or "local"
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r} (from the argument or "
                         f"{BACKEND_VARIABLE})")
    if address is not None and backend != "ray":
        raise ValueError(f"address={address!r} is for backend='ray'; the local backend runs on this machine")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise ValueError(f"processes must be a positive int (or 0: run logic in this process, to debug it), "
                         f"got {count!r}")
    if count == 0 and backend == "ray":
        raise ValueError("processes=0 runs logic in this process, to debug it: use the local backend for that "
                         "(drop backend='ray' or ROUTILUX_MP_BACKEND)")
    return backend


def _check_local_count(count: int) -> None:
    """Refuse more worker processes than this machine's CPUs can reasonably run."""
    cpus = _cpu_count()
    if count > MAX_PROCESSES_PER_CPU * cpus:
        raise ValueError(
            f"processes={count} is more than {MAX_PROCESSES_PER_CPU} per CPU ({MAX_PROCESSES_PER_CPU * cpus} "
            f"on the {cpus} CPUs this process may use): each worker is a Python interpreter competing for "
            "those CPUs and memory. Use fewer processes; for I/O-bound logic, use threads or asyncio inside "
            "the logic"
        )


#: The environment variable that chooses the backend of a ``Runtime`` that does not name one.
BACKEND_VARIABLE = "ROUTILUX_MP_BACKEND"


def _ray_backend(address: str | None, count: int | None) -> tuple[int, functools.partial]:
    """Connect to Ray (see ``_exec._raysession``): the number of lanes, and what builds the backend."""
    from ._exec._raysession import RaySession
    from ._exec.ray import RayBackend

    session = RaySession(address)
    session.open(count)
    global _ray_exit_hook
    if not _ray_exit_hook:  # registered after Ray's own: runs first at exit, while Ray still works
        atexit.register(_shutdown_all)
        _ray_exit_hook = True
    return (count or session.cluster_cpus()), functools.partial(RayBackend, session=session)


#: Whether ``_shutdown_all`` was registered again after Ray was imported.
_ray_exit_hook = False


def _dashboard_port(dashboard: Any) -> int | None:
    """The dashboard's port (``None``: off); checked without importing the dashboard's extra."""
    if dashboard is None or dashboard is False:
        return None
    from .dashboard import check_port
    return check_port(dashboard)


def _died_of_ctrl_c() -> bool:
    """Whether the interpreter exits because a script did not catch a KeyboardInterrupt."""
    last = getattr(sys, "last_exc", None)  # Python >= 3.12
    last_type = type(last) if last is not None else getattr(sys, "last_type", None)
    # (In an interactive session, last_type is whatever the user last saw fail.)
    return last_type is not None and issubclass(last_type, KeyboardInterrupt) and not hasattr(sys, "ps1")


def _runtime_of(worker_state: WorkerState) -> Runtime | None:
    """The live runtime of this process whose worker ``worker_state`` is (for ``WorkerState.wait_for_completion``)."""
    with _live_lock:
        runtimes = list(_live)
    for runtime in runtimes:
        if runtime._sup.owns(worker_state):
            return runtime
    return None


def _shutdown_all() -> None:
    """At interpreter exit: stop every runtime that was not shut down.

    Queued work is finished first, unless the script dies of Ctrl-C: then
    nothing new starts and running activations get :data:`INTERRUPT_GRACE`,
    as when leaving a ``with`` block by Ctrl-C.
    """
    with _live_lock:
        runtimes = list(_live)
    interrupted = _died_of_ctrl_c()
    for runtime in runtimes:
        try:
            if interrupted:
                runtime.shutdown(wait=True, timeout=INTERRUPT_GRACE, cancel_pending=True)
            else:
                runtime.shutdown(wait=True)
        except KeyboardInterrupt:  # Ctrl-C while the exit waits: the runtime stopped; stop the others now
            interrupted = True
        except BaseException:
            logger.exception("stopping a routilux-mp runtime at exit failed")


atexit.register(_shutdown_all)
