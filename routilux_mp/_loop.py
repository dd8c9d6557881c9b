"""The dispatcher thread: one loop, in named steps, over the backend's events and the timers.

:class:`DispatchLoop` owns the thread (CPython ``process.py``'s
``_ExecutorManagerThread``): it starts the workers, then each pass of
:meth:`DispatchLoop.run_once` waits in the backend's ``poll`` (results,
deaths, output, wake-ups) or for the next timer, forwards output, applies
events, checks the state server, fires timers by type, dispatches, and runs
done-callbacks. It never polls with sleeps. At the end it cancels what is
open, snapshots the state and stops the workers, then the state server;
:meth:`DispatchLoop.join_or_kill` kills them all from the caller's thread if
a done-callback keeps it from doing so.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _context
from ._dispatch import Dispatcher
from ._exec.base import Log, Output, WorkerBackend
from ._exec.local import TERM_GRACE
from ._ledger import Ledger
from ._lifecycle import Lifecycle, run_callbacks
from ._logs import replay
from ._messages import error_data
from ._routing import Router
from ._state.launcher import START_DELAY as STATE_START_DELAY
from ._state.launcher import STOP_TIMEOUT as STATE_STOP_TIMEOUT
from ._state.protocol import Method
from ._state.service import StateService
from ._timers import (
    ActivationDeadline,
    CheckMemory,
    FlushCounts,
    PolicyWakeup,
    RespawnDue,
    RetryDue,
    StartHoldOver,
    StartStateServer,
    Timers,
)
from .errors import RoutiluxError, RuntimeBrokenError, StateServerLostError
from .job import is_wake_up

logger = logging.getLogger("routilux_mp.runtime")

#: Longest delay before job counters reach the state server (where workers read them).
COUNTS_FLUSH_INTERVAL = 0.05
#: A post() waiting for room in a full slot queue is woken once 1/this of the queue is free.
ROOM_HYSTERESIS = 16
#: How often worker RSS is sampled when a hard memory limit is set.
MEMORY_SAMPLE_INTERVAL = 0.1
#: Seconds a done-callback may keep the dispatcher from stopping before shutdown() kills every
#: process from its own thread.
CALLBACK_STOP_GRACE = 2.0
#: Seconds after the first worker got ready at which the state server starts: its spawn holds the
#: dispatcher (and the GIL) for milliseconds, and its start-up takes CPU, that the first results need not
#: wait for. Logic that uses WorkerState waits for it anyway (a first activation that does waits this more).
STATE_START_GRACE = 0.02
#: Seconds Runtime() waits for the dispatcher to stop what it started when start-up failed.
START_FAILURE_JOIN = STATE_STOP_TIMEOUT + TERM_GRACE + 5


class DispatchLoop:
    """The dispatcher thread of one runtime (see the module docstring)."""

    def __init__(self, *, lock: threading.Lock, cond: threading.Condition, flags: Lifecycle,
                 clock: Callable[[], float], state: StateService, backend: WorkerBackend, ledger: Ledger,
                 processes: int, prefetch: int, kill_worker_rss: int | None, state_timeout: float,
                 output: Callable[[str, str], None]) -> None:
        #: The supervisor's lock (everything in the ledger is guarded by it) and its condition.
        self.lock = lock
        self.cond = cond
        #: closed / broken / stop requested.
        self.flags = flags
        #: Time for every timer here (injectable: the unit tests drive a fake clock).
        self.clock = clock
        #: The state server's process and this process's client of it.
        self.state = state
        #: The worker lanes; the loop waits in their ``poll``.
        self.backend = backend
        #: Jobs, activations, retries.
        self.ledger = ledger
        #: Retries, deadlines, policy wake-ups, respawns, periodic checks.
        self.timers = Timers(clock, self._timer_added)
        #: Policies and routing; placement of activations on worker lanes.
        self.router = Router(ledger, self.timers, processes, prefetch, fusion=backend.fusion)
        self.dispatcher = Dispatcher(self, backend, ledger, self.router, self.timers,
                                     prefetch=prefetch, kill_worker_rss=kill_worker_rss)
        #: Hard memory limit (bytes): sampled every ``MEMORY_SAMPLE_INTERVAL`` when set.
        self.kill_worker_rss = kill_worker_rss
        #: How long the final snapshot may take.
        self.state_timeout = state_timeout
        #: Where workers' output goes: ``fn(stream, text)``.
        self.output = output
        #: Threads waiting on the condition, by what they wait for. Each pass notifies only when what
        #: a waiter waits for may have happened (no ping-pong with a thread in wait_idle() per result):
        #: post() for room in a slot queue (or for the runtime to go quiet: then it raises);
        #: wait_idle() for every job to end (or quiet: it flushes); anyone else (a worker's jobs, test
        #: hooks) for any change.
        self.post_waiters = 0
        self.idle_waiters = 0
        self.watchers = 0
        #: When the done-callback running now on the dispatcher thread began (None: none runs).
        self.callback_since: float | None = None
        #: The dispatcher thread (None until started, and in unit tests that drive ``run_once`` themselves).
        self.thread: threading.Thread | None = None
        #: A flush of job counters to the state server is scheduled.
        self._counts_due = False
        #: The state server's start is scheduled: ``STATE_START_GRACE`` after the first worker got ready.
        self._state_start_scheduled = False
        self._timer_handlers: dict[type, Callable[[Any, float], None]] = {
            PolicyWakeup: lambda t, now: self.router.policy_wakeup(t.rt, now),
            RetryDue: lambda t, now: self.ledger.retry_due(t.act, self.flags.broken is not None),
            ActivationDeadline: self.dispatcher.deadline_due,
            RespawnDue: lambda t, now: self.dispatcher.respawn(t.slot),
            StartStateServer: lambda t, now: self._start_state_server(),
            StartHoldOver: lambda t, now: self.dispatcher.end_start_hold(),
            FlushCounts: self._counts_timer,
            CheckMemory: self._memory_timer,
        }

    # -- start ---------------------------------------------------------------------------------------

    def start(self, *, thread: bool = True) -> None:
        """Start the workers (and, on the dispatcher thread, everything else); raise if none could start.

        With ``thread=False`` (unit tests) nothing runs by itself: the caller
        drives the loop with :meth:`run_once`.
        """
        if not thread:
            with self.lock:
                self._start_up()
            return
        started = threading.Event()
        failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._main, args=(started, failure), name="routilux-mp dispatcher",
                                       daemon=True)
        self.thread.start()
        started.wait()
        if failure:
            self.thread.join(START_FAILURE_JOIN)
            raise failure[0]

    def _start_up(self) -> None:
        """Bind the state server's socket and start the workers; wait for none of them (lock held)."""
        self.state.open()
        errors = self.backend.start()
        self.dispatcher.started(errors)
        if all(errors):
            self.break_runtime(RuntimeBrokenError, f"no worker process could be started: {errors[-1]}. Check that "
                                                   f"{sys.executable} runs, and the limits on processes (ulimit -u) "
                                                   "and memory")
        now = self.clock()
        self.timers.add(StartStateServer(), now + STATE_START_DELAY)
        if self.kill_worker_rss is not None:
            self.timers.add(CheckMemory(), now + MEMORY_SAMPLE_INTERVAL)
        if self.flags.broken is not None:
            cls, message = self.flags.broken
            raise cls(message)

    def _main(self, started: threading.Event, failure: list[BaseException]) -> None:
        """The dispatcher thread: start up, loop until asked to stop, then stop everything."""
        _context.mark_dispatcher()
        try:
            with self.lock:
                self._start_up()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of Runtime()
            failure.append(exc)
            started.set()
            self._stop_processes()
            return
        started.set()
        try:
            while not self.flags.stop_requested:
                self.run_once()
        except BaseException:
            logger.exception("the routilux-mp dispatcher failed; stopping the runtime")
            with self.lock:
                self.break_runtime(RuntimeBrokenError, "the runtime's dispatcher thread failed (see the log above)")
        finally:
            self._stop_everything()

    # -- the loop ------------------------------------------------------------------------------------

    def run_once(self, timeout: float | None = None) -> None:
        """One pass of the dispatcher loop, in named steps (unit tests call it directly).

        Waits at most ``timeout`` seconds (``None``: until an event, a wake-up
        or the next timer).
        """
        events = self.backend.poll(self._wait_time(timeout))  # 1. wait for events, a wake-up or a timer
        self._forward_output(events)                          # 2. output first, unlocked: it precedes results
        with self.lock:
            self.dispatcher.handle(events)                    # 3. results, readiness, deaths, hangs
            self._check_state_server()                        # 4. a lost state server breaks the runtime
            self._fire_timers()                               # 5. retries, deadlines, policies, respawns
            self.dispatcher.dispatch()                        # 6. ready activations to free workers
            self._schedule_counts()                           # 7. job counters to the state server, soon
            if self.watchers or (self.post_waiters or self.idle_waiters) and self._waiters_due():
                self.cond.notify_all()
            callbacks = self.ledger.take_callbacks()
        self._run_callbacks(callbacks)                        # 8. done-callbacks, unlocked

    def _wait_time(self, timeout: float | None) -> float | None:
        """How long the next poll may wait: until the next timer, at most ``timeout``."""
        due = self.timers.next_due()  # (unlocked: a timer another thread adds later wakes the poll)
        if due is not None:
            wait = max(0.0, due - self.clock())
            timeout = wait if timeout is None else min(timeout, wait)
        return timeout

    def _waiters_due(self) -> bool:
        """Whether post() or wait_idle() waiters may go on: every job ended, nothing runs, or the end."""
        ledger = self.ledger
        return ledger.open_jobs == 0 or ledger.quiescent() or self.flags.stop_requested or self.flags.closed

    def _forward_output(self, events: list) -> None:
        """Hand workers' output to ``worker_output`` and their log records to logging (both precede results)."""
        for event in events:
            kind = type(event)
            if kind is Output:
                self.output(event.stream, event.text)
            elif kind is Log:
                try:
                    replay(event.record, event.slot, self.backend.pid(event.slot))
                except Exception:
                    logger.exception("routilux-mp: a logging handler failed on a record of worker %d", event.slot)

    def _check_state_server(self) -> None:
        """Restart a state server that died or hung (state in a file), or break the runtime: its state is lost."""
        why = self.state.check(self.flags.stop_requested)
        if why is not None:
            self.state_lost(why)

    def _fire_timers(self) -> None:
        """Run every timer that is due, dispatched by its type."""
        now = self.clock()
        due = self.timers.next_due()
        if due is None or due > now:
            return
        handlers = self._timer_handlers
        for timer in self.timers.pop_due(now):
            handlers[type(timer)](timer, now)

    def _schedule_counts(self) -> None:
        """Send job counters to the state server within ``COUNTS_FLUSH_INTERVAL`` (batched, never waited on)."""
        if self.ledger.count_deltas and not self._counts_due:
            self._counts_due = True
            self.timers.add(FlushCounts(), self.clock() + COUNTS_FLUSH_INTERVAL)

    def _counts_timer(self, _timer: FlushCounts, _now: float) -> None:
        """The counters' flush is due."""
        self._counts_due = False
        self._flush_counts()

    def _flush_counts(self) -> None:
        """Push the job counters collected so far to the state server."""
        if self.ledger.count_deltas:
            self.state.push(Method.ADD_JOB_COUNTS, self.ledger.take_counts())

    def _memory_timer(self, _timer: CheckMemory, now: float) -> None:
        """Sample the workers' RSS (hard memory limit), and again in ``MEMORY_SAMPLE_INTERVAL``."""
        self.dispatcher.check_memory()
        if not self.flags.stop_requested:
            self.timers.add(CheckMemory(), now + MEMORY_SAMPLE_INTERVAL)

    def _run_callbacks(self, callbacks: list[Callable[[], Any]]) -> None:
        """Run done-callbacks on the dispatcher, noting when each began (see ``join_or_kill``)."""
        for callback in callbacks:
            self.callback_since = time.monotonic()
            try:
                run_callbacks([callback])
            finally:
                self.callback_since = None

    def _timer_added(self) -> None:
        """A timer was added: wake the dispatcher if another thread added it (it may sleep past it)."""
        if self.thread is not None and threading.current_thread() is not self.thread:
            self.backend.wake()

    def wake(self) -> None:
        """Make the dispatcher run a pass now (any thread)."""
        self.backend.wake()

    # -- what the dispatcher's collaborators report (lock held) -------------------------------------

    def worker_ready(self) -> None:
        """A worker is ready: the state server starts ``STATE_START_GRACE`` after the first one was.

        At once (in this pass, before anything is dispatched) when logic runs on this thread: nothing could
        start it while logic waited for it.
        """
        if not self._state_start_scheduled:
            self._state_start_scheduled = True
            grace = 0.0 if self.backend.inline else STATE_START_GRACE
            self.timers.add(StartStateServer(), self.clock() + grace)

    def _start_state_server(self) -> None:
        """Start the state server, once (a worker got ready, or none did within the start delay)."""
        why = self.state.start_server()
        if why is not None:
            self.state_lost(why)

    def room_made(self, rt: Any) -> None:
        """An activation of ``rt`` left its slot queues: wake posts waiting for room, once there is enough.

        Enough = a slot queue with ``1/ROOM_HYSTERESIS`` of its length free: a poster woken for every
        item would post one and wait again (two context switches per item while a producer outruns the
        workers). Nothing waits for ever: a pass that finds nothing running wakes them too.
        """
        if self.post_waiters:
            for queue in rt.slots.values():
                if queue.pending <= queue.max_queue_length - max(1, queue.max_queue_length // ROOM_HYSTERESIS):
                    self.cond.notify_all()
                    return

    def push_state(self, method: Method, *args: Any) -> None:
        """Tell the state server something nobody waits for (in order, off this thread)."""
        self.state.push(method, *args)

    def state_lost(self, why: str) -> None:
        """The state server is gone or hung: every WorkerState is lost, and the runtime is broken."""
        if self.flags.broken is not None:
            return
        message = (
            f"{why}: all shared worker state is lost. Jobs in flight failed with StateServerLostError; "
            "this runtime accepts no more work: shut it down and start a new one"
        )
        self.state.mark_lost(message)
        logger.error("routilux-mp: %s", message)
        self.break_runtime(StateServerLostError, message)

    def break_runtime(self, cls: type[RoutiluxError], message: str) -> None:
        """The runtime cannot go on: fail every open job with ``cls``, refuse new work."""
        if self.flags.flag_broken(cls, message):
            self.ledger.end_all("failed", error_data(cls, message))
            self.cond.notify_all()

    def instance_quiescent(self, inst: Any) -> bool:
        """Nothing of worker ``inst`` runs, is queued to run or waits to be retried (lock held)."""
        if any(rt.running or rt.ready for rt in inst.routines.values()):
            return False
        return not any(type(t) is RetryDue and t.act.rt.inst is inst for t in self.timers.pending())

    # -- stop ----------------------------------------------------------------------------------------

    def request_stop(self, grace: float) -> None:
        """Ask the dispatcher to stop everything; running activations get ``grace`` seconds (any thread)."""
        with self.lock:
            self.flags.flag_stop(grace)
        self.wake()

    def _stop_everything(self) -> None:
        """Runs in the dispatcher thread: cancel, snapshot, stop workers, then the state server."""
        with self.lock:
            self.flags.flag_stop(self.flags.stop_grace)
            self.ledger.end_all("cancelled")
            self.timers.clear()
            callbacks = self.ledger.take_callbacks()
            self.cond.notify_all()
        self._run_callbacks(callbacks)
        self._finish_state()
        self._stop_processes()
        with self.lock:
            self.cond.notify_all()

    def _finish_state(self) -> None:
        """Send the last job counters and take the snapshot WorkerStates are read from after shutdown."""
        with self.lock:
            self._flush_counts()
            final = "failed" if self.flags.broken is not None else "stopped"
            metas = {wid: {"flow_id": inst.flow.flow_id, "status": final}
                     for wid, inst in self.ledger.instances.items()}
        self.state.finish(metas, self.state_timeout)

    def _stop_processes(self) -> None:
        """Stop the workers (forwarding their last output), then the state server."""
        self.backend.stop(self.flags.stop_grace, lambda piece: self.output(piece.stream, piece.text))
        self.state.stop()

    def close(self) -> None:
        """Stop everything from this thread (unit tests that drive ``run_once`` themselves)."""
        assert self.thread is None, "a runtime with a dispatcher thread stops with request_stop()"
        self._stop_everything()

    def join_or_kill(self, timeout: float) -> None:
        """Wait (not in the dispatcher) until the dispatcher stopped every process; if it cannot, kill them.

        The dispatcher gets ``timeout`` seconds, but only ``CALLBACK_STOP_GRACE``
        while one done-callback keeps it busy. Then this thread cancels the
        open jobs, takes the state snapshot and SIGKILLs every worker's group
        and the state server itself: ``shutdown()`` always returns, and stops
        every process, whatever a callback does.
        """
        thread = self.thread
        assert thread is not None
        started = time.monotonic()
        deadline = started + timeout
        while thread.is_alive():
            now = time.monotonic()
            since = self.callback_since
            if now >= deadline or (since is not None and now - since >= CALLBACK_STOP_GRACE):
                break
            until = deadline if since is None else min(deadline, since + CALLBACK_STOP_GRACE)
            thread.join(min(until - now, CALLBACK_STOP_GRACE))
        else:
            return
        stuck = self.callback_since is not None
        logger.error("routilux-mp: the dispatcher did not stop every process within %.3gs%s; killing them "
                     "from this thread", time.monotonic() - started, " (a job done-callback blocks it)" * stuck)
        if self.lock.acquire(timeout=TERM_GRACE):
            wake_ups = []
            try:
                self.flags.flag_stop(self.flags.stop_grace)
                self.ledger.end_all("cancelled")  # callbacks run if the dispatcher ever resumes
                self.cond.notify_all()
                wake_ups = [callback for callback in self.ledger.callbacks if is_wake_up(callback)]
            finally:
                self.lock.release()
            run_callbacks(wake_ups)  # job.wait() returns now (twice set if the dispatcher resumes: harmless)
            if stuck:  # (otherwise the dispatcher is taking it, or the state server hangs)
                self._finish_state()
        self.backend.abort()
        self.state.kill()

