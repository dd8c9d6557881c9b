"""Scenarios of ``bench.py --backend ray``: routilux-mp on Ray vs the local backend vs Ray used directly.

One Ray instance serves the whole run (``open_ray``): a private one on this
machine with N CPUs, or the cluster at ``--address``. Every system runs on the
same cores, its pools, runtimes and actors started and warmed up before the
timer, each round.

* ``cpu``: ~30 ms pure-Python items: Runtime(N, backend="ray") vs
  Runtime(N) (local) vs Ray tasks vs N Ray actors. Target: >= 0.9x local.
* ``tiny``: trivial activations, one at a time and all at once:
  Runtime(N, backend="ray") vs calls on N Ray actors (and Ray tasks, all at
  once). Target: >= 2x Ray actor calls.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import _bench_scenarios as bs
from _bench_scenarios import RMP, Check, Config, Scenario, SystemFn, cpu_work, echo_value

from routilux_mp import Runtime

#: Where the bench's Ray is (set by ``open_ray``): the address given, or the private instance's.
ADDRESS: list[str | None] = [None]


def open_ray(cfg: Config, address: str | None) -> None:
    """Connect to ``address``, or start a private Ray instance with ``cfg.processes`` CPUs."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers need not import scripts/
    ray.cloudpickle.register_pickle_by_value(bs)
    if address is None:
        ray.init(address="local", num_cpus=cfg.processes, include_dashboard=False, configure_logging=False)
    else:
        ray.init(address=address, configure_logging=False)
    ADDRESS[0] = ray.get_runtime_context().gcs_address


def close_ray() -> None:
    import ray

    ray.shutdown()


def _ray_task(n: int, timeout: float) -> Any:
    """A warmed-up Ray task (one CPU) doing ``cpu_work`` or ``echo_value``."""
    import ray

    @ray.remote(num_cpus=1)
    def task(name: str, x: Any) -> Any:
        return cpu_work(x) if name == "cpu" else echo_value(x)

    ray.get([task.remote("echo", 0) for _ in range(4 * n)], timeout=timeout)
    return task


def _ray_actors(n: int, timeout: float) -> list[Any]:
    """``n`` warmed-up Ray actors (one CPU each) doing ``cpu_work`` or ``echo_value`` (free them with ``_free``).

    Tasks and actors never run at once: actors hold their CPUs, and tasks
    would wait for them forever.
    """
    import ray

    @ray.remote(num_cpus=1)
    class Worker:
        def call(self, name: str, x: Any) -> Any:
            return cpu_work(x) if name == "cpu" else echo_value(x)

    actors = [Worker.remote() for _ in range(n)]
    ray.get([a.call.remote("echo", 0) for a in actors for _ in range(4)], timeout=timeout)
    return actors


def _free(actors: list[Any]) -> None:
    """Kill ``actors`` and wait until their CPUs are free again."""
    import ray

    for actor in actors:
        ray.kill(actor)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            raise bs.BenchError("Ray did not free the actors' CPUs within 30s")
        time.sleep(0.01)  # Ray has no event for freed resources


def scenario_cpu(cfg: Config) -> Scenario:
    """CPU-bound items: the Ray backend vs the local backend vs Ray tasks and actors, on the same cores."""
    import ray

    n = cfg.processes
    work_n, seconds = bs.calibrate()
    count = (4 if cfg.quick else 40) * n
    ns = [work_n] * count
    expected = [cpu_work(work_n)]
    sc = Scenario("cpu", "CPU-bound items: routilux-mp on Ray vs local vs Ray directly")
    sc.description = (f"{count} items of {seconds * 1000:.1f} ms of CPU each on N={n} lanes / processes / "
                      "actors; everything started and warmed up before the timer.")
    sc.quantity("items_per_s", "items per second", "items/s", True)
    on_ray, local, tasks, actors_ = f"{RMP} on Ray ({n})", f"{RMP} local ({n})", "Ray tasks", f"Ray actors ({n})"

    def run_rmp(backend: dict, label: str) -> SystemFn:
        def run(_r: int) -> dict:
            with Runtime(processes=n, **backend) as runtime:
                runtime.exec("bench-cpu")
                bs._rmp_warm(runtime, "bench-cpu", "r", "in", {"i": -1, "n": 1}, 2 * n, cfg.timeout)
                start = time.perf_counter()
                jobs = [runtime.post("bench-cpu", "r", "in", {"i": i, "n": x}, timeout=cfg.timeout)[1]
                        for i, x in enumerate(ns)]
                bs._wait_all(runtime, cfg.timeout, label)
                elapsed = time.perf_counter() - start
                bs._same([job.outputs[0]["data"]["h"] for job in jobs], expected, label)
            return {label: {"items_per_s": count / elapsed}}
        return run

    def run_tasks(_r: int) -> dict:
        task = _ray_task(n, cfg.timeout)
        start = time.perf_counter()
        results = ray.get([task.remote("cpu", x) for x in ns], timeout=cfg.timeout)
        elapsed = time.perf_counter() - start
        bs._same(results, expected, tasks)
        return {tasks: {"items_per_s": count / elapsed}}

    def run_actors(_r: int) -> dict:
        actors = _ray_actors(n, cfg.timeout)
        try:
            start = time.perf_counter()
            results = ray.get([actors[i % n].call.remote("cpu", x) for i, x in enumerate(ns)], timeout=cfg.timeout)
            elapsed = time.perf_counter() - start
        finally:
            _free(actors)
        bs._same(results, expected, actors_)
        return {actors_: {"items_per_s": count / elapsed}}

    bs.run_rounds(sc, cfg, {on_ray: run_rmp({"backend": "ray", "address": ADDRESS[0]}, on_ray),
                            local: run_rmp({}, local), tasks: run_tasks, actors_: run_actors})
    sc.checks.append(Check("on Ray vs the local backend", "items_per_s", on_ray, local, 0.9))
    sc.checks.append(Check("on Ray vs Ray tasks", "items_per_s", on_ray, tasks))
    sc.checks.append(Check("on Ray vs Ray actors", "items_per_s", on_ray, actors_))
    return sc


