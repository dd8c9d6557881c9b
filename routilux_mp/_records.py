"""The records the supervisor's ledger keeps: queued items, slot queues, activations, routines, workers.

Plain data with ``__slots__``; the ledger (``_ledger``) and the router
(``_routing``) change them, always with the supervisor's lock held. Item data
stays a pickled blob from where it was produced (``post`` or a worker's
``emit``) to the worker that consumes it; it is decoded in the supervisor only
for a job's outputs and for policies that look at items.
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Iterable
from typing import Any, NamedTuple

from .activation_policies import SlotQueueAPI
from .error_handling import ErrorHandler
from .job import TERMINAL, JobContext

#: Latency samples kept per routine for the p50/p99 in ``stats()``.
LATENCY_SAMPLES = 2048


class _Entry(NamedTuple):
    """One queued item: its arrival order, its job, and its data as a pickle.

    ``others`` holds the item's further jobs when it belongs to several (an
    emit that named no job in an activation of several jobs belongs to all of
    them); ``None`` for the usual item of one job.
    """

    seq: int
    job: JobContext
    blob: bytes
    others: tuple[JobContext, ...] | None = None

    def all_jobs(self) -> tuple[JobContext, ...]:
        """Every job this item belongs to, ``job`` first."""
        return (self.job,) if self.others is None else (self.job, *self.others)


class SlotQueue(SlotQueueAPI):
    """A routine's input queue as policies see it (one per routine per worker).

    The ``consume_*``/``peek_*`` methods (:class:`SlotQueueAPI`) return copies of
    the items. Built-in policies use ``_take``, which moves the pickled items
    without decoding them.
    """

    __slots__ = ("_consumed", "_entries", "_given", "held", "max_queue_length", "name")

    def __init__(self, name: str, max_queue_length: int) -> None:
        self.name = name
        self.max_queue_length = max_queue_length
        self._entries: collections.deque[_Entry] = collections.deque()
        #: Items consumed into activations that no process has received yet.
        self.held = 0
        self._consumed: list[_Entry] = []
        #: While a policy runs: id of each item copy it was given -> its entry, so an item a policy
        #: returns as a copy (``consume_all_new``) keeps its job. The copies stay referenced by the policy.
        self._given: dict[int, _Entry] = {}

    @property
    def pending(self) -> int:
        """Items counted against ``max_queue_length``."""
        return len(self._entries) + self.held

    def get_total_count(self) -> int:
        """Items counted against ``max_queue_length``: waiting, plus consumed but not yet running."""
        return self.pending

    def _head_seq(self) -> int | None:
        """Arrival number of the oldest waiting item (``None`` when empty)."""
        return self._entries[0].seq if self._entries else None

    def _take(self, n: int | None) -> list[_Entry]:
        """Consume up to ``n`` items (all when ``None``), oldest first."""
        entries = self._entries
        count = len(entries) if n is None else min(n, len(entries))
        taken = [entries.popleft() for _ in range(count)]
        self._consumed.extend(taken)
        return taken

    def _item(self, entry: _Entry) -> Any:
        """A fresh copy of an entry's item (remembered, so the job of the copy is known)."""
        item = pickle.loads(entry.blob)
        self._given[id(item)] = entry
        return item

    def _start_policy(self) -> None:
        """A policy is about to run on this queue: forget what the previous run consumed and gave."""
        self._consumed = []
        self._given = {}

    def _put_back(self, entries: Iterable[_Entry]) -> None:
        """Return consumed items to the front, in their original order."""
        for entry in sorted(entries, key=lambda e: e.seq, reverse=True):
            self._entries.appendleft(entry)

    def __repr__(self) -> str:
        return f"<SlotQueue {self.name!r} waiting={len(self._entries)} held={self.held}>"


class _RoutineStats:
    """Counters of one routine of one worker, for ``stats()``."""

    __slots__ = ("activations", "busy_seconds", "errors", "fused", "latencies")

    def __init__(self) -> None:
        self.activations = 0
        #: Of ``activations``, those a worker ran fused into the activation that emitted their item.
        self.fused = 0
        self.errors = 0
        self.busy_seconds = 0.0
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)


