"""Scenario ``lifecycle`` of ``scripts/bench.py``: an idle runtime's shutdown and a crashed worker's replacement.

* shutdown: a started, warmed-up, idle ``Runtime`` -> ``shutdown()`` returned
  (every process gone), vs ``ProcessPoolExecutor(N, spawn).shutdown(wait=True)``.
* respawn: SIGKILL of an idle worker -> its replacement reported ready (through
  the test hooks ``Runtime._testing``: the supervisor's own condition, no
  polling). No baseline: a ``ProcessPoolExecutor`` whose worker dies is broken
  for good.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor

import psutil
from _bench_scenarios import RMP, BenchError, Check, Config, Scenario, _ppe_warm, _rmp_warm, run_rounds

from routilux_mp import Runtime

#: Seconds the idle runtime runs before its worker is killed: the spare worker, started once the pool
#: is ready, has finished starting by then (as it has when a worker crashes in a real run).
SPARE_SETTLE = 1.0
#: Targets of issue 10 (seconds).
SHUTDOWN_TARGET, RESPAWN_TARGET = 0.050, 0.030


def scenario_lifecycle(cfg: Config) -> Scenario:
    """Idle shutdown and respawn times."""
    n = cfg.processes
    sc = Scenario("lifecycle", "Idle shutdown, and a crashed worker's replacement")
    sc.description = (
        f"Shutdown: an idle, warmed-up Runtime(processes={n}) (one flow, {2 * n} jobs done) -> shutdown() returned "
        f"with every process gone, vs ProcessPoolExecutor({n}, spawn).shutdown(wait=True) after a warm-up. "
        f"Respawn: SIGKILL of an idle worker {SPARE_SETTLE:g}s after the pool was ready -> its replacement ready "
        "(the supervisor notices the death, gives the lane the spare worker process started ahead, or a new one, "
        "and the worker reports ready)."
    )
    sc.quantity("shutdown_s", "idle shutdown, seconds", "s", False)
    sc.quantity("respawn_s", "a killed worker's replacement ready, seconds", "s", False)
    rmp, ppe = f"{RMP} Runtime({n})", f"ProcessPoolExecutor({n}, spawn)"

    def run_rmp(_r: int) -> dict:
        runtime = Runtime(processes=n)
        try:
            runtime.exec("bench-echo")
            _rmp_warm(runtime, "bench-echo", "r", "in", {"x": 0}, 2 * n, cfg.timeout)
            hooks = runtime._testing
            if not hooks.wait_pool_ready(cfg.timeout):
                raise BenchError(f"{rmp}: the pool was not ready within {cfg.timeout:g}s")
            time.sleep(SPARE_SETTLE)  # (not a synchronization: a worker crashes some time after start-up)
            pid = hooks.worker_pid(0)
            start = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            if not (hooks.wait_pool_refilled(1, cfg.timeout) and hooks.wait_pool_ready(cfg.timeout)):
                raise BenchError(f"{rmp}: the killed worker was not replaced within {cfg.timeout:g}s")
            respawn = time.perf_counter() - start
            _rmp_warm(runtime, "bench-echo", "r", "in", {"x": 0}, 2 * n, cfg.timeout)  # idle again, every lane used
            ours = [psutil.Process(p["pid"]) for p in runtime.stats()["processes"] if p["pid"]]
            ours.append(psutil.Process(hooks.state_pid))
        finally:
            start = time.perf_counter()
            runtime.shutdown()
            shutdown = time.perf_counter() - start
        alive = [p.pid for p in ours if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if alive:
            raise BenchError(f"{rmp}: processes {alive} were still running when shutdown() returned")
        return {rmp: {"shutdown_s": shutdown, "respawn_s": respawn}}

    def run_ppe(_r: int) -> dict:
        pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
        try:
            _ppe_warm(pool, n, cfg.timeout)
        finally:
            start = time.perf_counter()
            pool.shutdown(wait=True)
            elapsed = time.perf_counter() - start
        return {ppe: {"shutdown_s": elapsed}}

    run_rounds(sc, cfg, {rmp: run_rmp, ppe: run_ppe})
    sc.checks.append(Check("idle shutdown (s)", "shutdown_s", rmp, None, SHUTDOWN_TARGET))
    sc.checks.append(Check(f"idle shutdown vs {ppe}", "shutdown_s", rmp, ppe))
    sc.checks.append(Check("killed worker's replacement ready (s)", "respawn_s", rmp, None, RESPAWN_TARGET))
    return sc