def scenario_tiny(cfg: Config) -> Scenario:
    """Trivial activations: the Ray backend vs calls on Ray actors (and Ray tasks)."""
    import ray

    n = cfg.processes
    one = 200 if cfg.quick else 600
    many = 500 if cfg.quick else 3000
    sc = Scenario("tiny", "Tiny activations: routilux-mp on Ray vs Ray actor calls")
    sc.description = (f"One at a time: {one} x (post, wait) vs ray.get(actor.call.remote(x)). All at once: {many} "
                      f"posts then wait vs ray.get of {many} calls spread over {n} actors (and {many} tasks).")
    sc.quantity("per_s", "activations per second", "act/s", True)
    rmp_one, rmp_all = f"{RMP} on Ray, one at a time", f"{RMP} on Ray, all at once"
    act_one, act_all, task_all = "Ray actor call, one at a time", f"Ray actor calls ({n}), all at once", \
        "Ray tasks, all at once"

    def run_rmp(_r: int) -> dict:
        with Runtime(processes=n, backend="ray", address=ADDRESS[0]) as runtime:
            runtime.exec("bench-echo")
            bs._rmp_warm(runtime, "bench-echo", "r", "in", {"x": 0}, 4 * n, cfg.timeout)
            start = time.perf_counter()
            for i in range(one):
                _, job = runtime.post("bench-echo", "r", "in", {"x": i}, timeout=cfg.timeout)
                if not job.wait(cfg.timeout):
                    raise bs.BenchError(f"{rmp_one}: a job did not finish within {cfg.timeout:g}s")
            t_one = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(many):
                runtime.post("bench-echo", "r", "in", {"x": i}, timeout=cfg.timeout)
            bs._wait_all(runtime, cfg.timeout, rmp_all)
            t_all = time.perf_counter() - start
            bs._check_completed(runtime, 4 * n + one + many, RMP)
        return {rmp_one: {"per_s": one / t_one}, rmp_all: {"per_s": many / t_all}}

    def run_ray(_r: int) -> dict:
        actors = _ray_actors(n, cfg.timeout)
        try:
            start = time.perf_counter()
            for i in range(one):
                ray.get(actors[0].call.remote("echo", {"x": i}), timeout=cfg.timeout)
            t_one = time.perf_counter() - start
            start = time.perf_counter()
            got = ray.get([actors[i % n].call.remote("echo", {"x": i}) for i in range(many)], timeout=cfg.timeout)
            t_all = time.perf_counter() - start
        finally:
            _free(actors)
        task = _ray_task(n, cfg.timeout)
        start = time.perf_counter()
        got_tasks = ray.get([task.remote("echo", {"x": i}) for i in range(many)], timeout=cfg.timeout)
        t_tasks = time.perf_counter() - start
        if len(got) != many or len(got_tasks) != many:
            raise bs.BenchError("Ray lost results")
        return {act_one: {"per_s": one / t_one}, act_all: {"per_s": many / t_all}, task_all: {"per_s": many / t_tasks}}

    bs.run_rounds(sc, cfg, {RMP: run_rmp, "Ray": run_ray})
    sc.checks.append(Check("one at a time: vs a Ray actor call", "per_s", rmp_one, act_one, 2.0))
    sc.checks.append(Check("all at once: vs Ray actor calls", "per_s", rmp_all, act_all, 2.0))
    sc.checks.append(Check("all at once: vs Ray tasks", "per_s", rmp_all, task_all))
    return sc


SCENARIOS = {"cpu": scenario_cpu, "tiny": scenario_tiny}
