"""What the dashboard shows, read from a runtime: one snapshot a second, and the history behind the charts.

Everything here reads what the runtime already measures (``stats()``, the job
ledger, the flows in the registry, WorkerState); nothing here knows about HTTP.
Keys ``stats()`` gains later (a ``node`` per process, a ``fused`` flag per
connection, new top-level sections) pass through to the page untouched, so
it can show them without this module knowing what they mean.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from typing import Any

import psutil

from .._cli_ui import SATURATED, RateMeter, bottleneck_hint
from ..errors import RoutiluxError

#: Recent failures the page lists (newest first); the count of all failures is exact regardless.
MAX_FAILURES = 50
#: Characters of a failed job's input, traceback or message kept for the page.
MAX_TEXT = 20_000
#: Points kept per chart series; past it every other point is dropped and sampling slows by half,
#: so a run of any length fits (a 1-hour run at one point a second is already 3,600).
MAX_POINTS = 900
#: Seconds over which a routine's busy share is measured for the live graph.
BUSY_WINDOW = 5.0
#: Bytes of one routine state shown in the WorkerState explorer (its full size is always given).
MAX_STATE_SHOWN = 64 * 2**10

#: Snapshots between two readings of the dashboard's own CPU time.
COST_EVERY = 5
#: How the dashboard's threads are named (``ps -L``, ``py-spy``): their CPU time is what the page reports as its cost.
THREAD_PREFIX = "routilux-mp dashboard"

#: Keys of ``stats()`` this module turns into panels; any other top-level key is passed on as is.
KNOWN_STATS = frozenset({"routines", "processes", "jobs", "waiting"})


def _clip(text: str | None, limit: int = MAX_TEXT) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"\n... ({len(text) - limit} more characters)"


def _lanes(routine: dict, processes: int) -> int:
    limit = routine.get("max_concurrency")
    return processes if limit is None else max(1, min(limit, processes))


def describe_flows(registry: Any, flow_ids: set[str] | None) -> list[dict]:
    """The registered flows (those with ``flow_ids``, or all) as the graph draws them."""
    flows = []
    for name in registry.list_names():
        flow = registry.get(name)
        if flow_ids is not None and flow.flow_id not in flow_ids:
            continue
        entries = [list(entry) for entry in flow.entry_slots()]
        routines = []
        for rid, routine in flow.routines.items():
            policy = routine.activation_policy
            routines.append({
                "id": rid, "class": type(routine).__name__,
                "slots": [slot.name for slot in routine.slots.values()],
                "events": [event.name for event in routine.events.values()],
                "policy": repr(policy) if policy else "immediate_policy()",
                "max_concurrency": routine.max_concurrency,
            })
        connections = [{"source": c.source_id, "event": c.event, "target": c.target_id, "slot": c.slot}
                       for c in flow.connections]
        flows.append({"name": name, "flow_id": flow.flow_id, "routines": routines, "connections": connections,
                      "entries": entries})
    return flows


class Collector:
    """Samples a runtime: call :meth:`snapshot` about once a second from one thread.

    Args:
        runtime: the :class:`~routilux_mp.Runtime` to read.
        registry: where its flows are registered (for the graph).
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, runtime: Any, registry: Any, clock: Any = time.monotonic) -> None:
        self.runtime = runtime  # read only: stats(), list_jobs(), list_workers(), WorkerState reads
        self.registry = registry  # the flows drawn as the graph
        self.clock = clock  # monotonic seconds
        self.started = clock()  # when the dashboard started: elapsed times count from here
        self.wall_started = time.time()  # the same moment for people (the page shows the start time)
        self.total: int | None = None  # jobs the run will post, when the caller knows (the CLI, from its input)
        self.describe_job: Any = None  # optional fn(job) -> dict of extra fields for a failure (the CLI: line)
        self.meter = RateMeter()  # smoothed jobs/s and the ETA, as the terminal display measures them
        self.busy_marks: deque[tuple[float, dict[str, float]]] = deque()  # (time, busy seconds per routine)
        self.failures: deque[dict] = deque(maxlen=MAX_FAILURES)  # recent failed jobs, newest first
        self.failed_seen: set[str] = set()  # ids of failed jobs already listed (those still in the ledger)
        self.failed_counted = 0  # failed jobs the ledger counted at the last scan
        self.points: list[dict] = []  # chart history
        self.stride = 1  # record one sample every ``stride`` snapshots (doubles as the history is thinned)
        self.ticks = 0  # snapshots taken
        self.workers: tuple[str, ...] = ()  # worker ids when the graph was last described
        self.flows: list[dict] = []  # the graph
        self.me = psutil.Process()  # this (the supervisor's) process: the cost the page reports
        self.cpu_mark: tuple[float, float] | None = None  # (process CPU, dashboard threads CPU) at the first read
        self.cost: float | None = None  # the last measured share of this process's CPU the dashboard used
        self.last: dict | None = None  # the last snapshot (the page's first paint)
        self.last_stats: dict = {}  # the last ``stats()`` read (kept when a read fails)

    # -- pieces --------------------------------------------------------------------------------------

    def _graph(self) -> None:
        workers = tuple(self.runtime.list_workers())
        if workers == self.workers and self.flows:
            return
        flow_ids = set()
        for wid in workers:
            try:
                flow_ids.add(self.runtime.get_worker_state(wid).flow_id)
            except (RoutiluxError, KeyError, ValueError):
                continue
        self.workers = workers
        self.flows = describe_flows(self.registry, flow_ids or None)

    def _failures(self, failed: int) -> None:
        """List failed jobs new since the last scan (only scanned when the failed count grew)."""
        if failed <= self.failed_counted:
            return
        self.failed_counted = failed
        present = set()
        fresh = []
        for job in self.runtime.list_jobs():
            if job.status != "failed":
                continue
            present.add(job.job_id)
            if job.job_id in self.failed_seen:
                continue
            fresh.append(self._failure(job))
        self.failed_seen = present  # bounded by the ledger: ids that left it cannot come back
        for item in sorted(fresh, key=lambda f: f["completed_at"] or 0):
            self.failures.appendleft(item)

    def _failure(self, job: Any) -> dict:
        error = job.error or {}
        item = {"job_id": job.job_id, "worker_id": job.worker_id, "routine": error.get("routine"),
                "type": error.get("type"), "message": _clip(error.get("message")),
                "traceback": _clip(error.get("traceback")), "completed_at": job.completed_at,
                "attempts": job.attempts, "metadata": job.metadata or None, "input": None}
        posted = getattr(job, "input", None)  # the posted data, where the runtime keeps it
        if posted is not None:
            item["input"] = _clip(json.dumps(posted, default=repr))
        if self.describe_job is not None:
            item.update(self.describe_job(job))
        return item

    def _busy(self, routines: dict, now: float, processes: int) -> None:
        """Each routine's share of its lanes busy over the last :data:`BUSY_WINDOW` seconds."""
        busy = {rid: r.get("busy_seconds", 0.0) for rid, r in routines.items()}
        self.busy_marks.append((now, busy))
        while len(self.busy_marks) > 2 and now - self.busy_marks[1][0] >= BUSY_WINDOW:
            self.busy_marks.popleft()
        then, before = self.busy_marks[0]
        span = now - then
        for rid, routine in routines.items():
            lanes = _lanes(routine, processes)
            routine["lanes"] = lanes
            used = busy[rid] - before.get(rid, 0.0)
            routine["busy_share"] = None if span <= 0 else min(used / (span * lanes), 1.0)

    def _cost(self) -> float | None:
        """The dashboard threads' share of this process's CPU time since the dashboard started.

        Read every :data:`COST_EVERY` snapshots (reading every thread's times is a good part of a snapshot).
        """
        if self.ticks % COST_EVERY and self.cost is not None:
            return self.cost
        own = {t.native_id for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)}
        try:
            times = self.me.cpu_times()
            ours = sum(t.user_time + t.system_time for t in self.me.threads() if t.id in own)
        except psutil.Error:
            return None
        total = times.user + times.system
        if self.cpu_mark is None:
            self.cpu_mark = (total, ours)
            return None
        spent = total - self.cpu_mark[0]
        self.cost = None if spent <= 0 else (ours - self.cpu_mark[1]) / spent
        return self.cost

    def _record(self, snap: dict) -> None:
        """Add a chart point (one every ``stride`` snapshots; thinned by half when full)."""
        self.ticks += 1
        if self.ticks % self.stride and snap["status"] == "running":
            return
        procs = {str(p.get("index", i)): [p.get("rss"), p.get("cpu_percent")]
                 for i, p in enumerate(snap["processes"])}
        self.points.append({"t": snap["elapsed"], "done": snap["done"], "failed": snap["jobs"].get("failed", 0),
                            "rate": snap["rate"], "procs": procs})
        snap["point"] = self.points[-1]
        if len(self.points) > MAX_POINTS:
            self.points = self.points[::2]
            self.stride *= 2

    # -- the snapshot --------------------------------------------------------------------------------

    def snapshot(self, final: bool = False) -> dict:
        """Read the runtime once: everything the page shows (and a chart point)."""
        now = self.clock()
        try:
            stats = self.runtime.stats()
        except RoutiluxError as exc:  # broken or closed mid-read: show why, keep the last numbers
            stats = dict(self.last_stats)
            stats["error"] = f"{type(exc).__name__}: {exc}"
        processes = self.runtime.processes
        jobs = dict(stats.get("jobs", {}))
        done = sum(jobs.get(k, 0) for k in ("completed", "failed", "cancelled"))
        processed = jobs.get("completed", 0) + jobs.get("failed", 0)
        self.meter.sample(processed, now)
        elapsed = now - self.started
        routines = {rid: dict(r) for rid, r in stats.get("routines", {}).items()}
        self._busy(routines, now, processes)
        self._graph()
        self._failures(jobs.get("failed", 0))
        open_jobs = jobs.get("pending", 0) + jobs.get("running", 0)
        remaining = self.total - done if self.total is not None else open_jobs
        # The bottleneck: the busiest routine, once it keeps its lanes busy (as the end-of-run hint judges it).
        ranked = [(r["busy_share"], rid) for rid, r in routines.items() if (r.get("busy_share") or 0) >= SATURATED]
        snap = {
            "status": "finished" if final else "running",
            "started": self.wall_started, "elapsed": round(elapsed, 3), "processes_n": processes,
            "jobs": jobs, "done": done, "total": self.total, "rate": round(self.meter.rate, 3),
            "eta": self.meter.eta(remaining, processed, now) if (self.total is not None or open_jobs) else None,
            "routines": routines, "waiting": stats.get("waiting", []), "processes": stats.get("processes", []),
            "bottleneck": max(ranked)[1] if ranked else None,
            "failures": list(self.failures), "flows": self.flows,
            "extra": {k: v for k, v in stats.items() if k not in KNOWN_STATS},
            "dashboard_cpu": self._cost(), "pid": os.getpid(),
        }
        self.last_stats = stats
        self._record(snap)
        if final:
            snap["summary"] = self._summary(stats, elapsed, processes, done)
        self.last = snap
        return snap

    def _summary(self, stats: dict, wall: float, processes: int, done: int) -> dict:
        """The run as a whole, as the terminal prints it at the end."""
        routines = stats.get("routines", {})
        for routine in routines.values():
            routine.setdefault("max_concurrency", None)
            if routine["max_concurrency"] is None:
                routine["max_concurrency"] = processes
        jobs = stats.get("jobs", {})
        return {"wall": round(wall, 3), "done": done, "throughput": done / wall if wall > 0 else None,
                "completed": jobs.get("completed", 0), "failed": jobs.get("failed", 0),
                "cancelled": jobs.get("cancelled", 0),
                "busy": {rid: (r.get("busy_seconds", 0.0) / (wall * _lanes(r, processes)) if wall > 0 else None)
                         for rid, r in routines.items()},
                "hint": bottleneck_hint(routines, wall, processes, len(os.sched_getaffinity(0)))}

    # -- WorkerState, on demand ----------------------------------------------------------------------

    def worker_states(self) -> dict:
        """Every worker's WorkerState: status, counters, and each routine state with its size (read-only)."""
        lost = {rid: r.get("lost_updates", 0) for rid, r in ((self.last or {}).get("routines") or {}).items()}
        workers = []
        for wid in self.runtime.list_workers():
            entry: dict[str, Any] = {"worker_id": wid, "routines": []}
            try:
                ws = self.runtime.get_worker_state(wid)
                entry.update(flow_id=ws.flow_id, status=ws.status, jobs_processed=ws.jobs_processed,
                             jobs_failed=ws.jobs_failed)
                states = ws.routine_states
            except RoutiluxError as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
                workers.append(entry)
                continue
            for rid, state in states.items():
                text = json.dumps(state, indent=1, sort_keys=True, ensure_ascii=False)
                size = len(json.dumps(state, separators=(",", ":")).encode("utf-8"))
                entry["routines"].append({"routine": rid, "bytes": size, "lost_updates": lost.get(rid, 0),
                                          "json": _clip(text, MAX_STATE_SHOWN), "truncated": len(text) > MAX_STATE_SHOWN})
            workers.append(entry)
        return {"workers": workers}
