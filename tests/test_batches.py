"""Jobs in activations of several jobs (batches, joins, custom policies): every output goes to its own job."""

from __future__ import annotations

import re

import pytest
from helpers import WAIT, FnRoutine, by_value, single_flow

from routilux_mp import Flow, FlowRegistry, JobContext, job_of, jobs_of
from routilux_mp.activation_policies import all_slots_ready_policy, batch_size_policy, custom_policy

by_value(__name__)


def _per_item(routine, slot_data, message, ws):
    for item in slot_data["in"]:
        routine.emit("out", job=job_of(item), i=item["i"], square=item["i"] ** 2)
    routine.emit("out", batch=[item["i"] for item in slot_data["in"]])  # names no job: the whole batch's


def _pairs(slots, ws):
    return slots["in"].get_unconsumed_count() >= 2  # (each post runs the policy: batches of exactly 2)


def _copies(slots, ws):
    # A policy written against the public queue API: it gets (and returns) copies of the items.
    if slots["in"].get_unconsumed_count() < 2:
        return False, {}, None
    return True, {"in": slots["in"].consume_all_new()}, {"reason": "copies"}


@pytest.mark.parametrize("policy", [batch_size_policy(4), custom_policy(_pairs), _copies],
                         ids=["batch_size", "custom", "consume_all_new"])
def test_each_job_of_a_batch_gets_its_own_outputs_and_the_batch_output_names_them_all(make_runtime, policy) -> None:
    single_flow("per-item", _per_item, policy=policy)
    runtime = make_runtime(processes=2)
    jobs = [runtime.post("per-item", "r", "in", {"i": i}, job_id=f"line-{i}")[1] for i in range(10)]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    by_batch = {}
    for i, job in enumerate(jobs):
        assert job.status == "completed"
        own = [o["data"] for o in job.outputs if "batch" not in o["data"]]
        assert own == [{"i": i, "square": i * i}], f"{job.job_id} got {job.outputs}"
        (batch,) = [o for o in job.outputs if "batch" in o["data"]]
        assert i in batch["data"]["batch"]
        assert batch["job_ids"] == [f"line-{k}" for k in batch["data"]["batch"]]
        # One output object, in the outputs of each of its jobs.
        assert by_batch.setdefault(tuple(batch["data"]["batch"]), batch) is batch


def _split(routine, slot_data, message, ws):
    for item in slot_data["in"]:
        routine.emit("each", job=job_of(item), i=item["i"])
    routine.emit("total", total=sum(item["i"] for item in slot_data["in"]))


def _square(routine, slot_data, message, ws):
    item = slot_data["in"][0]
    job = job_of(item)
    job.data["squared"] = True
    routine.emit("out", i=item["i"], square=item["i"] ** 2, jobs=[j.job_id for j in jobs_of(item)])


def test_emits_travel_downstream_with_their_jobs(make_runtime) -> None:
    flow = Flow("pipe")
    flow.add_routine(FnRoutine(_split, events=("each", "total"), policy=batch_size_policy(3)), "split")
    flow.add_routine(FnRoutine(_square, concurrency=None), "square")
    flow.add_routine(FnRoutine(lambda r, sd, m, ws: r.emit("out", **sd["in"][0])), "report")
    flow.connect("split", "each", "square", "in")
    flow.connect("split", "total", "report", "in")
    FlowRegistry.get_instance().register_by_name("pipe", flow)
    runtime = make_runtime(processes=2)
    jobs = [runtime.post("pipe", "split", "in", {"i": i}, job_id=f"j{i}")[1] for i in range(6)]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    for i, job in enumerate(jobs):
        assert job.status == "completed"
        squares = [o["data"] for o in job.outputs if o["routine"] == "square"]
        assert squares == [{"i": i, "square": i * i, "jobs": [job.job_id]}]
        assert job.data == {"squared": True}, "job.data changed on an item's job travels back to that job"
        totals = [o for o in job.outputs if o["routine"] == "report"]
        first = i - i % 3
        assert [(t["data"], t["job_ids"]) for t in totals] == [
            ({"total": 3 * first + 3}, [f"j{k}" for k in range(first, first + 3)])]


def test_a_failed_batch_fails_all_its_jobs(make_runtime) -> None:
    def fail(routine, slot_data, message, ws):
        raise ValueError("bad batch")

    single_flow("bad-batch", fail, policy=batch_size_policy(2))
    runtime = make_runtime(processes=1)
    jobs = [runtime.post("bad-batch", "r", "in", {"i": i})[1] for i in range(4)]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert [j.status for j in jobs] == ["failed"] * 4
    assert all("bad batch" in j.error["message"] for j in jobs)


def _join(routine, slot_data, message, ws):
    left, right = slot_data["left"][0], slot_data["right"][0]
    routine.emit("out", job=job_of(left), side="left")
    routine.emit("out", job=[job_of(right)], side="right")
    routine.emit("out", job="a job keyword that is not a JobContext is data")


def test_a_join_attributes_each_side_and_a_job_keyword_that_is_data_stays_data(make_runtime) -> None:
    flow = Flow("join")
    flow.add_routine(FnRoutine(_join, slots=("left", "right"), policy=all_slots_ready_policy()), "r")
    FlowRegistry.get_instance().register_by_name("join", flow)
    runtime = make_runtime(processes=1)
    _, left = runtime.post("join", "r", "left", {"x": 1})
    _, right = runtime.post("join", "r", "right", {"x": 2})
    assert runtime.wait_until_all_jobs_finished(WAIT)
    data = "a job keyword that is not a JobContext is data"
    assert [o["data"] for o in left.outputs] == [{"side": "left"}, {"job": data}]
    assert [o["data"] for o in right.outputs] == [{"side": "right"}, {"job": data}]
    assert left.outputs[1] is right.outputs[1] and left.outputs[1]["job_ids"] == [left.job_id, right.job_id]


def _misuse(routine, slot_data, message, ws):
    item = slot_data["in"][0]
    case = item["case"]
    if case == "copy":
        job_of(dict(item))
    elif case == "foreign":
        routine.emit("out", job=JobContext("someone-else", "w", "f"))


@pytest.mark.parametrize(("case", "message"), [
    ("copy", r"is not an item of the running activation of 'r': pass the item object from slot_data itself"),
    ("foreign", r"named 'someone-else', which is not a job of this activation of 'r' \(its jobs: 'm-"),
])
def test_misattribution_is_refused_with_what_to_do(make_runtime, case, message) -> None:
    single_flow("misuse", _misuse)
    runtime = make_runtime(processes=1)
    _, job = runtime.post("misuse", "r", "in", {"case": case}, job_id=f"m-{case}")
    assert job.wait(WAIT)
    assert job.status == "failed"
    assert job.error["type"].endswith("RoutiluxError")
    assert re.search(message, job.error["message"]), job.error["message"]
