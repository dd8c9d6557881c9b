"""The supervisor: what ``Runtime`` calls, and what it composes.

::

     your process                                        state server process
    ┌──────────────────────────────────────────┐  unix   ┌──────────────────────┐
    │ Runtime ─▶ Supervisor.post()/add_worker()│ socket  │ StateStore           │
    │   Ledger: jobs, holds, retries           │◀───────▶│ (JSON, locks,        │
    │   Router: slot queues ─▶ policies ─▶ acts│ authkey │  counters)           │
    │           emits ─▶ slots / outputs       │         └──────────▲───────────┘
    │   Dispatcher: acts ─▶ worker lanes       │                    │ own connection
    │   DispatchLoop (thread): poll, timers ───┼─ WorkerBackend ─┐  │
    └──────────────────────────────────────────┘  (_exec)        │  │
    ┌──────────────────────────────────────────┐  x processes    │  │
    │ worker: ActivationRunner: one _Result    │◀────────────────┘  │
    │ per _Activation                          │────────────────────┘
    └──────────────────────────────────────────┘

* :class:`Supervisor` composes the :class:`~routilux_mp._ledger.Ledger`, a
  :class:`~routilux_mp._exec.base.WorkerBackend` (local processes, or the
  in-thread stub in unit tests), the state server's launcher and the
  :class:`~routilux_mp._loop.DispatchLoop` (the dispatcher thread, which owns
  the router, the dispatcher and the timers). ``Runtime`` calls only its
  public methods; everything they touch is guarded by ``lock``.
* ``post()`` (any thread) queues an item, runs the routine's policy and hands
  activations to workers, all under one lock: an idle worker gets a post
  without a wake-up of the dispatcher thread.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ._drain import stop_taking_work
from ._exec.base import WorkerBackend, WorkerSettings
from ._exec.local import TERM_GRACE, LocalProcessBackend
from ._ledger import Ledger, queued_items, routine_stats
from ._lifecycle import Lifecycle, run_callbacks
from ._logs import parent_levels
from ._loop import DispatchLoop
from ._messages import error_data
from ._records import SlotQueue, _Instance, _RoutineRt
from ._state.protocol import Method
from ._state.service import StateService
from .errors import FlowError, RoutiluxError, SlotQueueFullError, WorkerNotRunningError
from .job import JobContext
from .state import WorkerState

#: Seconds ``shutdown()`` gives the dispatcher to stop every process (its own escalation takes a few
#: seconds, more when the state server hangs) before it kills them all from the calling thread.
SHUTDOWN_JOIN_TIMEOUT = 30.0


class Settings:
    """The runtime's options, as ``Runtime`` checked them (see its docstring for each)."""

    __slots__ = ("kill_worker_rss", "lock_timeout", "max_activations_per_process", "max_crash_retries",
                 "max_finished_jobs", "max_outputs_per_job", "max_state_bytes", "max_worker_rss", "prefetch",
                 "processes", "state_backend", "state_path", "state_sync", "state_timeout", "strict_state",
                 "worker_output")

    def __init__(self, *, processes: int, prefetch: int = 1, strict_state: bool = False,
                 max_state_bytes: int = 16 * 2**20, state_timeout: float = 10.0, lock_timeout: float = 30.0,
                 max_crash_retries: int = 3, max_worker_rss: int | None = None, kill_worker_rss: int | None = None,
                 max_activations_per_process: int | None = None, max_outputs_per_job: int = 10_000,
                 max_finished_jobs: int = 10_000, worker_output: Callable[[str, str], None] | None = None,
                 state_path: str | None = None, state_sync: str = "normal", state_backend: str | None = None) -> None:
        self.processes = processes
        self.prefetch = prefetch
        self.strict_state = strict_state
        self.max_state_bytes = max_state_bytes
        self.state_timeout = state_timeout
        self.lock_timeout = lock_timeout
        self.max_crash_retries = max_crash_retries
        self.max_worker_rss = max_worker_rss
        self.kill_worker_rss = kill_worker_rss
        self.max_activations_per_process = max_activations_per_process
        self.max_outputs_per_job = max_outputs_per_job
        self.max_finished_jobs = max_finished_jobs
        self.worker_output = worker_output
        self.state_path = state_path
        self.state_sync = state_sync
        self.state_backend = state_backend


