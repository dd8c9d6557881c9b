"""The supervisor: the ledger and the dispatcher thread behind ``Runtime``.

::

     your process                                        state server process
    ┌──────────────────────────────────────────┐  unix   ┌──────────────────────┐
    │ Runtime.post()/exec()  ──┐               │ socket  │ StateStore           │
    │                          ▼               │◀───────▶│ (BaseManager, JSON,  │
    │ slot queues ─▶ policies ─▶ ready acts    │ authkey │  locks, counters)    │
    │      ▲                        │ _Activation        └──────────▲───────────┘
    │      └── route emits ◀─ _Result            │                  │ own connection
    │ dispatcher thread: wait(results, pidfds,  │                  │
    │   outputs, wakeup, state-server pidfd)    │                  │
    └────────────┬───────────────▲─────────────┘                  │
          command pipe      result pipe + stdout/stderr pipes     │
    ┌────────────▼───────────────┴─────────────┐  x processes     │
    │ worker process: run logic, emit, one     │──────────────────┘
    │ _Result per activation                   │
    └──────────────────────────────────────────┘

* ``post()`` (any thread) queues an item, runs the routine's policy and hands
  activations to processes, all under one lock.
* The dispatcher thread blocks on every result pipe, every process's pidfd
  (its death), every stdout/stderr pipe, the command pipes that have bytes
  waiting for room, a wake-up pipe and the state server's pidfd; it never
  polls with sleeps, and never blocks on a pipe (see ``_guards``). It
  forwards output lines, routes results, notices deaths, fires timers
  (retries, timeouts, interval policies, kill escalation, respawns, hang
  checks) and spawns every child process, so the children's
  ``PR_SET_PDEATHSIG`` is tied to a thread that lives until shutdown.
* The ledger entry of an activation (which process holds it, for which jobs,
  which attempt) is written before it is sent. A process holds its
  activations in order, so when it dies the first one still held is the one
  it was running: that one fails with ``WorkerCrashedError``; the others,
  never started, go back to their queues.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import _context, _process
from ._guards import Guards, run_callbacks
from ._ledger import _Act, _Entry, _Instance, _Proc, _RoutineRt
from ._messages import (
    CorruptFrameError,
    _Activation,
    _Exiting,
    _LoadFlow,
    _Ready,
    _Result,
    describe_exception,
    dumps,
    encode,
    error_data,
    loads,
)
from ._pool import MEMORY_SAMPLE_INTERVAL, STATE_STOP_TIMEOUT, TERM_GRACE, ProcessPool
from .activation_policies import IMMEDIATE_MESSAGE
from .error_handling import ErrorStrategy
from .errors import (
    ActivationTimeoutError,
    FlowError,
    RoutiluxError,
    RuntimeBrokenError,
    RuntimeClosedError,
    SerializationError,
    StateServerLostError,
)
from .job import JobContext
from .state import StatePusher, _StoreClient

logger = logging.getLogger("routilux_mp.runtime")

#: The immediate policy's message, pickled once.
IMMEDIATE_BLOB = encode(IMMEDIATE_MESSAGE)
#: Bytes the supervisor may queue on a busy worker's command pipe (Linux pipes hold 64 KiB).
PIPE_SAFE_BYTES = 48 * 1024
#: Longest delay before job counters reach the state server (where workers read them).
COUNTS_FLUSH_INTERVAL = 0.05


def _default_output(stream: str, text: str) -> None:
    target = sys.stdout if stream == "stdout" else sys.stderr
    if target is None:
        return
    try:
        target.write(text)
        target.flush()
    except (OSError, ValueError):  # closed or broken pipe: output has nowhere to go
        pass


class Supervisor(ProcessPool, Guards):
    """All mutable runtime state, guarded by ``self.lock``; see the module docstring."""

    def __init__(
        self,
        *,
        processes: int,
        prefetch: int,
        strict_state: bool,
        max_state_bytes: int,
        state_timeout: float,
        lock_timeout: float,
        max_crash_retries: int,
        max_worker_rss: int | None,
        kill_worker_rss: int | None,
        max_activations_per_process: int | None,
        max_outputs_per_job: int,
        max_finished_jobs: int,
        worker_output: Callable[[str, str], None] | None,
    ) -> None:
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
        self.output = worker_output or _default_output

        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.procs: list[_Proc | None] = [None] * processes
        self.restarts = [0] * processes
        self.instances: dict[str, _Instance] = {}
        self.current: dict[str, str] = {}
        self.jobs: dict[str, JobContext] = {}
        self.finished: collections.deque[str] = collections.deque()
        self.status_counts: collections.Counter[str] = collections.Counter()
        self.active_jobs = 0
        self.runnable: set[_RoutineRt] = set()
        self.inflight = 0
        self.retrying = 0
        self.post_waiters = 0
        self.timers: list[tuple[float, int, str, Any]] = []
        self.callbacks: list[Callable[[], Any]] = []
        self.count_deltas: dict[str, list[int]] = {}
        self.ships: dict[int, tuple[Any, int, bytes]] = {}
        self.closed = False
        self.broken: tuple[type[RoutiluxError], str] | None = None
        self.stop_requested = False
        self.stop_grace = TERM_GRACE
        self.start_failures = 0
        #: When the done-callback running now on the dispatcher thread began (None: none runs).
        self.callback_since: float | None = None
        #: Processes with bytes waiting in their outbox, whose pipes the dispatcher must watch for room.
        self.want_write: set[_Proc] = set()

        self._seq = itertools.count(1)
        self._act_ids = itertools.count(1)
        self._timer_seq = itertools.count()
        self._flow_keys = itertools.count(1)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        # Workers watch the read end; only this process holds the write end open,
        # so they see EOF the moment the supervisor dies, however it dies.
        self._life_r, self._life_w = os.pipe()
        self._counts_timer = False
        self._tmpdir = tempfile.mkdtemp(prefix=_process.SOCKET_DIR_PREFIX)
        self.state_address = os.path.join(self._tmpdir, "state.sock")
        self._authkey = os.urandom(32)
        self.client = _StoreClient(self.state_address, self._authkey, state_timeout, lock_timeout)
        # WorkerStates in this process read status and job counters from here, exactly.
        self.client.local_meta = self.local_meta
        # A call from any thread of this process that finds the server lost breaks the runtime.
        self.client.on_lost = self.wake
        #: Sends what workers need to know, but nobody waits for, off the dispatcher thread.
        self.pusher = StatePusher(self.client)
        self.state_popen: subprocess.Popen | None = None
        self._state_listener: Any = None
        self._state_pidfd: int | None = None
        self._sys_path = list(sys.path)

        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="routilux-mp dispatcher", daemon=True)
        self.thread.start()
        self._started.wait()
        if self._start_error is not None:
            self.thread.join(STATE_STOP_TIMEOUT + TERM_GRACE + 5)
            raise self._start_error

    # ------------------------------------------------------------------ wake-up

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # already awake with plenty of pending wake-ups
            pass

    # ------------------------------------------------------------------ start-up

    def _main(self) -> None:
        _context.mark_dispatcher()
        try:
            with self.lock:
                self._start()
                if self.broken is not None:
                    cls, message = self.broken
                    raise cls(message)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of Runtime()
            self._start_error = exc
            self._started.set()
            self._stop_children()
            return
        self._started.set()
        try:
            self._loop()
        except BaseException:
            logger.exception("the routilux-mp dispatcher failed; stopping the runtime")
            with self.lock:
                self._break(RuntimeBrokenError, "the runtime's dispatcher thread failed (see the log above)")
        finally:
            self._stop_everything()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self.lock:
                if self.stop_requested:
                    return
                timeout = None
                if self.timers:
                    timeout = max(0.0, self.timers[0][0] - time.monotonic())
            ready = []
            for key, _ in self._selector.select(timeout):
                kind, proc = key.data
                if kind == "wake":
                    try:
                        os.read(self._wake_r, 65536)
                    except BlockingIOError:
                        pass
                elif kind == "output":
                    # Output first, outside the lock. A worker writes its lines before
                    # the result that follows them, so both are ready in this round.
                    self._pump_fd(proc, key.fd)
                else:
                    ready.append((kind, proc))
            with self.lock:
                for kind, proc in ready:
                    if kind == "results" and self.procs[proc.index] is proc:
                        self._read_results(proc)
                    elif kind == "commands" and self.procs[proc.index] is proc:
                        self._write_commands(proc)
                    elif kind == "state":
                        self._state_died()
                for kind, proc in ready:
                    if kind == "death" and self.procs[proc.index] is proc:
                        self._on_death(proc)
                if self.client.lost is not None:
                    self._state_lost(self.client.lost)
                self._run_timers()
                self._dispatch()
                self._watch_writers()
                if self.count_deltas and not self._counts_timer:
                    self._counts_timer = True
                    self._add_timer(time.monotonic() + COUNTS_FLUSH_INTERVAL, "counts", None)
                self.cond.notify_all()
                callbacks = self.take_callbacks()
            for callback in callbacks:
                self._run_callback(callback)

    def _run_callback(self, callback: Callable[[], Any]) -> None:
        self.callback_since = time.monotonic()
        try:
            run_callbacks([callback])
        finally:
            self.callback_since = None

    def take_callbacks(self) -> list[Callable[[], Any]]:
        callbacks, self.callbacks = self.callbacks, []
        return callbacks

    # ------------------------------------------------------------------ results

    def _read_results(self, proc: _Proc) -> None:
        if proc.results_closed:
            return
        reader = proc.reader
        if proc.hung is not None:  # killed: what it still says is not to be trusted
            self._drain(proc)
            return
        corrupt = None
        try:
            frames = reader.read()
        except CorruptFrameError as exc:
            frames, corrupt = exc.frames, str(exc)
        for frame in frames:
            try:
                message = loads(frame)
            except Exception as exc:  # noqa: BLE001 - bytes logic wrote on the pipe may fail in any way
                corrupt = f"a message that cannot be unpickled ({type(exc).__name__}: {exc})"
                break
            if isinstance(message, _Result):
                if not self._on_result(proc, message):
                    return
            elif isinstance(message, _Ready):
                proc.ready = True
                self.start_failures = 0
                self._start_state_server()
            elif isinstance(message, _Exiting):
                proc.exiting = message.reason
                logger.debug("worker %d (pid %d) exits: %s", proc.index, proc.pid, message.reason)
                # It ran everything up to here; the rest was never started.
                self._requeue(proc, list(proc.inflight))
                proc.inflight.clear()
            else:
                corrupt = f"an unexpected message ({type(message).__name__})"
                break
        if corrupt is not None:
            self._protocol_broken(proc, f"sent {corrupt} on its result pipe")
            return
        if reader.eof:
            proc.results_closed = True
            self._unwatch(reader.fd)
            if proc.pidfd is None:  # no pidfd on this system: EOF is how death shows
                self._on_death(proc)

    def _requeue(self, proc: _Proc, acts: list[_Act]) -> None:
        for act in reversed(acts):
            self.inflight -= 1
            act.rt.running -= 1
            if act.resolved:
                continue
            act.proc = None
            act.started = None
            act.deadline = None
            act.rt.ready.appendleft(act)
            self.runnable.add(act.rt)

    def _start_act(self, act: _Act, now: float) -> None:
        act.started = now
        if act.rt.timeout is not None:
            act.deadline = now + act.rt.timeout
            self._add_timer(act.deadline, "deadline", act)
        assert act.proc is not None
        self._watch_take(act.proc)

    def _on_result(self, proc: _Proc, res: _Result) -> bool:
        """Apply one result; False if it broke the protocol (the process is then killed)."""
        if not proc.inflight or proc.inflight[0].act_id != res.act_id:
            held = f"activation #{proc.inflight[0].act_id}" if proc.inflight else "no activation"
            self._protocol_broken(proc, f"sent a result for activation #{res.act_id} while it held {held}")
            return False
        act = proc.inflight.popleft()
        now = time.monotonic()
        self.inflight -= 1
        rt = act.rt
        rt.running -= 1
        proc.activations += 1
        if proc.inflight:
            self._start_act(proc.inflight[0], now)
        if rt.ready:
            self.runnable.add(rt)
        if act.resolved:  # it timed out or was killed: its outcome is already decided
            return True
        stats = rt.stats
        stats.activations += 1
        stats.busy_seconds += res.seconds
        stats.latencies.append(now - act.created)
        if res.error is None:
            lead = act.lead_job()
            error = None
            if lead is not None:
                error = self._route(act, lead, res.emits, res)
            if error is None:
                self._release(act)
            else:
                stats.errors += 1
                self._on_failure(act, error)
        else:
            stats.errors += 1
            if res.error.get("type") == "routilux_mp.errors.StateServerLostError":
                self._state_lost(res.error.get("message", "the state server stopped answering"))
            self._on_failure(act, res.error, res)
        return True

    def _apply_job_changes(self, job: JobContext, act: _Act, res: _Result) -> None:
        job.attempts = max(job.attempts, act.attempt)
        if res.data_set:
            job.data.update(res.data_set)
        if res.data_deleted:
            for key in res.data_deleted:
                job.data.pop(key, None)
        if res.traces:
            job.traces.extend(res.traces)
            del job.traces[: max(0, len(job.traces) - 1000)]

    def _route(self, act: _Act, lead: JobContext, emits: list[tuple[str, bytes]], res: _Result) -> dict | None:
        """Apply a result's job changes and route its emits; an error (as data) if an output is unreadable.

        Outputs are decoded first, so an output the supervisor cannot unpickle
        fails this activation only, before anything of it is applied.
        """
        outputs = {}
        for i, (event, blob) in enumerate(emits):
            if not act.rt.targets.get(event):
                try:
                    outputs[i] = loads(blob)
                except Exception as exc:  # noqa: BLE001 - unpickling runs the data's own code
                    return error_data(SerializationError,
                                  f"an output of emit({event!r}) from routine {act.rt.rid!r} cannot be unpickled "
                                  f"in the supervisor ({type(exc).__name__}: {exc}); emit plain values",
                                  routine=act.rt.rid)
        self._apply_job_changes(lead, act, res)
        dirty: list[_RoutineRt] = []
        for i, (event, blob) in enumerate(emits):
            targets = act.rt.targets.get(event)
            if not targets:
                self._add_output(lead, act.rt.rid, event, outputs[i])
                continue
            for target, slot in targets:
                lead._refs += 1  # type: ignore[attr-defined]
                target.slots[slot]._entries.append(_Entry(next(self._seq), lead, blob))
                if target not in dirty:
                    dirty.append(target)
        for target in dirty:
            self.evaluate(target)
        return None

    def _add_output(self, job: JobContext, rid: str, event: str, data: Any) -> None:
        job.outputs.append({"routine": rid, "event": event, "data": data})
        if len(job.outputs) > self.max_outputs_per_job:
            del job.outputs[0]
            job.outputs_dropped += 1

    # ------------------------------------------------------------------ failures

    def _on_failure(self, act: _Act, error: dict, res: _Result | None = None) -> None:
        rt = act.rt
        error = dict(error)
        error.setdefault("routine", rt.rid)
        error["worker_id"] = rt.inst.worker_id
        error["attempt"] = act.attempt
        lead = act.lead_job()
        if lead is None:
            self._release(act)
            return
        lead.attempts = max(lead.attempts, act.attempt)
        handler = rt.handler
        strategy = handler.strategy
        crashed = bool(error.get("crashed"))
        if strategy is ErrorStrategy.RETRY:
            if not handler.is_retryable(error.get("mro") or [error["type"]]):
                strategy = ErrorStrategy.STOP
            elif act.attempt > handler.max_retries:
                error["message"] += f" (gave up after {act.attempt} attempts; max_retries={handler.max_retries})"
                strategy = ErrorStrategy.STOP
            elif crashed and act.crashes >= self.max_crash_retries:
                error["message"] += (
                    f" (it crashed a worker {act.crashes} times: given up as a poison activation; "
                    f"max_crash_retries={self.max_crash_retries})"
                )
                strategy = ErrorStrategy.STOP
            else:
                retry = self._clone(act)
                delay = handler.delay_before(retry.attempt)
                lead.trace(rt.rid, "retry", {"attempt": retry.attempt, "delay": delay, "error": error["type"],
                                             "message": error["message"][:500]})
                self.retrying += 1
                self._add_timer(time.monotonic() + delay, "retry", retry)
                return
        if strategy is ErrorStrategy.CONTINUE:
            lead.error = error
            lead.trace(rt.rid, "error", {"error": error["type"], "message": error["message"][:500]})
            if res is not None and self._route(act, lead, res.emits, res) is not None:
                lead.trace(rt.rid, "outputs dropped", "an output of the failed activation cannot be unpickled")
        elif strategy is ErrorStrategy.SKIP:
            lead.trace(rt.rid, "skipped", {"error": error["type"], "message": error["message"][:500]})
        else:
            for job in act.jobs:
                if not job.done:
                    self._fail_job(job, error)
        self._release(act)

    def _clone(self, act: _Act) -> _Act:
        """A new attempt of ``act``; it takes over ``act``'s hold on its jobs."""
        clone = _Act(next(self._act_ids), act.seq, act.rt, act.slots, {}, act.message, act.jobs, act.created)
        clone.attempt = act.attempt + 1
        clone.crashes = act.crashes
        return clone

    def _release(self, act: _Act) -> None:
        for job in act.jobs:
            job._refs -= 1  # type: ignore[attr-defined]
            if job._refs <= 0 and not job.done:  # type: ignore[attr-defined]
                self._finish_job(job, "completed")

    def _finish_job(self, job: JobContext, status: str, error: dict | None = None) -> None:
        self.status_counts[job.status] -= 1
        self.status_counts[status] += 1
        self.callbacks.extend(job._finish(status, error))
        self.active_jobs -= 1
        if status != "cancelled":
            delta = self.count_deltas.setdefault(job.worker_id, [0, 0])
            delta[0] += 1
            delta[1] += status == "failed"
            inst = self.instances.get(job.worker_id)
            if inst is not None:
                inst.jobs_processed += 1
                inst.jobs_failed += status == "failed"
        self.finished.append(job.job_id)
        while len(self.finished) > self.max_finished_jobs:
            old = self.jobs.get(self.finished.popleft())
            if old is not None and old.done:
                del self.jobs[old.job_id]

    def _fail_job(self, job: JobContext, error: dict) -> None:
        self._finish_job(job, "failed", error)
        self._purge({id(job)}, job.worker_id)

    def _purge(self, job_ids: set[int], worker_id: str | None = None) -> None:
        """Drop queued items of these (terminal) jobs, and activations left with no open job."""
        for inst in self.instances.values():
            if worker_id is not None and inst.worker_id != worker_id:
                continue
            for rt in inst.routines.values():
                for queue in rt.slots.values():
                    if any(id(e.job) in job_ids for e in queue._entries):
                        queue._entries = collections.deque(e for e in queue._entries if id(e.job) not in job_ids)
                if rt.ready and any(act.lead_job() is None for act in rt.ready):
                    keep = collections.deque()
                    for act in rt.ready:
                        if act.lead_job() is None:
                            for name, n in act.slot_counts.items():
                                rt.slots[name].held -= n
                            self._release(act)
                        else:
                            keep.append(act)
                    rt.ready = keep
                    if not keep:
                        self.runnable.discard(rt)

    def end_job(self, job: JobContext, status: str, error: dict | None = None) -> None:
        """End an open job now (``Runtime.complete_job``): drop its queued items; running ones no longer count."""
        self._finish_job(job, status, error)
        self._purge({id(job)}, job.worker_id)
        self.cond.notify_all()

    def cancel_pending(self) -> int:
        """Cancel every job none of whose activations has started; return how many."""
        cancelled = [job for job in self.jobs.values() if job.status == "pending"]
        for job in cancelled:
            self._finish_job(job, "cancelled")
        if cancelled:
            self._purge({id(job) for job in cancelled})
            self.cond.notify_all()
        return len(cancelled)

    # ------------------------------------------------------------------ deaths

    def _state_lost(self, why: str) -> None:
        if self.broken is not None:
            return
        message = (
            f"{why}: all shared worker state is lost. Jobs in flight failed with StateServerLostError; "
            "this runtime accepts no more work: shut it down and start a new one"
        )
        self.client.mark_lost(message)
        logger.error("routilux-mp: %s", message)
        if self.state_popen is not None and self.state_popen.poll() is None:
            _process.signal_group(self.state_popen.pid, signal.SIGKILL)
        self._break(StateServerLostError, message)

    def _break(self, cls: type[RoutiluxError], message: str) -> None:
        """The runtime cannot go on: fail every open job with ``cls``, refuse new work."""
        if self.broken is not None:
            return
        self.broken = (cls, message)
        error = error_data(cls, message)
        for rt in list(self.runnable):
            rt.ready.clear()
        self.runnable.clear()
        for job in list(self.jobs.values()):
            if not job.done:
                self._finish_job(job, "failed", dict(error))
        for inst in self.instances.values():
            for rt in inst.routines.values():
                for queue in rt.slots.values():
                    queue._entries.clear()
                    queue.held = 0
        self.cond.notify_all()

    # ------------------------------------------------------------------ timers

    def _add_timer(self, when: float, kind: str, payload: Any) -> None:
        heapq.heappush(self.timers, (when, next(self._timer_seq), kind, payload))
        if threading.current_thread() is not self.thread:
            self.wake()

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, kind, payload = heapq.heappop(self.timers)
            if kind == "policy":
                if payload.timer_at is not None and payload.timer_at <= now:
                    payload.timer_at = None
                    self.evaluate(payload)
            elif kind == "retry":
                self.retrying -= 1
                if self.broken is not None or payload.lead_job() is None:
                    self._release(payload)
                else:
                    payload.rt.ready.appendleft(payload)
                    self.runnable.add(payload.rt)
            elif kind == "deadline":
                act = payload
                proc = act.proc
                if proc is not None and proc.inflight and proc.inflight[0] is act and not act.resolved:
                    if not proc.taken(act):  # it has not started: its clock starts later (a hang is TAKE_TIMEOUT's)
                        act.deadline = now + act.rt.timeout
                        self._add_timer(act.deadline, "deadline", act)
                        continue
                    self._kill_activation(
                        act, ActivationTimeoutError,
                        f"routine {act.rt.rid!r} ran longer than its timeout of {act.rt.timeout:g}s "
                        f"(worker {proc.index}, pid {proc.pid}); the process was stopped and replaced",
                        signal.SIGTERM,
                    )
            elif kind == "kill":
                if self.procs[payload.index] is payload and payload.popen.poll() is None:
                    _process.signal_group(payload.pid, signal.SIGKILL)
            elif kind == "respawn":
                self._respawn(payload)
            elif kind == "take":
                self._check_taken(payload)
            elif kind == "state-start":
                self._start_state_server()
            elif kind == "counts":
                self._counts_timer = False
                self.flush_counts()
            elif kind == "memory":
                self._check_memory()
                if not self.stop_requested:
                    self._add_timer(now + MEMORY_SAMPLE_INTERVAL, "memory", None)

    # ------------------------------------------------------------------ policies

    def evaluate(self, rt: _RoutineRt) -> None:
        """Run ``rt``'s policy until it stops activating; queue what it activates."""
        policy = rt.policy
        while True:
            for queue in rt.slots.values():
                queue._consumed = []
            try:
                activate, data_slice, message = policy(rt.slots, rt.inst.ws)
            except Exception as exc:  # noqa: BLE001 - a user's policy: fail its jobs, not the dispatcher
                self._policy_failed(rt, exc)
                return
            consumed = [e for queue in rt.slots.values() for e in queue._consumed]
            if not activate:
                if consumed:
                    for queue in rt.slots.values():
                        queue._put_back(queue._consumed)
                break
            if not consumed:
                logger.error("the activation policy of routine %r activated without consuming any item; "
                             "ignored (a policy must consume the items it activates on)", rt.rid)
                break
            try:
                self._make_activation(rt, data_slice or {}, message, consumed)
            except Exception as exc:  # noqa: BLE001 - user data that cannot be shipped: fail its jobs
                for queue in rt.slots.values():
                    queue._put_back(queue._consumed)
                self._policy_failed(rt, exc)
                return
        wakeup = getattr(policy, "next_wakeup", None)
        if wakeup is not None:
            when = wakeup(rt.slots)
            if when is not None and (rt.timer_at is None or when < rt.timer_at):
                rt.timer_at = when
                self._add_timer(when, "policy", rt)

    def _policy_failed(self, rt: _RoutineRt, exc: Exception) -> None:
        logger.error("the activation policy of routine %r raised %s: %s; the jobs waiting in its slots fail",
                     rt.rid, type(exc).__name__, exc)
        error = describe_exception(exc, rt.rid)
        error["message"] = f"the activation policy of routine {rt.rid!r} raised: {error['message']}"
        jobs = {id(e.job): e.job for q in rt.slots.values() for e in q._entries}
        for job in jobs.values():
            if not job.done:
                self._fail_job(job, dict(error))

    def _make_activation(self, rt: _RoutineRt, data_slice: dict, message: Any, consumed: list[_Entry]) -> None:
        slots: dict[str, list[bytes]] = {}
        for name, items in data_slice.items():
            if name not in rt.slots:
                raise FlowError(f"the policy of routine {rt.rid!r} returned items for unknown slot {name!r}")
            blobs = []
            for item in items:
                if type(item) is _Entry:
                    blobs.append(item.blob)
                else:
                    try:
                        blobs.append(encode(item))
                    except Exception as exc:
                        raise SerializationError(f"an item the policy returned for slot {name!r} cannot be pickled: {exc}") from exc
            slots[name] = blobs
        counts = {}
        for name, queue in rt.slots.items():
            if queue._consumed:
                counts[name] = len(queue._consumed)
                queue.held += len(queue._consumed)
        if len(consumed) == 1:
            jobs = [consumed[0].job]  # the item's hold on its job passes to the activation
        else:
            by_id = {}
            for entry in consumed:
                by_id.setdefault(id(entry.job), entry.job)
            jobs = sorted(by_id.values(), key=lambda j: j._seq)  # type: ignore[attr-defined]
            for job in jobs:
                job._refs += 1  # type: ignore[attr-defined]
            for entry in consumed:
                entry.job._refs -= 1  # type: ignore[attr-defined]
        blob = IMMEDIATE_BLOB if message is IMMEDIATE_MESSAGE else encode(message)
        act = _Act(next(self._act_ids), next(self._seq), rt, slots, counts, blob, jobs, time.monotonic())
        rt.ready.append(act)
        self.runnable.add(rt)

    def flush(self, instances: list[_Instance]) -> bool:
        """Deliver what batch and interval policies hold back; True if anything was."""
        delivered = False
        for inst in instances:
            for rt in inst.routines.values():
                flusher = getattr(rt.policy, "flush", None)
                if flusher is None:
                    continue
                while True:
                    for queue in rt.slots.values():
                        queue._consumed = []
                    try:
                        out = flusher(rt.slots)
                        if out is None:
                            break
                        consumed = [e for queue in rt.slots.values() for e in queue._consumed]
                        if not consumed:
                            break
                        self._make_activation(rt, out[0], out[1], consumed)
                    except Exception as exc:  # noqa: BLE001 - a user's policy: fail its jobs, not the dispatcher
                        self._policy_failed(rt, exc)
                        break
                    delivered = True
        if delivered:
            self._dispatch()
        return delivered

    # ------------------------------------------------------------------ dispatch

    def _free_proc(self, full: set[_Proc]) -> _Proc | None:
        """An idle process if any, else one that may take a prefetched activation."""
        best = None
        for proc in self.procs:
            if (proc is None or proc.exiting is not None or proc.hung is not None or proc.stopping
                    or proc.broken_pipe or proc in full or (proc.outbox and proc.inflight)):
                continue  # (a process with bytes waiting in its outbox is not reading now)
            n = len(proc.inflight)
            if n == 0 and proc.ready:
                return proc
            if n <= self.prefetch and (best is None or n < len(best.inflight)):
                best = proc
        return best

    def _pick(self) -> _RoutineRt | None:
        best = None
        blocked = None
        for rt in self.runnable:
            if rt.running >= rt.limit or not rt.ready:
                continue
            if rt.targets and rt.backpressured():
                if blocked is None or rt.ready[0].seq < blocked.ready[0].seq:
                    blocked = rt
                continue
            if best is None or rt.ready[0].seq < best.ready[0].seq:
                best = rt
        if best is None and self.inflight == 0:
            return blocked  # nothing runs that could drain the full slots: go anyway
        return best

    def _dispatch(self) -> None:
        if self.broken is not None:
            return
        full: set[_Proc] = set()
        while self.runnable:
            proc = self._free_proc(full)
            if proc is None:
                return
            rt = self._pick()
            if rt is None:
                return
            act = rt.ready.popleft()
            if not rt.ready:
                self.runnable.discard(rt)
            lead = act.lead_job()
            if lead is None:  # all its jobs ended elsewhere
                self._release(act)
                continue
            if not self._send(proc, act, lead):
                rt.ready.appendleft(act)
                self.runnable.add(rt)
                full.add(proc)

    def _send(self, proc: _Proc, act: _Act, lead: JobContext) -> bool:
        """Send ``act`` to ``proc``; False if it must wait for a process with room."""
        rt = act.rt
        inst = rt.inst
        payload = dumps(_Activation(
            act.act_id, inst.flow_key, inst.worker_id, inst.flow.flow_id, rt.rid, act.slots, act.message,
            lead.job_id, lead.metadata, lead.data, act.attempt,
        ))
        load = None if inst.flow_key in proc.loaded else self.ships[inst.flow_key][2]
        size = len(payload) + (len(load) if load else 0)
        if proc.inflight:
            # A busy worker reads its next message only after finishing the current
            # activation: never queue more than its pipe holds, or this write would
            # block the supervisor meanwhile.
            queued = sum(a.wire_size for a in itertools.islice(proc.inflight, 1, None))
            if queued + size > PIPE_SAFE_BYTES:
                return False
        try:
            # Never blocks: what the pipe has no room for waits in the process's outbox,
            # written by the dispatcher as the worker reads (a stopped worker hangs nothing).
            if load is not None:
                proc.queue(load)
                proc.loaded.add(inst.flow_key)
            proc.queue(payload)
        except OSError:  # the process is dying; its death is handled when the pidfd fires
            proc.broken_pipe = True
            rt.ready.appendleft(act)
            self.runnable.add(rt)
            return True
        if proc.outbox:
            self.want_write.add(proc)
            if threading.current_thread() is not self.thread:
                self.wake()
        act.wire_end = proc.sent
        act.wire_size = size
        act.proc = proc
        proc.inflight.append(act)
        if len(proc.inflight) == 1:
            self._start_act(act, time.monotonic())
        rt.running += 1
        self.inflight += 1
        if act.slot_counts:
            for name, n in act.slot_counts.items():
                rt.slots[name].held -= n
            act.slot_counts = {}
            if self.post_waiters:
                self.cond.notify_all()
        for job in act.jobs:
            if job.status == "pending":
                self.status_counts["pending"] -= 1
                self.status_counts["running"] += 1
                job.status = "running"
        return True

    # ------------------------------------------------------------------ public helpers (lock held)

    def ship(self, flow: Any) -> int:
        """Pickle ``flow`` once for the workers; return its key."""
        for key, (shipped, _, _) in self.ships.items():
            if shipped is flow:
                return key
        try:
            blob = cloudpickle.dumps(flow)
        except Exception as exc:
            raise SerializationError(
                f"flow {flow.flow_id!r} cannot be sent to worker processes: {type(exc).__name__}: {exc}. "
                "Routines, their logic and everything it refers to must be picklable by cloudpickle "
                "(no open files, locks, sockets or Runtime objects in routine attributes or closures)"
            ) from exc
        key = next(self._flow_keys)
        self.ships[key] = (flow, key, dumps(_LoadFlow(key, blob)))
        return key

    def new_job(self, job: JobContext) -> None:
        job._refs = 0  # type: ignore[attr-defined]
        job._seq = next(self._seq)  # type: ignore[attr-defined]
        self.jobs[job.job_id] = job
        self.status_counts["pending"] += 1
        self.active_jobs += 1

    def enqueue(self, rt: _RoutineRt, slot: str, job: JobContext, blob: bytes) -> None:
        job._refs += 1  # type: ignore[attr-defined]
        rt.slots[slot]._entries.append(_Entry(next(self._seq), job, blob))
        self.evaluate(rt)
        self._dispatch()

    def quiescent(self) -> bool:
        """Nothing runs, nothing is queued to run, nothing waits to be retried."""
        return self.inflight == 0 and not self.runnable and self.retrying == 0

    def instance_quiescent(self, inst: _Instance) -> bool:
        """Nothing of worker ``inst`` runs, is queued to run or waits to be retried."""
        if any(rt.running or rt.ready for rt in inst.routines.values()):
            return False
        return not any(kind == "retry" and payload.rt.inst is inst for _, _, kind, payload in self.timers)

    def flush_counts(self) -> None:
        if not self.count_deltas:
            return
        deltas = {wid: (p, f) for wid, (p, f) in self.count_deltas.items()}
        self.count_deltas.clear()
        self.pusher.push("add_job_counts", deltas)

    def local_meta(self, worker_id: str) -> dict | None:
        """Status and job counters of a worker, as this process knows them (exactly)."""
        inst = self.instances.get(worker_id)
        if inst is None:
            return None
        status = "failed" if self.broken is not None else ("stopped" if self.closed else "running")
        return {"flow_id": inst.flow.flow_id, "status": status, "jobs_processed": inst.jobs_processed,
                "jobs_failed": inst.jobs_failed}

    def check_usable(self) -> None:
        if self.broken is not None:
            cls, message = self.broken
            raise cls(message)
        if self.closed:
            raise RuntimeClosedError("this runtime was shut down; start a new Runtime to run more work")
        if self.client.lost is not None:  # found by a call; the dispatcher breaks the runtime next
            raise StateServerLostError(self.client.lost)

    # ------------------------------------------------------------------ shutdown

    def request_stop(self, grace: float) -> None:
        with self.lock:
            self.closed = True
            self.stop_grace = grace
            self.stop_requested = True
        self.wake()

    def _stop_everything(self) -> None:
        """Runs in the dispatcher thread: cancel, snapshot, stop workers, then the state server."""
        with self.lock:
            self.closed = True
            self.stop_requested = True
            for job in list(self.jobs.values()):
                if not job.done:
                    self._finish_job(job, "cancelled")
            for rt in self.runnable:
                rt.ready.clear()
            self.runnable.clear()
            for inst in self.instances.values():
                for rt in inst.routines.values():
                    for queue in rt.slots.values():
                        queue._entries.clear()
                        queue.held = 0
            self.timers.clear()
            callbacks = self.take_callbacks()
            self.cond.notify_all()
        for callback in callbacks:
            self._run_callback(callback)
        self._take_snapshot()
        self._stop_children()
        with self.lock:
            self.cond.notify_all()

    def _take_snapshot(self) -> None:
        if self.client.snapshot is not None:  # taken already (by shutdown() while this thread was stuck)
            return
        self.flush_counts()
        started = self.state_popen is not None
        if not started:
            # Stopped before the state server started: nothing was ever stored. Closing the
            # listener refuses the connections waiting in its backlog, so nobody waits for it.
            self._close_state_listener()
        self.pusher.close(self.state_timeout)
        final = "failed" if self.broken is not None else "stopped"
        self.client.freeze({wid: {"flow_id": inst.flow.flow_id, "status": final}
                            for wid, inst in self.instances.items()}, server_started=started)
