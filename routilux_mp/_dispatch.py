"""Which activation runs on which worker, and what the workers' events mean for the ledger.

The :class:`Dispatcher` keeps one :class:`WorkerSlot` per worker lane of the
:class:`~routilux_mp._exec.base.WorkerBackend`: the activations the lane holds,
in the order it runs them. It hands ready activations to free lanes
(:meth:`Dispatcher.dispatch`) and turns backend events into ledger changes
(:meth:`Dispatcher.handle`). Everything runs with the supervisor's lock held.

The ledger entry of an activation (which lane holds it, for which jobs, which
attempt) is written before anything else can see its result. A lane runs what
it holds in order, so when its worker dies the first activation still held is
the one it was running: that one fails with ``WorkerCrashedError``; the
others, never started, go back to their queues.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable
from typing import Any, Protocol

from ._batching import batch_for, book, lane_for, take_batch
from ._drain import drop_ready
from ._exec.base import Broken, Died, Exiting, Finished, Ready, Stalled, WorkerBackend
from ._fusion import book_fused_run, unexpected_result
from ._ledger import Ledger, Retry
from ._lifecycle import Lifecycle
from ._messages import ExitInfo, _Activation, _Batch, _LoadFlow, _Result, dumps_by_value, error_data, type_name
from ._records import _Act, _RoutineRt
from ._routing import Router
from ._state.protocol import Method
from ._timers import ActivationDeadline, RespawnDue, RetryDue, StartHoldOver, Timers
from .errors import (
    ActivationTimeoutError,
    RoutiluxError,
    RuntimeBrokenError,
    SerializationError,
    StateServerLostError,
    WorkerCrashedError,
    WorkerMemoryError,
)
from .job import JobContext

logger = logging.getLogger("routilux_mp.runtime")

#: Consecutive start-up failures of worker processes before the runtime gives up.
MAX_START_FAILURES = 5
#: Longest pause between respawns of a worker that keeps dying at start-up.
MAX_RESPAWN_DELAY = 5.0
#: Most activations of a one-at-a-time routine its lane holds (running + queued in its pipe; see
#: ``_batching.pace``).
MAX_DEPTH = 8
#: Seconds after the pool started during which activations wait for the first ready worker instead of
#: going to one still starting: the first result comes from whichever worker is ready first (workers
#: start in 80-300 ms). After it, a worker that never gets ready is sent work, so its take check
#: (``TAKE_TIMEOUT``) notices it.
START_HOLD = 2.0
#: Seconds after which a running activation gets nothing sent ahead behind it (see ``_free_slot``).
PREFETCH_MAX_AGE = 0.05
#: The type name a result's error carries when the state server was lost under a worker.
_STATE_LOST = type_name(StateServerLostError)


class Owner(Protocol):
    """What the dispatcher reports to: the dispatcher thread's loop (``_loop.DispatchLoop``)."""

    flags: Lifecycle

    def worker_ready(self) -> None:
        """A worker is ready: the state server may start."""

    def room_made(self, rt: _RoutineRt) -> None:
        """An activation of ``rt`` left its slot queues: posts waiting for room may go on."""

    def push_state(self, method: Method, *args: Any) -> None:
        """Tell the state server something nobody waits for."""

    def state_lost(self, why: str) -> None:
        """The state server is gone: break the runtime."""

    def break_runtime(self, cls: type[RoutiluxError], message: str) -> None:
        """The runtime cannot go on: fail every open job with ``cls``."""


