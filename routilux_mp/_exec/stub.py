"""StubBackend: worker lanes in the calling thread, for unit tests of the dispatcher.

Like dramatiq's stub broker: the real thing minus the processes. Each lane
runs the real :class:`~routilux_mp._worker.ActivationRunner` (the code a worker
process runs) inside :meth:`StubBackend.poll`, in the caller's thread, one
message after another: deterministic, no process, no pipe. ``poll(0)`` never
waits (unit tests drive the loop pass by pass); with a longer timeout it
waits for a send or a wake-up, so a dispatcher thread can run over it too.
Messages and results go through a pickle round trip, as on the wire.
:class:`StubState` stands in for the state server's launcher: WorkerState
calls are served in this process by a real ``StateStore``.

Test controls (all deterministic; the event shows at the next ``poll``):

* ``hold(slot)`` / ``release(slot, count=None)``: the lane's worker is busy
  with the first activation it holds (it has taken it) until released (to
  run ``count`` activations, then be busy with the next: the middle of a
  batch);
* ``crash(slot, signal=..., exitcode=...)``: its worker dies now;
  ``recycle_after(slot, count)``: it exits on purpose after ``count`` more
  activations (``max_activations_per_process``);
* ``stall(slot)`` / ``corrupt(slot, what)``: it is reported stalled, or as
  having broken the protocol (what the local backend reports);
  ``loading(slot)``: it has not taken its first activation yet;
* ``spawn_error``: why new lanes fail to start, while it is set;
* ``rss[slot] = bytes``: what :meth:`StubBackend.rss` says;
* ``capacity``: activations a busy lane holds before ``send`` says it has no room
  (an idle lane takes a batch of any size, as a worker process does).
"""

from __future__ import annotations

import collections
import itertools
import signal
import threading
from collections.abc import Callable
from typing import Any

from .._messages import ExitInfo, _Activation, _Batch, dumps, loads
from .._state.backend import MemoryBackend
from .._state.client import StoreClient
from .._state.protocol import Method
from .._state.store import StateStore
from .._worker import ActivationRunner
from ..errors import StateServerLostError
from . import base
from .base import Usage, WorkerBackend, WorkerEvent, WorkerSettings

#: Where StubState's stores are found by address (as workers find the state server by its socket).
_STORES: dict[str, Any] = {}
_addresses = itertools.count(1)


class _Lane:
    """One stub worker: its runner and the messages it holds, in order."""

    __slots__ = ("budget", "held", "inbox", "pid", "runner", "stalled")

    def __init__(self, pid: int, runner: ActivationRunner) -> None:
        self.pid = pid
        self.runner = runner
        self.inbox: collections.deque[Any] = collections.deque()
        #: Busy with its first activation until released (it has taken it); or stalled (it has not).
        self.held = False
        self.stalled = False
        #: Activations it may still run before it is held again (``release(slot, count)``); None: no limit.
        self.budget: int | None = None


