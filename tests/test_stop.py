"""Stopping without starting anything new: ``shutdown(cancel_pending=True)``, what a first Ctrl-C does."""

from __future__ import annotations

import threading
import time

from helpers import WAIT, FnRoutine, by_value, wait_until

from routilux_mp import Flow, FlowRegistry

by_value(__name__)


def _first(routine, slot_data, message, ws):
    item = slot_data["in"][0]
    if item.get("hold"):
        ws.increment("first", "holding")
        with ws.lock("gate"):  # held by the test: this activation runs until the test lets it go
            pass
    routine.emit("out", **item)


def _second(routine, slot_data, message, ws):
    ws.increment("second", "ran")
    routine.emit("out", **slot_data["in"][0])


def test_stopping_cancels_queued_and_downstream_work_and_lets_running_activations_finish(make_runtime) -> None:
    flow = Flow("stop")
    flow.add_routine(FnRoutine(_first, concurrency=None), "first")
    flow.add_routine(FnRoutine(_second, concurrency=None), "second")
    flow.connect("first", "out", "second", "in")
    FlowRegistry.get_instance().register_by_name("stop", flow)
    runtime = make_runtime(processes=2, prefetch=0)
    ws = runtime.exec("stop")
    with ws.lock("gate"):
        held = runtime.post("stop", "first", "in", {"n": 0, "hold": True})[1]
        wait_until(lambda: (ws.get_routine_state("first") or {}).get("holding") == 1, "the held activation",
                   job=held)
        jobs = [runtime.post("stop", "first", "in", {"n": n})[1] for n in range(1, 400)]
        stopper = threading.Thread(target=runtime.shutdown, kwargs={"timeout": WAIT, "cancel_pending": True})
        stopper.start()
        wait_until(lambda: runtime.stats()["jobs"].get("running", 0) + runtime.stats()["jobs"].get("pending", 0) <= 2,
                   "everything not running to be cancelled")
        second_before = runtime.stats()["routines"]["second"]["activations"]
        released = time.monotonic()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert time.monotonic() - released < 10, "shutdown waits only for what was running"
    statuses = [job.status for job in [held, *jobs]]
    assert all(status in ("completed", "cancelled") for status in statuses)
    assert held.status == "cancelled", "its downstream activation never started: the job is cut short"
    assert held.outputs == [], "what it emitted downstream was dropped, not run"
    # (At most the one activation the other worker held when the stop came finishes after it.)
    assert runtime.stats()["routines"]["second"]["activations"] <= second_before + 1, "no downstream work started"
    assert statuses.count("cancelled") >= 390
    for n, job in enumerate(jobs, 1):
        if job.status == "completed":
            assert job.outputs == [{"routine": "second", "event": "out", "data": {"n": n}}]