class WorkerSlot:
    """One worker lane as the supervisor sees it: what it holds, in the order it runs them."""

    __slots__ = ("activations", "alive", "blame", "exiting", "hung", "index", "inflight", "loaded", "pid", "ready",
                 "restarts")

    def __init__(self, index: int, restarts: int = 0) -> None:
        self.index = index
        #: Replacements of this lane's worker so far.
        self.restarts = restarts
        #: A worker was started in it and has not died yet.
        self.alive = False
        #: It reported ready (and its pid).
        self.ready = False
        self.pid: int | None = None
        #: Activations it holds; the first is the one it runs (or takes next).
        self.inflight: collections.deque[_Act] = collections.deque()
        #: Flow keys already sent to it.
        self.loaded: set[int] = set()
        #: Results it sent.
        self.activations = 0
        #: Why it exits or was killed on purpose (its death is then planned), if it does.
        self.exiting: str | None = None
        #: Why the supervisor killed it for misbehaving (hung, broke the protocol); ``blame``: fail what it ran.
        self.hung: str | None = None
        self.blame = False

    def usable(self) -> bool:
        """Whether activations may be sent to it."""
        return self.alive and self.exiting is None and self.hung is None

    def __repr__(self) -> str:
        return f"<WorkerSlot {self.index} pid={self.pid} inflight={len(self.inflight)}>"


