"""The supervisor's bookkeeping: slot queues, activations, routines, worker processes.

Everything here is touched only with the supervisor's lock held. Item data
stays a pickled blob from where it was produced (``post`` or a worker's
``emit``) to the worker that consumes it; it is decoded in the supervisor only
for a job's outputs and for policies that look at items.
"""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
from collections.abc import Iterable
from typing import Any

from ._messages import FrameReader, frame
from ._process import unread_bytes
from .activation_policies import SlotQueueAPI
from .error_handling import ErrorHandler
from .job import JobContext

#: Latency samples kept per routine for the p50/p99 in ``stats()``.
LATENCY_SAMPLES = 2048


class _Entry:
    """One queued item: its arrival order, its job, and its data as a pickle."""

    __slots__ = ("blob", "job", "seq")

    def __init__(self, seq: int, job: JobContext, blob: bytes) -> None:
        self.seq = seq
        self.job = job
        self.blob = blob

    def __repr__(self) -> str:
        return f"_Entry(#{self.seq} job={self.job.job_id})"


class SlotQueue(SlotQueueAPI):
    """A routine's input queue as policies see it (one per routine per worker).

    The ``consume_*``/``peek_*`` methods (:class:`SlotQueueAPI`) return copies of
    the items. Built-in policies use ``_take``, which moves the pickled items
    without decoding them.
    """

    __slots__ = ("_consumed", "_entries", "held", "max_queue_length", "name")

    def __init__(self, name: str, max_queue_length: int) -> None:
        self.name = name
        self.max_queue_length = max_queue_length
        self._entries: collections.deque[_Entry] = collections.deque()
        #: Items consumed into activations that no process has received yet.
        self.held = 0
        self._consumed: list[_Entry] = []

    @property
    def pending(self) -> int:
        """Items counted against ``max_queue_length``."""
        return len(self._entries) + self.held

    def get_total_count(self) -> int:
        """Items counted against ``max_queue_length``: waiting, plus consumed but not yet running."""
        return self.pending

    def _head_seq(self) -> int | None:
        return self._entries[0].seq if self._entries else None

    def _take(self, n: int | None) -> list[_Entry]:
        """Consume up to ``n`` items (all when ``None``), oldest first."""
        entries = self._entries
        count = len(entries) if n is None else min(n, len(entries))
        taken = [entries.popleft() for _ in range(count)]
        self._consumed.extend(taken)
        return taken

    @staticmethod
    def _item(entry: _Entry) -> Any:
        return pickle.loads(entry.blob)

    def _put_back(self, entries: Iterable[_Entry]) -> None:
        """Return consumed items to the front, in their original order."""
        for entry in sorted(entries, key=lambda e: e.seq, reverse=True):
            self._entries.appendleft(entry)

    def __repr__(self) -> str:
        return f"<SlotQueue {self.name!r} waiting={len(self._entries)} held={self.held}>"


class _RoutineStats:
    __slots__ = ("activations", "busy_seconds", "errors", "latencies")

    def __init__(self) -> None:
        self.activations = 0
        self.errors = 0
        self.busy_seconds = 0.0
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)


