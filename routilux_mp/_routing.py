"""Routing: activation policies turn queued items into activations; results' emits go to slots or outputs.

Runs in the supervisor, with its lock held, on whatever thread holds it (a
``post`` runs its routine's policy at once). Policies are user code: one that
raises fails the jobs waiting in its routine's slots, never the dispatcher.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from ._fusion import fused_targets
from ._ledger import IMMEDIATE_BLOB, Ledger
from ._messages import _Result, describe_exception, encode, error_data, loads
from ._records import _Act, _Entry, _Instance, _RoutineRt
from ._timers import PolicyWakeup, Timers
from .activation_policies import IMMEDIATE_MESSAGE, ImmediatePolicy
from .error_handling import ErrorHandler
from .errors import FlowError, SerializationError
from .job import JobContext

logger = logging.getLogger("routilux_mp.runtime")

#: Trace entries a job keeps (the oldest dropped beyond).
MAX_JOB_TRACES = 1000


class Router:
    """Runs policies and routes results for every worker of one runtime."""

    def __init__(self, ledger: Ledger, timers: Timers, processes: int, prefetch: int, fusion: bool = True) -> None:
        #: The books: queues, jobs and activations live there.
        self.ledger = ledger
        #: Where policy wake-ups (interval policies) are scheduled.
        self.timers = timers
        #: Worker processes: a routine without a concurrency limit may use them all.
        self.processes = processes
        #: Activations sent ahead to a busy process (a routine without a limit may have them in flight).
        self.prefetch = prefetch
        #: Whether the workers may run fused stages (``_fusion``; the backend must support it).
        self.fusion = fusion

    def build_instance(self, worker_id: str, flow_name: str, flow: Any, flow_key: int, ws: Any) -> _Instance:
        """A live instance of ``flow``: per routine its queues, a copy of its policy, its limit and handler."""
        inst = _Instance(worker_id, flow_name, flow, flow_key, ws)
        default_handler = flow.error_handler or ErrorHandler()
        for rid, routine in flow.routines.items():
            policy = copy.deepcopy(routine._activation_policy) if routine._activation_policy else ImmediatePolicy()
            limit = routine._max_concurrency or self.processes
            handler = routine._error_handler or default_handler
            rt = inst.routines[rid] = _RoutineRt(inst, rid, routine, policy, limit, handler)
            if limit == 1:  # one at a time: queued on one lane, they still run one after another
                rt.cap = 1 + self.prefetch
        for conn in flow.connections:
            source = inst.routines[conn.source_id]
            source.targets.setdefault(conn.event, []).append((inst.routines[conn.target_id], conn.slot))
        if self.fusion:
            fuse = fused_targets(flow)
            for rid, events in fuse.items():
                rt = inst.routines[rid]
                rt.fuse = fuse
                rt.fused = {event: (inst.routines[target], slot) for event, (target, slot) in events.items()}
        return inst

    # -- policies ------------------------------------------------------------------------------------

    def evaluate(self, rt: _RoutineRt) -> None:
        """Run ``rt``'s policy until it stops activating; queue what it activates."""
        policy = rt.policy
        if type(policy) is ImmediatePolicy and len(rt.slots) == 1:
            # The default policy on one slot (most routines): one activation per item, oldest first,
            # exactly what the loop below makes of it, without the generic bookkeeping per item.
            (queue,) = rt.slots.values()
            entries = queue._entries
            single = self.ledger.new_single_activation
            while entries and entries[0].others is None:
                single(rt, queue, entries.popleft())
            if not entries:
                return
            # An item of several jobs (a batch's emit that named none): the loop below passes on all its holds.
        while True:
            for queue in rt.slots.values():
                queue._start_policy()
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
                self._activation(rt, data_slice or {}, message, consumed)
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
                self.timers.add(PolicyWakeup(rt), when)

    def policy_wakeup(self, rt: _RoutineRt, now: float) -> None:
        """An interval policy asked to be run again at about ``now``."""
        if rt.timer_at is not None and rt.timer_at <= now:
            rt.timer_at = None
            self.evaluate(rt)

    def flush(self, instances: list[_Instance]) -> bool:
        """Deliver what batch and interval policies hold back; True if anything was (never while stopping)."""
        delivered = False
        if self.ledger.draining:
            return False
        for inst in instances:
            for rt in inst.routines.values():
                flusher = getattr(rt.policy, "flush", None)
                if flusher is None:
                    continue
                while True:
                    for queue in rt.slots.values():
                        queue._start_policy()
                    try:
                        out = flusher(rt.slots)
                        if out is None:
                            break
                        consumed = [e for queue in rt.slots.values() for e in queue._consumed]
                        if not consumed:
                            break
                        self._activation(rt, out[0], out[1], consumed)
                    except Exception as exc:  # noqa: BLE001 - a user's policy: fail its jobs, not the dispatcher
                        self._policy_failed(rt, exc)
                        break
                    delivered = True
        return delivered

    def _policy_failed(self, rt: _RoutineRt, exc: Exception) -> None:
        """A policy raised (or returned items that cannot be shipped): fail the jobs waiting in its slots."""
        logger.error("the activation policy of routine %r raised %s: %s; the jobs waiting in its slots fail",
                     rt.rid, type(exc).__name__, exc)
        error = describe_exception(exc, rt.rid)
        error["message"] = f"the activation policy of routine {rt.rid!r} raised: {error['message']}"
        jobs = {id(job): job for q in rt.slots.values() for e in q._entries for job in e.all_jobs()}
        for job in jobs.values():
            if not job.done:
                self.ledger.fail(job, dict(error))

    def _activation(self, rt: _RoutineRt, data_slice: dict, message: Any, consumed: list[_Entry]) -> None:
        """Queue an activation on what a policy returned (items stay pickled; new items are pickled here).

        Each item keeps its job: an entry the policy returned, or a copy it was
        given of one, is the consumed entry's item; an item the policy made
        itself belongs to all the activation's jobs.
        """
        slots: dict[str, list[bytes]] = {}
        sources: dict[str, list[_Entry | None]] = {}
        for name, items in data_slice.items():
            queue = rt.slots.get(name)
            if queue is None:
                raise FlowError(f"the policy of routine {rt.rid!r} returned items for unknown slot {name!r}")
            blobs = []
            found: list[_Entry | None] = []
            for item in items:
                if type(item) is _Entry:
                    blobs.append(item.blob)
                    found.append(item)
                else:
                    try:
                        blobs.append(encode(item))
                    except Exception as exc:
                        raise SerializationError(
                            f"an item the policy returned for slot {name!r} cannot be pickled: {exc}") from exc
                    found.append(queue._given.get(id(item)))
            slots[name] = blobs
            sources[name] = found
        blob = IMMEDIATE_BLOB if message is IMMEDIATE_MESSAGE else encode(message)
        act = self.ledger.new_activation(rt, slots, blob, consumed)
        if len(act.jobs) > 1:
            index = {id(job): i for i, job in enumerate(act.jobs)}
            act.item_jobs = {
                name: [None if entry is None else tuple(index[id(j)] for j in entry.all_jobs() if id(j) in index)
                       or None for entry in found]
                for name, found in sources.items()
            }

    # -- results -------------------------------------------------------------------------------------

    def route(self, act: _Act, lead: JobContext, res: _Result) -> dict | None:
        """Apply a result's job changes and route its emits; an error (as data) if an output is unreadable.

        Outputs are decoded first, so an output the supervisor cannot unpickle
        fails this activation only, before anything of it is applied. Each emit
        goes to the jobs it names (its items' jobs), or to all the activation's
        jobs when it names none; jobs that ended meanwhile get nothing.
        """
        outputs = {}
        targets_of = act.rt.targets
        for i, emit in enumerate(res.emits):
            if not targets_of.get(emit[0]):
                try:
                    outputs[i] = loads(emit[1])
                except Exception as exc:  # noqa: BLE001 - unpickling runs the data's own code
                    return error_data(SerializationError,
                                      f"an output of emit({emit[0]!r}) from routine {act.rt.rid!r} cannot be "
                                      f"unpickled in the supervisor ({type(exc).__name__}: {exc}); emit plain values",
                                      routine=act.rt.rid)
        self._apply_job_changes(act, res)
        single = len(act.jobs) == 1
        dirty: list[_RoutineRt] = []
        fused = res.fused  # (its worker runs that one itself: booked by the dispatcher)
        for i, (event, blob, named) in enumerate(res.emits):
            if i == fused:
                continue
            if single:
                owners = [lead]
            else:
                chosen = act.jobs if named is None else [act.jobs[k] for k in named if k < len(act.jobs)]
                owners = [job for job in chosen if not job.done]
                if not owners:
                    continue
            targets = targets_of.get(event)
            if not targets:
                self._add_output(owners, act.rt.rid, event, outputs[i])
                continue
            if self.ledger.draining:  # stopping: downstream work never starts; its jobs end cancelled
                self.ledger.cut.update(owners)
                continue
            others = tuple(owners[1:]) or None
            for target, slot in targets:
                self.ledger.enqueue(target, slot, owners[0], blob, others)
                if target not in dirty:
                    dirty.append(target)
        for target in dirty:
            self.evaluate(target)
        return None

    def _apply_job_changes(self, act: _Act, res: _Result) -> None:
        """What logic changed on its jobs (``job.data``, traces) and the attempt they reached."""
        jobs = act.jobs
        changes = [(act.lead, res.data_set, res.data_deleted, res.traces)]
        if res.others:
            changes.extend(res.others)
        for index, data_set, data_deleted, traces in changes:
            job = jobs[index] if index < len(jobs) else None
            if job is None or job.done:
                continue
            job.attempts = max(job.attempts, act.attempt)
            if data_set:
                job.data.update(data_set)
            if data_deleted:
                for key in data_deleted:
                    job.data.pop(key, None)
            if traces:
                job.traces.extend(traces)
                del job.traces[: max(0, len(job.traces) - MAX_JOB_TRACES)]

    def _add_output(self, jobs: list[JobContext], rid: str, event: str, data: Any) -> None:
        """Keep an emit nobody listens to as an output of its jobs (the oldest dropped past the limit).

        An output of several jobs is one dict, in each job's outputs, naming them all in ``job_ids``.
        """
        out = {"routine": rid, "event": event, "data": data}
        if len(jobs) > 1:
            out["job_ids"] = [job.job_id for job in jobs]
        limit = self.ledger.max_outputs_per_job
        for job in jobs:
            job.outputs.append(out)
            if len(job.outputs) > limit:
                del job.outputs[0]
                job.outputs_dropped += 1
