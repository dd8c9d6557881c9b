"""LocalProcessBackend: worker processes on this machine, fed through pipes.

::

    dispatcher thread                         worker process (``_child``)
    ┌─────────────────────────────┐  command pipe  ┌──────────────────────┐
    │ send() ─▶ Child.queue/outbox │──────────────▶│ ActivationRunner     │
    │ poll(): epoll over           │  result pipe   │  (+ watchdog thread, │
    │  results, stdout/stderr,     │◀──────────────│   group guard)       │
    │  pidfds, command pipes with  │ stdout/stderr  └──────────────────────┘
    │  an outbox, the wake pipe    │◀──────────────
    └─────────────────────────────┘   life pipe: EOF when this process dies

* Start: every worker is a fresh interpreter in its own session (see
  ``_process``), handed its command pipe, its result pipe and the read end of
  the life pipe; nothing waits for it to be ready. Once every lane is ready,
  one more process starts and waits as a spare (``_spare``): a lane whose
  worker died takes it, ready in milliseconds instead of a fresh start.
* Send: never blocks. A busy worker reads its next message only after it
  finished the activation it runs, so it is given at most ``PIPE_BUDGET``
  bytes of prefetch; what its pipe has no room for waits in its outbox,
  written as it reads. A ``_Batch`` is one frame: its activations count as
  taken together (the worker reads it whole) and finish one by one.
* Poll: one epoll selector over every result pipe, stdout/stderr pipe and
  pidfd (its death), the command pipes with bytes waiting, and a wake-up
  pipe; it never polls with sleeps. Deaths are reported after everything the
  process wrote before it died.
* Hangs: a worker that has not read its first activation off the pipe
  ``TAKE_TIMEOUT`` seconds after it went first is reported
  (:class:`~routilux_mp._exec.base.Stalled`); one that writes bytes that are
  not a frame of ours is reported (:class:`~routilux_mp._exec.base.Broken`).
* Kill: SIGTERM then SIGKILL after ``TERM_GRACE`` (or SIGKILL at once), always
  to the worker's whole process group.
* Stop: stop message, join, SIGTERM, SIGKILL, each to the group, forwarding
  output meanwhile.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait as wait_for
from typing import Any

from .. import _process
from .._logs import _Log
from .._messages import (
    STOP,
    ExitInfo,
    _Activation,
    _Batch,
    _Exiting,
    _Ready,
    _Result,
    _WorkerConfig,
    dumps,
    read_messages,
)
from ._deadlines import Deadlines, TakeCheck, TermGrace
from ._pipes import Child
from ._spare import Spare, start_worker
from .base import (
    Broken,
    Died,
    Exiting,
    Finished,
    Log,
    Output,
    Ready,
    Stalled,
    Usage,
    WakeUp,
    WorkerBackend,
    WorkerEvent,
    WorkerSettings,
)

logger = logging.getLogger("routilux_mp.runtime")

#: Seconds a worker gets after SIGTERM before SIGKILL (kills with a grace, and shutdown).
TERM_GRACE = 2.0
#: Seconds a worker may leave an activation unread on its command pipe before it counts as hung
#: (stopped, frozen, or stuck loading the flow). Generous, because loading a flow runs its imports
#: (a large library takes seconds).
TAKE_TIMEOUT = 60.0
#: Bytes of prefetch a busy worker may hold in its command pipe (Linux pipes hold 64 KiB).
PIPE_BUDGET = 48 * 1024
#: Keep a spare worker process started ahead (see ``_spare``), so a dead worker's lane is refilled in milliseconds.
SPARE_WORKER = True
#: How often exits are checked while stopping on a system without pidfds.
EXIT_CHECK_INTERVAL = 0.05


class LocalProcessBackend(WorkerBackend):
    """Worker processes on this machine (see the module docstring)."""

    fusion = batches = True  # (a _Batch is one frame; see ``send``)

    def __init__(self, slots: int, settings: WorkerSettings) -> None:
        #: Worker lanes, numbered 0 .. slots - 1.
        self.slots = slots
        #: What every worker is told at start (state address and key, limits, sys.path).
        self.settings = settings
        #: The worker in each slot (None: none now, e.g. between its death and its respawn).
        self._children: list[Child | None] = [None] * slots
        #: Guards the command-pipe side (outboxes, ``acts``, ``_want_write``, ``_deadlines``): send() runs
        #: in posting threads while poll() runs in the dispatcher.
        self._lock = threading.Lock()
        #: epoll over results, outputs, pidfds, command pipes waiting for room, the wake pipe (dispatcher only).
        self._selector = selectors.DefaultSelector()
        self._wakeup = WakeUp(self._selector)
        # Workers watch the read end; only this process holds the write end open,
        # so they see EOF the moment the supervisor dies, however it dies.
        self._life_r, self._life_w = os.pipe()
        #: Children with bytes in their outbox whose command pipe poll() must watch for room.
        self._want_write: set[Child] = set()
        #: Kill escalations and take checks, soonest first.
        self._deadlines = Deadlines()
        #: The thread that polls: a send() from any other thread wakes it when bytes wait in an outbox.
        self._poller: threading.Thread | None = None
        #: stop() began: nothing more is sent.
        self._stopping = False
        #: A worker process started ahead, waiting for its config: the next lane that needs one takes it.
        self._spare = Spare(self._life_r, enabled=SPARE_WORKER)

    # -- start ---------------------------------------------------------------------------------------

    def start(self) -> list[str | None]:
        """Start a worker in every slot (see :meth:`WorkerBackend.start`)."""
        return [self._spawn(slot) for slot in range(self.slots)]

    def respawn(self, slot: int) -> str | None:
        """Start a new worker in the empty ``slot``; why it failed, or ``None``."""
        if self._stopping or self._children[slot] is not None:
            return None
        return self._spawn(slot)

    def _spawn(self, slot: int) -> str | None:
        """Give ``slot`` a worker (the spare, or a new process) and queue its config; the error if none started."""
        started = self._spare.take()
        if started is None:
            try:
                started = start_worker(f"routilux-mp worker {slot}", self._life_r)
            except OSError as exc:
                return f"worker {slot}: could not start a process: {type(exc).__name__}: {exc}"
        popen, cmd_w, res_r = started.popen, started.commands, started.results
        child = Child(slot, popen, cmd_w, res_r, _process.open_pidfd(popen.pid))
        for fd in child.watch_output():
            self._selector.register(fd, selectors.EVENT_READ, (self._on_output, child))
        self._selector.register(res_r, selectors.EVENT_READ, (self._on_results, child))
        if child.pidfd is not None:
            self._selector.register(child.pidfd, selectors.EVENT_READ, (self._on_exit, child))
        s = self.settings
        config = _WorkerConfig(slot, os.getpid(), s.sys_path, s.state_address, s.authkey, s.state_timeout,
                               s.lock_timeout, s.max_rss, s.max_activations, s.log_levels)
        try:
            child.queue(dumps(config))  # a fresh pipe has room for it
        except OSError:
            child.pipe_broken = True
        with self._lock:
            self._children[slot] = child
        return None

    # -- send ----------------------------------------------------------------------------------------

    def send(self, slot: int, message: Any) -> bool:
        """Queue ``message`` on the worker's command pipe; False when it has no room (see the protocol)."""
        data = dumps(message)
        activations = 1 if type(message) is _Activation else len(message.acts) if type(message) is _Batch else 0
        wake = False
        with self._lock:
            child = self._children[slot]
            if (child is None or child.closed or child.pipe_broken or child.broken or child.killed is not None
                    or child.stopping or self._stopping):
                return False
            # Busy: it reads this only after the activation it runs, so it gets a bounded prefetch.
            if child.acts and (child.outbox or child.queued_bytes() + len(data) > PIPE_BUDGET):
                return False
            try:
                child.queue(data)
            except OSError:  # the worker is gone; its death shows on its pidfd
                child.pipe_broken = True
                return False
            if activations:  # (a batch is read whole: its bytes count with its first activation)
                child.acts.extend([(child.sent, len(data) + child.extra)] + [(child.sent, 0)] * (activations - 1))
                child.extra = 0
                # A poll waiting now computed its timeout without this check's deadline.
                wake = len(child.acts) == activations and self._went_first(child)
            else:
                child.extra += len(data)
            if child.outbox and child not in self._want_write:
                self._want_write.add(child)
                wake = True
            wake = wake and threading.current_thread() is not self._poller
        if wake:
            self.wake()
        return True

    def _went_first(self, child: Child) -> bool:
        """``child.acts[0]`` just went first: it must be taken within ``TAKE_TIMEOUT`` (lock held).

        Returns True when a new take check was scheduled.
        """
        child.first_since = time.monotonic()
        if child.take_armed:
            return False
        child.take_armed = True
        self._deadlines.push(child.first_since + TAKE_TIMEOUT, TakeCheck(child))
        return True

    # -- poll ----------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Make the dispatcher's ``poll`` return now (any thread)."""
        self._wakeup.wake()

    def poll(self, timeout: float | None) -> list[WorkerEvent]:
        """Wait for events (see :meth:`WorkerBackend.poll`); never longer than the next own deadline."""
        if self._poller is None:
            self._poller = threading.current_thread()
        if self._spare.due is not None and not self._stopping:
            # Here, not after the select: the events that made it due (a worker ready, a result) are
            # handled first, so no result waits for the spare's spawn.
            self._spare.start_if_due(self._children)
        due = self._deadlines.next_due()  # (only poll pops; a send that pushes an earlier one wakes this thread)
        if due is not None:
            wait = max(0.0, due - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        events: list[WorkerEvent] = []
        exits = []
        for key, _mask in self._selector.select(timeout):
            handler, child = key.data
            if handler == self._on_exit:  # after what every process wrote (deaths come last)
                exits.append(child)
            else:
                handler(child, key.fd, events)
        for child in exits:
            self._on_exit(child, child.pidfd, events)
        self._fire_deadlines(events)
        self._watch_writers()
        return events

    def _on_output(self, child: Child, fd: int, events: list[WorkerEvent]) -> None:
        """Forward what ``child`` wrote to stdout/stderr."""
        if child.pump(fd, events):
            self._unwatch(fd)
            child.close_output(fd)

    def _on_results(self, child: Child, _fd: int, events: list[WorkerEvent]) -> None:
        """Turn what ``child`` wrote on its result pipe into events; report bytes that are not ours."""
        if child.results_closed or child.closed:
            return
        if child.broken:  # out of step for good: drop what it still writes
            self._drain(child, events)
            return
        messages, corrupt = read_messages(child.reader)
        for message in messages:
            kind = type(message)
            if kind is _Result:
                self._finished(child, message)
                events.append(Finished(child.slot, message))
            elif kind is _Log:
                events.append(Log(child.slot, message.record))
            elif kind is _Ready:
                child.ready = True
                self._spare.want(self._children)
                events.append(Ready(child.slot, message.pid))
            elif kind is _Exiting:
                with self._lock:
                    child.acts.clear()
                events.append(Exiting(child.slot, message.reason))
            else:
                corrupt = f"an unexpected message ({kind.__name__})"
                break
        if corrupt is not None:
            child.broken = True
            events.append(Broken(child.slot, f"sent {corrupt} on its result pipe"))
            self._drain(child, events)
        elif child.reader.eof:
            self._results_closed(child, events)

    def _finished(self, child: Child, result: _Result) -> None:
        """``child`` sent a result: of its first activation (the next goes first), or of a fused run (``_fusion``)."""
        with self._lock:
            # A fused run is no activation sent; the next one goes first once the last fused run is over.
            child.fusing = result.fused is not None
            if child.acts:
                if not result.chain:
                    child.acts.popleft()
                if child.acts and not child.fusing:
                    self._went_first(child)

    def _drain(self, child: Child, events: list[WorkerEvent]) -> None:
        """Read and drop what ``child`` writes on its result pipe, until EOF."""
        while True:
            try:
                data = os.read(child.results, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._results_closed(child, events)
                return

    def _results_closed(self, child: Child, events: list[WorkerEvent]) -> None:
        """EOF on the result pipe: stop watching it; without a pidfd, that is how death shows."""
        child.results_closed = True
        self._unwatch(child.results)
        if child.pidfd is None:  # no pidfd on this system: EOF is how death shows
            self._on_exit(child, None, events)

    def _on_exit(self, child: Child, _fd: int | None, events: list[WorkerEvent]) -> None:
        """``child``'s process ended: report what it wrote, then its death."""
        if child.closed:
            return
        self._on_results(child, child.results, events)
        if child.closed:  # handled while reading (no pidfd)
            return
        _process.signal_group(child.pid, signal.SIGKILL)  # anything it started goes too
        try:
            code = child.popen.wait(TERM_GRACE)
        except subprocess.TimeoutExpired:
            return  # not dead after all; the pidfd will fire again
        for fd in list(child.outputs):
            child.pump(fd, events, final=True)
        self._release(child)
        events.append(Died(child.slot, ExitInfo.from_returncode(child.pid, code, "\n".join(child.stderr_tail))))

    def _release(self, child: Child) -> None:
        """Free ``child``'s slot and close its descriptors (unwatched first: fd numbers are reused)."""
        with self._lock:
            child.closed = True
            if self._children[child.slot] is child:
                self._children[child.slot] = None
            self._want_write.discard(child)
        for fd in child.fds():
            self._unwatch(fd)
        child.close()

    def _on_writable(self, child: Child, _fd: int, _events: list[WorkerEvent]) -> None:
        """The command pipe has room: write what waits in the outbox."""
        with self._lock:
            if child.closed:
                return
            try:
                child.flush()
            except OSError:  # the worker is gone; its death shows on its pidfd
                child.pipe_broken = True
                child.outbox.clear()
            if not child.outbox and child.writing:
                child.writing = False
                self._unwatch(child.commands)

    def _watch_writers(self) -> None:
        """Wait for room in the command pipes of children with bytes in their outbox."""
        if not self._want_write:  # (a send that adds one wakes this thread)
            return
        with self._lock:
            for child in self._want_write:
                if child.outbox and not child.writing and not child.closed:
                    self._selector.register(child.commands, selectors.EVENT_WRITE, (self._on_writable, child))
                    child.writing = True
            self._want_write.clear()

    def _unwatch(self, fd: int) -> None:
        """Stop waiting on ``fd`` (always before closing it: fd numbers are reused)."""
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    # -- deadlines -----------------------------------------------------------------------------------

    def _fire_deadlines(self, events: list[WorkerEvent]) -> None:
        """Escalate kills and check takes that are due."""
        now = time.monotonic()
        due = self._deadlines.next_due()
        if due is None or due > now:  # the common case, without the lock
            return
        while True:
            with self._lock:
                deadline = self._deadlines.pop_due(now)
            if deadline is None:
                return
            child = deadline.child
            if type(deadline) is TermGrace:
                if not child.closed and child.popen.poll() is None:
                    _process.signal_group(child.pid, signal.SIGKILL)
            else:
                self._check_taken(child, now, events)

    def _check_taken(self, child: Child, now: float, events: list[WorkerEvent]) -> None:
        """Report ``child`` as stalled if it has not taken its first activation ``TAKE_TIMEOUT`` after it went first."""
        with self._lock:
            child.take_armed = False
            if (child.closed or child.killed is not None or child.broken or child.stopping or child.stalled
                    or not child.acts or child.fusing):
                return
            due = child.first_since + TAKE_TIMEOUT
            if now < due:  # it went first later than the check was set: check it then
                child.take_armed = True
                self._deadlines.push(due, TakeCheck(child))
                return
            if child.taken(child.acts[0][0]):
                return
            child.stalled = True
        events.append(Stalled(child.slot, TAKE_TIMEOUT))

    # -- kill, usage ---------------------------------------------------------------------------------

    def kill(self, slot: int, reason: str, hard: bool) -> None:
        """Signal the worker's group: SIGKILL if ``hard``, else SIGTERM and SIGKILL ``TERM_GRACE`` later."""
        child = self._children[slot]
        if child is None or child.closed:
            return
        child.killed = child.killed or reason
        _process.signal_group(child.pid, signal.SIGKILL if hard else signal.SIGTERM)
        if not hard:
            with self._lock:
                self._deadlines.push(time.monotonic() + TERM_GRACE, TermGrace(child))

    def taken(self, slot: int) -> bool:
        """Whether the worker has read the activation it holds first off its command pipe."""
        with self._lock:
            child = self._children[slot]
            if child is None or not child.acts or child.fusing:
                return True
            return child.taken(child.acts[0][0])

    @property
    def pending_deadlines(self) -> int:
        """Kill escalations and take checks scheduled now (for tests)."""
        return len(self._deadlines)

    def pid(self, slot: int) -> int | None:
        """The worker's process id (any thread)."""
        child = self._children[slot]
        return None if child is None else child.pid

    @property
    def spare_pid(self) -> int | None:
        """The spare worker's process id, when one is started (for tests)."""
        started = self._spare.started
        return None if started is None else started.popen.pid

    def usage(self) -> list[Usage | None]:
        """Per slot: pid, RSS and CPU% (since the previous call) of its worker. Any thread."""
        return [None if child is None else child.usage() for child in list(self._children)]

    def rss(self, slot: int) -> int | None:
        """The worker's resident memory in bytes (``None``: no worker, or it just died). Any thread."""
        child = self._children[slot]
        return None if child is None else child.rss()

    # -- stop ----------------------------------------------------------------------------------------

    def stop(self, grace: float, output: Callable[[Output], None]) -> None:
        """Stop every worker, escalating (see :meth:`WorkerBackend.stop`); then release everything."""
        stop = dumps(STOP)
        with self._lock:
            self._stopping = True
            children = [c for c in self._children if c is not None]
            for child in children:
                child.stopping = True
                try:  # never blocks: a worker that does not read gets SIGTERM after the grace
                    child.queue(stop)
                    child.flush()
                except OSError:
                    pass
        self._spare.discard()
        _escalate(children, grace, output, self._unwatch)
        for child in children:
            _forward_last_output(child, output)
            self._release(child)
        self._selector.close()
        self._wakeup.close()
        _close_quietly(self._life_r, self._life_w)

    def abort(self) -> None:
        """SIGKILL every worker's group now and wait for them (any thread)."""
        self._spare.kill()
        _kill_and_reap([c for c in list(self._children) if c is not None])


def _forward_last_output(child: Child, output: Callable[[Output], None]) -> None:
    """Hand ``output`` what ``child`` wrote last (incomplete lines included): it is gone or stopping."""
    pieces: list[Output] = []
    for fd in list(child.outputs):
        child.pump(fd, pieces, final=True)
    for piece in pieces:
        output(piece)


def _close_quietly(*fds: int) -> None:
    """Close ``fds``, some of which may be closed already."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _escalate(children: list[Child], grace: float, output: Callable[[Output], None],
              unwatch: Callable[[int], None]) -> None:
    """Wait ``grace`` for ``children`` (asked to stop) to exit, then SIGTERM, then SIGKILL their groups."""
    deadline = time.monotonic() + grace
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        alive = [c for c in children if c.popen.poll() is None]
        if not alive:
            break
        if sig is not None:
            for child in alive:
                _process.signal_group(child.pid, sig)
            deadline = time.monotonic() + TERM_GRACE
        _wait_exit(alive, deadline, output, unwatch)
    _kill_and_reap(children)


def _kill_and_reap(children: list[Child]) -> None:
    """SIGKILL the groups of ``children`` (whatever they started goes too) and wait for each."""
    for child in children:
        _process.signal_group(child.pid, signal.SIGKILL)
    for child in children:
        try:
            child.popen.wait(TERM_GRACE)
        except subprocess.TimeoutExpired:
            logger.error("worker %d (pid %d) survived SIGKILL", child.slot, child.pid)


def _wait_exit(children: list[Child], deadline: float, output: Callable[[Output], None],
               unwatch: Callable[[int], None]) -> None:
    """Wait until ``children`` exit or ``deadline`` passes, forwarding their output meanwhile."""
    while True:
        alive = [c for c in children if c.popen.poll() is None]
        remaining = deadline - time.monotonic()
        if not alive or remaining <= 0:
            return
        fds: list[int] = []
        for child in alive:
            fds.extend(child.outputs)
            if child.pidfd is not None:
                fds.append(child.pidfd)
        if not any(c.pidfd is not None for c in alive):
            remaining = min(remaining, EXIT_CHECK_INTERVAL)  # no pidfd on this system: check exits often
        pieces: list[Output] = []
        for fd in wait_for(fds, remaining) if fds else []:
            for child in alive:
                if fd in child.outputs and child.pump(fd, pieces):
                    unwatch(fd)
                    child.close_output(fd)
        for piece in pieces:
            output(piece)
        if not fds:
            time.sleep(min(remaining, EXIT_CHECK_INTERVAL))
