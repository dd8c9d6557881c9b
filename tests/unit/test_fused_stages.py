"""Fused stages without processes: which connections fuse, and fused runs end exactly as unfused ones.

Every outcome row runs one flow twice on the stub lanes, fused and with
``set_fusion(False)``, and compares what a user can see: job status, error,
attempts, outputs, job data, traces, ``stats()`` per routine. Crashes and
timeouts inside a fused stage need real processes: ``tests/test_fusion.py``.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from helpers import FnRoutine

from routilux_mp import ErrorHandler, ErrorStrategy, Flow, get_current_job
from routilux_mp._cli_ui import describe_flow
from routilux_mp._drain import stop_taking_work
from routilux_mp._fusion import fused_targets, fusion_plan, unexpected_result
from routilux_mp._messages import _Result, encode
from routilux_mp.activation_policies import batch_size_policy


def _pass(routine, slot_data, message, ws):
    for item in slot_data["in"]:
        routine.emit("out", **item)


def _pass_and_trace(routine, slot_data, message, ws):
    job = get_current_job()
    job.trace("a", "saw", slot_data["in"][0]["i"])
    job.data["a_saw"] = slot_data["in"][0]["i"]
    _pass(routine, slot_data, message, ws)


def _change_metadata(routine, slot_data, message, ws):
    get_current_job().metadata["tag"] = "changed in a"  # (metadata does not travel back)
    _pass(routine, slot_data, message, ws)


def _three(routine, slot_data, message, ws):
    for k in range(3):
        routine.emit("out", i=slot_data["in"][0]["i"], k=k)


def _fail(routine, slot_data, message, ws):
    raise ValueError(f"bad item {slot_data['in'][0]}")


def _fail_first_attempt(routine, slot_data, message, ws):
    if get_current_job().attempts == 1:
        raise ValueError("first attempt fails")
    _b_output(routine, slot_data, message, ws)


def _emit_then_fail(routine, slot_data, message, ws):
    routine.emit("out", partial=slot_data["in"][0]["i"])
    raise ValueError("after one emit")


def _b_output(routine, slot_data, message, ws):
    job = get_current_job()
    for item in slot_data["in"]:
        # What the fused stage sees of the job: the data the stage before it set.
        routine.emit("out", **item, seen=job.data.get("a_saw"), attempt=job.attempts, tag=job.metadata.get("tag"))
    ws.increment("b", "runs")
    job.data["b_done"] = True


def _flow(name: str, a_fn, b_fn, *, fusion: bool, b_handler=None, b_events=("out",)) -> Flow:
    flow = Flow(name)
    a = FnRoutine(a_fn, concurrency=None)
    b = FnRoutine(b_fn, events=b_events, concurrency=None, handler=b_handler)
    a.set_fusion(fusion)
    flow.add_routine(a, "a")
    flow.add_routine(b, "b")
    flow.connect("a", "out", "b", "in")
    return flow


RETRY = ErrorHandler(strategy=ErrorStrategy.RETRY, max_retries=2, retry_delay=0.5, retry_backoff=1.0)

#: (case, logic of a, logic of b, b's error handler, expected job status)
OUTCOMES = [
    ("both succeed", _pass_and_trace, _b_output, None, "completed"),
    ("a emits three: one fused", _three, _b_output, None, "completed"),
    ("a changes the job's metadata", _change_metadata, _b_output, None, "completed"),
    ("b raises: STOP", _pass, _fail, None, "failed"),
    ("b raises: SKIP", _pass, _fail, ErrorHandler(strategy=ErrorStrategy.SKIP), "completed"),
    ("b raises: CONTINUE", _pass, _emit_then_fail, ErrorHandler(strategy=ErrorStrategy.CONTINUE), "completed"),
    ("b retried, then succeeds", _pass_and_trace, _fail_first_attempt, RETRY, "completed"),
    ("b retried, gives up", _pass, _fail, RETRY, "failed"),
    ("a raises (nothing to fuse)", _fail, _b_output, None, "failed"),
]


def _seen(h, flow: Flow) -> dict:
    """Everything a user sees of one job through ``flow`` (outputs sorted: two lanes may finish in any order)."""
    flow.validate()
    h.sup.add_worker(flow.flow_id, flow, None)
    _, job = h.sup.post(flow.flow_id, flow, "a", "in", encode({"i": 7}), worker_id=None, job_id=None,
                        metadata={"tag": "posted"}, timeout=None, block=False)
    h.settle()
    h.advance(0.5)  # retry delays
    h.advance(0.5)
    h.advance(0.5)
    stats = h.sup.stats()["routines"]
    error = job.error or {}
    return {
        "status": job.status,
        "error": (error.get("type"), error.get("routine"), error.get("attempt"), error.get("message")),
        "attempts": job.attempts,
        "outputs": sorted(repr(o) for o in job.outputs),
        "data": dict(job.data),
        "traces": [(t["routine"], t["action"]) for t in job.traces],
        "stats": {rid: (s["activations"], s["errors"]) for rid, s in stats.items()},
        "b_runs": h.sup.worker_state(job.worker_id).get_routine_state("b"),
    }


@pytest.mark.parametrize(("case", "a_fn", "b_fn", "handler", "status"), OUTCOMES, ids=[row[0] for row in OUTCOMES])
def test_a_fused_stage_ends_as_the_unfused_one(harness, case, a_fn, b_fn, handler, status) -> None:
    fused_h, unfused_h = harness(), harness()
    fused = _seen(fused_h, _flow("fused", a_fn, b_fn, fusion=True, b_handler=handler))
    unfused = _seen(unfused_h, _flow("unfused", a_fn, b_fn, fusion=False, b_handler=handler))
    assert fused["status"] == status
    assert fused == unfused
    sent_b = [m for m in fused_h.activations() if m.routine_id == "b"]
    fused_runs = fused_h.sup.stats()["routines"]["b"]["fused"]
    if a_fn is _fail:
        assert fused_runs == 0
    else:
        assert fused_runs == 1, "the first emit of a's activation runs fused"
        # Only what could not run fused is sent: the other emits, and retries (which run unfused).
        assert len(sent_b) == fused["stats"]["b"][0] - 1
    assert unfused_h.sup.stats()["routines"]["b"]["fused"] == 0


def _end_by_hand(h, job) -> None:
    assert h.sup.complete_job(job.job_id, "cancelled", None)


def _stop_taking_work(h, job) -> None:
    with h.sup.lock:
        stop_taking_work(h.sup.ledger, h.sup.dispatcher.inflight())


#: (case, what happens while a runs, job status after)
WHILE_A_RUNS = [
    ("the job is ended by hand", _end_by_hand, "cancelled"),
    ("the runtime stops taking work (shutdown(cancel_pending=True))", _stop_taking_work, "cancelled"),
]


@pytest.mark.parametrize(("case", "meanwhile", "status"), WHILE_A_RUNS, ids=[row[0] for row in WHILE_A_RUNS])
def test_a_fused_stage_whose_job_ended_while_its_source_ran_changes_nothing(harness, case, meanwhile,
                                                                            status) -> None:
    seen = []
    for fusion in (True, False):
        h = harness()
        flow = _flow("ended", _pass, _b_output, fusion=fusion)
        h.stub.hold(0)
        job = h.post(flow, {"i": 1}, routine="a")
        h.settle()
        assert [getattr(m, "routine_id", None) for m in h.stub.holding(0)] == [None, "a"], "a waits on lane 0"
        meanwhile(h, job)
        h.stub.release(0)
        h.settle()
        stats = h.sup.stats()
        seen.append((job.status, job.outputs, {rid: (s["activations"], s["errors"], s["running"])
                                               for rid, s in stats["routines"].items()}))
        assert stats["jobs"] == {status: 1}
    assert seen[0] == seen[1]
    assert seen[0][0] == status


def test_a_worker_due_to_be_recycled_fuses_nothing(harness) -> None:
    h = harness(max_activations_per_process=1)
    jobs = [h.post(_flow("recycled", _pass, _b_output, fusion=True), {"i": i}, routine="a") for i in range(3)]
    h.settle()
    assert [job.status for job in jobs] == ["completed"] * 3
    stats = h.sup.stats()
    assert stats["routines"]["b"]["activations"] == 3 and stats["routines"]["b"]["fused"] == 0
    # (an activation a recycled lane had queued is sent again: count activations, not sends)
    assert len({m.act_id for m in h.activations() if m.routine_id == "b"}) == 3, "b went through the supervisor"
    assert sum(p["restarts"] for p in stats["processes"]) >= 5, "every activation recycled its worker"


def test_a_chain_of_fused_stages_sends_one_activation_per_item(harness) -> None:
    h = harness()
    flow = Flow("chain")
    for rid in ("a", "b", "c"):
        flow.add_routine(FnRoutine(_pass, concurrency=None), rid)
    flow.connect("a", "out", "b", "in")
    flow.connect("b", "out", "c", "in")
    jobs = [h.post(flow, {"i": i}, routine="a") for i in range(6)]
    h.settle()
    assert [job.status for job in jobs] == ["completed"] * 6
    assert [job.outputs[0]["routine"] for job in jobs] == ["c"] * 6
    assert [m.routine_id for m in h.activations()] == ["a"] * 6
    stats = h.sup.stats()["routines"]
    assert {rid: (s["activations"], s["fused"]) for rid, s in stats.items()} == {"a": (6, 0), "b": (6, 6), "c": (6, 6)}
    assert stats["b"]["running"] == stats["c"]["running"] == 0 and stats["b"]["busy_seconds"] > 0


# -- which connections fuse -------------------------------------------------------------------------


def _two(source: dict, target: dict, *, fan_out: bool = False) -> Flow:
    flow = Flow("plan")
    flow.add_routine(FnRoutine(_pass, **source), "a")
    flow.add_routine(FnRoutine(_pass, **target), "b")
    flow.connect("a", "out", "b", "in")
    if fan_out:
        flow.add_routine(FnRoutine(_pass, concurrency=None), "c")
        flow.connect("a", "out", "c", "in")
    return flow


FREE = {"concurrency": None}

#: (case, source routine options, target routine options, fan-out, why it is not fused (regex) or None)
PLANS = [
    ("both run one per process", FREE, FREE, False, None),
    ("target has a timeout (enforced on the fused run)", FREE, {**FREE, "timeout": 5.0}, False, None),
    ("target has a retry handler (applied to the fused run)", FREE, {**FREE, "handler": RETRY}, False, None),
    ("fan-out", FREE, FREE, True, r"event 'out' has 2 targets"),
    ("target runs one at a time", FREE, {"concurrency": 1}, False, r"'b' runs at most 1 at a time"),
    ("target limited to 2", FREE, {"concurrency": 2}, False, r"'b' runs at most 2 at a time"),
    ("source runs one at a time", {"concurrency": 1}, FREE, False, r"'a' runs at most 1 at a time"),
    ("target batches", FREE, {**FREE, "policy": batch_size_policy(2)}, False, r"'b' has a policy"),
    ("target joins two slots", FREE, {**FREE, "slots": ("in", "other")}, False, r"several slots"),
    ("source turned it off", {**FREE, "fusion": False}, FREE, False, r"'a' turned fusion off"),
    ("target turned it off", FREE, {**FREE, "fusion": False}, False, r"'b' turned fusion off"),
]


@pytest.mark.parametrize(("case", "source", "target", "fan_out", "why"), PLANS, ids=[row[0] for row in PLANS])
def test_which_connections_fuse(case, source, target, fan_out, why) -> None:
    source, target = dict(source), dict(target)
    fusion = source.pop("fusion", True), target.pop("fusion", True)
    flow = _two(source, target, fan_out=fan_out)
    flow.routines["a"].set_fusion(fusion[0])
    flow.routines["b"].set_fusion(fusion[1])
    found = fusion_plan(flow)[("a", "out", "b", "in")]
    if why is None:
        assert found is None
        assert fused_targets(flow) == {"a": {"out": ("b", "in")}}
    else:
        assert found is not None
        assert re.search(why, found), found
        assert fused_targets(flow) == {}
    listing = describe_flow("plan", flow)
    assert ("a.out -> b.in  [fused]" in listing) == (why is None), listing


def test_set_fusion_takes_a_bool() -> None:
    with pytest.raises(TypeError, match=r"set_fusion\(\) takes True or False, got 'no'"):
        FnRoutine(_pass).set_fusion("no")


# -- what a lane may send -----------------------------------------------------------------------------


def _first(act_id: int = 5, chain=None, jobs: int = 1) -> SimpleNamespace:
    """What the supervisor holds first on a lane: an activation sent (``chain`` None) or a fused run booked."""
    return SimpleNamespace(act_id=act_id, chain=chain, jobs=[object()] * jobs,
                           rt=SimpleNamespace(fused={"out": ("b", "in")}))


def _result(act_id: int = 5, chain: int = 0, fused=None, events=("out",)) -> _Result:
    return _Result(act_id, None, [(event, b"", None) for event in events], None, None, None, 0.0, None, fused, chain)


#: (case, first activation the lane holds, the result it sends, why that breaks the protocol (regex) or None)
RESULTS = [
    ("the activation's result", _first(), _result(), None),
    ("it runs emit 0 fused next", _first(), _result(fused=0), None),
    ("the fused run's result", _first(9, chain=(5, 1)), _result(5, chain=1), None),
    ("nothing held", None, _result(), r"while it held no activation"),
    ("another activation", _first(), _result(6), r"activation #6 while it held activation #5"),
    ("a fused run where an activation is held", _first(), _result(5, chain=1), r"#5\.1 while it held activation #5"),
    ("the activation where a fused run is held", _first(9, chain=(5, 1)), _result(5),
     r"#5 while it held activation the fused run 5\.1"),
    ("another fused run", _first(9, chain=(5, 1)), _result(5, chain=2), r"#5\.2 while it held .* 5\.1"),
    ("fuses an event with no fused connection", _first(), _result(fused=0, events=("other",)),
     r"claimed to run emit 0 .* not on a fused connection"),
    ("fuses an emit it did not make", _first(), _result(fused=1), r"claimed to run emit 1"),
    ("fuses in an activation of two jobs", _first(jobs=2), _result(fused=0), r"claimed to run emit 0"),
]


@pytest.mark.parametrize(("case", "first", "result", "why"), RESULTS, ids=[row[0] for row in RESULTS])
def test_which_results_a_lane_may_send(case, first, result, why) -> None:
    found = unexpected_result(first, result)
    if why is None:
        assert found is None
    else:
        assert found is not None and re.search(why, found), found