class Dispatcher:
    """Places activations on worker lanes and applies what the lanes report (supervisor lock held)."""

    def __init__(self, owner: Owner, backend: WorkerBackend, ledger: Ledger, router: Router, timers: Timers,
                 *, prefetch: int, kill_worker_rss: int | None) -> None:
        #: The loop: told when a worker is ready, when state is lost, when the runtime must break; its flags.
        self.owner = owner
        self.flags = owner.flags
        #: The worker lanes (see ``_exec.base``).
        self.backend = backend
        #: The books, and the policies and routing of results.
        self.ledger = ledger
        self.router = router
        #: Retries, deadlines and respawns are scheduled here.
        self.timers = timers
        #: Activations sent ahead to a busy lane (of a one-at-a-time routine to its lane: up to
        #: ``MAX_DEPTH - 1`` when they are short, see ``_batching.pace``).
        self.prefetch = prefetch
        self.max_depth = max(MAX_DEPTH, prefetch + 1) if prefetch else 1
        #: Several ready activations of a routine may go to a lane in one frame (``_batching``).
        self.batching = bool(prefetch) and backend.batches
        #: Kill a worker running an activation past this RSS (bytes).
        self.kill_worker_rss = kill_worker_rss
        #: One record per lane.
        self.slots = [WorkerSlot(i) for i in range(backend.slots)]
        #: Worker start-ups that failed in a row (the runtime breaks at ``MAX_START_FAILURES``).
        self.start_failures = 0
        #: No lane reported ready yet and ``START_HOLD`` has not passed: activations wait for a ready lane.
        self.hold_starting = False
        #: flow key -> (flow, its ``_LoadFlow`` message): each flow is pickled once for every lane.
        self.ships: dict[int, tuple[Any, _LoadFlow]] = {}
        #: Keys for newly shipped flows.
        self._flow_keys = itertools.count(1)
        #: Event type -> what it means for the ledger.
        self._handlers: dict[type, Callable[[Any], None]] = {
            Ready: self._on_ready, Finished: self._on_finished, Exiting: self._on_exiting, Died: self._on_died,
            Stalled: self._on_stalled, Broken: self._on_broken,
        }

    # -- start ---------------------------------------------------------------------------------------

    def started(self, errors: list[str | None]) -> None:
        """The backend started its lanes; ``errors`` says which could not start."""
        for slot, error in zip(self.slots, errors, strict=True):
            if error is None:
                slot.alive = True
            else:
                self._start_failed(slot.index, error)
        if any(error is None for error in errors):
            self.hold_starting = True
            self.timers.add(StartHoldOver(), self.timers.clock() + START_HOLD)

    def end_start_hold(self) -> None:
        """No worker got ready within ``START_HOLD``: send to workers still starting (their take checks run)."""
        self.hold_starting = False

    def ship(self, flow: Any) -> int:
        """Pickle ``flow`` once for the workers; return its key."""
        for key, (shipped, _) in self.ships.items():
            if shipped is flow:
                return key
        try:
            blob = dumps_by_value(flow)
        except Exception as exc:
            raise SerializationError(
                f"flow {flow.flow_id!r} cannot be sent to worker processes: {type(exc).__name__}: {exc}. "
                "Routines, their logic and everything it refers to must be picklable by cloudpickle "
                "(no open files, locks, sockets or Runtime objects in routine attributes or closures)"
            ) from exc
        key = next(self._flow_keys)
        self.ships[key] = (flow, _LoadFlow(key, blob))
        return key

    # -- dispatch ------------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand ready activations to lanes with room, oldest first, within each routine's limit."""
        if self.flags.broken is not None:
            return
        ledger = self.ledger
        if ledger.draining:  # stopping: nothing new starts (what a stopped worker gave back included)
            if ledger.runnable:
                drop_ready(ledger)
            return
        full: set[int] = set()
        single: set[int] = set()  # lanes that had no room for a batch this pass
        skip: set[_RoutineRt] | None = None
        stale: float | None = None  # lanes whose running activation began before this take nothing ahead
        while ledger.runnable:
            candidate = self._free_slot(full)
            if candidate is None:
                return
            rt = ledger.pick(skip)
            if rt is None:
                return
            if stale is None:
                stale = self.timers.clock() - PREFETCH_MAX_AGE
            slot = lane_for(rt, candidate, self.slots, full, self.prefetch, stale)
            if slot is None:  # its lanes are full: the next oldest routine may still go
                skip = skip or set()
                skip.add(rt)
                continue
            n = batch_for(rt, slot, self.slots, self.prefetch) if self.batching and slot.index not in single else 1
            acts, leads = take_batch(ledger, rt, n)
            if acts and not self._send(slot, acts, leads):
                for act in reversed(acts):
                    ledger.put_back(act)
                (single if len(acts) > 1 else full).add(slot.index)  # no room for a batch: one may still fit

    def inflight(self) -> list[_Act]:
        """Every activation handed to a worker and not yet over (running, or sent ahead to a busy worker)."""
        return [act for slot in self.slots for act in slot.inflight if not act.resolved]

    def _free_slot(self, full: set[int]) -> WorkerSlot | None:
        """An idle lane if any, else the least busy one (of those with the fewest in flight, the one whose
        running activation began last: the likeliest to be free soon); ``lane_for`` decides whether it
        may take the activation."""
        best = None
        for slot in self.slots:
            if not slot.alive or slot.exiting is not None or slot.hung is not None or slot.index in full:
                continue  # (slot.usable(), inlined: this runs for every activation)
            inflight = slot.inflight
            n = len(inflight)
            if n == 0 and slot.ready:
                return slot
            if n < self.max_depth and (best is None or n < len(best.inflight) or (
                    n and n == len(best.inflight) and (inflight[0].started or 0.0) > (best.inflight[0].started or 0.0))):
                best = slot
        if best is not None and self.hold_starting and not best.ready:
            return None  # (no lane is ready yet: the first that is gets the activation)
        return best

    def _send(self, slot: WorkerSlot, acts: list[_Act], leads: list[JobContext]) -> bool:
        """Send activations of one routine (and its flow, the first time) to ``slot`` in one frame; False if it
        has no room."""
        rt = acts[0].rt
        inst = rt.inst
        if inst.flow_key not in slot.loaded:
            if not self.backend.send(slot.index, self.ships[inst.flow_key][1]):
                return False
            slot.loaded.add(inst.flow_key)
        messages = [activation_message(act, job) for act, job in zip(acts, leads)]
        if not self.backend.send(slot.index, messages[0] if len(messages) == 1 else _Batch(tuple(messages))):
            return False
        for act in acts:
            act.slot = slot.index
            slot.inflight.append(act)
            if len(slot.inflight) == 1:
                self._went_first(act, self.timers.clock())
            if self.ledger.started(act):
                self.owner.room_made(act.rt)
        return True

    def _went_first(self, act: _Act, now: float) -> None:
        """``act`` is next to run on its lane: its timeout counts from now."""
        act.started = now
        if act.rt.timeout is not None:
            act.deadline = now + act.rt.timeout
            self.timers.add(ActivationDeadline(act, act.deadline), act.deadline)

    # -- events --------------------------------------------------------------------------------------

    def handle(self, events: list) -> None:
        """Apply the backend's events, in order (``Output`` is the supervisor's, unlocked)."""
        handlers = self._handlers
        for event in events:
            handler = handlers.get(type(event))
            if handler is not None:
                handler(event)

    def _on_ready(self, event: Ready) -> None:
        """The lane's worker serves: its start-up succeeded (the state server may start now)."""
        slot = self.slots[event.slot]
        if not slot.alive:
            return
        slot.ready = True
        slot.pid = event.pid
        self.hold_starting = False
        self.start_failures = 0
        self.owner.worker_ready()

    def _on_finished(self, event: Finished) -> None:
        """Apply one result; a result for an activation the lane does not hold first breaks the protocol."""
        slot = self.slots[event.slot]
        if not slot.alive or slot.hung is not None:  # killed for misbehaving: what it says is not trusted
            return
        res = event.result
        wrong = unexpected_result(slot.inflight[0] if slot.inflight else None, res)
        if wrong is not None:
            self._protocol_broken(slot, wrong)
            return
        act = slot.inflight.popleft()
        now = self.timers.clock()
        self.ledger.left(act)
        slot.activations += 1
        if res.fused is not None:  # it runs that emit's target itself now: book that run first on the lane
            slot.inflight.appendleft(book_fused_run(self.ledger, act, res, slot.index))
        if slot.inflight:
            self._went_first(slot.inflight[0], now)
        if act.resolved:  # it timed out or was killed: its outcome is already decided
            return
        stats = act.rt.stats
        book(act, res.seconds, now, self.prefetch, self.max_depth, self.batching)
        if res.error is None:
            lead = act.lead_job()
            error = None if lead is None else self.router.route(act, lead, res)
            if error is None:
                self.ledger.release(act)
            else:
                stats.errors += 1
                self._failed(act, error)
        else:
            stats.errors += 1
            if res.error.get("type") == _STATE_LOST:
                self.owner.state_lost(res.error.get("message", "the state server stopped answering"))
            self._failed(act, res.error, res)

    def _on_exiting(self, event: Exiting) -> None:
        """The worker exits on purpose: it ran everything up to its last result; the rest was never started."""
        slot = self.slots[event.slot]
        if not slot.alive or slot.hung is not None:
            return
        slot.exiting = event.reason
        logger.debug("worker %d (pid %s) exits: %s", slot.index, slot.pid, event.reason)
        acts = list(slot.inflight)
        slot.inflight.clear()
        self.ledger.requeue(acts)

    def _on_died(self, event: Died) -> None:
        """The lane's worker is gone: fail what it ran (unless planned), requeue the rest, replace it."""
        slot = self.slots[event.slot]
        if not slot.alive:
            return
        slot.alive = False
        info = event.info
        if self.flags.broken is None and info.pid is not None:
            self.owner.push_state(Method.RELEASE_PID, info.pid if info.owner is None else info.owner)
        acts = list(slot.inflight)
        slot.inflight.clear()
        first = acts[0] if acts and not acts[0].resolved else None
        error = None
        if slot.hung is not None:
            if slot.blame:
                error = error_data(WorkerCrashedError, slot.hung, traceback=info.stderr_tail, pid=info.pid,
                                   process=slot.index, crashed=True)
        elif first is not None and slot.ready and slot.exiting is None:
            first.crashes += 1
            error = crash_error(slot, first, info)
        if error is not None and first is not None:
            acts.pop(0)
            self.ledger.left(first)
            first.rt.stats.errors += 1
            self._failed(first, error)
        self.ledger.requeue(acts)
        flags = self.flags
        if flags.stop_requested or flags.closed and self.ledger.open_jobs == 0:
            return
        if not slot.ready and slot.exiting is None:
            how = f"({'signal ' + info.signal if info.signal else 'exit code ' + str(info.exitcode)})"
            tail = info.stderr_tail
            self._start_failed(slot.index, (slot.hung or f"worker {slot.index} (pid {info.pid}) exited during "
                                            f"start-up {how}") + (f"; its last error output:\n{tail}" if tail else ""))
        else:
            self.respawn(slot.index)

    def _on_stalled(self, event: Stalled) -> None:
        """The worker did not take its first activation in time: kill it; requeue, or give up on the activation."""
        slot = self.slots[event.slot]
        if not slot.usable() or not slot.inflight or slot.inflight[0].resolved:
            return
        act = slot.inflight[0]
        where = f"worker {slot.index} (pid {self.backend.pid(slot.index)})"
        if not slot.ready:  # a start-up failure, not the activation's fault
            self._kill_worker(slot, f"{where} did not finish starting within {event.seconds:g}s (TAKE_TIMEOUT)",
                              blame=False)
            return
        act.crashes += 1
        why = (f"{where} did not take its activation of routine {act.rt.rid!r} within {event.seconds:g}s "
               "(TAKE_TIMEOUT): it was stopped (SIGSTOP), frozen, or stuck loading the flow (unpickling "
               "a flow runs the imports and __setstate__ of everything it refers to)")
        give_up = act.crashes >= self.ledger.max_crash_retries
        if give_up:
            why += (f"; {act.crashes} processes in a row did not take it: given up "
                    f"(max_crash_retries={self.ledger.max_crash_retries})")
        logger.warning("routilux-mp: %s; it was killed and replaced", why)
        self._kill_worker(slot, why, blame=give_up)

    def _on_broken(self, event: Broken) -> None:
        """The backend read something from the worker that is not a message of ours."""
        self._protocol_broken(self.slots[event.slot], event.what)

    def _protocol_broken(self, slot: WorkerSlot, what: str) -> None:
        """The worker said something no worker loop says: kill it and fail what it was running."""
        why = (f"worker {slot.index} (pid {self.backend.pid(slot.index)}) {what}: its protocol with the supervisor "
               "is broken (did logic write to the worker's pipes, or fork a child that carried on as the worker?). "
               "It was killed and replaced; other jobs carry on")
        logger.error("routilux-mp: %s", why)
        if slot.inflight:
            slot.inflight[0].crashes += 1  # so a retry handler gives up on an activation that keeps doing it
        self._kill_worker(slot, why, blame=True)

    # -- kills and replacements ----------------------------------------------------------------------

    def _kill_worker(self, slot: WorkerSlot, why: str, blame: bool) -> None:
        """Kill a misbehaving worker now; when it died, its first activation fails if ``blame``, the rest requeue."""
        if slot.hung is not None:
            return
        slot.hung = why
        slot.blame = blame
        if slot.ready:  # a planned death: replaced at once, not counted as a start failure
            slot.exiting = slot.exiting or "killed by the supervisor"
        self.backend.kill(slot.index, why, hard=True)

    def kill_activation(self, act: _Act, cls: type[RoutiluxError], message: str, hard: bool) -> None:
        """Fail ``act`` now and kill the worker running it (it is replaced once dead)."""
        assert act.slot is not None
        slot = self.slots[act.slot]
        act.resolved = True
        slot.exiting = slot.exiting or f"killed: {cls.__name__}"
        act.rt.stats.errors += 1
        self.backend.kill(slot.index, message, hard)
        self._failed(act, error_data(cls, message, pid=self.backend.pid(slot.index), process=slot.index))

    def deadline_due(self, timer: ActivationDeadline, now: float) -> None:
        """An activation may have run past its routine's timeout: kill it if it really has."""
        act = timer.act
        if act.deadline != timer.when or act.slot is None or act.resolved:
            return  # an earlier placement's deadline, or decided already
        slot = self.slots[act.slot]
        if not slot.usable() or not slot.inflight or slot.inflight[0] is not act:
            return
        if not self.backend.taken(slot.index):  # not begun: its clock starts later (a hang is TAKE_TIMEOUT's)
            act.deadline = now + act.rt.timeout
            self.timers.add(ActivationDeadline(act, act.deadline), act.deadline)
            return
        self.kill_activation(
            act, ActivationTimeoutError,
            f"routine {act.rt.rid!r} ran longer than its timeout of {act.rt.timeout:g}s "
            f"(worker {slot.index}, pid {self.backend.pid(slot.index)}); the process was stopped and replaced",
            hard=False,
        )

    def check_memory(self) -> None:
        """Kill workers running an activation past the hard memory limit (``kill_worker_rss``)."""
        limit = self.kill_worker_rss
        if limit is None:
            return
        for slot in self.slots:
            if not slot.usable() or not slot.inflight or slot.inflight[0].resolved:
                continue
            rss = self.backend.rss(slot.index)
            if rss is not None and rss > limit:
                act = slot.inflight[0]
                self.kill_activation(
                    act, WorkerMemoryError,
                    f"worker {slot.index} (pid {self.backend.pid(slot.index)}) used {rss // 2**20} MiB while "
                    f"running routine {act.rt.rid!r}, over the hard limit of {limit // 2**20} MiB; it was killed "
                    "and replaced. Process less data per activation, or raise Runtime(max_worker_rss=...)",
                    hard=True,
                )

    def respawn(self, index: int) -> None:
        """Start a new worker in lane ``index`` (its old one is gone)."""
        old = self.slots[index]
        flags = self.flags
        if old.alive or flags.stop_requested or flags.broken is not None:
            return
        slot = self.slots[index] = WorkerSlot(index, old.restarts + 1)
        error = self.backend.respawn(index)
        if error is None:
            slot.alive = True
        else:
            self._start_failed(index, error)

    def _start_failed(self, index: int, why: str) -> None:
        """Count a worker that could not start: respawn it later, or give up after too many in a row."""
        self.start_failures += 1
        if self.start_failures >= MAX_START_FAILURES:
            self.owner.break_runtime(RuntimeBrokenError, f"worker processes failed to start {self.start_failures} "
                                                         f"times in a row; giving up. Last failure: {why}")
        else:
            delay = min(MAX_RESPAWN_DELAY, 0.1 * 2 ** (self.start_failures - 1))
            self.timers.add(RespawnDue(index), self.timers.clock() + delay)

    def _failed(self, act: _Act, error: dict, res: _Result | None = None) -> None:
        """Apply the routine's error strategy to a failed activation (a retry is scheduled here)."""
        outcome = self.ledger.fail_activation(act, error)
        if type(outcome) is Retry:
            self.timers.add(RetryDue(outcome.act), self.timers.clock() + outcome.delay)
        elif outcome is not None:  # CONTINUE: what it emitted before failing still counts
            if res is not None and self.router.route(act, outcome, res) is not None:
                outcome.trace(act.rt.rid, "outputs dropped", "an output of the failed activation cannot be unpickled")
            self.ledger.release(act)