def _default_output(stream: str, text: str) -> None:
    """Write a worker's output to this process's stdout/stderr."""
    target = sys.stdout if stream == "stdout" else sys.stderr
    if target is None:
        return
    try:
        target.write(text)
        target.flush()
    except (OSError, ValueError):  # closed or broken pipe: output has nowhere to go
        pass


class Supervisor:
    """Everything behind one ``Runtime`` (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        backend: Callable[[int, WorkerSettings], WorkerBackend] = LocalProcessBackend,
        state: Callable[..., StateService] = StateService,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: The runtime's options.
        self.settings = settings
        #: Guards the ledger and everything the loop changes; ``cond`` tells waiters (posts waiting for room,
        #: waits for jobs) that something changed.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        #: closed / broken / stop requested.
        self.flags = Lifecycle()
        #: The state server's process and this process's client of it.
        self.state = state(max_state_bytes=settings.max_state_bytes, strict=settings.strict_state,
                           state_timeout=settings.state_timeout, lock_timeout=settings.lock_timeout,
                           local_meta=self.local_meta, on_lost=self.wake, state_path=settings.state_path,
                           state_sync=settings.state_sync, backend=settings.state_backend)
        #: The worker lanes (``backend`` builds them: local processes by default).
        self.backend = backend(settings.processes, WorkerSettings(
            state_address=self.state.address, authkey=self.state.authkey, state_timeout=settings.state_timeout,
            lock_timeout=settings.lock_timeout, max_rss=settings.max_worker_rss,
            max_activations=settings.max_activations_per_process, sys_path=list(sys.path),
            log_levels=parent_levels(),
        ))
        #: Jobs, activations, retries: the books.
        self.ledger = Ledger(max_finished_jobs=settings.max_finished_jobs,
                             max_outputs_per_job=settings.max_outputs_per_job,
                             max_crash_retries=settings.max_crash_retries, clock=clock)
        #: The dispatcher thread, and through it the router, the dispatcher and the timers.
        self.loop = DispatchLoop(lock=self.lock, cond=self.cond, flags=self.flags, clock=clock, state=self.state,
                                 backend=self.backend, ledger=self.ledger, processes=settings.processes,
                                 prefetch=settings.prefetch, kill_worker_rss=settings.kill_worker_rss,
                                 state_timeout=settings.state_timeout,
                                 output=settings.worker_output or _default_output)
        #: Policies and routing of results (posts run policies at once), and placement on worker lanes.
        self.router = self.loop.router
        self.dispatcher = self.loop.dispatcher
        #: Time (injectable: unit tests drive a fake clock).
        self.clock = clock
        #: Worker ids being created by :meth:`add_worker` (not yet in the ledger), and numbers for new ids.
        self._reserved: set[str] = set()
        self._worker_numbers = itertools.count(1)
        #: Ids of jobs posted without one: 16 hex digits, a random half per runtime (ids of two runtimes,
        #: say in one state file, do not collide) and a counter (cheaper than random bytes per job).
        self._job_prefix = os.urandom(4).hex()
        self._job_numbers = itertools.count(1)

    # -- life ----------------------------------------------------------------------------------------

    def start(self, *, thread: bool = True) -> None:
        """Start the workers and the dispatcher thread; raise if no worker could start.

        With ``thread=False`` (unit tests) nothing runs by itself: drive the
        loop with :meth:`run_once`, end it with :meth:`close`.
        """
        self.loop.start(thread=thread)

    def run_once(self, timeout: float | None = 0.0) -> None:
        """One pass of the dispatcher loop in this thread (unit tests without a dispatcher thread)."""
        self.loop.run_once(timeout)

    def close(self) -> None:
        """Stop everything from this thread (unit tests without a dispatcher thread)."""
        self.loop.close()

    @property
    def closed(self) -> bool:
        """True once ``shutdown()`` started."""
        return self.flags.closed

    def wake(self) -> None:
        """Make the dispatcher run a pass now (any thread)."""
        self.backend.wake()

    def check_usable(self) -> None:
        """Raise if this runtime cannot take work (closed, broken, or its state server lost)."""
        self.flags.check_usable(self.state.lost)

    def on_dispatcher(self) -> bool:
        """Whether the caller runs on this runtime's dispatcher thread (in a done-callback)."""
        return threading.current_thread() is self.loop.thread

    def local_meta(self, worker_id: str) -> dict | None:
        """Status and job counters of a worker, as this process knows them (exactly; any thread)."""
        inst = self.ledger.instances.get(worker_id)
        if inst is None:
            return None
        flags = self.flags
        status = "failed" if flags.broken is not None else ("stopped" if flags.closed else "running")
        return {"flow_id": inst.flow.flow_id, "status": status, "jobs_processed": inst.jobs_processed,
                "jobs_failed": inst.jobs_failed}

    # -- workers -------------------------------------------------------------------------------------

    def add_worker(self, flow_name: str, flow: Any, worker_id: str | None) -> WorkerState:
        """Start a worker (a live instance of a validated ``flow``) and make it the flow's current one."""
        with self.lock:
            self.check_usable()
            key = self.dispatcher.ship(flow)
            known = self.ledger.instances
            stored = self.state.stored_workers
            if worker_id is None:
                worker_id = f"{flow_name}-{next(self._worker_numbers)}"
                while worker_id in known or worker_id in self._reserved or worker_id in stored:
                    worker_id = f"{flow_name}-{next(self._worker_numbers)}"
            elif worker_id in known or worker_id in self._reserved:
                raise FlowError(f"a worker {worker_id!r} already exists in this runtime; pick another worker_id")
            elif stored.get(worker_id, flow.flow_id) not in (flow.flow_id, ""):
                raise FlowError(
                    f"worker {worker_id!r} in the state file {self.state.state_path} ran flow "
                    f"{stored[worker_id]!r}, not {flow.flow_id!r}: its routine states belong to that flow. Exec "
                    "that flow to resume it, or pick another worker_id"
                )
            self._reserved.add(worker_id)
        try:
            ws = WorkerState(worker_id, flow.flow_id, self.state.client)
            inst = self.router.build_instance(worker_id, flow_name, flow, key, ws)
            # A resumed worker's counters go on from what the state file held.
            inst.jobs_processed, inst.jobs_failed = self.state.stored_counts.get(worker_id, (0, 0))
            with self.lock:
                self.check_usable()
                self.ledger.instances[worker_id] = inst
                self.ledger.current[flow_name] = worker_id
            # Workers may read status and flow_id; nobody needs to wait for it to arrive.
            self.state.push(Method.REGISTER_WORKER, worker_id, flow.flow_id, "running")
        finally:
            with self.lock:
                self._reserved.discard(worker_id)
        return ws

    def has_current(self, flow_name: str) -> bool:
        """Whether ``flow_name`` has a current worker (where a post without ``worker_id`` goes)."""
        return flow_name in self.ledger.current

    def worker_state(self, worker_id: str) -> WorkerState:
        """The WorkerState of an existing worker (``WorkerNotRunningError`` naming the workers if none)."""
        inst = self.ledger.instances.get(worker_id)
        if inst is None:
            known = ", ".join(repr(w) for w in list(self.ledger.instances)) or "none"
            raise WorkerNotRunningError(f"no worker {worker_id!r} in this runtime (workers: {known})")
        return inst.ws

    def owns(self, worker_state: WorkerState) -> bool:
        """Whether ``worker_state`` is the handle of one of this runtime's workers."""
        inst = self.ledger.instances.get(worker_state.worker_id)
        return inst is not None and inst.ws is worker_state

    def list_workers(self, stored: bool = False) -> list[str]:
        """Ids of the workers, oldest first; with ``stored``, those the state file held first."""
        with self.lock:
            live = list(self.ledger.instances)
        if not stored:
            return live
        return list(dict.fromkeys([*self.state.stored_workers, *live]))

    def state_call(self, method: Method, *args: Any) -> Any:
        """Call the state server directly from this process (the CLI's run journal)."""
        return self.state.client.call(method, *args)

    def _resolve_worker(self, flow_name: str, worker_id: str | None) -> _Instance:
        """The instance a post goes to: ``worker_id``, or the flow's current worker."""
        # No lock: single dict reads are atomic, and add_worker() publishes an instance whole.
        instances = self.ledger.instances
        if worker_id is None:
            inst = instances.get(self.ledger.current.get(flow_name, ""))
            if inst is None:
                raise WorkerNotRunningError(f"flow {flow_name!r} has no current worker; exec() it first")
            return inst
        inst = instances.get(worker_id)
        if inst is None:
            known = ", ".join(repr(w) for w, i in list(instances.items()) if i.flow_name == flow_name)
            raise WorkerNotRunningError(
                f"flow {flow_name!r} has no worker {worker_id!r} in this runtime (workers: {known or 'none'})")
        if inst.flow_name != flow_name:
            raise FlowError(f"worker {worker_id!r} runs flow {inst.flow_name!r}, not {flow_name!r}")
        return inst

    # -- posting -------------------------------------------------------------------------------------

    def post(self, flow_name: str, flow: Any, routine_id: str, slot_name: str, blob: bytes, *,
             worker_id: str | None, job_id: str | None, metadata: dict | None, block: bool,
             timeout: float | None) -> tuple[WorkerState, JobContext]:
        """A new job: the pickled item ``blob`` on ``routine_id.slot_name`` (checked on ``flow``, the flow
        registered as ``flow_name`` now) of ``worker_id``, or the flow's current worker (see ``Runtime.post``)."""
        inst = self._resolve_worker(flow_name, worker_id)
        if inst.flow is not flow:  # (the flow was registered again since this worker started)
            inst.flow.check_slot(routine_id, slot_name)
        deadline = None if timeout is None else self.clock() + timeout
        flags = self.flags
        with self.lock:
            if flags.broken is not None or flags.closed or self.state.lost is not None:
                self.check_usable()
            if job_id is not None and job_id in self.ledger.jobs:
                raise FlowError(f"a job {job_id!r} already exists; job ids must be unique")
            rt = inst.routines[routine_id]
            queue = rt.slots[slot_name]
            while queue.pending >= queue.max_queue_length:
                self._wait_for_room(rt, queue, block, deadline)
            if job_id is None:
                job_id = f"{self._job_prefix}{next(self._job_numbers):08x}"
            job = JobContext(job_id, inst.worker_id, inst.flow.flow_id, metadata, _input=blob)
            self.ledger.open_job(job)
            self.ledger.enqueue(rt, slot_name, job, blob)
            self.router.evaluate(rt)
            self.dispatcher.dispatch()
            callbacks = self.ledger.take_callbacks()
            if callbacks:
                self.cond.notify_all()
        run_callbacks(callbacks)
        return inst.ws, job

    def _wait_for_room(self, rt: _RoutineRt, queue: SlotQueue, block: bool, deadline: float | None) -> None:
        """Wait (lock held) until ``queue`` has room, or raise ``SlotQueueFullError``."""
        where = f"slot {queue.name!r} of routine {rt.rid!r} (worker {rt.inst.worker_id!r})"
        if not block:
            raise SlotQueueFullError(f"{where} holds {queue.pending} items, its max_queue_length; retry later")
        if self.on_dispatcher():
            raise SlotQueueFullError(
                f"{where} is full, and post() from a job done-callback cannot wait for room (the callback "
                "runs in the thread that makes room); post from another thread, or with block=False"
            )
        if self.ledger.quiescent():
            raise SlotQueueFullError(
                f"{where} is full ({queue.pending} items) and nothing is running that could consume them: "
                "its activation policy is holding them (a join waiting on another slot?). Flush, feed the "
                "other slots, or raise max_queue_length"
            )
        remaining = None if deadline is None else deadline - self.clock()
        if remaining is not None and remaining <= 0:
            raise SlotQueueFullError(f"{where} stayed full ({queue.pending} items) past the post() timeout")
        self.loop.post_waiters += 1
        try:
            self.cond.wait(remaining)
        finally:
            self.loop.post_waiters -= 1
        self.check_usable()

    # -- waiting and flushing ------------------------------------------------------------------------

    def wait_idle(self, timeout: float | None, worker_id: str | None = None) -> bool:
        """Wait until every job (of ``worker_id``) finished, flushing policies once nothing else runs."""
        if self.on_dispatcher():
            raise RoutiluxError("wait_until_all_jobs_finished() cannot be called from a job done-callback: "
                                "the callback runs in the thread that finishes jobs")
        if worker_id is not None:
            self.worker_state(worker_id)  # unknown -> WorkerNotRunningError naming the workers
        deadline = None if timeout is None else time.monotonic() + timeout
        loop = self.loop
        with self.lock:
            if worker_id is None:
                loop.idle_waiters += 1
            else:
                loop.watchers += 1
            try:
                result = self._wait_idle(deadline, worker_id)
            finally:
                if worker_id is None:
                    loop.idle_waiters -= 1
                else:
                    loop.watchers -= 1
            callbacks = self.ledger.take_callbacks()
        run_callbacks(callbacks)
        return result

    def _wait_idle(self, deadline: float | None, worker_id: str | None) -> bool:
        """The wait of :meth:`wait_idle` (lock held; the loop counts this thread as a waiter)."""
        while True:
            if not self.ledger.busy(worker_id):
                return True
            if self.flags.stop_requested:
                return False
            if worker_id is None:
                if self.ledger.quiescent() and self._flush(list(self.ledger.instances.values())):
                    continue
            else:
                inst = self.ledger.instances[worker_id]
                if self.loop.instance_quiescent(inst) and self._flush([inst]):
                    continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self.cond.wait(remaining)

    def flush(self, flow_name: str | None) -> None:
        """Deliver now what batch and interval policies hold back (of one flow's workers, or all)."""
        with self.lock:
            self._flush([i for i in self.ledger.instances.values() if flow_name is None or i.flow_name == flow_name])
            callbacks = self.ledger.take_callbacks()
        run_callbacks(callbacks)

    def _flush(self, instances: list[_Instance]) -> bool:
        """Flush the policies of ``instances`` and dispatch what they delivered; True if anything was (lock held)."""
        delivered = self.router.flush(instances)
        if delivered:
            self.dispatcher.dispatch()
        return delivered

    # -- jobs and stats ------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> JobContext | None:
        """The job with this id, or ``None``."""
        with self.lock:
            return self.ledger.job(job_id)

    def list_jobs(self, worker_id: str | None) -> list[JobContext]:
        """Jobs in the ledger, oldest first (of one worker, or all)."""
        with self.lock:
            return self.ledger.list_jobs(worker_id)

    def complete_job(self, job_id: str, status: str, error: str | None) -> bool:
        """End an open job now with ``status``; False if there is none (see ``Runtime.complete_job``)."""
        details = None if error is None else error_data(RoutiluxError, str(error), routine=None)
        with self.lock:
            ended = self.ledger.end(job_id, status, details)
            if ended:
                self.cond.notify_all()
            callbacks = self.ledger.take_callbacks()
        run_callbacks(callbacks)
        return ended

    def stats(self) -> dict:
        """A JSON-able snapshot: per-routine counters, per-process usage, jobs by status, waiting items."""
        with self.lock:
            routines = routine_stats(self.ledger.instances)
            # (the routine a lane runs, or takes next: the first activation it holds)
            lanes = [(s.index, s.activations, s.restarts, s.alive and s.ready,
                      s.inflight[0].rt.rid if s.inflight else None) for s in self.dispatcher.slots]
            jobs = {status: n for status, n in self.ledger.status_counts.items() if n}
            waiting = queued_items(self.ledger.instances)
            ask = self.state.lost is None and not self.flags.closed
        lost: dict = {}
        if ask:
            try:
                lost = self.state.client.call(Method.LOST_UPDATES)
            except RoutiluxError:
                lost = {}
        for rid, agg in routines.items():
            agg["lost_updates"] = lost.get(rid, 0)
        usage = self.backend.usage()
        processes = []
        for index, activations, restarts, ready, routine in lanes:
            use = usage[index]
            processes.append({"index": index, "pid": None if use is None else use.pid,
                              "alive": use is not None and use.rss is not None, "ready": ready,
                              "rss": None if use is None else use.rss,
                              "cpu_percent": None if use is None else use.cpu_percent,
                              "activations": activations, "restarts": restarts, "routine": routine})
        return {"routines": routines, "processes": processes, "jobs": jobs, "waiting": waiting}

    # -- shutdown ------------------------------------------------------------------------------------

    def shutdown(self, wait: bool, timeout: float, cancel_pending: bool) -> None:
        """Stop taking work, let it finish (``wait``), then stop every process (see ``Runtime.shutdown``)."""
        loop = self.loop
        if self.on_dispatcher():
            # From a job done-callback: the dispatcher stops once the callback returns.
            loop.request_stop(grace=TERM_GRACE)
            return
        if loop.thread is None or not loop.thread.is_alive():
            return
        interrupt = None
        with self.lock:
            already = self.flags.flag_closed()
        try:
            if cancel_pending:
                with self.lock:
                    stop_taking_work(self.ledger, self.dispatcher.inflight())
                    self.cond.notify_all()
                    callbacks = self.ledger.take_callbacks()
                run_callbacks(callbacks)
            if wait and not already:
                self.wait_idle(timeout)
        except KeyboardInterrupt as exc:  # Ctrl-C while waiting: stop now, then let it propagate
            interrupt = exc
        loop.request_stop(grace=TERM_GRACE)
        loop.join_or_kill(SHUTDOWN_JOIN_TIMEOUT)
        if interrupt is not None:
            raise interrupt

    def testing(self) -> TestHooks:
        """What tests may inspect and wait for (see :class:`TestHooks`)."""
        return TestHooks(self)


