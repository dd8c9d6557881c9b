"""Adaptive batching: how many ready activations of a routine go to one worker in one frame.

joblib's automatic batching, made ours. Every activation costs a round trip
through the supervisor (pickling, pipes, routing, the ledger); for
activations of a few microseconds that round trip is the whole cost, and the
worker idles while the supervisor makes it. So when several activations of a
routine are ready, a worker with nothing to do gets several in one frame
(``_Batch``) and runs them one after another, writing each result as soon as
it has it:

* The size follows the routine's measured activations: about
  ``BATCH_SECONDS`` of them (their moving mean, plus ``ACTIVATION_OVERHEAD``
  each), at most ``MAX_BATCH`` activations and ``BATCH_BYTES`` of items. It
  starts at one (nothing is measured yet) and drops back to one as soon as
  one activation runs long (the mean weights the newest by ``SMOOTHING``):
  a slow routine is never batched, and a fast one delays another routine's
  activation by at most about ``BATCH_SECONDS`` on that worker. A batch never
  takes activations younger than another routine's oldest ready one
  (``take_batch``): the order across routines stays first come, first served.
* A parallel routine's batch goes only to an idle worker (never behind a
  running activation, which may block), and takes at most its share of the
  ready activations among the usable workers, so none idles while another
  holds a long batch. Its activations stay on at most ``max_concurrency``
  workers, where they run one after another: its limit holds.
* A one-at-a-time routine already queues about 2 ms of its activations on
  its one lane (``pace`` in ``_dispatch``); what it queues at once goes in
  one frame.
* One activation ready (one at a time, a trickle): it goes alone, as before.
* Crashes: results are never held back, so a worker that dies mid-batch has
  sent every result it made; the first activation it still held is the one
  it was running (it fails or retries as a crash), the rest were never
  started and are dispatched again. ``prefetch=0`` turns batching off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._dispatch import WorkerSlot
    from ._ledger import Ledger
    from ._records import _Act, _RoutineRt
    from .job import JobContext

#: Seconds of a routine's measured activations one batch holds (its latency cost to whoever waits behind it).
BATCH_SECONDS = 0.002
#: Most activations in one batch, and most bytes of their items (large items gain nothing from batching).
MAX_BATCH = 64
BATCH_BYTES = 64 * 1024
#: Seconds each activation costs a worker beside its logic (its loop, unpickling, the result), for the size.
ACTIVATION_OVERHEAD = 50e-6
#: Weight of the newest activation in a routine's moving mean of activation seconds.
SMOOTHING = 0.2


def learn(rt: _RoutineRt, seconds: float) -> None:
    """Fold one finished activation of a parallel routine (its logic took ``seconds``) into its batch size."""
    mean = rt.mean = seconds if rt.mean is None else rt.mean + SMOOTHING * (seconds - rt.mean)
    rt.batch = max(1, min(MAX_BATCH, int(BATCH_SECONDS / (mean + ACTIVATION_OVERHEAD))))
    # Beyond its limit only in batches to idle lanes (``lane_for``): still at most ``limit`` run at once.
    rt.cap = rt.limit * rt.batch


def batch_for(rt: _RoutineRt, slot: WorkerSlot, slots: list[WorkerSlot], prefetch: int) -> int:
    """How many of ``rt``'s ready activations go to ``slot`` (chosen by ``lane_for``) in one frame."""
    ready = len(rt.ready)
    if ready < 2:
        return 1
    if rt.limit == 1:  # what its one lane may still queue
        return max(1, min(ready, (rt.depth or prefetch + 1) - len(slot.inflight)))
    if slot.inflight or rt.batch < 2:
        return 1
    lanes = min(rt.limit, sum(1 for each in slots if each.usable() and each.ready)) or 1  # lanes it may use
    return min(rt.batch, -(-ready // lanes))


def take_batch(ledger: Ledger, rt: _RoutineRt, n: int) -> tuple[list[_Act], list[JobContext]]:
    """Take up to ``n`` of ``rt``'s ready activations (at most ``BATCH_BYTES`` of items), with their lead jobs.

    A batch never takes an activation younger than the oldest ready one of another routine that may
    run now: across routines, activations still start in the order they became ready (only the
    wait for one batch is added). An activation whose jobs all ended elsewhere is released, not taken.
    """
    if n == 1:  # (the common case, one at a time: as cheap as it was before batching)
        act = ledger.take_next(rt)
        lead = act.lead_job()
        if lead is None:  # all its jobs ended elsewhere
            ledger.release(act)
            return [], []
        return [act], [lead]
    before = None
    for other in ledger.runnable:
        if other is not rt and other.ready and other.running < other.cap and (
                before is None or other.ready[0].seq < before):
            before = other.ready[0].seq
    acts: list[_Act] = []
    leads: list[JobContext] = []
    size = 0
    ready = rt.ready
    while ready and len(acts) < n and size < BATCH_BYTES and (before is None or not acts or ready[0].seq < before):
        act = ledger.take_next(rt)
        lead = act.lead_job()
        if lead is None:
            ledger.release(act)
            continue
        acts.append(act)
        leads.append(lead)
        for blobs in act.slots.values():
            for blob in blobs:
                size += len(blob)
    return acts, leads