class StubBackend(WorkerBackend):
    """In-thread worker lanes running the real activation code (see the module docstring)."""

    fusion = batches = True

    def __init__(self, slots: int, settings: WorkerSettings, *, capacity: int = 2) -> None:
        #: Worker lanes, numbered 0 .. slots - 1.
        self.slots = slots
        #: What a worker is told at start: its state client comes from the StubState at ``state_address``.
        self.settings = settings
        #: Activations a lane may hold (running or prefetched) before :meth:`send` returns False.
        self.capacity = capacity
        #: RSS per slot, as :meth:`rss` and :meth:`usage` report it (bytes).
        self.rss_by_slot: dict[int, int] = {}
        #: Every message accepted by :meth:`send`, as ``(slot, message)`` (a batch's activations one by one),
        #: and as sent (``frames``: a batch whole); every :meth:`kill` as ``(slot, reason, hard)``; how often
        #: :meth:`wake` was called.
        self.sent: list[tuple[int, Any]] = []
        self.frames: list[tuple[int, Any]] = []
        self.kills: list[tuple[int, str, bool]] = []
        self.wakes = 0
        #: Set by a test to make :meth:`respawn` fail with this reason (until it is set back to None).
        self.spawn_error: str | None = None
        #: The lane in each slot (None: none now); events to report at the next poll; fake pids.
        self._lanes: list[_Lane | None] = [None] * slots
        self._events: list[WorkerEvent] = []
        self._pids = itertools.count(1_000_001)  # never a real process of ours
        #: stop() was called: nothing more is accepted.
        self._stopped = False
        #: Guards the lanes and events (a dispatcher thread may poll while posting threads send);
        #: notified when there is something to poll.
        self._cond = threading.Condition()
        #: wake() was called since the last poll.
        self._woken = False

    # -- the protocol ---------------------------------------------------------------------------------

    def start(self) -> list[str | None]:
        """Start a lane in every slot; each reports Ready at the first poll."""
        return [self._spawn(slot) for slot in range(self.slots)]

    def respawn(self, slot: int) -> str | None:
        """Start a new lane in the empty ``slot`` (or fail with ``spawn_error``)."""
        if self.spawn_error is not None:
            return self.spawn_error
        return self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        """Make the lane of ``slot``; its Ready event shows at the next poll."""
        store = _STORES.get(self.settings.state_address)
        client = store.client if store is not None else StoreClient(
            self.settings.state_address, self.settings.authkey, self.settings.state_timeout,
            self.settings.lock_timeout)
        lane = _Lane(next(self._pids), ActivationRunner(client, max_rss=None,
                                                         max_activations=self.settings.max_activations))
        self._report(slot, lane, base.Ready(slot, lane.pid))

    def send(self, slot: int, message: Any) -> bool:
        """Queue ``message`` on the lane (after a pickle round trip); False when the lane holds activations and
        would hold more than ``capacity`` (as the local backend, a lane holding none takes a batch of any size)."""
        message = loads(dumps(message))
        kind = type(message)
        messages = message.acts if kind is _Batch else (message,)
        with self._cond:
            lane = self._lanes[slot]
            if lane is None or self._stopped:
                return False
            held = sum(type(m) is _Activation for m in lane.inbox)
            if kind in (_Activation, _Batch) and held and held + len(messages) > self.capacity:
                return False
            lane.inbox.extend(messages)
            self.frames.append((slot, message))
            self.sent.extend((slot, each) for each in messages)
            self._cond.notify_all()
        return True

    def poll(self, timeout: float | None) -> list[WorkerEvent]:
        """Run what every lane that is not held holds, and return what happened.

        Waits up to ``timeout`` (``None``: until a send or wake-up) only when
        there is nothing to report or run; ``poll(0)`` never waits.
        """
        with self._cond:
            if timeout != 0 and not self._woken and self.idle():
                self._cond.wait(timeout)
            self._woken = False
            events, self._events = self._events, []
            lanes = [(slot, lane) for slot, lane in enumerate(self._lanes) if lane is not None and not lane.held]
        for slot, lane in lanes:
            self._run(slot, lane, events)
        return events

    def _run(self, slot: int, lane: _Lane, events: list[WorkerEvent]) -> None:
        """Hand every message the lane holds to its runner, in order (the runner runs unlocked)."""
        def reply(result: Any) -> None:
            """The result, as the supervisor would read it off the wire."""
            events.append(base.Finished(slot, loads(dumps(result))))

        while True:
            with self._cond:
                if self._lanes[slot] is not lane or lane.held or not lane.inbox:
                    return
                if lane.budget == 0 and type(lane.inbox[0]) is _Activation:  # busy with it until released
                    lane.held, lane.budget = True, None
                    return
                message = lane.inbox.popleft()
                if lane.budget is not None and type(message) is _Activation:
                    lane.budget -= 1
            reason = lane.runner.step(message, reply)
            if reason is not None:  # recycled: it exits, having run nothing it held after this
                with self._cond:
                    if self._lanes[slot] is lane:
                        self._lanes[slot] = None
                events.append(base.Exiting(slot, reason))
                events.append(base.Died(slot, ExitInfo.from_returncode(lane.pid, 0)))
                return

    def wake(self) -> None:
        """Make a waiting ``poll`` return (any thread)."""
        with self._cond:
            self.wakes += 1
            self._woken = True
            self._cond.notify_all()

    def kill(self, slot: int, reason: str, hard: bool) -> None:
        """Kill the lane now: it dies by SIGKILL (``hard``) or SIGTERM; nothing it holds runs."""
        self.kills.append((slot, reason, hard))
        self._die(slot, -(signal.SIGKILL if hard else signal.SIGTERM))

    def taken(self, slot: int) -> bool:
        """A stub lane takes what it holds at once, but a stalled one takes nothing."""
        lane = self._lanes[slot]
        return lane is None or not lane.stalled

    def pid(self, slot: int) -> int | None:
        """The lane's (fake) pid."""
        lane = self._lanes[slot]
        return None if lane is None else lane.pid

    def usage(self) -> list[Usage | None]:
        """Per slot: the fake pid, ``rss_by_slot`` and no CPU."""
        return [None if lane is None else Usage(lane.pid, self.rss_by_slot.get(slot, 0), 0.0)
                for slot, lane in enumerate(self._lanes)]

    def rss(self, slot: int) -> int | None:
        """What the test set in ``rss_by_slot`` (``None`` when the slot is empty)."""
        return None if self._lanes[slot] is None else self.rss_by_slot.get(slot, 0)

    def stop(self, grace: float, output: Callable[[base.Output], None]) -> None:
        """Drop every lane (what they hold never runs)."""
        with self._cond:
            self._stopped = True
            self._lanes = [None] * self.slots
            self._cond.notify_all()

    def abort(self) -> None:
        """Drop every lane."""
        self.stop(0.0, lambda piece: None)

    # -- test controls (any thread) --------------------------------------------------------------------

    def _lane(self, slot: int) -> _Lane:
        """The lane in ``slot`` (a test control on an empty slot is a mistake in the test)."""
        lane = self._lanes[slot]
        assert lane is not None, f"no lane in slot {slot}"
        return lane

    def _report(self, slot: int, lane: _Lane | None, event: WorkerEvent) -> None:
        """Put ``lane`` in ``slot`` (``None``: empty it) and report ``event`` at the next poll."""
        with self._cond:
            self._lanes[slot] = lane
            self._events.append(event)
            self._cond.notify_all()

    def hold(self, slot: int) -> None:
        """The lane's worker is busy with its first activation (taken) until :meth:`release`."""
        with self._cond:
            self._lane(slot).held = True

    def release(self, slot: int, count: int | None = None) -> None:
        """Let a held lane run what it holds at the next poll (only ``count`` activations: then it is
        busy with the next one, taken, until released again)."""
        with self._cond:
            lane = self._lanes[slot]
            if lane is not None:
                lane.held = False
                lane.budget = count
            self._cond.notify_all()

    def recycle_after(self, slot: int, count: int) -> None:
        """The lane's worker recycles (as past ``max_activations_per_process``) after ``count`` more activations."""
        with self._cond:
            runner = self._lane(slot).runner
            runner.max_activations = runner.activations + count

    def loading(self, slot: int, still: bool = True) -> None:
        """The lane has not taken its first activation yet (still loading the flow), or has now."""
        with self._cond:
            self._lane(slot).stalled = still

    def idle(self) -> bool:
        """Nothing to report and nothing to run: another poll would change nothing."""
        return not self._events and all(lane is None or lane.held or not lane.inbox for lane in self._lanes)

    def holding(self, slot: int) -> list[Any]:
        """The messages the lane in ``slot`` holds, in order."""
        with self._cond:
            lane = self._lanes[slot]
            return [] if lane is None else list(lane.inbox)

    def crash(self, slot: int, *, sig: int | None = signal.SIGKILL, exitcode: int = 1, stderr: str = "") -> None:
        """The lane's worker dies now, killed by ``sig`` (or exiting with ``exitcode`` when ``sig`` is None)."""
        self._die(slot, -sig if sig is not None else exitcode, stderr)

    def stall(self, slot: int, seconds: float = 60.0) -> None:
        """Report the lane stalled (it did not take its first activation in ``seconds``)."""
        with self._cond:
            lane = self._lane(slot)
            lane.held = lane.stalled = True
        self._report(slot, lane, base.Stalled(slot, seconds))

    def corrupt(self, slot: int, what: str) -> None:
        """Report that the lane's worker broke the protocol (``what`` it did)."""
        self._report(slot, self._lane(slot), base.Broken(slot, what))

    def _die(self, slot: int, returncode: int, stderr: str = "") -> None:
        """The lane is gone: its Died event shows at the next poll."""
        with self._cond:
            lane = self._lanes[slot]
            if lane is None:
                return
            self._report(slot, None, base.Died(slot, ExitInfo.from_returncode(lane.pid, returncode, stderr)))


