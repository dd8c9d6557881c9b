"""A worker that dies or hangs in the middle of a batch, with real processes: exactly once, nothing lost.

One activation of ``src`` emits ten items to the parallel routine ``r`` at
once, so the dispatcher finds ten ready activations and two idle workers:
each gets five in one frame (``_Batch``; the batch time is raised so the size
does not depend on the machine's load). The item at position 2 of its batch
faults on its first run. Expected, for every row of the table: the two items
before it in its batch ran once and are not run again, it is blamed (retried,
or its job fails) as when it runs alone, and the two after it, never started,
run once elsewhere and are never counted as crashed. Runs are counted in a
file every run appends to.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import time

import pytest
from helpers import WAIT, by_value

from routilux_mp import ErrorHandler, ErrorStrategy, Flow, FlowRegistry, Routine
from routilux_mp._exec.local import LocalProcessBackend
from routilux_mp._messages import _Batch

by_value(__name__)

FAULT_AT = 2  # (the middle of the batch of items 0-4)


def _hang():
    time.sleep(600)  # (the activation's workload: its timeout kills it)


#: id, what item 2 does on its first run, options of ``r``, the error it is blamed with, its job's status
MID_BATCH_FAULTS = [
    ("sigkill-retried", lambda: os.kill(os.getpid(), signal.SIGKILL), {}, "WorkerCrashedError", "completed"),
    ("os-exit-retried", lambda: os._exit(3), {}, "WorkerCrashedError", "completed"),
    # (3 s, as in test_faults: a cold first activation on a loaded machine has taken over 1 s)
    ("hang-past-timeout-retried", _hang, {"timeout": 3.0}, "ActivationTimeoutError", "completed"),
    ("segfault-fails-the-job", lambda: ctypes.string_at(0), {"retries": 0}, "WorkerCrashedError", "failed"),
]


class Source(Routine):
    """Emits ten items at once (one activation): they become ready together."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("in")
        self.add_event("out")

        def logic(slot_data, message, ws):
            for item in slot_data["in"]:
                for i in range(10):
                    self.emit("out", i=i, log=item["log"])

        self.set_logic(logic)


class Faulty(Routine):
    """Appends its item number to the log (every run), faults once at ``FAULT_AT``, emits the number."""

    def __init__(self, fault, timeout: float | None, retries: int) -> None:
        super().__init__()
        self.add_slot("in")
        self.add_event("done")
        self.set_max_concurrency(None)
        if timeout is not None:
            self.set_timeout(timeout)
        if retries:
            self.set_error_handler(ErrorHandler(ErrorStrategy.RETRY, max_retries=retries, retry_delay=0.0))

        def logic(slot_data, message, ws):
            for item in slot_data["in"]:
                with open(item["log"], "a") as log:
                    log.write(f"{item['i']}\n")
                marker = item["log"] + ".faulted"
                if item["i"] == FAULT_AT and not os.path.exists(marker):
                    open(marker, "w").close()
                    fault()
                self.emit("done", i=item["i"])

        self.set_logic(logic)


@pytest.fixture
def frames(monkeypatch):
    """The items of every batch the local backend sends, in order (recorded in this, the supervisor's, process)."""
    import routilux_mp._batching

    monkeypatch.setattr(routilux_mp._batching, "BATCH_SECONDS", 10.0)  # sized by the share, not the load
    sent: list[list[int]] = []
    send = LocalProcessBackend.send

    def recording(self, slot, message):
        ok = send(self, slot, message)
        if ok and type(message) is _Batch:
            sent.append([pickle.loads(act.slots["in"][0])["i"] for act in message.acts])
        return ok

    monkeypatch.setattr(LocalProcessBackend, "send", recording)
    return sent


@pytest.mark.parametrize(("fault", "options", "blamed", "status"), [case[1:] for case in MID_BATCH_FAULTS],
                         ids=[case[0] for case in MID_BATCH_FAULTS])
def test_a_fault_in_the_middle_of_a_batch_blames_only_the_running_activation(make_runtime, tmp_path, frames, fault,
                                                                            options, blamed, status) -> None:
    flow = Flow("mid-batch")
    flow.add_routine(Source(), "src")
    flow.add_routine(Faulty(fault, options.get("timeout"), options.get("retries", 1)), "r")
    flow.connect("src", "out", "r", "in")
    FlowRegistry.get_instance().register_by_name("mid-batch", flow)
    runtime = make_runtime(processes=2)
    runtime.exec("mid-batch")
    warm = str(tmp_path / "warm.log")
    for _ in range(3):  # measured: its activations are short
        runtime.post("mid-batch", "r", "in", {"i": -1, "log": warm})
    assert runtime.wait_until_all_jobs_finished(WAIT)
    log = str(tmp_path / "runs.log")
    _, job = runtime.post("mid-batch", "src", "in", {"log": log})
    assert job.wait(WAIT), f"job {job.job_id} did not finish: {job.status}"

    assert [0, 1, 2, 3, 4] in frames, f"items 0-4 went in one frame (frames sent: {frames})"
    with open(log) as f:
        runs = [int(line) for line in f]
    assert job.status == status
    before, after = [0, 1], [3, 4]
    assert all(runs.count(i) == 1 for i in before), f"done before the fault: not run again ({runs})"
    if status == "completed":
        assert runs.count(FAULT_AT) == 2, f"the faulty one ran again (its retry) ({runs})"
        assert sorted(o["data"]["i"] for o in job.outputs) == list(range(10)), "every item's output, once"
        assert all(runs.count(i) == 1 for i in after + [5, 6, 7, 8, 9]), f"never started: run once ({runs})"
        retries = [t["details"] for t in job.traces if t["action"] == "retry"]
        assert len(retries) == 1 and retries[0]["error"].endswith(blamed), retries
    else:
        assert runs.count(FAULT_AT) == 1
        assert job.error["type"].endswith(blamed)
        assert "while running routine 'r'" in job.error["message"]
        assert all(runs.count(i) <= 1 for i in after), f"never started: run at most once elsewhere ({runs})"
        assert set(before) <= {o["data"]["i"] for o in job.outputs} <= set(runs) - {FAULT_AT}
    assert runtime.stats()["routines"]["r"]["errors"] == 1, "only the running one counted as failed"