class _Act:
    """One activation in the ledger: queued, in flight on a process, or waiting to retry."""

    __slots__ = (
        "act_id",
        "attempt",
        "chain",
        "crashes",
        "created",
        "deadline",
        "item_jobs",
        "jobs",
        "lead",
        "message",
        "resolved",
        "rt",
        "seq",
        "slot",
        "slot_counts",
        "slots",
        "started",
    )

    def __init__(self, act_id: int, seq: int, rt: _RoutineRt, slots: dict[str, list[bytes]],
                 slot_counts: dict[str, int], message: bytes, jobs: list[JobContext], created: float) -> None:
        self.act_id = act_id
        self.seq = seq
        self.rt = rt
        self.slots = slots
        self.slot_counts = slot_counts
        self.message = message
        self.jobs = jobs
        self.attempt = 1
        self.crashes = 0
        self.created = created
        self.started: float | None = None
        #: The worker slot that holds it (``None`` while queued or waiting to retry).
        self.slot: int | None = None
        #: Set once the activation's outcome is decided while its process still holds it.
        self.resolved = False
        self.deadline: float | None = None
        #: With several jobs: per slot, per item, the indices in ``jobs`` of the item's jobs (``None``
        #: for an item whose job is unknown: it belongs to all). ``None`` for an activation of one job.
        self.item_jobs: dict[str, list[tuple[int, ...] | None]] | None = None
        #: The index in ``jobs`` of the job sent as the current one (``get_current_job()`` in logic).
        self.lead = 0
        #: A fused run (``_fusion``), never sent: ``(act_id of the activation sent, its number in the chain)``,
        #: which its result carries; ``None`` for an activation sent to a worker.
        self.chain: tuple[int, int] | None = None

    def lead_job(self) -> JobContext | None:
        """The oldest job still open: its emits, outputs and errors go there."""
        for job in self.jobs:
            if job._status not in TERMINAL:  # (``job.done``, without a property call per activation)
                return job
        return None

    def __repr__(self) -> str:
        return f"<_Act #{self.act_id} {self.rt.inst.worker_id}/{self.rt.rid} attempt={self.attempt}>"


class _RoutineRt:
    """One routine of one worker: its slot queues, policy copy, queue of activations."""

    __slots__ = (
        "batch",
        "cap",
        "depth",
        "fuse",
        "fused",
        "handler",
        "inst",
        "lanes",
        "limit",
        "mean",
        "policy",
        "ready",
        "rid",
        "routine",
        "running",
        "slots",
        "stats",
        "targets",
        "timeout",
        "timer_at",
    )

    def __init__(self, inst: _Instance, rid: str, routine: Any, policy: Any, limit: int,
                 handler: ErrorHandler) -> None:
        self.inst = inst
        self.rid = rid
        self.routine = routine
        self.policy = policy
        self.slots = {name: SlotQueue(name, spec.max_queue_length) for name, spec in routine._slots.items()}
        self.ready: collections.deque[_Act] = collections.deque()
        self.running = 0
        self.limit = limit
        #: Activations it may have in flight (sent, running or queued in a process): its limit, or for a
        #: routine that runs one at a time, as many as its one lane may queue (``depth``): they run one
        #: after another there all the same.
        self.cap = limit
        #: How many of its activations its lane may hold (running + queued); 0: the runtime's default.
        self.depth = 0
        #: A parallel routine's activations per frame to an idle lane, and the moving mean of its
        #: activations' seconds it follows (``_batching.learn``; ``None``: none measured yet).
        self.batch = 1
        self.mean: float | None = None
        #: Lane index -> its activations in flight there.
        self.lanes: dict[int, int] = {}
        self.handler = handler
        self.timeout: float | None = routine._timeout
        #: event name -> [(target routine runtime, slot name)]
        self.targets: dict[str, list[tuple[_RoutineRt, str]]] = {}
        #: event name -> (target, slot) of its fused connections; and what its activations carry for the
        #: worker (the flow's fused connections, ``None`` when this routine starts none).
        self.fused: dict[str, tuple[_RoutineRt, str]] = {}
        self.fuse: dict | None = None
        self.stats = _RoutineStats()
        self.timer_at: float | None = None

    def backpressured(self) -> bool:
        """True when a slot this routine feeds is full."""
        for targets in self.targets.values():
            for target, slot in targets:
                queue = target.slots[slot]
                if queue.pending >= queue.max_queue_length:
                    return True
        return False

    def __repr__(self) -> str:
        return f"<_RoutineRt {self.inst.worker_id}/{self.rid} ready={len(self.ready)} running={self.running}>"


class _Instance:
    """One worker (one ``exec``): a live instance of a flow with its own WorkerState."""

    __slots__ = ("flow", "flow_key", "flow_name", "jobs_failed", "jobs_processed", "routines", "worker_id", "ws")

    def __init__(self, worker_id: str, flow_name: str, flow: Any, flow_key: int, ws: Any) -> None:
        self.worker_id = worker_id
        self.flow_name = flow_name
        self.flow = flow
        self.flow_key = flow_key
        self.ws = ws
        self.routines: dict[str, _RoutineRt] = {}
        self.jobs_processed = 0
        self.jobs_failed = 0


def percentile(samples: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile of ``samples`` (``None`` when there are none).

    The value ``statistics.quantiles(data, n=100, method="inclusive")[q - 1]``
    gives, computed for the one cut point asked for instead of all 99
    (``stats()`` is read every second by the progress display and the dashboard).
    """
    data = sorted(samples)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    i, m = int(q), len(data) - 1
    j, delta = divmod(i * m, 100)
    if delta == 0:
        return data[j]
    return (data[j] * (100 - delta) + data[j + 1] * delta) / 100
