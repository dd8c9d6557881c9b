"""Fused stages on real worker processes: a crash or a timeout inside a fused stage ends as it would unfused.

Each row runs one job through ``a -> b`` twice in one runtime, on a flow
whose connection is fused and on the same flow with ``set_fusion(False)``,
and compares the job's end (status, error type and message, attempts,
outputs) and ``stats()`` of both routines. The worker sends ``a``'s result
before it runs ``b`` itself, so a death in ``b`` fails ``b``'s activation,
never ``a``'s. The outcome table without processes is ``tests/unit/test_fused_stages.py``.
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
from helpers import WAIT, FnRoutine, by_value

from routilux_mp import ErrorHandler, ErrorStrategy, Flow, FlowRegistry, get_current_job
from routilux_mp._exec import local

by_value(__name__)

CRASH = "routilux_mp.errors.WorkerCrashedError"
TIMEOUT = "routilux_mp.errors.ActivationTimeoutError"


def _pass(routine, slot_data, message, ws):
    for item in slot_data["in"]:
        routine.emit("out", **item, pid=os.getpid())


def _forward(routine, slot_data, message, ws):
    for item in slot_data["in"]:
        routine.emit("out", **item)


def _ok(routine, slot_data, message, ws):
    routine.emit("out", **slot_data["in"][0], pid_b=os.getpid())


def _raise(routine, slot_data, message, ws):
    raise ValueError("b refuses")


def _exit(routine, slot_data, message, ws):
    os._exit(13)


def _exit_on_first_attempt(routine, slot_data, message, ws):
    if get_current_job().attempts == 1:
        os._exit(13)
    _ok(routine, slot_data, message, ws)


def _block(routine, slot_data, message, ws):
    threading.Event().wait()  # until the timeout kills the process


RETRY = ErrorHandler(strategy=ErrorStrategy.RETRY, max_retries=2, retry_delay=0.01)

#: id, b's logic, b's options, job status, error type, error message regex ({b}: b's routine id)
FUSED_FAULTS = [
    ("no fault", _ok, {}, "completed", None, None),
    ("raises", _raise, {}, "failed", "ValueError", r"^b refuses$"),
    ("os-exit", _exit, {}, "failed", CRASH, r"exited with code 13 while running routine '{b}'"),
    ("os-exit, retried unfused", _exit_on_first_attempt, {"handler": RETRY}, "completed", None, None),
    ("runs past its timeout", _block, {"timeout": 1.0}, "failed", TIMEOUT,
     r"routine '{b}' ran longer than its timeout of 1s"),
]


def _register(prefix: str, b_fn, b_options: dict, fusion: bool) -> None:
    flow = Flow(f"{prefix}flow")
    a = FnRoutine(_pass, concurrency=None)
    b = FnRoutine(b_fn, concurrency=None, **b_options)
    b.set_fusion(fusion)
    flow.add_routine(a, f"{prefix}a")
    flow.add_routine(b, f"{prefix}b")
    flow.connect(f"{prefix}a", "out", f"{prefix}b", "in")
    FlowRegistry.get_instance().register_by_name(f"{prefix}flow", flow)


@pytest.mark.parametrize(("case", "b_fn", "b_options", "status", "error_type", "message"), FUSED_FAULTS,
                         ids=[row[0] for row in FUSED_FAULTS])
def test_a_fault_in_a_fused_stage_ends_as_unfused(make_runtime, case, b_fn, b_options, status, error_type,
                                                  message) -> None:
    _register("", b_fn, b_options, fusion=True)
    _register("u", b_fn, b_options, fusion=False)
    runtime = make_runtime(processes=2, max_crash_retries=3)
    seen = {}
    for prefix in ("", "u"):
        runtime.exec(f"{prefix}flow")
        _, job = runtime.post(f"{prefix}flow", f"{prefix}a", "in", {"i": 1})
        assert job.wait(WAIT), f"{prefix}flow: the job did not end within {WAIT}s"
        error = job.error or {}
        assert job.status == status, (prefix, job.status, error)
        assert error.get("type") == error_type, error
        if message is not None:
            assert re.search(message.format(b=f"{prefix}b"), error["message"]), error["message"]
            assert error["routine"] == f"{prefix}b"
        stats = runtime.stats()["routines"]
        seen[prefix] = {
            "status": job.status, "attempts": job.attempts,
            "outputs": [{k: v for k, v in o["data"].items() if k not in ("pid", "pid_b")} for o in job.outputs],
            "a": (stats[f"{prefix}a"]["activations"], stats[f"{prefix}a"]["errors"]),
            "b": (stats[f"{prefix}b"]["activations"], stats[f"{prefix}b"]["errors"]),
            "fused": stats[f"{prefix}b"]["fused"],
        }
        if case == "no fault" and prefix == "":  # fused: b ran in the process that ran a
            data = job.outputs[0]["data"]
            assert data["pid"] == data["pid_b"]
    assert seen[""]["fused"] == (0 if case in ("os-exit", "runs past its timeout", "os-exit, retried unfused")
                                 else 1), "a run that never sent its result is not counted as a fused activation"
    assert seen["u"]["fused"] == 0
    del seen[""]["fused"], seen["u"]["fused"]
    assert seen[""] == seen["u"]


def test_a_pipeline_of_fused_stages_sends_one_activation_per_item(make_runtime) -> None:
    flow = Flow("chain")
    for rid in ("a", "b", "c"):
        flow.add_routine(FnRoutine(_forward, concurrency=None), rid)
    flow.connect("a", "out", "b", "in")
    flow.connect("b", "out", "c", "in")
    FlowRegistry.get_instance().register_by_name("chain", flow)
    runtime = make_runtime(processes=2)
    runtime.exec("chain")
    jobs = [runtime.post("chain", "a", "in", {"i": i})[1] for i in range(40)]
    assert all(job.wait(WAIT) for job in jobs)
    assert [job.status for job in jobs] == ["completed"] * 40
    assert sorted(job.outputs[0]["data"]["i"] for job in jobs) == list(range(40))
    stats = runtime.stats()
    routines = {rid: (s["activations"], s["errors"], s["fused"]) for rid, s in stats["routines"].items()}
    assert routines == {"a": (40, 0, 0), "b": (40, 0, 40), "c": (40, 0, 40)}
    # Every result counts on its lane, fused runs included; only a's 40 activations went out to the workers.
    assert sum(p["activations"] for p in stats["processes"]) == 120


def _long_first(routine, slot_data, message, ws):
    item = slot_data["in"][0]
    if item["i"] == 0:
        until = time.monotonic() + item["seconds"]
        while time.monotonic() < until:  # a long activation (work, not a wait for something)
            pass
    routine.emit("out", i=item["i"])


def _block_first(routine, slot_data, message, ws):
    if slot_data["in"][0]["i"] == 0:
        threading.Event().wait()  # until the timeout kills the process
    routine.emit("out", i=slot_data["in"][0]["i"])


#: Seconds the first job of ``BEHIND`` may take, on a loaded machine (it takes 2-3 s on a quiet one).
ENDS_WITHIN = 30.0

#: id, b's logic, b's options, seconds b runs on item 0, TAKE_TIMEOUT, status of job 0
BEHIND = [
    # The activation queued behind is not due while the fused stage runs: no stall is reported.
    ("longer than TAKE_TIMEOUT", _long_first, {}, 3.0, 1.5, "completed"),
    # The fused stage is what runs: its timeout kills it (the one behind is sent again).
    ("past its timeout", _block_first, {"timeout": 1.5}, 0.0, local.TAKE_TIMEOUT, "failed"),
]


@pytest.mark.parametrize(("case", "b_fn", "b_options", "seconds", "take_timeout", "status"), BEHIND,
                         ids=[row[0] for row in BEHIND])
def test_a_fused_stage_with_an_activation_queued_behind_it(make_runtime, monkeypatch, case, b_fn, b_options,
                                                           seconds, take_timeout, status) -> None:
    monkeypatch.setattr(local, "TAKE_TIMEOUT", take_timeout)
    _register("", b_fn, b_options, fusion=True)
    runtime = make_runtime(processes=1)
    runtime.exec("flow")
    # Posted before the worker is ready: both are sent together, the second queued behind the first.
    jobs = [runtime.post("flow", "a", "in", {"i": i, "seconds": seconds})[1] for i in range(2)]
    # (Within a bound well under the 60 s TAKE_TIMEOUT: a timeout that waited for the activation behind to
    # be taken would fire only once that check killed the worker.)
    assert jobs[0].wait(ENDS_WITHIN), f"job 0 did not end within {ENDS_WITHIN}s: {jobs[0].status}"
    assert jobs[1].wait(WAIT), jobs[1].status
    assert [job.status for job in jobs] == [status, "completed"], [job.error for job in jobs]
    if status == "failed":
        assert jobs[0].error["type"] == TIMEOUT and jobs[0].error["routine"] == "b"
    else:
        assert runtime.stats()["processes"][0]["restarts"] == 0, "no stall was reported"
