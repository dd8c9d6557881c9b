"""``scripts/bench.py --profile [tiny|pipeline]``: where the supervisor's CPU goes per item.

Runs the ``tiny`` scenario's all-at-once path (``--profile-items`` trivial
items posted, then ``wait_until_all_jobs_finished``), or the pipeline
scenario's flow with a token transform, on a warmed-up runtime,
twice: once plain, measuring this process's CPU seconds (every thread: the
posting thread and the dispatcher) and the workers' CPU per activation, and
once under ``cProfile`` in *every* thread of this process (a profiler per
thread, merged), printing the functions with the most own time, in
microseconds per activation. The profiler itself slows things down about 2x;
read the profile for proportions, the plain run for absolute costs.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import psutil
from _bench_scenarios import _rmp_warm, _wait_all, pipeline_line

from routilux_mp import Runtime

if TYPE_CHECKING:
    from typing_extensions import Self

#: Functions shown by the profile.
TOP_FUNCTIONS = 30


class AllThreadsProfile:
    """cProfile in every thread started while it is on (and in this one): one profiler per thread, merged."""

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def _start_in_thread(self, *_args: Any) -> None:
        # threading calls this hook as the new thread's first profile event: switch that thread to cProfile.
        # Thread CPU time, not wall time: a dispatcher blocked in poll() must not look busy.
        profile = cProfile.Profile(time.thread_time)
        with self._lock:
            self.profiles.append(profile)
        sys.setprofile(None)
        profile.enable()

    def __enter__(self) -> Self:
        threading.setprofile(self._start_in_thread)
        self._start_in_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        threading.setprofile(None)  # type: ignore[arg-type]
        for profile in self.profiles:
            profile.disable()  # (in other threads this is a no-op; they have ended: their runtime shut down)

    def stats(self) -> pstats.Stats:
        stream = io.StringIO()
        stats = pstats.Stats(self.profiles[0], stream=stream)
        for profile in self.profiles[1:]:
            stats.add(profile)
        return stats


#: What --profile-flow runs: flow, entry routine and slot, and the item posted (``i``: its number).
PROFILED = {
    "tiny": ("bench-echo", "r", "in", lambda i: {"x": i}),
    # The pipeline scenario's flow with a token transform (100 rounds of hashing, ~10 us): the overhead.
    "pipeline": ("bench-pipeline", "parse", "line", lambda i: {"line": pipeline_line(i), "n": 100}),
}


def _run(processes: int, items: int, timeout: float, kind: str) -> dict[str, float]:
    """One warmed-up runtime; ``items`` posted all at once; CPU seconds of this process and of the workers."""
    flow, routine, slot, item = PROFILED[kind]
    with Runtime(processes=processes) as runtime:
        runtime.exec(flow)
        _rmp_warm(runtime, flow, routine, slot, item(-1), 4 * processes, timeout)
        workers = [psutil.Process(p["pid"]) for p in runtime.stats()["processes"] if p["pid"]]
        worker_cpu = sum(sum(w.cpu_times()[:2]) for w in workers)
        cpu = time.process_time()
        start = time.perf_counter()
        for i in range(items):
            runtime.post(flow, routine, slot, item(i), timeout=timeout)
        _wait_all(runtime, timeout, "profile")
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        worker_cpu = sum(sum(w.cpu_times()[:2]) for w in workers) - worker_cpu
    return {"wall": wall, "supervisor_cpu": cpu, "worker_cpu": worker_cpu}


def profile(processes: int, items: int, timeout: float, kind: str = "tiny") -> str:
    """The report: per-item costs of a plain run, then the merged profile of a profiled run."""
    plain = _run(processes, items, timeout, kind)
    with AllThreadsProfile() as prof:
        profiled = _run(processes, items, timeout, kind)
    out = io.StringIO()
    us = 1e6 / items
    what = ("tiny activations, all at once" if kind == "tiny"
            else "3-stage pipeline items (parse -> ~10 us transform -> collect: 3 activations each), all at once")
    print(f"{what}: {items:,} items on {processes} processes", file=out)
    print(f"  plain run:    {items / plain['wall']:,.0f} items/s; supervisor CPU "
          f"{plain['supervisor_cpu'] * us:.1f} us per item (every thread of this process); workers' CPU "
          f"{plain['worker_cpu'] * us:.1f} us per item (all workers)", file=out)
    print(f"  profiled run: {items / profiled['wall']:,.0f} items/s; supervisor CPU "
          f"{profiled['supervisor_cpu'] * us:.1f} us per item (with the profiler's own overhead)", file=out)
    stats = prof.stats()
    stats.stream = out
    print(f"\nfunctions by own time (tottime), microseconds per item, top {TOP_FUNCTIONS} "
          "(all threads of the supervisor process):", file=out)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:TOP_FUNCTIONS]
    print(f"  {'own us':>8} {'cum us':>8} {'calls/item':>10}  function", file=out)
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in rows:
        where = filename.rsplit("/", 2)
        short = "/".join(where[-2:]) if len(where) > 1 else filename
        print(f"  {tottime * us:8.2f} {cumtime * us:8.2f} {calls / items:10.2f}  {name} ({short}:{line})", file=out)
    print("\ncumulative time of the supervisor's entry points (us per item):", file=out)
    wanted = ("post", "run_once", "dispatch", "evaluate", "_apply", "handle", "poll", "send", "finish")
    cum = sorted(((k, v) for k, v in stats.stats.items() if k[2] in wanted and "routilux_mp" in k[0]),
                 key=lambda kv: kv[1][3], reverse=True)
    for (filename, line, name), (_cc, calls, _tottime, cumtime, _callers) in cum[:15]:
        short = "/".join(filename.rsplit("/", 2)[-2:])
        print(f"  {cumtime * us:8.2f}  {name} ({short}:{line}), {calls / items:.2f} calls per item", file=out)
    return out.getvalue()
