"""The supervisor's books: which jobs are open, what holds them, what runs, what waits to retry.

A job is open while anything it caused is queued, running or waiting to be
retried: the ledger counts those holds, and each open job's arrival order, in
dicts of its own (never on the public ``JobContext``; no object per job, so
nothing more for the garbage collector to walk). When the last hold goes, the
job completes.
Failures go through the routine's error strategy here (:meth:`Ledger.fail_activation`).

Every method runs with the supervisor's lock held. The ledger never waits,
sends, or calls user code: done-callbacks are collected (``take_callbacks``)
and run by the supervisor once the lock is released.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

from ._messages import encode
from ._records import SlotQueue, _Act, _Entry, _Instance, _RoutineRt, percentile
from .activation_policies import IMMEDIATE_MESSAGE
from .error_handling import ErrorStrategy
from .job import JobContext, JobStatus, is_wake_up

#: The immediate policy's message, pickled once.
IMMEDIATE_BLOB = encode(IMMEDIATE_MESSAGE)
PENDING, RUNNING = JobStatus.PENDING, JobStatus.RUNNING
#: Characters of an error message copied into a job's trace entries.
TRACE_MESSAGE_CHARS = 500


class Retry(NamedTuple):
    """The error strategy says: run ``act`` (a new attempt) again after ``delay`` seconds."""

    act: _Act
    delay: float


class Ledger:
    """Jobs and activations of one runtime, as the supervisor accounts for them."""

    def __init__(self, *, max_finished_jobs: int, max_outputs_per_job: int, max_crash_retries: int,
                 clock: Callable[[], float]) -> None:
        #: Finished jobs kept for ``get_job``/``list_jobs``; outputs kept per job.
        self.max_finished_jobs = max_finished_jobs
        self.max_outputs_per_job = max_outputs_per_job
        #: A crashing activation is given up after this many crashes.
        self.max_crash_retries = max_crash_retries
        #: The supervisor's clock (injectable for tests).
        self.clock = clock
        #: worker_id -> the live flow instance (one per ``exec``), and flow name -> its current worker_id.
        self.instances: dict[str, _Instance] = {}
        self.current: dict[str, str] = {}
        #: job_id -> job, open and finished (the oldest finished dropped past ``max_finished_jobs``).
        self.jobs: dict[str, JobContext] = {}
        #: Open job -> its holds (queued items, activations, retries: it completes when they drop to 0),
        #: and its arrival number (a multi-job activation lists its jobs oldest first).
        self.holds: dict[JobContext, int] = {}
        self.arrival: dict[JobContext, int] = {}
        #: job_ids of finished jobs, oldest first.
        self.finished: collections.deque[str] = collections.deque()
        #: Jobs per status, and how many are open.
        self.status_counts: collections.Counter[str] = collections.Counter()
        self.open_jobs = 0
        #: Routines with activations ready to be sent.
        self.runnable: set[_RoutineRt] = set()
        #: Activations held by workers now, and activations waiting for their retry delay.
        self.inflight = 0
        self.retrying = 0
        #: worker_id -> [jobs processed, jobs failed] not yet sent to the state server.
        self.count_deltas: dict[str, list[int]] = {}
        #: Done-callbacks of jobs that finished, to run once the lock is released.
        self.callbacks: list[Callable[[], Any]] = []
        #: Stopping: nothing new starts (``_drain``). Open jobs that lost queued or downstream work to it
        #: end ``cancelled`` once what runs for them is over.
        self.draining = False
        self.cut: set[JobContext] = set()
        #: Arrival numbers (items, jobs, activations: the oldest goes first) and activation ids.
        self._seq = itertools.count(1)
        self._act_ids = itertools.count(1)

    # -- jobs ----------------------------------------------------------------------------------------

    def open_job(self, job: JobContext) -> None:
        """Enter a new (pending) job."""
        self.jobs[job.job_id] = job
        self.holds[job] = 0
        self.arrival[job] = next(self._seq)
        self.status_counts["pending"] += 1
        self.open_jobs += 1

    def enqueue(self, rt: _RoutineRt, slot: str, job: JobContext, blob: bytes,
                others: tuple[JobContext, ...] | None = None) -> None:
        """Queue one item of ``job`` (and of ``others``, open jobs too) on ``rt``'s ``slot``; it holds them open."""
        holds = self.holds
        holds[job] += 1
        if others is not None:
            for other in others:
                holds[other] += 1
        rt.slots[slot]._entries.append(_Entry(next(self._seq), job, blob, others))

    def job(self, job_id: str) -> JobContext | None:
        """The job with this id, open or kept finished."""
        return self.jobs.get(job_id)

    def list_jobs(self, worker_id: str | None) -> list[JobContext]:
        """Jobs in the ledger, oldest first (of one worker, or all)."""
        return [j for j in self.jobs.values() if worker_id is None or j.worker_id == worker_id]

    def busy(self, worker_id: str | None) -> bool:
        """Whether any job (of ``worker_id``, or of anyone) is still open."""
        if worker_id is None:
            return self.open_jobs != 0
        return any(job.worker_id == worker_id for job in self.holds)

    def release(self, act: _Act) -> None:
        """``act`` is over: drop its hold on its jobs; a job nothing holds any more completes."""
        holds = self.holds
        for job in act.jobs:
            left = holds.get(job)
            if left is None:  # finished meanwhile (failed, cancelled, completed by hand)
                continue
            if left <= 1:
                self.finish(job, "cancelled" if job in self.cut else "completed")
            else:
                holds[job] = left - 1

    def finish(self, job: JobContext, status: str, error: dict | None = None) -> None:
        """Move an open job to ``status`` (its done-callbacks are queued) and count it for its worker."""
        del self.holds[job]
        del self.arrival[job]
        self.cut.discard(job)
        self.status_counts[job.status] -= 1
        self.status_counts[status] += 1
        self.callbacks.extend(job._finish(status, error))
        self.open_jobs -= 1
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

    def fail(self, job: JobContext, error: dict) -> None:
        """Fail an open job: drop its queued items and the activations left with no open job."""
        self.finish(job, "failed", error)
        self.purge({id(job)}, job.worker_id)

    def end(self, job_id: str, status: str, error: dict | None) -> bool:
        """End an open job now (``Runtime.complete_job``); False if there is none. Running ones no longer count."""
        job = self.jobs.get(job_id)
        if job is None or job not in self.holds:
            return False
        self.finish(job, status, error)
        self.purge({id(job)}, job.worker_id)
        return True

    def end_all(self, status: str, error: dict | None = None) -> None:
        """End every open job with ``status`` and drop everything queued (shutdown, or a broken runtime)."""
        for rt in self.runnable:
            rt.ready.clear()
        self.runnable.clear()
        for job in list(self.holds):
            self.finish(job, status, None if error is None else dict(error))
        for inst in self.instances.values():
            for rt in inst.routines.values():
                for queue in rt.slots.values():
                    queue._entries.clear()
                    queue.held = 0

    def purge(self, job_ids: set[int], worker_id: str | None = None) -> None:
        """Drop queued items of these (finished) jobs, and activations left with no open job."""
        for inst in self.instances.values():
            if worker_id is not None and inst.worker_id != worker_id:
                continue
            for rt in inst.routines.values():
                for queue in rt.slots.values():
                    if any(id(e.job) in job_ids or e.others is not None for e in queue._entries):
                        queue._entries = collections.deque(e for e in queue._entries if self._wanted(e, job_ids))
                if rt.ready and any(act.lead_job() is None for act in rt.ready):
                    keep: collections.deque[_Act] = collections.deque()
                    for act in rt.ready:
                        if act.lead_job() is None:
                            for name, n in act.slot_counts.items():
                                rt.slots[name].held -= n
                            self.release(act)
                        else:
                            keep.append(act)
                    rt.ready = keep
                    if not keep:
                        self.runnable.discard(rt)

    def _wanted(self, entry: _Entry, job_ids: set[int]) -> bool:
        """Whether a queued item still belongs to an open job after the jobs ``job_ids`` finished."""
        if entry.others is None:
            return id(entry.job) not in job_ids
        return any(job in self.holds for job in entry.all_jobs())

    # -- activations ---------------------------------------------------------------------------------

    def new_activation(self, rt: _RoutineRt, slots: dict[str, list[bytes]], message: bytes,
                       consumed: list[_Entry]) -> _Act:
        """Queue an activation of ``rt`` on the items a policy consumed; it takes over their holds."""
        counts = {}
        for name, queue in rt.slots.items():
            if queue._consumed:
                counts[name] = len(queue._consumed)
                queue.held += len(queue._consumed)
        if len(consumed) == 1 and consumed[0].others is None:
            jobs = [consumed[0].job]  # the item's hold on its job passes to the activation
        else:
            # Each item's holds pass to the activation: one per open job (an item may outlive one of its jobs).
            holds = self.holds
            unique = {id(j): j for e in consumed for j in e.all_jobs() if j in holds}
            jobs = sorted(unique.values(), key=self.arrival.__getitem__)
            for job in jobs:
                holds[job] += 1
            for entry in consumed:
                for job in entry.all_jobs():
                    if job in holds:
                        holds[job] -= 1
        act = _Act(next(self._act_ids), next(self._seq), rt, slots, counts, message, jobs, self.clock())
        rt.ready.append(act)
        self.runnable.add(rt)
        return act

    def new_single_activation(self, rt: _RoutineRt, queue: SlotQueue, entry: _Entry) -> None:
        """:meth:`new_activation` of one item taken from ``queue`` by the immediate policy (its fast path)."""
        queue.held += 1
        act = _Act(next(self._act_ids), next(self._seq), rt, {queue.name: [entry.blob]}, {queue.name: 1},
                   IMMEDIATE_BLOB, [entry.job], self.clock())
        rt.ready.append(act)
        self.runnable.add(rt)

    def new_fused_activation(self, rt: _RoutineRt, slot_name: str, job: JobContext, blob: bytes,
                             chain: tuple[int, int], lane: int, resolved: bool = False) -> _Act:
        """Book the run of ``rt`` a worker makes itself on a fused item (``_fusion``), on ``lane``, as started.

        What the item's trip through ``rt``'s slot and policy would have led
        to: an activation of ``job`` on that one item, holding the job open,
        counted as running on the lane (so a crash or timeout there fails it).

        Where the item would never have reached ``rt`` (``resolved``: the
        activation that emitted it was decided already, it timed out say; its
        job ended meanwhile; the runtime is stopping, which cuts the job short)
        the run is booked as decided: it holds no job, and its outcome (result,
        stats, a crash) is ignored, as the worker cannot be stopped from
        running it.
        """
        act = _Act(next(self._act_ids), next(self._seq), rt, {slot_name: [blob]}, {}, IMMEDIATE_BLOB, [job],
                   self.clock())
        act.chain = chain
        act.slot = lane
        if resolved or self.draining or job not in self.holds:
            if self.draining and job in self.holds:
                self.cut.add(job)
            act.resolved = True
        else:
            self.holds[job] += 1
        self.started(act)
        return act

    def pick(self, skip: set[_RoutineRt] | None = None) -> _RoutineRt | None:
        """The routine whose oldest ready activation should go next (concurrency limits, back-pressure),
        other than those in ``skip``."""
        best = None
        blocked = None
        for rt in self.runnable:
            if rt.running >= rt.cap or not rt.ready or skip and rt in skip:
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

    def take_next(self, rt: _RoutineRt) -> _Act:
        """Take ``rt``'s oldest ready activation out of its queue."""
        act = rt.ready.popleft()
        if not rt.ready:
            self.runnable.discard(rt)
        return act

    def put_back(self, act: _Act) -> None:
        """Return an activation that could not be sent to the front of its routine's queue."""
        act.rt.ready.appendleft(act)
        self.runnable.add(act.rt)

    def started(self, act: _Act) -> bool:
        """``act`` was handed to a worker: count it; True if that made room in a slot queue."""
        rt = act.rt
        rt.running += 1
        lanes = rt.lanes
        lanes[act.slot] = lanes.get(act.slot, 0) + 1
        self.inflight += 1
        room = False
        if act.slot_counts:
            for name, n in act.slot_counts.items():
                rt.slots[name].held -= n
            act.slot_counts = {}
            room = True
        for job in act.jobs:
            if job._status is PENDING:  # (not through the ``status`` property: this runs per activation)
                self.status_counts["pending"] -= 1
                self.status_counts["running"] += 1
                job._status = RUNNING
        return room

    def left(self, act: _Act) -> None:
        """``act`` is no longer held by a worker (its result came, or its worker died running it)."""
        self.inflight -= 1
        act.rt.running -= 1
        _leave_lane(act)
        if act.rt.ready:
            self.runnable.add(act.rt)

    def requeue(self, acts: list[_Act]) -> None:
        """A worker gave these back unstarted: they go to the front of their queues, in order."""
        for act in reversed(acts):
            self.inflight -= 1
            act.rt.running -= 1
            _leave_lane(act)
            if act.resolved:
                continue
            act.slot = None
            act.chain = None  # a fused run booked but never begun: sent like any other now
            act.started = None
            act.deadline = None
            self.put_back(act)

    def retry_due(self, act: _Act, broken: bool) -> None:
        """A retry's delay is over: queue it (or drop it when its jobs ended meanwhile)."""
        self.retrying -= 1
        if broken or act.lead_job() is None or self.draining:
            if self.draining:
                self.cut.update(act.jobs)
            self.release(act)
        else:
            self.put_back(act)

    # -- the error strategy --------------------------------------------------------------------------

    def fail_activation(self, act: _Act, error: dict) -> Retry | JobContext | None:
        """Apply the routine's error strategy to a failed activation.

        Returns a :class:`Retry` to schedule (the new attempt holds the jobs
        now); the lead job when the strategy is ``CONTINUE`` (the caller routes
        the activation's emits to it, then releases ``act``); or ``None`` when
        ``act`` was released here (its jobs failed, or it was skipped).
        """
        rt = act.rt
        error = dict(error)
        error.setdefault("routine", rt.rid)
        error["worker_id"] = rt.inst.worker_id
        error["attempt"] = act.attempt
        job = act.lead_job()
        if job is None:
            self.release(act)
            return None
        job.attempts = max(job.attempts, act.attempt)
        handler = rt.handler
        strategy = handler.strategy
        if strategy is ErrorStrategy.RETRY and self.draining:
            error["message"] += " (not retried: the runtime is stopping)"
            strategy = ErrorStrategy.STOP
        if strategy is ErrorStrategy.RETRY:
            if not handler.is_retryable(error.get("mro") or [error["type"]]):
                strategy = ErrorStrategy.STOP
            elif act.attempt > handler.max_retries:
                error["message"] += f" (gave up after {act.attempt} attempts; max_retries={handler.max_retries})"
                strategy = ErrorStrategy.STOP
            elif error.get("crashed") and act.crashes >= self.max_crash_retries:
                error["message"] += (
                    f" (it crashed a worker {act.crashes} times: given up as a poison activation; "
                    f"max_crash_retries={self.max_crash_retries})"
                )
                strategy = ErrorStrategy.STOP
            else:
                retry = self._next_attempt(act)
                delay = handler.delay_before(retry.attempt)
                job.trace(rt.rid, "retry", {"attempt": retry.attempt, "delay": delay, "error": error["type"],
                                            "message": error["message"][:TRACE_MESSAGE_CHARS]})
                self.retrying += 1
                return Retry(retry, delay)
        summary = {"error": error["type"], "message": error["message"][:TRACE_MESSAGE_CHARS]}
        if strategy is ErrorStrategy.CONTINUE:
            job.error = error
            job.trace(rt.rid, "error", summary)
            return job
        if strategy is ErrorStrategy.SKIP:
            job.trace(rt.rid, "skipped", summary)
        else:
            for each in act.jobs:
                if not each.done:
                    self.fail(each, error)
        self.release(act)
        return None

    def _next_attempt(self, act: _Act) -> _Act:
        """A new attempt of ``act``; it takes over ``act``'s hold on its jobs."""
        clone = _Act(next(self._act_ids), act.seq, act.rt, act.slots, {}, act.message, act.jobs, act.created)
        clone.attempt = act.attempt + 1
        clone.crashes = act.crashes
        clone.item_jobs = act.item_jobs
        return clone

    # -- what the supervisor asks --------------------------------------------------------------------

    def quiescent(self) -> bool:
        """Nothing runs, nothing is queued to run, nothing waits to be retried."""
        return self.inflight == 0 and not self.runnable and self.retrying == 0

    def take_callbacks(self) -> list[Callable[[], Any]]:
        """The done-callbacks collected so far (to run with the lock released), every job's wake-up of its
        ``wait()`` callers first: a done-callback that blocks must not keep another job's waiters asleep."""
        callbacks, self.callbacks = self.callbacks, []
        return sorted(callbacks, key=lambda callback: not is_wake_up(callback)) if len(callbacks) > 1 else callbacks

    def take_counts(self) -> dict[str, tuple[int, int]]:
        """Job counters per worker not yet sent to the state server (and forget them)."""
        deltas = {wid: (p, f) for wid, (p, f) in self.count_deltas.items()}
        self.count_deltas.clear()
        return deltas