class _InProcessClient(StoreClient):
    """A state client whose calls run on a ``StateStore`` in this process (no server, no socket)."""

    def __init__(self, store: Any, timeout: float, lock_timeout: float) -> None:
        super().__init__("<in-process>", b"", timeout, lock_timeout)
        self._store = store

    def call(self, method: Method, *args: Any, patience: float = 0.0) -> Any:
        """Run ``method(*args)`` on the store, raising what it raised (as the real client does)."""
        if self.lost is not None:
            raise StateServerLostError(self.lost)
        return getattr(self._store, Method(method).value)(*args)


class StubState:
    """The state server's launcher for unit tests: an in-process store, no process (same methods)."""

    def __init__(self, *, max_state_bytes: int, strict: bool, state_timeout: float, lock_timeout: float,
                 local_meta: Callable[[str], dict | None], on_lost: Callable[[], None],
                 state_path: str | None = None, **_options: Any) -> None:
        if state_path is not None:
            raise ValueError("the stub state keeps state in memory only: give no state_path")
        #: The address stub lanes find this store by, and a key nobody checks.
        self.address = f"stub-state-{next(_addresses)}"
        self.authkey = b""
        self.socket_dir = ""
        self.pid: int | None = None
        #: Nothing was stored before (no state file).
        self.state_path: str | None = None
        self.stored_workers: dict[str, str] = {}
        self.stored_counts: dict[str, tuple[int, int]] = {}
        #: The store every WorkerState of the runtime (supervisor and stub lanes) calls.
        self.store = StateStore(MemoryBackend(), max_state_bytes, strict, lock_timeout)
        self.client = _InProcessClient(self.store, state_timeout, lock_timeout)
        self.client.local_meta = local_meta
        self.client.on_lost = on_lost
        #: Set by a test (:meth:`lose`) to simulate the server's death.
        self._died: str | None = None
        _STORES[self.address] = self

    @property
    def lost(self) -> str | None:
        """Why the store is lost, if a test said so."""
        return self.client.lost

    def open(self) -> None:
        """Nothing to bind."""

    def start_server(self) -> str | None:
        """Nothing to start."""
        return None

    def check(self, stopping: bool) -> str | None:
        """Why the (simulated) server's state is lost, if a test made it die (never while stopping)."""
        if stopping:
            return None
        return self._died if self._died is not None else self.client.lost

    def lose(self, why: str) -> None:
        """Simulate the server's death (the dispatcher notices at its next pass)."""
        self._died = why

    def push(self, method: Method, *args: Any) -> None:
        """Run ``method(*args)`` on the store now (dropped once the store is lost, as the real pusher does)."""
        if self.client.lost is None:
            self.client.call(method, *args)

    def mark_lost(self, message: str) -> None:
        """Every call fails from now on."""
        self.client.mark_lost(message)

    def finish(self, metas: dict[str, dict], timeout: float) -> None:
        """Take the final snapshot."""
        self.client.freeze(metas, server_started=True)

    def stop(self) -> None:
        """Forget the store's address."""
        _STORES.pop(self.address, None)

    def kill(self) -> None:
        """Forget the store's address."""
        self.stop()
