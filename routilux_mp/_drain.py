"""Stopping without starting anything new: what ``shutdown(cancel_pending=True)`` (a first Ctrl-C) does.

Once the runtime stops taking work, only activations already handed to a
worker go on (they get the shutdown's grace). Every job with nothing of it
in flight is cancelled at once; the jobs that have lose everything queued for
them (items, activations, retries) and end ``cancelled`` once what runs for
them is over, unless that was all they had left to do (then they complete).
What those running activations emit downstream is dropped the same way
(``Router.route``); their outputs are kept.

Runs with the supervisor's lock held.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._ledger import Ledger
from ._records import _Act
from .job import JobContext

__all__ = ["drop_ready", "stop_taking_work"]


def stop_taking_work(ledger: Ledger, inflight: Iterable[_Act]) -> int:
    """Enter the drain: cancel every job with nothing in ``inflight``, drop all queued work; return the cancelled count."""
    ledger.draining = True
    running = {job for act in inflight for job in act.jobs if job in ledger.holds}
    idle = [job for job in ledger.holds if job not in running]
    for job in idle:
        ledger.finish(job, "cancelled")
    for inst in ledger.instances.values():
        for rt in inst.routines.values():
            for queue in rt.slots.values():
                for entry in queue._entries:
                    _drop_hold(ledger, entry.all_jobs())
                queue._entries.clear()
    drop_ready(ledger)
    return len(idle)


def drop_ready(ledger: Ledger) -> None:
    """Drop every activation waiting to be sent (queued, or given back by a worker that stopped)."""
    for rt in list(ledger.runnable):
        for act in rt.ready:
            for name, n in act.slot_counts.items():
                rt.slots[name].held -= n
            act.slot_counts = {}
            ledger.cut.update(job for job in act.jobs if job in ledger.holds)
            ledger.release(act)
        rt.ready.clear()
    ledger.runnable.clear()


def _drop_hold(ledger: Ledger, jobs: Iterable[JobContext]) -> None:
    """A queued item of ``jobs`` is dropped: its hold goes, and its open jobs are cut short."""
    holds = ledger.holds
    for job in jobs:
        left = holds.get(job)
        if left is None:
            continue
        ledger.cut.add(job)
        if left <= 1:
            ledger.finish(job, "cancelled")
        else:
            holds[job] = left - 1