def _leave_lane(act: _Act) -> None:
    """``act`` no longer counts on the lane that held it."""
    lanes = act.rt.lanes
    left = lanes[act.slot] - 1
    if left:
        lanes[act.slot] = left
    else:
        del lanes[act.slot]


def routine_stats(instances: dict[str, Any]) -> dict[str, dict]:
    """Per routine id, over every worker of ``instances`` (the ledger's): activations (``fused``: of them,
    run fused), errors, busy seconds, latency percentiles."""
    routines: dict[str, dict] = {}
    latencies: dict[str, list[float]] = {}
    for inst in instances.values():
        for rid, rt in inst.routines.items():
            agg = routines.setdefault(rid, {"activations": 0, "errors": 0, "busy_seconds": 0.0,
                                            "max_concurrency": rt.limit, "running": 0, "fused": 0})
            agg["running"] += rt.running
            agg["activations"] += rt.stats.activations
            agg["fused"] += rt.stats.fused
            agg["errors"] += rt.stats.errors
            agg["busy_seconds"] += rt.stats.busy_seconds
            latencies.setdefault(rid, []).extend(rt.stats.latencies)
    for rid, agg in routines.items():
        agg["busy_seconds"] = round(agg["busy_seconds"], 6)
        latencies[rid].sort()  # once: percentile() sorts again, which costs little on sorted data
        agg["p50_latency"] = percentile(latencies[rid], 50)
        agg["p99_latency"] = percentile(latencies[rid], 99)
    return routines


def queued_items(instances: dict[str, Any]) -> list[dict]:
    """Every slot queue of ``instances`` (the ledger's) holding items: where, and how many."""
    found = []
    for inst in instances.values():
        for rid, rt in inst.routines.items():
            for name, queue in rt.slots.items():
                if queue.pending:
                    found.append({"worker_id": inst.worker_id, "routine": rid, "slot": name,
                                  "items": queue.pending})
    return found


__all__ = ["Ledger", "Retry", "SlotQueue", "queued_items", "routine_stats"]
