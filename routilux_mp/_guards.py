"""What the supervisor does about processes and callbacks that hang or misbehave.

``Guards`` is a mixin of :class:`~routilux_mp._supervisor.Supervisor`, like
``ProcessPool``; its methods run in the dispatcher thread with the lock held,
except :meth:`Guards.join_or_kill`.

* Command pipes are written without ever blocking (``_Proc.queue``): what a
  pipe has no room for waits in the process's outbox, and the dispatcher
  writes it when the selector says the pipe has room. A worker that does not
  read (stopped, frozen) hangs nothing.
* A worker that has not read its activation off the pipe ``TAKE_TIMEOUT``
  seconds after it went first (stopped, frozen, stuck loading the flow) is
  killed and replaced; its activations, none of which started, are requeued.
  An activation that several processes in a row did not take
  (``max_crash_retries``) fails with ``WorkerCrashedError``.
* A worker that breaks the protocol (a result for an activation it does not
  hold first, bytes that are not a message) is killed; its running activation
  fails with ``WorkerCrashedError``, the others are requeued.
* Done-callbacks run guarded (:func:`run_callbacks`); if one blocks the
  dispatcher at shutdown, :meth:`Guards.join_or_kill` stops every process
  from the caller's thread.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from . import _context, _process
from ._ledger import _Act, _Proc
from ._messages import error_data
from ._pool import TERM_GRACE
from .errors import WorkerCrashedError

#: Seconds a worker may leave an activation unread on its command pipe before it counts as hung
#: (stopped, frozen, or stuck loading the flow): it is then killed and replaced, and the activation
#: requeued. Generous, because loading a flow runs its imports (a large library takes seconds).
TAKE_TIMEOUT = 60.0
#: Seconds a done-callback may keep the dispatcher from stopping before shutdown() kills every
#: process from its own thread.
CALLBACK_STOP_GRACE = 2.0

logger = logging.getLogger("routilux_mp.runtime")


def run_callbacks(callbacks: list[Callable[[], Any]]) -> None:
    """Run job done-callbacks: whatever one raises (``SystemExit`` too) is logged and stops nothing else.

    Only a ``KeyboardInterrupt`` in a user's thread (a real Ctrl-C there) is
    raised again, once every callback ran.
    """
    interrupt = None
    for callback in callbacks:
        try:
            callback()
        except KeyboardInterrupt as exc:
            if _context.on_dispatcher():
                logger.exception("a job done-callback raised KeyboardInterrupt; ignored")
            else:
                interrupt = exc
        except BaseException:
            logger.exception("a job done-callback raised; ignored (it fails nothing else)")
    if interrupt is not None:
        raise interrupt


class Guards:
    """Hang and protocol checks for the supervisor (a mixin: it uses the supervisor's ledger and timers)."""

    def _write_commands(self, proc: _Proc) -> None:
        """The command pipe has room: write what waits in the outbox."""
        try:
            proc.flush()
        except OSError:  # the worker is gone; its death shows on its pidfd
            proc.broken_pipe = True
            proc.outbox.clear()
        if not proc.outbox and proc.writing:
            self._unwatch(proc.commands)
            proc.writing = False

    def _watch_writers(self) -> None:
        """Wait for room in the command pipes of processes with bytes in their outbox (dispatcher only)."""
        for proc in self.want_write:
            if proc.outbox and not proc.writing and self.procs[proc.index] is proc:
                self._selector.register(proc.commands, selectors.EVENT_WRITE, ("commands", proc))
                proc.writing = True
        self.want_write.clear()

    def _watch_take(self, proc: _Proc) -> None:
        """Check, ``TAKE_TIMEOUT`` from now, that ``proc`` took the activation it was just given."""
        if not proc.take_timer:
            proc.take_timer = True
            self._add_timer(time.monotonic() + TAKE_TIMEOUT, "take", proc)

    def _check_taken(self, proc: _Proc) -> None:
        proc.take_timer = False
        if (self.procs[proc.index] is not proc or proc.hung is not None or proc.exiting is not None
                or proc.stopping or not proc.inflight):
            return
        act = proc.inflight[0]
        due = (act.started or 0.0) + TAKE_TIMEOUT
        if time.monotonic() < due:  # it went first later than the check was set: check it then
            proc.take_timer = True
            self._add_timer(due, "take", proc)
        elif not act.resolved and not proc.taken(act):
            self._stalled(proc, act)

    def _stalled(self, proc: _Proc, act: _Act) -> None:
        """``proc`` left ``act`` unread past ``TAKE_TIMEOUT``: kill it, requeue what it held."""
        where = f"worker {proc.index} (pid {proc.pid})"
        if not proc.ready:  # a start-up failure, not the activation's fault
            self._kill_worker(proc, f"{where} did not finish starting within {TAKE_TIMEOUT:g}s (TAKE_TIMEOUT)",
                              blame=False)
            return
        act.crashes += 1
        why = (f"{where} did not take its activation of routine {act.rt.rid!r} within {TAKE_TIMEOUT:g}s "
               "(TAKE_TIMEOUT): it was stopped (SIGSTOP), frozen, or stuck loading the flow (unpickling "
               "a flow runs the imports and __setstate__ of everything it refers to)")
        give_up = act.crashes >= self.max_crash_retries
        if give_up:
            why += (f"; {act.crashes} processes in a row did not take it: given up "
                    f"(max_crash_retries={self.max_crash_retries})")
        logger.warning("routilux-mp: %s; it was killed and replaced", why)
        self._kill_worker(proc, why, blame=give_up)

    def _protocol_broken(self, proc: _Proc, what: str) -> None:
        """``proc`` said something no worker loop says: kill it and fail what it was running."""
        why = (f"worker {proc.index} (pid {proc.pid}) {what}: its protocol with the supervisor is broken "
               "(did logic write to the worker's pipes, or fork a child that carried on as the worker?). "
               "It was killed and replaced; other jobs carry on")
        logger.error("routilux-mp: %s", why)
        if proc.inflight:
            proc.inflight[0].crashes += 1  # so a retry handler gives up on an activation that keeps doing it
        self._kill_worker(proc, why, blame=True)

    def _kill_worker(self, proc: _Proc, why: str, blame: bool) -> None:
        """SIGKILL ``proc``'s group now; fail its first activation if ``blame``, requeue the others."""
        if proc.hung is not None:
            return
        proc.hung = why
        if proc.ready:  # a planned death: replaced at once, not counted as a start failure
            proc.exiting = proc.exiting or "killed by the supervisor"
        _process.signal_group(proc.pid, signal.SIGKILL)
        acts = list(proc.inflight)
        proc.inflight.clear()
        if blame and acts and not acts[0].resolved:
            act = acts.pop(0)
            self.inflight -= 1
            act.rt.running -= 1
            act.rt.stats.errors += 1
            self._on_failure(act, error_data(WorkerCrashedError, why, traceback="\n".join(proc.stderr_tail),
                                         pid=proc.pid, process=proc.index, crashed=True))
        self._requeue(proc, acts)

    def _drain(self, proc: _Proc) -> None:
        """Read and drop what a killed process still writes on its result pipe, until EOF."""
        while True:
            try:
                data = os.read(proc.results, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                proc.results_closed = True
                self._unwatch(proc.results)
                if proc.pidfd is None:  # no pidfd on this system: EOF is how death shows
                    self._on_death(proc)
                return

    def join_or_kill(self, timeout: float) -> None:
        """Wait (not in the dispatcher) until the dispatcher stopped every process; if it cannot, kill them.

        The dispatcher gets ``timeout`` seconds, but only ``CALLBACK_STOP_GRACE``
        while one done-callback keeps it busy. Then this thread cancels the
        open jobs, takes the state snapshot and SIGKILLs every worker's group
        and the state server itself: ``shutdown()`` always returns, and stops
        every process, whatever a callback does.
        """
        started = time.monotonic()
        deadline = started + timeout
        while self.thread.is_alive():
            now = time.monotonic()
            since = self.callback_since
            if now >= deadline or (since is not None and now - since >= CALLBACK_STOP_GRACE):
                break
            until = deadline if since is None else min(deadline, since + CALLBACK_STOP_GRACE)
            self.thread.join(min(until - now, CALLBACK_STOP_GRACE))
        else:
            return
        stuck = self.callback_since is not None
        logger.error("routilux-mp: the dispatcher did not stop every process within %.3gs%s; killing them "
                     "from this thread", time.monotonic() - started, " (a job done-callback blocks it)" * stuck)
        if self.lock.acquire(timeout=TERM_GRACE):
            try:
                self.closed = self.stop_requested = True
                for job in list(self.jobs.values()):
                    if not job.done:
                        self._finish_job(job, "cancelled")  # its callbacks run if the dispatcher ever resumes
                if stuck:  # (otherwise the dispatcher is taking it, or the state server hangs)
                    self._take_snapshot()
                self.cond.notify_all()
            finally:
                self.lock.release()
        popens = [p.popen for p in list(self.procs) if p is not None]
        if self.state_popen is not None:
            popens.append(self.state_popen)
        for popen in popens:
            if popen.poll() is None:
                _process.signal_group(popen.pid, signal.SIGKILL)
        for popen in popens:
            try:
                popen.wait(TERM_GRACE)
            except subprocess.TimeoutExpired:
                logger.error("process %d survived SIGKILL", popen.pid)
        shutil.rmtree(self._tmpdir, ignore_errors=True)
