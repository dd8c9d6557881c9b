"""The scenarios of ``scripts/bench.py``: routilux-mp side by side with what users would use instead.

Each scenario builds *systems*: callables that run one round of one system
(or of a group sharing a pool) and return ``{system_label: {quantity: value}}``.
:func:`run_rounds` runs them alternating, in a rotated order every round, so
slow drift of the machine (other jobs, thermal limits) hits every system
alike. Pools and runtimes are created and warmed up *before* the timer in
each round; start-up has its own scenario (``startup``).

Routines here are shipped to worker processes by value (cloudpickle), like a
user's ``__main__`` script; functions given to ``ProcessPoolExecutor`` and
``multiprocess.Pool`` are pickled by reference (this module is importable in
their children through ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import psutil

from routilux_mp import Flow, FlowRegistry, Routine, Runtime
from routilux_mp.activation_policies import batch_size_policy

cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: Seconds of pure Python one CPU-bound item should take (scenario ``cpu``).
CPU_ITEM_SECONDS = 0.030
#: The pipeline's transform stage costs this fraction of a CPU-bound item (about 2 ms; scenario ``durable``).
PIPELINE_WORK_FRACTION = 1 / 15
#: Seconds of CPU of the pipeline scenario's transform stage (where real pipelines live: stages of ~1 ms).
PIPELINE_ITEM_SECONDS = 0.001
#: Items per activation of the streaming flow (scenario ``memory``).
STREAM_BATCH = 100
#: The supervisor's RSS is sampled this often while streaming (seconds).
RSS_SAMPLE_INTERVAL = 0.02
#: The value written and read by the state scenario: a small JSON routine state.
STATE_VALUE = {"count": 1, "name": "bench", "tags": ["a", "b"], "ratio": 0.5}

RMP = "routilux-mp"
MB = 1_000_000


class BenchError(Exception):
    """Raised when a benchmark step fails or one of its waits times out."""


@dataclass
class Config:
    """What the harness was asked to run."""

    processes: int
    rounds: int
    quick: bool
    stream_items: int
    timeout: float
    systems: list[str] | None = None  # substrings of system labels to run (None: all)

    def wanted(self, label: str) -> bool:
        return self.systems is None or any(s.lower() in label.lower() for s in self.systems)


@dataclass
class Quantity:
    """One measured quantity: per system, one sample per round."""

    label: str
    unit: str
    higher_is_better: bool
    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, system: str) -> float | None:
        values = self.samples.get(system)
        return statistics.median(values) if values else None


@dataclass
class Check:
    """A ratio ``system / baseline`` of medians (or, without a baseline, the system's median), with a target."""

    label: str
    quantity: str
    system: str
    baseline: str | None = None
    target: float | None = None
    note: str = ""


@dataclass
class Scenario:
    """Everything one scenario measured."""

    name: str
    title: str
    description: str = ""
    quantities: dict[str, Quantity] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    foreign_cores: float | None = None  # cores other processes kept busy while this scenario ran
    round_foreign_cores: list[float] = field(default_factory=list)

    def quantity(self, key: str, label: str, unit: str, higher_is_better: bool) -> Quantity:
        if key not in self.quantities:
            self.quantities[key] = Quantity(label, unit, higher_is_better)
        return self.quantities[key]


SystemFn = Callable[[int], dict[str, dict[str, float]]]


def log(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class CpuMeter:
    """How much CPU processes *other than ours* used between two readings, in cores.

    Machine-wide busy time (``/proc/stat``) minus the CPU time of this process and
    of its children that were waited for (every pool and runtime of a round is
    shut down, so its processes are reaped and counted, by the time we read).
    """

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        own = self._me.cpu_times()
        return time.monotonic(), busy, own.user + own.system + own.children_user + own.children_system

    def foreign_cores(self) -> float:
        now = self._read()
        wall = now[0] - self._start[0]
        if wall <= 0:
            return 0.0
        return max(0.0, (now[1] - self._start[1]) - (now[2] - self._start[2])) / wall


def run_rounds(scenario: Scenario, cfg: Config, systems: dict[str, SystemFn]) -> None:
    """Run every system once per round, in an order rotated each round; record the samples."""
    names = [name for name in systems if cfg.wanted(name)]
    for r in range(cfg.rounds):
        shift = r % len(names) if names else 0
        order = names[shift:] + names[:shift]
        meter = CpuMeter()
        for name in order:
            results = systems[name](r)
            for system, values in results.items():
                for key, value in values.items():
                    scenario.quantities[key].samples.setdefault(system, []).append(value)
        scenario.round_foreign_cores.append(round(meter.foreign_cores(), 2))
        log(f"{scenario.name}: round {r + 1}/{cfg.rounds} done (other processes used "
            f"{scenario.round_foreign_cores[-1]:.2f} cores)")


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _wait_all(runtime: Runtime, timeout: float, what: str) -> None:
    if not runtime.wait_until_all_jobs_finished(timeout):
        raise BenchError(f"{what}: routilux-mp jobs did not finish within {timeout:g}s ({runtime.stats()['jobs']})")


def _check_completed(runtime: Runtime, expected: int, what: str) -> None:
    jobs = runtime.stats()["jobs"]
    if jobs.get("completed", 0) != expected or len(jobs) != 1:
        raise BenchError(f"{what}: expected {expected} completed jobs, got {jobs}")


def _rmp_warm(runtime: Runtime, flow: str, routine: str, slot: str, item: dict, count: int, timeout: float) -> None:
    """Post ``count`` items and wait, so every worker process is up and has loaded the flow.

    Also reads a state, so the state server has finished starting (it starts
    in parallel and would otherwise take CPU from the first timed round).
    """
    for _ in range(count):
        runtime.post(flow, routine, slot, dict(item), timeout=timeout)
    _wait_all(runtime, timeout, "warm-up")
    runtime.get_worker_state(runtime.list_workers()[-1]).get_routine_state("warm-up")


def _ppe_warm(pool: ProcessPoolExecutor, processes: int, timeout: float) -> None:
    list(pool.map(echo_value, range(4 * processes), timeout=timeout))


def joblib_module() -> Any:
    """``joblib`` when installed (the ``bench`` extra), else ``None``: its baselines are then skipped with a note."""
    try:
        import joblib
    except ImportError:
        return None
    return joblib


JOBLIB_MISSING = "joblib baselines: skipped: joblib not installed (pip install -e '.[bench]')"


@contextlib.contextmanager
def joblib_pool(n: int, batch_size: Any = "auto") -> Iterator[Any]:
    """A started, warmed-up ``joblib.Parallel`` (loky backend), reused within a round; its workers stopped after.

    (joblib keeps loky's workers for reuse after ``Parallel`` ends; every pool of a round is stopped at its end.)
    """
    joblib = joblib_module()
    from joblib.externals.loky import get_reusable_executor

    try:
        with joblib.Parallel(n_jobs=n, batch_size=batch_size) as pool:
            pool(joblib.delayed(echo_value)(i) for i in range(4 * n))
            yield pool
    finally:
        get_reusable_executor().shutdown(wait=True)


# ---------------------------------------------------------------------------- work


def cpu_work(n: int) -> int:
    """Pure-Python integer hashing, ``n`` rounds (no C extension, holds the GIL throughout)."""
    h = 0
    for i in range(n):
        h = hash((h, i))
    return h


def echo_value(x: Any) -> Any:
    """The trivial task: return the input."""
    return x


def pipeline_line(i: int) -> str:
    """The ``i``-th input line of the pipeline scenario (JSON text)."""
    return json.dumps({"id": i, "bucket": f"b{i % 8}", "text": f"item {i} " + "x" * 40})


def pipeline_transform(rec: dict, n: int) -> int:
    """The pipeline's CPU stage: a score from ``n`` rounds of hashing, seeded by the record."""
    h = rec["id"]
    for i in range(n):
        h = hash((h, i))
    return h % 1000


def calibrate(target: float = CPU_ITEM_SECONDS) -> tuple[int, float]:
    """A work size ``n`` such that ``cpu_work(n)`` takes about ``target`` seconds of CPU; returns ``(n, seconds)``.

    CPU time of this thread, not wall time: other processes on a busy machine
    would otherwise stretch the measurement and shrink the work.
    """
    n = 20_000
    for _ in range(3):
        best = min(_cpu_time(cpu_work, n) for _ in range(3))
        n = max(1000, int(n * target / best))
    return n, min(_cpu_time(cpu_work, n) for _ in range(3))


def _cpu_time(fn: Callable[..., Any], *args: Any) -> float:
    start = time.thread_time()
    fn(*args)
    return time.thread_time() - start


# ---------------------------------------------------------------------------- routilux-mp routines


class CpuRoutine(Routine):
    """Parallel, stateless: hash ``item["n"]`` rounds, emit the result (a job output)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("in")
        self.add_event("out", ["i", "h"])

        def logic(slot_data, policy_message, worker_state):
            for item in slot_data["in"]:
                self.emit("out", i=item["i"], h=cpu_work(item["n"]))

        self.set_logic(logic)
        self.set_max_concurrency(None)


class EchoRoutine(Routine):
    """Parallel, trivial: emit every item as it came (a job output)."""

    def __init__(self, max_queue_length: int = 1000) -> None:
        super().__init__()
        self.add_slot("in", max_queue_length=max_queue_length)
        self.add_event("out")

        def logic(slot_data, policy_message, worker_state):
            for item in slot_data["in"]:
                self.emit("out", **item)

        self.set_logic(logic)
        self.set_max_concurrency(None)


class SinkRoutine(Routine):
    """Parallel, trivial, batched: take ``STREAM_BATCH`` items at once and drop them."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("in")

        def logic(slot_data, policy_message, worker_state):
            return len(slot_data["in"])

        self.set_logic(logic)
        self.set_activation_policy(batch_size_policy(STREAM_BATCH))
        self.set_max_concurrency(None)


class ParseRoutine(Routine):
    """Pipeline stage 1 (one at a time per worker, like an actor): JSON text -> record."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("line")
        self.add_event("parsed", ["rec", "n"])

        def logic(slot_data, policy_message, worker_state):
            for item in slot_data["line"]:
                self.emit("parsed", rec=json.loads(item["line"]), n=item["n"])

        self.set_logic(logic)


class TransformRoutine(Routine):
    """Pipeline stage 2 (parallel): a CPU-bound score per record."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("parsed")
        self.add_event("scored", ["bucket", "score"])

        def logic(slot_data, policy_message, worker_state):
            for item in slot_data["parsed"]:
                rec = item["rec"]
                self.emit("scored", bucket=rec["bucket"], score=pipeline_transform(rec, item["n"]))

        self.set_logic(logic)
        self.set_max_concurrency(None)


class CollectRoutine(Routine):
    """Pipeline stage 3 (stateful): add each score to its bucket with ``worker_state.increment``."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("scored")

        def logic(slot_data, policy_message, worker_state):
            for item in slot_data["scored"]:
                worker_state.increment("collect", item["bucket"], item["score"])

        self.set_logic(logic)


class StateOpsRoutine(Routine):
    """Parallel: ``k`` WorkerState operations of one kind in a row; emits ``(t0, t1, pid)``."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("in")
        self.add_event("timing", ["t0", "t1", "pid"])

        def logic(slot_data, policy_message, worker_state):
            for item in slot_data["in"]:
                t0, t1 = rmp_state_ops(worker_state, item["op"], item["k"], item["index"])
                self.emit("timing", t0=t0, t1=t1, pid=os.getpid())

        self.set_logic(logic)
        self.set_max_concurrency(None)


def rmp_state_ops(ws: Any, op: str, k: int, index: int) -> tuple[float, float]:
    """Run ``k`` operations ``op`` on a WorkerState (after one untimed call that opens the connection)."""
    own = f"u{index}"  # updates go to a routine state of one's own: blind writes, no lost-update noise
    ws.get_routine_state("s")
    t0 = time.monotonic()
    if op == "get":
        for _ in range(k):
            ws.get_routine_state("s")
    elif op == "update":
        for _ in range(k):
            ws.update_routine_state(own, STATE_VALUE)
    else:
        for _ in range(k):
            ws.increment("c", "n")
    return t0, time.monotonic()


def manager_state_ops(args: tuple[Any, str, int, int]) -> tuple[float, float, int]:
    """The baseline of :func:`rmp_state_ops` on a Manager dict proxy; increment = non-atomic read + write."""
    d, op, k, index = args
    own = f"u{index}"
    d["s"]  # opens this process's connection to the manager, untimed
    t0 = time.monotonic()
    if op == "get":
        for _ in range(k):
            d["s"]
    elif op == "update":
        for _ in range(k):
            d[own] = STATE_VALUE
    else:
        for _ in range(k):
            d["n"] = d["n"] + 1
    return t0, time.monotonic(), os.getpid()


def register_rmp_flows() -> None:
    """Register the flows of every scenario under ``bench-*`` names."""
    registry = FlowRegistry.get_instance()
    single = {"bench-cpu": CpuRoutine(), "bench-echo": EchoRoutine(), "bench-sink": SinkRoutine(),
              "bench-state": StateOpsRoutine()}
    for name, routine in single.items():
        flow = Flow(name)
        flow.add_routine(routine, "r")
        registry.register_by_name(name, flow)
    flow = Flow("bench-pipeline")
    flow.add_routine(ParseRoutine(), "parse")
    flow.add_routine(TransformRoutine(), "transform")
    flow.add_routine(CollectRoutine(), "collect")
    flow.connect("parse", "parsed", "transform", "parsed")
    flow.connect("transform", "scored", "collect", "scored")
    registry.register_by_name("bench-pipeline", flow)


# ---------------------------------------------------------------------------- routilux 1.1.0 (thread runtime)


def routilux_version() -> str | None:
    """The installed ``routilux`` version, or ``None``."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("routilux")
    except PackageNotFoundError:
        return None


def _rtx_policy(slots: dict, worker_state: Any) -> tuple[bool, dict, Any]:
    """One item per activation (routilux 1.1.0 has no ``activation_policies`` module, and no default)."""
    for name, slot in slots.items():
        item = slot.consume_one_new()
        if item is not None:
            return True, {name: [item]}, {"reason": "immediate"}
    return False, {}, None


def _rtx_flow(stages: list[tuple[str, Callable[..., Any], str, str | None]]) -> str:
    """Register a routilux 1.1.0 flow of a chain of routines; returns its (unique) name.

    Each stage is ``(routine_id, fn(routine, item, worker_state), slot, event)``; ``fn``
    runs per item in the runtime's threads and may emit on ``event``. It must pass
    ``worker_state=`` to ``emit``: routilux 1.1.0 runs downstream stages in its
    event-loop thread, where ``emit`` finds no execution context otherwise.
    """
    from routilux.core import Flow as RtxFlow
    from routilux.core import FlowRegistry as RtxRegistry
    from routilux.core import Routine as RtxRoutine

    def make(fn: Callable[..., Any], slot: str, event: str | None) -> Any:
        routine = RtxRoutine()
        routine.add_slot(slot)
        if event is not None:
            routine.add_event(event)

        def logic(items: list, policy_message: Any = None, worker_state: Any = None) -> None:
            for item in items:
                fn(routine, item, worker_state)

        routine.set_activation_policy(_rtx_policy)
        routine.set_logic(logic)
        return routine

    flow = RtxFlow(_unique("rtx"))
    previous = None
    for rid, fn, slot, event in stages:
        flow.add_routine(make(fn, slot, event), rid)
        if previous is not None:
            flow.connect(previous[0], previous[1], rid, slot)
        previous = (rid, event)
    RtxRegistry.get_instance().register_by_name(flow.flow_id, flow)
    return flow.flow_id


def _rtx_run(processes: int, flow_name: str, entry: tuple[str, str], items: list[dict], done: threading.Semaphore,
             timeout: float) -> float:
    """Post ``items`` to one routilux 1.1.0 worker; return seconds until ``done`` was released once per item."""
    from routilux.core import Runtime as RtxRuntime

    with RtxRuntime(thread_pool_size=processes) as runtime:
        ws = runtime.exec(flow_name)
        start = time.perf_counter()
        for item in items:
            runtime.post(flow_name, entry[0], entry[1], item, worker_id=ws.worker_id)
        deadline = time.monotonic() + timeout
        for _ in items:
            if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise BenchError(f"routilux 1.1.0 did not finish {len(items)} items within {timeout:g}s")
        return time.perf_counter() - start


# ---------------------------------------------------------------------------- 1. cpu


def scenario_cpu(cfg: Config) -> Scenario:
    """CPU-bound items through a parallel routine vs serial, ProcessPoolExecutor, routilux 1.1.0 threads."""
    n = cfg.processes
    work_n, seconds = calibrate()
    count = (4 if cfg.quick else 24) * n  # enough per round that one late item is noise
    ns = [work_n] * count
    expected = [cpu_work(work_n)]  # every item is the same work: one result to compare with
    sc = Scenario("cpu", "CPU-bound items through a parallel routine")
    sc.description = (
        f"{count} items of {seconds * 1000:.1f} ms of CPU each (pure Python: cpu_work({work_n}), calibrated at start) "
        f"on N={n} processes. Pools and runtimes are started and warmed up before the timer, every round "
        "(steady state; start-up is scenario 'startup')."
    )
    q = sc.quantity("items_per_s", "items per second", "items/s", True)
    serial, ppe, rtx, rmp = "serial loop", f"ProcessPoolExecutor({n})", "routilux 1.1.0 threads", f"{RMP} Runtime({n})"

    def run_serial(_r: int) -> dict:
        start = time.perf_counter()
        results = [cpu_work(x) for x in ns]
        elapsed = time.perf_counter() - start
        _same(results, expected, serial)
        return {serial: {"items_per_s": count / elapsed}}

    def run_ppe(_r: int) -> dict:
        with ProcessPoolExecutor(n) as pool:
            _ppe_warm(pool, n, cfg.timeout)
            start = time.perf_counter()
            results = list(pool.map(cpu_work, ns, timeout=cfg.timeout))
            elapsed = time.perf_counter() - start
        _same(results, expected, ppe)
        return {ppe: {"items_per_s": count / elapsed}}

    def run_rmp(_r: int) -> dict:
        with Runtime(processes=n) as runtime:
            runtime.exec("bench-cpu")
            _rmp_warm(runtime, "bench-cpu", "r", "in", {"i": -1, "n": 1}, 2 * n, cfg.timeout)
            start = time.perf_counter()
            jobs = [runtime.post("bench-cpu", "r", "in", {"i": i, "n": x}, timeout=cfg.timeout)[1]
                    for i, x in enumerate(ns)]
            _wait_all(runtime, cfg.timeout, rmp)
            elapsed = time.perf_counter() - start
            _same([job.outputs[0]["data"]["h"] for job in jobs], expected, rmp)
        return {rmp: {"items_per_s": count / elapsed}}

    def run_rtx(_r: int) -> dict:
        done = threading.Semaphore(0)

        def work(routine: Any, item: dict, ws: Any) -> None:
            cpu_work(item["n"])
            done.release()

        flow = _rtx_flow([("r", work, "in", None)])
        elapsed = _rtx_run(n, flow, ("r", "in"), [{"n": x} for x in ns], done, cfg.timeout)
        return {rtx: {"items_per_s": count / elapsed}}

    systems: dict[str, SystemFn] = {serial: run_serial, ppe: run_ppe, rmp: run_rmp}
    if routilux_version():
        systems[rtx] = run_rtx
    else:
        sc.notes.append("routilux 1.1.0 thread runtime: skipped: routilux not installed (pip install routilux==1.1.0)")
    run_rounds(sc, cfg, systems)
    sc.checks.append(Check("speedup vs serial loop", "items_per_s", rmp, serial, 1.85 if n == 2 else None,
                           "target for N=2" if n != 2 else ""))
    sc.checks.append(Check(f"vs {ppe}", "items_per_s", rmp, ppe, 0.95))
    if rtx in q.samples:
        sc.checks.append(Check("vs routilux 1.1.0 threads", "items_per_s", rmp, rtx))
        sc.notes.append("routilux 1.1.0 runs logic on its global thread pool (under the GIL), whatever thread_pool_size")
    return sc


def _same(results: list, expected: list, who: str) -> None:
    if any(r != expected[0] for r in results):
        raise BenchError(f"{who} computed wrong results")


# ---------------------------------------------------------------------------- 2. tiny


def scenario_tiny(cfg: Config) -> Scenario:
    """Trivial activations per second: one at a time (latency) and all at once (throughput)."""
    n = cfg.processes
    one = 200 if cfg.quick else 600
    many = 500 if cfg.quick else 3000
    sc = Scenario("tiny", "Tiny activations per second (trivial logic: emit the input)")
    sc.description = (
        f"One at a time: {one} x (post, wait for that job) vs (submit, result()). All at once: {many} items "
        f"posted then wait_until_all_jobs_finished vs executor.map(fn, items, chunksize=1). N={n} processes, "
        "a parallel routine; pools warmed up before the timer."
    )
    sc.quantity("per_s", "activations per second", "act/s", True)
    rmp_one, rmp_all = f"{RMP} post + job.wait, one at a time", f"{RMP} post all + wait_until_all"
    ppe_one, ppe_map = "PPE submit + result, one at a time", "PPE map(chunksize=1)"
    jl_auto, jl_one = "joblib Parallel, automatic batching", "joblib Parallel(batch_size=1)"

    def run_rmp(_r: int) -> dict:
        with Runtime(processes=n) as runtime:
            runtime.exec("bench-echo")
            _rmp_warm(runtime, "bench-echo", "r", "in", {"x": 0}, 4 * n, cfg.timeout)
            start = time.perf_counter()
            for i in range(one):
                _, job = runtime.post("bench-echo", "r", "in", {"x": i}, timeout=cfg.timeout)
                if not job.wait(cfg.timeout):
                    raise BenchError(f"{rmp_one}: a job did not finish within {cfg.timeout:g}s")
            t_one = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(many):
                runtime.post("bench-echo", "r", "in", {"x": i}, timeout=cfg.timeout)
            _wait_all(runtime, cfg.timeout, rmp_all)
            t_all = time.perf_counter() - start
            _check_completed(runtime, 4 * n + one + many, RMP)
        return {rmp_one: {"per_s": one / t_one}, rmp_all: {"per_s": many / t_all}}

    def run_ppe(_r: int) -> dict:
        with ProcessPoolExecutor(n) as pool:
            _ppe_warm(pool, n, cfg.timeout)
            start = time.perf_counter()
            for i in range(one):
                pool.submit(echo_value, {"x": i}).result(cfg.timeout)
            t_one = time.perf_counter() - start
            start = time.perf_counter()
            results = list(pool.map(echo_value, ({"x": i} for i in range(many)), timeout=cfg.timeout, chunksize=1))
            t_all = time.perf_counter() - start
        if len(results) != many:
            raise BenchError("PPE map lost results")
        return {ppe_one: {"per_s": one / t_one}, ppe_map: {"per_s": many / t_all}}

    def run_joblib(_r: int) -> dict:
        joblib = joblib_module()
        out = {}
        for label, batch_size in ((jl_auto, "auto"), (jl_one, 1)):
            with joblib_pool(n, batch_size) as pool:
                start = time.perf_counter()
                results = pool(joblib.delayed(echo_value)({"x": i}) for i in range(many))
                out[label] = {"per_s": many / (time.perf_counter() - start)}
            if len(results) != many:
                raise BenchError(f"{label} lost results")
        return out

    systems: dict[str, SystemFn] = {RMP: run_rmp, "PPE": run_ppe}
    if joblib_module():
        systems["joblib"] = run_joblib
    else:
        sc.notes.append(JOBLIB_MISSING)
    run_rounds(sc, cfg, systems)
    sc.checks.append(Check("one at a time: vs PPE submit one at a time", "per_s", rmp_one, ppe_one, 2.5))
    sc.checks.append(Check("all at once: vs PPE map(chunksize=1)", "per_s", rmp_all, ppe_map, 3.5))
    sc.checks.append(Check("all at once: vs PPE submit one at a time", "per_s", rmp_all, ppe_one))
    if jl_auto in sc.quantities["per_s"].samples:
        sc.checks.append(Check("all at once: vs joblib automatic batching", "per_s", rmp_all, jl_auto, 0.5))
        sc.checks.append(Check("all at once: vs joblib batch_size=1", "per_s", rmp_all, jl_one))
    return sc


# ---------------------------------------------------------------------------- 3. pipeline


def scenario_pipeline(cfg: Config) -> Scenario:
    """A 3-stage pipeline (parse -> parallel transform -> stateful collect), end to end."""
    n = cfg.processes
    work_n, seconds = calibrate(PIPELINE_ITEM_SECONDS)
    count = 150 if cfg.quick else 1000
    lines = [pipeline_line(i) for i in range(count)]
    sc = Scenario("pipeline", "3-stage pipeline, end-to-end items per second")
    sc.description = (
        f"{count} JSON lines: parse (one at a time) -> transform ({seconds * 1000:.1f} ms pure Python, parallel) "
        "-> collect (stateful: worker_state.increment per item). Baselines: the same three steps in a serial "
        f"loop; parse and collect in the main process around ProcessPoolExecutor({n}).map(transform, "
        "chunksize=1), and around joblib Parallel (automatic batching); routilux 1.1.0's thread runtime with the "
        "same three routines."
    )
    sc.quantity("items_per_s", "items per second, end to end", "items/s", True)
    serial, ppe, rtx, rmp = "serial loop", f"ProcessPoolExecutor({n})", "routilux 1.1.0 threads", f"{RMP} Runtime({n})"
    jl = f"joblib Parallel({n}), automatic batching"
    expected: dict[str, int] = {}
    for line in lines:
        rec = json.loads(line)
        expected[rec["bucket"]] = expected.get(rec["bucket"], 0) + pipeline_transform(rec, work_n)

    def run_serial(_r: int) -> dict:
        start = time.perf_counter()
        totals: dict[str, int] = {}
        for line in lines:
            rec = json.loads(line)
            totals[rec["bucket"]] = totals.get(rec["bucket"], 0) + pipeline_transform(rec, work_n)
        elapsed = time.perf_counter() - start
        _totals_ok(totals, expected, serial)
        return {serial: {"items_per_s": count / elapsed}}

    def run_ppe(_r: int) -> dict:
        with ProcessPoolExecutor(n) as pool:
            _ppe_warm(pool, n, cfg.timeout)
            start = time.perf_counter()
            recs = [json.loads(line) for line in lines]
            totals: dict[str, int] = {}
            scores = pool.map(pipeline_transform, recs, [work_n] * count, timeout=cfg.timeout)
            for rec, score in zip(recs, scores):
                totals[rec["bucket"]] = totals.get(rec["bucket"], 0) + score
            elapsed = time.perf_counter() - start
        _totals_ok(totals, expected, ppe)
        return {ppe: {"items_per_s": count / elapsed}}

    def run_rmp(_r: int) -> dict:
        with Runtime(processes=n) as runtime:
            return {rmp: {"items_per_s": run_pipeline(runtime, lines, work_n, expected, cfg.timeout, rmp)}}

    def run_rtx(_r: int) -> dict:
        done = threading.Semaphore(0)
        lock = threading.Lock()
        totals: dict[str, int] = {}

        def parse(routine: Any, item: dict, ws: Any) -> None:
            routine.emit("parsed", worker_state=ws, rec=json.loads(item["line"]))

        def transform(routine: Any, item: dict, ws: Any) -> None:
            rec = item["rec"]
            routine.emit("scored", worker_state=ws, bucket=rec["bucket"], score=pipeline_transform(rec, work_n))

        def collect(routine: Any, item: dict, ws: Any) -> None:
            with lock:
                totals[item["bucket"]] = totals.get(item["bucket"], 0) + item["score"]
            done.release()

        flow = _rtx_flow([("parse", parse, "line", "parsed"), ("transform", transform, "parsed", "scored"),
                          ("collect", collect, "scored", None)])
        elapsed = _rtx_run(n, flow, ("parse", "line"), [{"line": line} for line in lines], done, cfg.timeout)
        _totals_ok(totals, expected, rtx)
        return {rtx: {"items_per_s": count / elapsed}}

    def run_joblib(_r: int) -> dict:
        joblib = joblib_module()
        with joblib_pool(n) as pool:
            start = time.perf_counter()
            recs = [json.loads(line) for line in lines]
            totals: dict[str, int] = {}
            scores = pool(joblib.delayed(pipeline_transform)(rec, work_n) for rec in recs)
            for rec, score in zip(recs, scores):
                totals[rec["bucket"]] = totals.get(rec["bucket"], 0) + score
            elapsed = time.perf_counter() - start
        _totals_ok(totals, expected, jl)
        return {jl: {"items_per_s": count / elapsed}}

    systems: dict[str, SystemFn] = {serial: run_serial, ppe: run_ppe, rmp: run_rmp}
    if joblib_module():
        systems[jl] = run_joblib
    else:
        sc.notes.append(JOBLIB_MISSING)
    if routilux_version():
        systems[rtx] = run_rtx
    else:
        sc.notes.append("routilux 1.1.0 thread runtime: skipped: routilux not installed (pip install routilux==1.1.0)")
    run_rounds(sc, cfg, systems)
    sc.checks.append(Check("speedup vs serial loop", "items_per_s", rmp, serial))
    sc.checks.append(Check(f"vs {ppe}", "items_per_s", rmp, ppe, 1.3))
    if jl in sc.quantities["items_per_s"].samples:
        sc.checks.append(Check(f"vs {jl}", "items_per_s", rmp, jl, 1.0))
    if rtx in sc.quantities["items_per_s"].samples:
        sc.checks.append(Check("vs routilux 1.1.0 threads", "items_per_s", rmp, rtx))
        sc.notes.append("routilux 1.1.0 runs the stages fed by emits in its one event-loop thread per worker, "
                        "one after another (so its 'parallel' transform is serial)")
    return sc


def run_pipeline(runtime: Runtime, lines: list[str], work_n: int, expected: dict, timeout: float, label: str) -> float:
    """Items per second through parse -> transform -> collect on ``runtime`` (warmed first, totals checked)."""
    ws = runtime.exec("bench-pipeline")
    _rmp_warm(runtime, "bench-pipeline", "parse", "line", {"line": pipeline_line(-1), "n": 1},
              2 * runtime.processes, timeout)
    ws.update_routine_state("collect", {})
    start = time.perf_counter()
    for line in lines:
        runtime.post("bench-pipeline", "parse", "line", {"line": line, "n": work_n}, timeout=timeout)
    _wait_all(runtime, timeout, label)
    elapsed = time.perf_counter() - start
    _totals_ok(ws.get_routine_state("collect") or {}, expected, label)
    return len(lines) / elapsed


def _totals_ok(totals: dict, expected: dict, who: str) -> None:
    if totals != expected:
        raise BenchError(f"{who}: pipeline totals differ from the serial loop's")


# ---------------------------------------------------------------------------- 4. state


STATE_OPS = ("get", "update", "increment")


def measure_state_ops(runtime: Runtime, ops: tuple[str, ...], n: int, k1: int, kn: int, timeout: float,
                      label: str, sc: Scenario) -> dict[str, float]:
    """WorkerState ops per second on ``bench-state``: ``k1`` of each op from this process (``{op}_1``), then
    ``kn`` from each of ``n`` activations at once (``{op}_n``); checks that no increment was lost."""
    out: dict[str, float] = {}
    ws = runtime.exec("bench-state")
    ws.update_routine_state("s", STATE_VALUE)
    for op in ops:
        t0, t1 = rmp_state_ops(ws, op, k1, 0)
        out[f"{op}_1"] = k1 / (t1 - t0)
    _rmp_warm(runtime, "bench-state", "r", "in", {"op": "get", "k": 1, "index": 0}, 2 * n, timeout)
    before = (ws.get_routine_state("c") or {}).get("n", 0)
    for op in ops:
        jobs = [runtime.post("bench-state", "r", "in", {"op": op, "k": kn, "index": i}, timeout=timeout)[1]
                for i in range(n)]
        _wait_all(runtime, timeout, label)
        out[f"{op}_n"] = _span_rate([job.outputs[0]["data"] for job in jobs], n * kn, label, sc)
    total = ws.get_routine_state("c")["n"]
    if total - before != n * kn:
        raise BenchError(f"{label}: {n} x {kn} increments gave {total - before}")
    return out


def scenario_state(cfg: Config) -> Scenario:
    """WorkerState operations per second from 1 and N processes vs raw Manager dict proxy calls."""
    n = cfg.processes
    k1 = 300 if cfg.quick else 1000
    kn = 200 if cfg.quick else 500
    sc = Scenario("state", "WorkerState operations per second vs Manager dict proxy calls")
    sc.description = (
        f"From 1 process (the supervisor / the main process): {k1} calls per operation. From N={n} processes "
        f"(routine logic in parallel / multiprocess.Pool workers, spawn): {kn} calls each; ops/s = all calls / "
        "(last end - first start). get = get_routine_state vs d[key]; update = update_routine_state vs d[key] = v "
        "(each process its own key); increment = atomic increment vs d['n'] = d['n'] + 1 (non-atomic, 2 round "
        f"trips). Value: {json.dumps(STATE_VALUE)}."
    )
    for op in STATE_OPS:
        for where in ("1", "n"):
            who = "1 process" if where == "1" else f"{n} processes"
            sc.quantity(f"{op}_{where}", f"{op} per second, from {who}", "ops/s", True)
    rmp, mpm, stdm = f"{RMP} WorkerState", "multiprocess Manager dict", "multiprocessing Manager dict (stdlib)"
    lost: dict[str, list[int]] = {}  # baseline -> [increments lost, increments made], over all rounds

    def run_rmp(_r: int) -> dict:
        with Runtime(processes=n) as runtime:
            return {rmp: measure_state_ops(runtime, STATE_OPS, n, k1, kn, cfg.timeout, rmp, sc)}

    def run_manager(label: str, module: Any) -> dict:
        out: dict[str, float] = {}
        with module.Manager() as manager:
            d = manager.dict()
            d["s"] = STATE_VALUE
            d["n"] = 0
            for op in STATE_OPS:
                t0, t1, _ = manager_state_ops((d, op, k1, 0))
                out[f"{op}_1"] = k1 / (t1 - t0)
            with module.get_context("spawn").Pool(n) as pool:
                pool.map_async(echo_value, range(2 * n)).get(cfg.timeout)
                before = d["n"]
                for op in STATE_OPS:
                    timings = pool.map_async(manager_state_ops, [(d, op, kn, i) for i in range(n)],
                                             chunksize=1).get(cfg.timeout)
                    out[f"{op}_n"] = _span_rate([{"t0": a, "t1": b, "pid": p} for a, b, p in timings], n * kn,
                                                label, sc)
                gained = d["n"] - before
            tally = lost.setdefault(label, [0, 0])
            tally[0] += n * kn - gained
            tally[1] += n * kn
        return {label: out}

    import multiprocess

    systems: dict[str, SystemFn] = {rmp: run_rmp, mpm: lambda _r: run_manager(mpm, multiprocess)}
    import multiprocessing

    systems[stdm] = lambda _r: run_manager(stdm, multiprocessing)
    run_rounds(sc, cfg, systems)
    for op in STATE_OPS:
        for where in ("1", "n"):
            who = "1 process" if where == "1" else f"{n} processes"
            sc.checks.append(Check(f"{op}, {who}: vs {mpm}", f"{op}_{where}", rmp, mpm, 0.9))
    for op in STATE_OPS:
        sc.checks.append(Check(f"{op}, 1 process: vs stdlib Manager", f"{op}_1", rmp, stdm))
    if any(tally[0] for tally in lost.values()):
        sc.notes.append("from N processes the non-atomic Manager increments lost updates, as expected "
                        "(routilux-mp's atomic ones lost none): "
                        + "; ".join(f"{label} {a:,} of {b:,}" for label, (a, b) in lost.items()))
    sc.notes.append("multiprocess's Manager pickles with dill; the stdlib Manager (C pickler) is shown for reference")
    return sc


def _span_rate(timings: list[dict], calls: int, who: str, sc: Scenario) -> float:
    pids = {t["pid"] for t in timings}
    if len(pids) != len(timings):
        note = f"{who}: some N-process rounds ran on fewer distinct processes than N (they ran one after another)"
        if note not in sc.notes:
            sc.notes.append(note)
    return calls / (max(t["t1"] for t in timings) - min(t["t0"] for t in timings))


# ---------------------------------------------------------------------------- 5. startup


def scenario_startup(cfg: Config) -> Scenario:
    """Seconds from constructing the pool to the first completed trivial task."""
    import multiprocessing

    n = cfg.processes
    sc = Scenario("startup", "Start-up: constructor to first completed activation")
    sc.description = (
        f"Runtime(processes={n}) -> exec -> post one trivial item -> job.wait, vs ProcessPoolExecutor({n}) -> "
        "submit(abs, 1).result(), with Linux's default start method (fork) and with spawn. routilux-mp starts "
        "fresh interpreters (like spawn) plus a state server. Shutdown is not timed."
    )
    sc.quantity("seconds", "seconds to first result", "s", False)
    rmp, fork, spawn = f"{RMP} Runtime({n})", f"ProcessPoolExecutor({n}) (default: fork)", f"ProcessPoolExecutor({n}, spawn)"

    def run_rmp(_r: int) -> dict:
        start = time.perf_counter()
        with Runtime(processes=n) as runtime:
            runtime.exec("bench-echo")
            _, job = runtime.post("bench-echo", "r", "in", {"x": 1}, timeout=cfg.timeout)
            if not job.wait(cfg.timeout):
                raise BenchError(f"{rmp}: the first job did not finish within {cfg.timeout:g}s")
            elapsed = time.perf_counter() - start
        return {rmp: {"seconds": elapsed}}

    def run_ppe(label: str, context: Any) -> dict:
        start = time.perf_counter()
        with ProcessPoolExecutor(n, mp_context=context) as pool:
            pool.submit(abs, 1).result(cfg.timeout)
            elapsed = time.perf_counter() - start
        return {label: {"seconds": elapsed}}

    run_rounds(sc, cfg, {
        rmp: run_rmp,
        fork: lambda _r: run_ppe(fork, None),
        spawn: lambda _r: run_ppe(spawn, multiprocessing.get_context("spawn")),
    })
    sc.checks.append(Check(f"vs {fork}", "seconds", rmp, fork, note="workers are fresh interpreters: never fork"))
    sc.checks.append(Check(f"vs {spawn}", "seconds", rmp, spawn, 1.0))
    return sc


# ---------------------------------------------------------------------------- 6. memory


class RssSampler(threading.Thread):
    """Samples a process's RSS in the background and keeps the peak."""

    def __init__(self, pid: int, interval: float = RSS_SAMPLE_INTERVAL) -> None:
        super().__init__(name="bench rss sampler", daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.samples += 1

    def stop(self) -> int:
        self._stop_event.set()
        self.join(5.0)
        self.peak = max(self.peak, self.process.memory_info().rss)
        return self.peak


def _state_server_rss() -> float | None:
    for child in psutil.Process().children(recursive=True):
        try:
            if "state-server" in " ".join(child.cmdline()) or child.name() == "rmp-state":
                return child.memory_info().rss / MB
        except psutil.Error:
            continue
    return None


def scenario_memory(cfg: Config) -> Scenario:
    """Idle worker RSS, and the supervisor's RSS while streaming many tiny items through bounded queues."""
    n = cfg.processes
    items = cfg.stream_items
    sc = Scenario("memory", "Memory: idle workers, and the supervisor while streaming")
    sc.description = (
        f"Measured in a fresh Python process (a user's script: routilux_mp imported, nothing else). Idle: RSS of "
        f"each worker process (runtime.stats()) and of the state server after a warm-up, vs "
        f"ProcessPoolExecutor({n}, spawn) workers. Streaming: {items:,} tiny items posted one by one (post blocks "
        f"on back-pressure: slot queue bound 1000) into a trivial sink routine taking {STREAM_BATCH} items per "
        f"activation (batch_size_policy, so the run fits the time budget); the supervisor's RSS is sampled every "
        f"{RSS_SAMPLE_INTERVAL * 1000:.0f} ms. Runs once (no rounds), default Runtime settings."
    )
    idle = sc.quantity("idle_worker_mb", "idle worker process RSS (median of workers)", "MB", False)
    state = sc.quantity("state_server_mb", "state server RSS, idle", "MB", False)
    base = sc.quantity("supervisor_base_mb", "supervisor RSS before streaming (runtime started)", "MB", False)
    peak = sc.quantity("supervisor_peak_mb", "supervisor peak RSS while streaming", "MB", False)
    growth = sc.quantity("supervisor_growth_mb", "supervisor RSS growth while streaming (peak - before)", "MB", False)
    rate = sc.quantity("stream_per_s", "items streamed per second", "items/s", True)
    rmp, ppe = f"{RMP} Runtime({n})", f"ProcessPoolExecutor({n}, spawn)"
    import multiprocessing

    if cfg.wanted(ppe):
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            # Only stdlib tasks: a function of this module would import routilux_mp into the pool's workers.
            list(pool.map(time.sleep, [0.05] * (2 * n), timeout=cfg.timeout))
            pids = list(pool._processes)  # no public API lists a pool's workers
            rss = [psutil.Process(pid).memory_info().rss / MB for pid in pids]
            idle.samples[ppe] = [statistics.median(rss)]
    if not cfg.wanted(rmp):
        return sc
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import _bench_scenarios as b; "
            f"b.memory_child({n}, {items}, {cfg.timeout!r})")
    budget = cfg.timeout + items / 1000  # the stream goes far faster than 1,000 items/s
    try:
        child = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, timeout=budget,
                               check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"the streaming process did not finish within {budget:.0f}s") from exc
    if child.returncode != 0 or not child.stdout.strip():
        raise BenchError(f"the streaming process failed (exit code {child.returncode}); see its stderr above")
    out = json.loads(child.stdout.strip().splitlines()[-1])
    idle.samples[rmp] = [out["idle_worker_mb"]]
    if out["state_server_mb"] is not None:
        state.samples[rmp] = [out["state_server_mb"]]
    base.samples[rmp] = [out["base_mb"]]
    peak.samples[rmp] = [out["peak_mb"]]
    growth.samples[rmp] = [out["peak_mb"] - out["base_mb"]]
    rate.samples[rmp] = [items / out["seconds"]]
    sc.notes.append(f"streamed {items:,} items in {out['seconds']:.1f}s; {out['samples']} RSS samples; supervisor "
                    f"RSS {out['import_mb']:.0f} MB after importing routilux_mp, {out['end_mb']:.0f} MB at the end")
    sc.checks.append(Check("idle worker RSS vs PPE spawn worker", "idle_worker_mb", rmp, ppe))
    sc.checks.append(Check("supervisor peak RSS while streaming (MB)", "supervisor_peak_mb", rmp, None, 200.0))
    return sc


def memory_child(processes: int, items: int, timeout: float) -> None:
    """The routilux-mp side of ``memory``, in a fresh process; prints one JSON line of results."""
    me = psutil.Process()
    import_mb = me.memory_info().rss / MB
    register_rmp_flows()
    with Runtime(processes=processes) as runtime:
        runtime.exec("bench-sink")
        runtime.exec("bench-echo")
        _rmp_warm(runtime, "bench-echo", "r", "in", {"x": 0}, 4 * processes, timeout)
        rss = [p["rss"] / MB for p in runtime.stats()["processes"] if p["rss"]]
        if not rss:
            raise BenchError(f"no live worker process to measure: {runtime.stats()['processes']}")
        result: dict[str, Any] = {"import_mb": import_mb, "idle_worker_mb": statistics.median(rss),
                                  "state_server_mb": _state_server_rss(), "base_mb": me.memory_info().rss / MB}
        sampler = RssSampler(me.pid)
        sampler.start()
        start = time.perf_counter()
        last_log = start
        try:
            for i in range(items):
                runtime.post("bench-sink", "r", "in", {"i": i}, timeout=timeout)
                if i % 10_000 == 0 and time.perf_counter() - last_log > 10:
                    last_log = time.perf_counter()
                    log(f"memory: {i:,} items posted, supervisor RSS peak so far {sampler.peak / MB:.0f} MB")
            _wait_all(runtime, timeout, "streaming")
        finally:
            peak = sampler.stop()
        result["seconds"] = time.perf_counter() - start
        jobs = runtime.stats()["jobs"]
        if jobs.get("completed", 0) != items + 4 * processes:
            raise BenchError(f"streaming: expected {items + 4 * processes} completed jobs, got {jobs}")
        result.update(peak_mb=peak / MB, samples=sampler.samples, end_mb=me.memory_info().rss / MB)
    print(json.dumps(result), flush=True)


def scenario_durable(cfg: Config) -> Scenario:
    """Durable WorkerState (``state_path``) vs in memory: see ``_bench_durable``."""
    from _bench_durable import durable_scenario  # it builds on this module: imported when run

    return durable_scenario(cfg)


def scenario_text(cfg: Config) -> Scenario:
    """The reduce-heavy text job: see ``_bench_text``."""
    from _bench_text import scenario_text as text  # it builds on this module: imported when run

    return text(cfg)


def scenario_lifecycle(cfg: Config) -> Scenario:
    """Idle shutdown and a crashed worker's replacement: see ``_bench_lifecycle``."""
    from _bench_lifecycle import scenario_lifecycle as lifecycle  # it builds on this module: imported when run

    return lifecycle(cfg)


SCENARIOS: dict[str, Callable[[Config], Scenario]] = {
    "cpu": scenario_cpu,
    "tiny": scenario_tiny,
    "pipeline": scenario_pipeline,
    "state": scenario_state,
    "durable": scenario_durable,
    "text": scenario_text,
    "startup": scenario_startup,
    "lifecycle": scenario_lifecycle,
    "memory": scenario_memory,
}