def activation_message(act: _Act, job: JobContext) -> _Activation:
    """The wire message that runs ``act`` with ``job`` (its oldest open job) as the current one."""
    rt = act.rt
    inst = rt.inst
    if len(act.jobs) == 1:
        return _Activation(act.act_id, inst.flow_key, inst.worker_id, inst.flow.flow_id, rt.rid, act.slots,
                           act.message, job.job_id, job._metadata, job._data, act.attempt, fuse=rt.fuse)
    act.lead = act.jobs.index(job)
    return _Activation(act.act_id, inst.flow_key, inst.worker_id, inst.flow.flow_id, rt.rid, act.slots, act.message,
                       job.job_id, job.metadata, job.data, act.attempt,
                       tuple((j.job_id, j._metadata, j._data) for j in act.jobs), act.lead, act.item_jobs)


def crash_error(slot: WorkerSlot, act: _Act, info: ExitInfo) -> dict:
    """The error of an activation whose worker died running it: how, and what that likely means."""
    message = (
        f"worker {slot.index} (pid {info.pid}) {info.how()} while running routine {act.rt.rid!r} "
        f"of worker {act.rt.inst.worker_id!r}: {info.cause}. The process was replaced; other jobs carry on"
    )
    return error_data(WorkerCrashedError, message, traceback=info.stderr_tail, exitcode=info.exitcode,
                      signal=info.signal, pid=info.pid, process=slot.index, crashed=True)