class TestHooks:
    """Documented hooks for tests (``Runtime._testing``): not public API, never used by the library."""

    __test__ = False  # (not a pytest test class)

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    @property
    def state_address(self) -> str:
        """The state server's unix socket path."""
        return self._sup.state.address

    @property
    def authkey(self) -> bytes:
        """The key clients of the state server authenticate with."""
        return self._sup.state.authkey

    @property
    def socket_dir(self) -> str:
        """The runtime's private directory (it holds the socket; removed at shutdown)."""
        return self._sup.state.socket_dir

    @property
    def state_pid(self) -> int | None:
        """The state server's pid, once it started."""
        return self._sup.state.pid

    @property
    def state_watched(self) -> bool:
        """Whether a state server runs and its death is watched (after a restart: the new one)."""
        return self._sup.state.launcher.sentinel is not None

    @property
    def broken(self) -> bool:
        """Whether the runtime is broken (it accepts no more work)."""
        return self._sup.flags.broken is not None

    def worker_pid(self, index: int) -> int | None:
        """The pid of the worker in lane ``index`` (``None`` when there is none now)."""
        return self._sup.backend.pid(index)

    def wait_spare(self, timeout: float) -> int | None:
        """Wait until the backend has a spare worker process started; its pid (``None``: none in time)."""
        backend = self._sup.backend
        if self._watch(lambda: getattr(backend, "spare_pid", None) is not None, timeout):
            return backend.spare_pid
        return None

    def wait_pool_ready(self, timeout: float) -> bool:
        """Wait (on the supervisor's condition, no polling) until every lane's worker reported ready."""
        sup = self._sup
        return self._watch(lambda: all(s.alive and s.ready for s in sup.dispatcher.slots), timeout)

    def wait_pool_refilled(self, restarts: int, timeout: float) -> bool:
        """Wait until at least ``restarts`` workers were replaced and every lane has a worker again."""
        sup = self._sup

        def refilled() -> bool:
            """Enough replacements, and a worker in every lane."""
            slots = sup.dispatcher.slots
            return sum(s.restarts for s in slots) >= restarts and all(s.alive for s in slots)

        return self._watch(refilled, timeout)

    def wait_no_timers(self, timeout: float) -> bool:
        """Wait until neither the dispatcher nor the backend has a timer pending (the dispatcher then
        sleeps until something happens)."""
        sup = self._sup

        def quiet() -> bool:
            """No timer of the loop, no deadline of the backend."""
            return len(sup.loop.timers) == 0 and getattr(sup.backend, "pending_deadlines", 0) == 0

        return self._watch(quiet, timeout)

    def _watch(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait on the supervisor's condition until ``predicate()``, notified on every dispatcher pass."""
        sup = self._sup
        with sup.cond:
            sup.loop.watchers += 1
            try:
                return sup.cond.wait_for(predicate, timeout)
            finally:
                sup.loop.watchers -= 1

    def join_dispatcher(self, timeout: float) -> bool:
        """Wait until the dispatcher thread finished; whether it did."""
        thread = self._sup.loop.thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()
