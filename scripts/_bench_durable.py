"""Scenario ``durable`` of ``scripts/bench.py``: WorkerState kept in a file (``state_path``) vs in memory.

The same runtime work is done three ways, alternating round by round:
state in the state server's memory (the default), in an SQLite file with
``state_sync="normal"`` (a commit per acknowledged write, no fsync: survives
any process dying), and with ``state_sync="full"`` (an fsync per commit,
shared by concurrent writers: survives a power cut). Measured: increments
and updates from 1 and from N processes (as in scenario ``state``), and the
3-stage pipeline (as in scenario ``pipeline``, its collect stage an
increment per item).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any

from _bench_scenarios import (
    CPU_ITEM_SECONDS,
    PIPELINE_WORK_FRACTION,
    RMP,
    Check,
    Config,
    Scenario,
    SystemFn,
    calibrate,
    measure_state_ops,
    pipeline_line,
    pipeline_transform,
    run_pipeline,
    run_rounds,
)

from routilux_mp import Runtime

#: Operations measured from 1 and from N processes.
OPS = ("increment", "update")
#: The target of the issue: increments with durability on at least this fraction of the in-memory figure.
INCREMENT_TARGET = 0.7


def durable_scenario(cfg: Config) -> Scenario:
    """Increments, updates and the pipeline with state in memory vs in a state file (two sync levels)."""
    n = cfg.processes
    k1, kn = (300, 200) if cfg.quick else (1000, 500)
    work_n, seconds = calibrate(CPU_ITEM_SECONDS * PIPELINE_WORK_FRACTION)
    count = 100 if cfg.quick else 400
    lines = [pipeline_line(i) for i in range(count)]
    expected: dict[str, int] = {}
    for line in lines:
        rec = json.loads(line)
        expected[rec["bucket"]] = expected.get(rec["bucket"], 0) + pipeline_transform(rec, work_n)
    sc = Scenario("durable", "Durable WorkerState: a state file (SQLite, WAL) vs state in memory")
    sc.description = (
        f"One Runtime({n}) per system and round: {k1} calls per operation from 1 process, {kn} each from {n} "
        f"processes (as in 'state'; update = each process its own routine state), then the 3-stage pipeline "
        f"({count} items, transform {seconds * 1000:.1f} ms; as in 'pipeline'). Systems: state in memory (the "
        "default); Runtime(state_path=FILE) (state_sync='normal': every acknowledged write committed, survives "
        "the SIGKILL of any process); state_sync='full' (also fsync'd: survives a power cut)."
    )
    for op in OPS:
        for where in ("1", "n"):
            who = "1 process" if where == "1" else f"{n} processes"
            sc.quantity(f"{op}_{where}", f"{op} per second, from {who}", "ops/s", True)
    sc.quantity("pipeline", "3-stage pipeline items per second", "items/s", True)
    memory = f"{RMP}, state in memory"
    normal = f"{RMP}, state_path (sync normal)"
    full = f"{RMP}, state_path (sync full)"

    def run(label: str, options: dict[str, Any]) -> dict:
        folder = tempfile.mkdtemp(prefix="rmp-bench-")
        if options:
            options = dict(options, state_path=f"{folder}/state.db")
        try:
            with Runtime(processes=n, **options) as runtime:
                out = measure_state_ops(runtime, OPS, n, k1, kn, cfg.timeout, label, sc)
                out["pipeline"] = run_pipeline(runtime, lines, work_n, expected, cfg.timeout, label)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {label: out}

    systems: dict[str, SystemFn] = {
        memory: lambda _r: run(memory, {}),
        normal: lambda _r: run(normal, {"state_sync": "normal"}),
        full: lambda _r: run(full, {"state_sync": "full"}),
    }
    run_rounds(sc, cfg, systems)
    for op in OPS:
        for where in ("1", "n"):
            who = "1 process" if where == "1" else f"{n} processes"
            target = INCREMENT_TARGET if op == "increment" else None
            sc.checks.append(Check(f"{op}, {who}: state_path vs memory", f"{op}_{where}", normal, memory, target))
            sc.checks.append(Check(f"{op}, {who}: sync full vs memory", f"{op}_{where}", full, memory))
    sc.checks.append(Check("pipeline: state_path vs memory", "pipeline", normal, memory))
    sc.checks.append(Check("pipeline: sync full vs memory", "pipeline", full, memory))
    sc.notes.append("each acknowledged write of a state_path runtime is one SQLite commit (a group commit when "
                    "writers overlap with sync full); the state server is one process, so writes from N processes "
                    "queue behind each other's commits")
    return sc
