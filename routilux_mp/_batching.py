"""Placement: which lane takes a routine's next activations, and how many go in one frame.

``lane_for`` picks the lane (and keeps what is sent ahead behind a running
activation short); ``pace`` sets how deep a one-at-a-time routine queues on
its lane; ``book`` records a finished activation and what it teaches both.

Adaptive batching:

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
  its one lane (``pace``); what it queues at once goes in
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
#: Work a one-at-a-time routine's lane should queue ahead, in seconds of its measured activations (``pace``).
QUEUE_SECONDS = 0.002


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


def book(act: _Act, seconds: float, now: float, prefetch: int, max_depth: int, batching: bool) -> None:
    """Record a finished activation in its routine's stats, and what it teaches the routine's placement."""
    rt = act.rt
    stats = rt.stats
    stats.activations += 1
    if act.chain is not None:
        stats.fused += 1
    stats.busy_seconds += seconds
    if rt.limit == 1 and prefetch:
        pace(rt, prefetch, max_depth)
    elif batching:
        learn(rt, seconds)
    stats.latencies.append(now - act.created)


def lane_for(rt: _RoutineRt, candidate: WorkerSlot, slots: list[WorkerSlot], full: set[int],
             prefetch: int, stale: float) -> WorkerSlot | None:
    """The lane for ``rt``'s next activation: ``candidate`` (the least busy) if it has room, or, for a
    routine that runs one at a time and has activations in flight, the lane holding them.

    Nothing goes ahead behind an activation of another routine that began before ``stale``
    (``PREFETCH_MAX_AGE`` ago): a long activation gains nothing from prefetching (its lane's round
    trip is small beside it), and what waited behind it would wait while other lanes go idle; it
    stays queued in the supervisor instead.

    Queued behind each other on one lane, a one-at-a-time routine's activations still run one
    after another, but without a round trip through the supervisor between them. Other routines
    never queue behind their own activations: an activation that blocks (waits for others of its
    routine, say) would hold back the ones behind it while other lanes are free.
    """
    lanes = rt.lanes
    if rt.limit != 1 or not lanes:
        inflight = candidate.inflight
        if inflight:
            if len(inflight) > prefetch or rt.running >= rt.limit:  # (batched beyond its limit: idle lanes only)
                return None
            began = inflight[0].started
            if began is not None and began < stale:
                return None
        elif len(lanes) >= rt.limit:  # its activations run on at most ``limit`` lanes at once
            return None
        return candidate
    (index,) = lanes
    slot = slots[index]
    if not slot.usable() or index in full or len(slot.inflight) >= (rt.depth or prefetch + 1):
        return None
    return slot


def pace(rt: _RoutineRt, prefetch: int, max_depth: int) -> None:
    """How deep a one-at-a-time routine's lane may queue its activations: short ones deeper.

    About ``QUEUE_SECONDS`` of its measured activations, between ``1 + prefetch`` and
    ``max_depth``: the worker finishing one finds the next in its pipe instead of idling for a
    round trip through the supervisor (a stateful stage of a pipeline keeps pace with its
    parallel stages), and an activation of another routine sent to that lane meanwhile waits
    behind at most that much. (Not called with ``prefetch=0``: one at a time in flight.)
    """
    stats = rt.stats
    base = prefetch + 1
    depth = base
    if stats.busy_seconds > 0:
        depth = max(base, min(max_depth, int(QUEUE_SECONDS * stats.activations / stats.busy_seconds)))
    rt.depth = rt.cap = depth
