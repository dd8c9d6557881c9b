"""Soak test: thousands of short jobs while worker processes are SIGKILLed at random.

Every job must end in exactly one terminal state, and every completed job must
carry exactly one output (none lost, none duplicated). Jobs whose activation
was running on a killed worker are retried (``ErrorHandler("retry")``), so
all of them should complete.

Usage::

    python scripts/soak.py                     # 5,000 jobs, >= 20 kills, 2 processes
    python scripts/soak.py --jobs 500 --kills 5 --json   # quick, machine-readable
    python scripts/soak.py --stages 3          # each job through 3 routines in a row (fused stages)

Exit code 0 when nothing was lost or duplicated and enough kills happened.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import signal
import sys
import threading
import time

from routilux_mp import ErrorHandler, Flow, FlowRegistry, Routine, Runtime


class Work(Routine):
    """A short activation: a few hundred microseconds of hashing, one emit."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("in")
        self.add_event("out", ["n", "digest"])

        def logic(slot_data, policy_message, worker_state):
            n = slot_data["in"][0]["n"]
            digest = hashlib.sha256(str(n).encode() * 2000).hexdigest()[:12]
            worker_state.increment("soak", "runs")
            self.emit("out", n=n, digest=digest)

        self.set_logic(logic)
        self.set_max_concurrency(None)
        self.set_error_handler(ErrorHandler("retry", max_retries=5, retry_delay=0.0))


def run_soak(jobs: int, kills: int, processes: int, seed: int, stages: int = 1) -> dict:
    flow = Flow("soak")
    names = ["work"] + [f"work{k}" for k in range(2, stages + 1)]
    for name in names:
        flow.add_routine(Work(), name)
    for source, target in itertools.pairwise(names):  # fused: a worker runs each next stage itself
        flow.connect(source, "out", target, "in")
    FlowRegistry.get_instance().register_by_name("soak", flow)
    rng = random.Random(seed)
    done_calls: dict[str, int] = {}
    progress = threading.Condition()

    def on_done(job) -> None:
        with progress:
            done_calls[job.job_id] = done_calls.get(job.job_id, 0) + 1
            progress.notify_all()

    def killer(runtime: Runtime, killed: list[int]) -> None:
        """SIGKILL a random live worker each time another slice of the jobs has finished."""
        every = max(1, jobs // (kills + 1))
        for k in range(1, kills + 1):
            with progress:
                if not progress.wait_for(lambda k=k: len(done_calls) >= k * every, timeout=120):
                    return
            pids = [p["pid"] for p in runtime.stats()["processes"] if p["alive"]]
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    killed.append(1)
                except ProcessLookupError:
                    pass

    started = time.perf_counter()
    killed: list[int] = []
    with Runtime(processes=processes) as runtime:
        ws = runtime.exec("soak")
        thread = threading.Thread(target=killer, args=(runtime, killed), daemon=True)
        thread.start()
        posted = []
        for n in range(jobs):
            _, job = runtime.post("soak", "work", "in", {"n": n})
            job.add_done_callback(on_done)
            posted.append(job)
        finished = runtime.wait_until_all_jobs_finished(timeout=600)
        thread.join(60)
        stats = runtime.stats()
        runs = (ws.get_routine_state("soak") or {}).get("runs", 0)
    kills_done = len(killed)
    elapsed = time.perf_counter() - started
    statuses: dict[str, int] = {}
    for job in posted:
        statuses[job.status] = statuses.get(job.status, 0) + 1
    lost = [j.job_id for j in posted if not j.done or (j.status == "completed" and not j.outputs)]
    duplicated = [j.job_id for j in posted if len(j.outputs) > 1 or done_calls.get(j.job_id, 0) > 1]
    return {
        "jobs": jobs,
        "processes": processes,
        "kills": kills_done,
        "restarts": sum(p["restarts"] for p in stats["processes"]),
        "finished_in_time": finished,
        "statuses": statuses,
        "lost": len(lost),
        "duplicated": len(duplicated),
        "done_callbacks": sum(done_calls.values()),
        "logic_runs": runs,
        "stages": stages,
        "fused_runs": sum(stats["routines"][name]["fused"] for name in names),
        "seconds": round(elapsed, 2),
        "jobs_per_second": round(jobs / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stages", type=int, default=1, help="routines each job goes through, in a row (default 1)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = run_soak(args.jobs, args.kills, args.processes, args.seed, args.stages)
    ok = (report["lost"] == 0 and report["duplicated"] == 0 and report["finished_in_time"]
          and report["kills"] >= args.kills and report["done_callbacks"] == args.jobs)
    if args.json:
        print(json.dumps(dict(report, ok=ok)))
    else:
        for key, value in report.items():
            print(f"{key:>18}: {value}")
        print("OK: every job ended exactly once" if ok else "FAILED: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