class _Act:
    """One activation in the ledger: queued, in flight on a process, or waiting to retry."""

    __slots__ = (
        "act_id",
        "attempt",
        "crashes",
        "created",
        "deadline",
        "jobs",
        "message",
        "proc",
        "resolved",
        "rt",
        "seq",
        "slot_counts",
        "slots",
        "started",
        "wire_end",
        "wire_size",
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
        self.proc: _Proc | None = None
        #: Set once the activation's outcome is decided while its process still holds it.
        self.resolved = False
        self.deadline: float | None = None
        #: Bytes sent for it (what it occupies in its worker's pipe until started).
        self.wire_size = 0
        #: Its process's ``sent`` count once it was queued: the worker took it when it read that far.
        self.wire_end = 0

    def lead_job(self) -> JobContext | None:
        """The oldest job still open: its emits, outputs and errors go there."""
        for job in self.jobs:
            if not job.done:
                return job
        return None

    def __repr__(self) -> str:
        return f"<_Act #{self.act_id} {self.rt.inst.worker_id}/{self.rt.rid} attempt={self.attempt}>"


class _RoutineRt:
    """One routine of one worker: its slot queues, policy copy, queue of activations."""

    __slots__ = (
        "handler",
        "inst",
        "limit",
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
        self.handler = handler
        self.timeout: float | None = routine._timeout
        #: event name -> [(target routine runtime, slot name)]
        self.targets: dict[str, list[tuple[_RoutineRt, str]]] = {}
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


class _Proc:
    """One worker process and what it holds, in the order it will run them."""

    __slots__ = (
        "activations",
        "broken_pipe",
        "commands",
        "exiting",
        "hung",
        "index",
        "inflight",
        "loaded",
        "outbox",
        "outputs",
        "pid",
        "pidfd",
        "popen",
        "ps",
        "reader",
        "ready",
        "results",
        "results_closed",
        "sent",
        "started_at",
        "stderr_tail",
        "stopping",
        "take_timer",
        "writing",
    )

    def __init__(self, index: int, popen: subprocess.Popen, commands: int, results: int, pidfd: int | None,
                 started_at: float) -> None:
        self.index = index
        self.popen = popen
        self.pid = popen.pid
        #: Write end of the command pipe, read end of the result pipe.
        self.commands = commands
        self.results = results
        self.pidfd = pidfd
        #: fd -> (stream name, partial line)
        self.outputs: dict[int, list] = {}
        self.inflight: collections.deque[_Act] = collections.deque()
        self.ready = False
        self.loaded: set[int] = set()
        self.activations = 0
        #: The reason the worker gave for exiting on purpose, if it did.
        self.exiting: str | None = None
        self.stopping = False
        self.broken_pipe = False
        self.ps: Any = None
        self.started_at = started_at
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self.results_closed = False
        #: Reads the result pipe without ever blocking.
        self.reader = FrameReader(results)
        #: Bytes for the command pipe that it had no room for yet (the dispatcher writes them when it has).
        self.outbox = bytearray()
        #: Bytes ever queued for the command pipe (written or in ``outbox``).
        self.sent = 0
        #: The dispatcher waits for room in the command pipe (EVENT_WRITE).
        self.writing = False
        #: A check that it takes its activations is scheduled.
        self.take_timer = False
        #: Why the supervisor killed it (hung, or it broke the protocol), if it did.
        self.hung: str | None = None
        os.set_blocking(commands, False)

    def queue(self, data: bytes) -> None:
        """Send one frame: write what the pipe takes now, keep the rest in ``outbox``; never block.

        Raises ``OSError`` when the worker's end of the pipe is gone.
        """
        blob = frame(data)
        self.sent += len(blob)
        if self.outbox:
            self.outbox += blob
            return
        try:
            n = os.write(self.commands, blob)
        except BlockingIOError:
            n = 0
        if n < len(blob):
            self.outbox += memoryview(blob)[n:]

    def flush(self) -> None:
        """Write as much of ``outbox`` as the pipe takes now."""
        while self.outbox:
            try:
                n = os.write(self.commands, self.outbox)
            except BlockingIOError:
                return
            del self.outbox[:n]

    def taken(self, act: _Act) -> bool:
        """Whether the worker has read all of ``act`` off its command pipe."""
        return self.sent - len(self.outbox) - unread_bytes(self.commands) >= act.wire_end

    def __repr__(self) -> str:
        return f"<_Proc {self.index} pid={self.pid} inflight={len(self.inflight)}>"


def percentile(samples: Iterable[float], q: float) -> float | None:
    import statistics

    data = sorted(samples)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    return statistics.quantiles(data, n=100, method="inclusive")[int(q) - 1]
