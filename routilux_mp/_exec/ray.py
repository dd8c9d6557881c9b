"""RayBackend: worker lanes on a Ray cluster, fed over authenticated sockets.

::

    supervisor (driver)                          any node of the cluster
    ┌──────────────────────────────┐  Ray call   ┌───────────────────────────┐
    │ start/respawn: nanny.run() ──┼────────────▶│ LaneNanny actor (_raylane) │
    │ poll(): epoll over           │  control    │  ├ output, usage, "exit"   │
    │  listener inbox, control     │◀───────────▶│  └ child process:          │
    │  connections, wires, wake    │  wire       │    worker loop (_raychild) │
    │                              │◀───────────▶│                            │
    └──────────────────────────────┘             └───────────────────────────┘

Ray places the lanes (one nanny actor each, ``num_cpus=1``, spread across
nodes), reports a nanny that dies or loses its node, and nothing else:
activations and results travel on the wire, a socket with the same frames as
a local worker's pipes (a Ray actor call per activation costs about 1 ms,
a frame on an open socket about 45 us). Both connections are made by the
nanny to a listener on this machine's cluster address and pass the HMAC
challenge of ``multiprocessing.connection`` with a random key before
anything is read from them.

* Died: the nanny's ``("exit", returncode)`` after the worker's last output
  (exact exit code or signal, like a local worker); or Ray's verdict on the
  nanny's call (its node lost, its actor killed): the exit is then unknown
  and the cause is Ray's. Either way after everything the worker sent.
* Kill: a request on the control connection, carried out by the nanny
  (SIGTERM, SIGKILL ``TERM_GRACE`` later; or SIGKILL); a nanny that does not
  carry it out in time is killed with ``ray.kill``.
* Respawn: a new ``run`` on the same nanny (about 0.1 s); a new nanny only
  when the old one is gone (Ray may place it on another node).
* Taken: a socket does not tell its writer what the peer read, so the
  worker says it took an activation (a small frame, or its result if it
  ends within ``TOOK_DELAY``); one not taken ``TAKE_TIMEOUT`` after it went
  first is reported (``Stalled``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

from .._messages import (
    STOP,
    ExitInfo,
    _Activation,
    dumps,
    frame,
)
from ._raylanes import Lane, Listener
from ._raysession import RaySession
from .base import (
    Died,
    Output,
    Stalled,
    Usage,
    WakeUp,
    WorkerBackend,
    WorkerEvent,
    WorkerSettings,
)
from .local import TAKE_TIMEOUT, TERM_GRACE

logger = logging.getLogger("routilux_mp.runtime")

#: Seconds to wait for Ray's verdict on a nanny whose control connection ended without the exit status.
LOST_GRACE = 15.0
#: Seconds a nanny has to carry out a kill before the supervisor kills the nanny itself.
KILL_GRACE = TERM_GRACE + 5.0
#: Seconds ``stop`` waits for Ray to confirm that every nanny is gone.
ACTOR_EXIT_TIMEOUT = 10.0


class RayBackend(WorkerBackend):
    """Worker lanes on a Ray cluster (see the module docstring)."""

    def __init__(self, slots: int, settings: WorkerSettings, *, session: RaySession) -> None:
        self.slots = slots
        self.settings = settings
        self.session = session
        self._ray = session.ray
        from ._raylane import LaneNanny

        self._nanny_class = self._ray.remote(LaneNanny).options(
            num_cpus=1, max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD")
        self._lanes: list[Lane | None] = [None] * slots
        #: Per slot, its nanny actor while it is usable for another run.
        self._actors: list[Any] = [None] * slots
        self._gens = [0] * slots
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wakeup = WakeUp(self._selector)
        #: What the listener thread and Ray's callbacks hand to poll().
        self._inbox: collections.deque[tuple] = collections.deque()
        self._want_write: set[Lane] = set()
        self._poller: threading.Thread | None = None
        self._stopping = False
        #: Where nannies connect to, with the key they must prove they hold.
        self._listener = Listener(session.node_ip(), self._push)

    def _push(self, item: tuple) -> None:
        """Hand ``item`` to poll() and wake it (any thread)."""
        self._inbox.append(item)
        self.wake()

    # -- start ---------------------------------------------------------------------------------------

    def start(self) -> list[str | None]:
        """Start a worker in every slot (see :meth:`WorkerBackend.start`)."""
        return [self._spawn(slot) for slot in range(self.slots)]

    def respawn(self, slot: int) -> str | None:
        """Start a new worker in the empty ``slot``; why it failed, or ``None``."""
        if self._stopping or self._lanes[slot] is not None:
            return None
        return self._spawn(slot)

    def _spawn(self, slot: int) -> str | None:
        """Ask the slot's nanny (a new one if it has none) to run a worker; the error if Ray refused."""
        self._gens[slot] += 1
        gen = self._gens[slot]
        try:
            actor = self._actors[slot]
            if actor is None:
                actor = self._actors[slot] = self._nanny_class.remote()
            ref = actor.run.remote(self._listener.address, self._listener.authkey, slot, gen)
        except Exception as exc:  # noqa: BLE001 - Ray may refuse in many ways (disconnected, shut down)
            self._actors[slot] = None
            return f"worker {slot}: Ray could not start its actor: {type(exc).__name__}: {exc}"
        lane = Lane(slot, gen, actor, ref)
        with self._lock:
            self._lanes[slot] = lane
        ref.future().add_done_callback(lambda future: self._push(("done", lane, future)))
        return None

    # -- send ----------------------------------------------------------------------------------------

    def send(self, slot: int, message: Any) -> bool:
        """Queue ``message`` on the worker's wire; False when it has no room (see the protocol)."""
        data = dumps(message)
        activation = type(message) is _Activation
        wake = False
        with self._lock:
            lane = self._lanes[slot]
            # Not connected yet: Ray may take long to place its nanny (or never, short of CPUs), so
            # activations wait for a lane that is there rather than in this one's outbox.
            if (lane is None or lane.wire is None or lane.closed or lane.broken or lane.killed is not None
                    or lane.stopping or self._stopping or lane.ctrl_eof or not lane.offer(data, activation)):
                return False
            if lane.outbox and lane.wire is not None and lane not in self._want_write:
                self._want_write.add(lane)
                wake = threading.current_thread() is not self._poller
        if wake:
            self.wake()
        return True

    # -- poll ----------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Make the dispatcher's ``poll`` return now (any thread)."""
        self._wakeup.wake()

    def poll(self, timeout: float | None) -> list[WorkerEvent]:
        """Wait for events (see :meth:`WorkerBackend.poll`); never longer than the next own deadline."""
        if self._poller is None:
            self._poller = threading.current_thread()
        due = [lane.deadline for lane in self._lanes if lane is not None and lane.deadline is not None]
        due += [lane.first_since + TAKE_TIMEOUT for lane in self._lanes
                if lane is not None and lane.acts and not lane.took and not lane.stalled]
        if due:
            wait = max(0.0, min(due) - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        if self._inbox:
            timeout = 0
        events: list[WorkerEvent] = []
        for key, mask in self._selector.select(timeout):
            handler, lane = key.data
            handler(lane, mask, events)
        while self._inbox:
            self._on_inbox(self._inbox.popleft(), events)
        self._fire_deadlines(events)
        self._watch_writers()
        return events

    def _on_inbox(self, item: tuple, events: list[WorkerEvent]) -> None:
        """A connection from a nanny, or a nanny's ``run`` call ended."""
        if item[0] == "done":
            self._run_done(item[1], item[2], events)
            return
        _, role, hello, conn = item
        lane = self._lanes[hello["slot"]] if 0 <= hello.get("slot", -1) < self.slots else None
        if lane is None or lane.gen != hello["gen"] or lane.closed:
            conn.close()  # an earlier run's, or one stopped meanwhile
            return
        lane.info = hello
        if role == "nanny":
            lane.ctrl = conn
            self._selector.register(conn.fileno(), selectors.EVENT_READ, (self._on_ctrl, lane))
            if lane.killed is not None:  # killed before it connected: pass it on
                self._send_ctrl(lane, ("kill", True))
            return
        with self._lock:
            if lane.attach_wire(conn, self.settings):
                self._want_write.add(lane)
        self._selector.register(conn.fileno(), selectors.EVENT_READ, (self._on_wire, lane))

    def _on_ctrl(self, lane: Lane, _mask: int, events: list[WorkerEvent]) -> None:
        """What the nanny says: output, usage, a start failure, the worker's exit."""
        ctrl = lane.ctrl
        assert ctrl is not None
        try:
            while ctrl.poll():
                message = ctrl.recv()
                kind = message[0]
                if kind == "out":
                    events.append(lane.output(message[1], message[2]))
                elif kind == "usage":
                    lane.rss, lane.cpu = message[1], message[2]
                elif kind == "exit":
                    self._died(lane, ExitInfo.from_returncode(lane.pid, message[1], "\n".join(lane.stderr_tail)),
                               events)
                    return
                elif kind == "failed":
                    self._died(lane, ExitInfo(None, None, None, message[1]), events)
                    return
        except (EOFError, OSError):
            self._ctrl_ended(lane)

    def _ctrl_ended(self, lane: Lane) -> None:
        """The control connection ended without the exit status: the nanny is dying; Ray's verdict follows."""
        if lane.ctrl_eof:
            return
        lane.ctrl_eof = True
        self._unwatch(lane.ctrl.fileno() if lane.ctrl is not None else None)
        lane.deadline = time.monotonic() + LOST_GRACE

    def _on_wire(self, lane: Lane, mask: int, events: list[WorkerEvent]) -> None:
        """The wire is readable (frames from the worker) or writable (room for the outbox)."""
        if mask & selectors.EVENT_WRITE:
            self._on_writable(lane)
        if mask & selectors.EVENT_READ:
            self._read_wire(lane, events)

    def _read_wire(self, lane: Lane, events: list[WorkerEvent]) -> None:
        """Turn what the worker wrote into events; stop reading at EOF or at bytes that are not ours."""
        if lane.reader is not None and not lane.closed and not lane.broken and lane.read(events, self._lock):
            self._unwatch(lane.wire)

    def _on_writable(self, lane: Lane) -> None:
        """The wire has room: write what waits in the outbox."""
        with self._lock:
            if lane.closed:
                return
            try:
                lane.flush()
            except OSError:  # the worker is gone; its death comes from its nanny
                lane.outbox.clear()
            if not lane.outbox and lane.writing:
                lane.writing = False
                self._selector.modify(lane.wire, selectors.EVENT_READ, (self._on_wire, lane))

    def _watch_writers(self) -> None:
        """Wait for room on the wires of lanes with bytes in their outbox."""
        if not self._want_write:
            return
        with self._lock:
            for lane in self._want_write:
                if lane.outbox and not lane.writing and not lane.closed and lane.wire is not None:
                    with contextlib.suppress(KeyError, ValueError):
                        self._selector.modify(lane.wire, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                              (self._on_wire, lane))
                        lane.writing = True
            self._want_write.clear()

    def _run_done(self, lane: Lane, future: Any, events: list[WorkerEvent]) -> None:
        """The nanny's ``run`` call ended: normally (the exit came on the control connection), or Ray lost it."""
        try:
            code = future.result()
        except Exception as exc:  # noqa: BLE001 - Ray's errors for a lost actor are many
            self._forget_actor(lane)
            if not lane.closed:
                text = str(exc).strip().splitlines()
                cause = f"its Ray actor was lost: {type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")
                self._died(lane, ExitInfo(lane.pid, None, None, cause, "\n".join(lane.stderr_tail)), events)
            return
        if not lane.closed:  # the nanny ended without saying how its worker did: its return value says it
            self._died(lane, ExitInfo.from_returncode(lane.pid, code, "\n".join(lane.stderr_tail)), events)

    def _died(self, lane: Lane, info: ExitInfo, events: list[WorkerEvent]) -> None:
        """The lane's worker is gone: report what it wrote, then its death; free the slot."""
        if lane.closed:
            return
        if lane.reader is not None and not lane.broken:
            self._read_wire(lane, events)
        with self._lock:
            lane.closed = True
            if self._lanes[lane.slot] is lane:
                self._lanes[lane.slot] = None
            self._want_write.discard(lane)
        self._close(lane)
        owner = (lane.info["node_id"], lane.pid) if lane.pid is not None and lane.info else None
        events.append(Died(lane.slot, info._replace(cause=info.cause + lane.where(), owner=owner)))

    def _close(self, lane: Lane) -> None:
        """Close both connections (unwatched first: fd numbers are reused)."""
        for conn in (lane.ctrl, lane.wire_conn):
            if conn is not None and not conn.closed:
                self._unwatch(conn.fileno())
                conn.close()

    def _unwatch(self, fd: int | None) -> None:
        """Stop waiting on ``fd`` (always before closing it)."""
        if fd is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def _fire_deadlines(self, events: list[WorkerEvent]) -> None:
        """Report stalls; give up on nannies that neither reported nor were reported lost, or ignored a kill."""
        now = time.monotonic()
        for lane in list(self._lanes):
            if (lane is not None and lane.acts and not lane.took and not lane.stalled and lane.killed is None
                    and not lane.stopping and now >= lane.first_since + TAKE_TIMEOUT):
                lane.stalled = True
                events.append(Stalled(lane.slot, TAKE_TIMEOUT))
            if lane is None or lane.deadline is None or lane.deadline > now or lane.closed:
                continue
            lane.deadline = None
            self._forget_actor(lane)
            if lane.ctrl_eof:
                self._died(lane, ExitInfo(lane.pid, None, None, "its Ray actor stopped answering and was killed",
                                          "\n".join(lane.stderr_tail)), events)
            else:  # a kill not carried out: ray.kill above ends the run; Ray's verdict follows
                lane.deadline = now + LOST_GRACE
                lane.ctrl_eof = True

    # -- kill, usage ---------------------------------------------------------------------------------

    def _forget_actor(self, lane: Lane) -> None:
        """Kill the lane's nanny (whatever state it is in) and never run on it again; its run's end follows."""
        if self._actors[lane.slot] is lane.actor:
            self._actors[lane.slot] = None
        with contextlib.suppress(Exception):  # gone already, or Ray shutting down
            self._ray.kill(lane.actor, no_restart=True)

    def _send_ctrl(self, lane: Lane, message: Any) -> None:
        """Tell the nanny something (a kill); a gone nanny shows through its run's end."""
        if lane.ctrl is None or lane.ctrl_eof:
            return
        try:
            lane.ctrl.send(message)
        except OSError:
            self._ctrl_ended(lane)

    def kill(self, slot: int, reason: str, hard: bool) -> None:
        """Have the nanny signal the worker's group (SIGKILL if ``hard``, else SIGTERM then SIGKILL)."""
        lane = self._lanes[slot]
        if lane is None or lane.closed:
            return
        lane.killed = lane.killed or reason
        if lane.ctrl is None:  # its nanny has not connected (Ray may still be placing it): no worker to lose
            self._forget_actor(lane)
            lane.deadline = time.monotonic() + LOST_GRACE
            lane.ctrl_eof = True
            return
        if lane.deadline is None:
            lane.deadline = time.monotonic() + KILL_GRACE
        self._send_ctrl(lane, ("kill", hard))

    def taken(self, slot: int) -> bool:
        """Whether the worker read the activation it holds first (it says so as it reads one)."""
        with self._lock:
            lane = self._lanes[slot]
            return lane is None or not lane.acts or lane.took > 0

    def pid(self, slot: int) -> int | None:
        """The worker's process id on its node (any thread)."""
        lane = self._lanes[slot]
        return None if lane is None else lane.pid

    def usage(self) -> list[Usage | None]:
        """Per slot: pid, RSS and CPU% (since the previous call) of its worker, from its nanny's reports."""
        now = time.monotonic()
        return [None if lane is None else lane.usage(now) for lane in list(self._lanes)]

    def rss(self, slot: int) -> int | None:
        """The worker's resident memory in bytes, from its nanny's latest report (any thread)."""
        lane = self._lanes[slot]
        return None if lane is None else lane.rss

    # -- stop ----------------------------------------------------------------------------------------

    def stop(self, grace: float, output: Callable[[Output], None]) -> None:
        """Stop every worker, escalating (see :meth:`WorkerBackend.stop`); then every nanny and the listener."""
        stop = frame(dumps(STOP))
        with self._lock:
            self._stopping = True
            lanes = [lane for lane in self._lanes if lane is not None]
            for lane in lanes:
                lane.stopping = True
                with contextlib.suppress(OSError):
                    lane.queue(stop)
                    lane.flush()
                if lane.outbox:
                    self._want_write.add(lane)
        for lane in lanes:
            if lane.ctrl is None:  # not started (Ray may never place it): nothing to wait for
                self.kill(lane.slot, "stop", True)
        deadline = time.monotonic() + grace
        for hard in (None, False, True):
            if hard is not None:
                for lane in self._lanes:
                    if lane is not None:
                        self.kill(lane.slot, "stop", hard)
                deadline = time.monotonic() + (TERM_GRACE if hard is False else KILL_GRACE)
            self._drain_until(deadline, output)
            if all(lane is None for lane in self._lanes):
                break
        self.abort()
        self._listener.close()
        while self._inbox:  # connections that arrived too late
            item = self._inbox.popleft()
            if item[0] == "conn":
                item[3].close()
        for lane in lanes:
            self._close(lane)
        self._selector.close()
        self._wakeup.close()
        self.session.close()

    def _drain_until(self, deadline: float, output: Callable[[Output], None]) -> None:
        """Poll until every lane is gone or ``deadline`` passes, passing output on and dropping other events."""
        while any(lane is not None for lane in self._lanes):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for event in self.poll(remaining):
                if type(event) is Output:
                    output(event)

    def abort(self) -> None:
        """Kill every nanny (and so its worker) now and wait until Ray confirms (any thread)."""
        refs = []
        actors = {id(a): a for a in self._actors if a is not None}
        actors.update({id(lane.actor): lane.actor for lane in list(self._lanes) if lane is not None})
        for lane in list(self._lanes):
            if lane is not None:
                refs.append(lane.ref)
        for actor in actors.values():
            with contextlib.suppress(Exception):
                self._ray.kill(actor, no_restart=True)
        self._actors = [None] * self.slots
        if refs:
            with contextlib.suppress(Exception):
                self._ray.wait(refs, num_returns=len(refs), timeout=ACTOR_EXIT_TIMEOUT)
