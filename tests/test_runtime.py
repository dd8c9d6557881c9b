"""The runtime end to end, on real worker processes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
from helpers import WAIT, FnRoutine, by_value, echo, our_children, single_flow, wait_until

from routilux_mp import ErrorHandler, Flow, FlowRegistry, Runtime, get_current_job
from routilux_mp.activation_policies import (
    all_slots_ready_policy,
    batch_size_policy,
    custom_policy,
    time_interval_policy,
)
from routilux_mp.errors import RuntimeClosedError, SerializationError, SlotQueueFullError

by_value(__name__)



def _whoami(routine, slot_data, message, ws):
    routine.emit("out", pid=os.getpid(), item=slot_data["in"][0])


def test_logic_runs_in_worker_processes_never_in_the_supervisor(make_runtime) -> None:
    single_flow("who", _whoami, concurrency=None)
    runtime = make_runtime(processes=2)
    jobs = [runtime.post("who", "r", "in", {"i": i})[1] for i in range(6)]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    pids = {j.outputs[0]["data"]["pid"] for j in jobs}
    worker_pids = {p["pid"] for p in runtime.stats()["processes"]}
    assert os.getpid() not in pids
    assert pids <= worker_pids
    assert [j.outputs[0]["data"]["item"] for j in jobs] == [{"i": i} for i in range(6)]


def _parse(routine, slot_data, message, ws):
    line = slot_data["line"][0]["text"]
    for word in line.split():
        routine.emit("words", word=word)


def _score(routine, slot_data, message, ws):
    word = slot_data["word"][0]["word"]
    routine.emit("scored", word=word, score=sum(ord(c) for c in word), pid=os.getpid())


def _collect(routine, slot_data, message, ws):
    item = slot_data["item"][0]
    ws.increment("collect", "total", item["score"])
    routine.emit("result", **item)


def _pipeline() -> Flow:
    flow = Flow("pipe")
    flow.add_routine(FnRoutine(_parse, slots=["line"], events=["words"]), "parse")
    flow.add_routine(FnRoutine(_score, slots=["word"], events=["scored"], concurrency=None), "score")
    flow.add_routine(FnRoutine(_collect, slots=["item"], events=["result"]), "collect")
    flow.connect("parse", "words", "score", "word")
    flow.connect("score", "scored", "collect", "item")
    FlowRegistry.get_instance().register_by_name("pipe", flow)
    return flow


def test_three_stage_pipeline_completes_jobs_with_outputs(make_runtime, backend) -> None:
    _pipeline()
    runtime = make_runtime(processes=2, **backend)
    lines = ["alpha beta", "gamma", "delta epsilon zeta"]
    jobs = [runtime.post("pipe", "parse", "line", {"text": t})[1] for t in lines]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    for job, line in zip(jobs, lines, strict=True):
        assert job.status == "completed" and job.completed_at is not None
        assert sorted(o["data"]["word"] for o in job.outputs) == sorted(line.split())
        assert {(o["routine"], o["event"]) for o in job.outputs} == {("collect", "result")}
    expected = sum(sum(ord(c) for c in w) for t in lines for w in t.split())
    assert runtime.get_worker_state("pipe-1").get_routine_state("collect") == {"total": expected}
    stats = runtime.stats()
    assert stats["routines"]["score"]["activations"] == 6
    assert stats["jobs"] == {"completed": 3}
    json.dumps(stats)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda rt: rt.post("nope", "r", "in", {}), r"no flow is registered as 'nope' \(registered: 'ok'\)"),
        (lambda rt: rt.post("ok", "nope", "in", {}), r"no routine 'nope' \(routines: 'r'\)"),
        (lambda rt: rt.post("ok", "r", "nope", {}), r"no slot 'nope' \(slots: 'in'\)"),
        (lambda rt: rt.post("ok", "r", "in", {}, worker_id="ghost"), r"no worker 'ghost'"),
        (lambda rt: rt.exec("nope"), r"no flow is registered as 'nope'"),
    ],
)
def test_bad_names_raise_before_anything_is_created(make_runtime, call, message) -> None:
    single_flow("ok", echo)
    runtime = make_runtime(processes=1)
    with pytest.raises(ValueError, match=message):
        call(runtime)
    assert runtime.list_workers() == []
    assert runtime.list_jobs() == []


def test_post_validates_data(make_runtime) -> None:
    single_flow("ok", echo)
    runtime = make_runtime(processes=1)
    with pytest.raises(TypeError, match="must be a dict"):
        runtime.post("ok", "r", "in", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match="cannot be pickled"):
        runtime.post("ok", "r", "in", {"lock": threading.Lock()})
    assert runtime.list_jobs() == []


def _flaky(routine, slot_data, message, ws):
    item = slot_data["in"][0]
    runs = ws.increment("runs", item["key"])
    routine.emit("out", before_error=runs)
    if runs < item["succeed_on"]:
        raise ValueError(f"attempt {runs} fails")
    routine.emit("out", ok=runs)


STRATEGIES = [
    # strategy, handler kwargs, succeed_on, expected status, expected runs, outputs
    ("stop", {}, 2, "failed", 1, 0),
    ("continue", {}, 2, "completed", 1, 1),
    ("skip", {}, 2, "completed", 1, 0),
    ("retry", {"max_retries": 3, "retry_delay": 0.01}, 3, "completed", 3, 2),
    ("retry", {"max_retries": 1, "retry_delay": 0.01}, 5, "failed", 2, 0),
    ("retry", {"max_retries": 3, "retry_delay": 0.01, "retryable_exceptions": [KeyError]}, 3, "failed", 1, 0),
]


@pytest.mark.parametrize(("strategy", "kwargs", "succeed_on", "status", "runs", "outputs"), STRATEGIES,
                         ids=["stop", "continue", "skip", "retry-succeeds", "retry-exhausted", "retry-not-retryable"])
def test_error_strategies(make_runtime, strategy, kwargs, succeed_on, status, runs, outputs) -> None:
    single_flow("flaky", _flaky, handler=ErrorHandler(strategy, **kwargs))
    runtime = make_runtime(processes=1)
    ws = runtime.exec("flaky")
    _, job = runtime.post("flaky", "r", "in", {"key": "k", "succeed_on": succeed_on})
    _, other = runtime.post("flaky", "r", "in", {"key": "other", "succeed_on": 1})
    assert job.wait(WAIT) and other.wait(WAIT)
    assert job.status == status
    assert ws.get_routine_state("runs")["k"] == runs, "retry re-runs the logic for real"
    assert len(job.outputs) == outputs
    assert other.status == "completed", "other jobs carry on"
    if strategy in ("stop", "continue") or status == "failed":
        assert job.error["type"] == "ValueError"
        assert "_flaky" in job.error["traceback"] and "Traceback" in job.error["traceback"]
    if strategy == "skip":
        assert job.error is None and job.traces[-1]["action"] == "skipped"
    if strategy == "retry" and status == "completed":
        assert job.attempts == 3


def _job_aware(routine, slot_data, message, ws):
    job = get_current_job()
    job.data["seen"] = job.data.get("seen", []) + [slot_data["in"][0]["i"]]
    job.data.setdefault("meta", job.metadata)
    job.trace("r", "visited", {"i": slot_data["in"][0]["i"]})
    routine.emit("out", job_id=job.job_id)


def test_job_context_data_travels_back_and_current_job_is_set(make_runtime) -> None:
    single_flow("jobs", _job_aware)
    runtime = make_runtime(processes=1)
    _, job = runtime.post("jobs", "r", "in", {"i": 1}, job_id="job-1", metadata={"user": "ann"})
    assert job.wait(WAIT)
    assert job.job_id == "job-1" and runtime.get_job("job-1") is job
    assert job.data == {"seen": [1], "meta": {"user": "ann"}}
    assert job.outputs[0]["data"] == {"job_id": "job-1"}
    assert job.traces[-1]["action"] == "visited" and job.traces[-1]["details"] == {"i": 1}
    assert get_current_job() is None
    with pytest.raises(ValueError, match="already exists"):
        runtime.post("jobs", "r", "in", {"i": 2}, job_id="job-1")


def _batch(routine, slot_data, message, ws):
    routine.emit("out", n=len(slot_data["in"]), reason=message["reason"])


def test_batch_size_policy_and_flush_deliver_everything(make_runtime) -> None:
    single_flow("batch", _batch, policy=batch_size_policy(3))
    runtime = make_runtime(processes=1)
    jobs = [runtime.post("batch", "r", "in", {"i": i})[1] for i in range(7)]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    outputs = [o["data"] for j in jobs for o in j.outputs]
    batches = [{"n": 3, "reason": "batch_ready"}] * 3 + [{"n": 3, "reason": "batch_ready"}] * 3 + [
        {"n": 1, "reason": "flush"}]
    assert outputs == batches, "an emit naming no job belongs to every job of its batch"
    assert [j.outputs[0].get("job_ids") for j in jobs] == [[f"{jobs[k].job_id}" for k in (0, 1, 2)]] * 3 + [
        [jobs[k].job_id for k in (3, 4, 5)]] * 3 + [None]
    assert all(j.status == "completed" for j in jobs)


def test_flush_delivers_a_partial_batch_on_demand(make_runtime) -> None:
    single_flow("batch", _batch, policy=batch_size_policy(10))
    runtime = make_runtime(processes=1)
    _, job = runtime.post("batch", "r", "in", {"i": 0})
    assert not job.wait(0.2)
    runtime.flush("batch")
    assert job.wait(WAIT) and job.outputs[0]["data"] == {"n": 1, "reason": "flush"}


def test_time_interval_policy_uses_a_real_timer(make_runtime) -> None:
    # The second and third items must arrive within the interval after the first fired: the worker is
    # ready before the first is posted (a fresh interpreter can take seconds on a loaded machine), and the
    # interval is far longer than one round trip to a ready worker.
    single_flow("tick", _batch, policy=time_interval_policy(1.0))
    runtime = make_runtime(processes=1)
    assert runtime._testing.wait_pool_ready(WAIT)
    started = time.monotonic()
    _, first = runtime.post("tick", "r", "in", {"i": 0})  # fires at once: nothing fired before
    assert first.wait(WAIT)
    _, second = runtime.post("tick", "r", "in", {"i": 1})
    _, third = runtime.post("tick", "r", "in", {"i": 2})
    assert second.wait(WAIT) and third.wait(WAIT)
    assert first.outputs[0]["data"] == {"n": 1, "reason": "time_interval"}
    assert second.outputs[0]["data"] == {"n": 2, "reason": "time_interval"}
    assert time.monotonic() - started >= 1.0, "the second activation waited for the interval"


def _join(routine, slot_data, message, ws):
    routine.emit("out", left=slot_data["left"][0]["v"], right=slot_data["right"][0]["v"])


def test_join_keeps_jobs_open_and_wait_reports_what_waits(make_runtime) -> None:
    single_flow("join", _join, slots=["left", "right"], policy=all_slots_ready_policy())
    runtime = make_runtime(processes=1)
    _, left = runtime.post("join", "r", "left", {"v": 1})
    assert runtime.wait_until_all_jobs_finished(timeout=0.5) is False
    assert runtime.stats()["waiting"] == [{"worker_id": "join-1", "routine": "r", "slot": "left", "items": 1}]
    _, right = runtime.post("join", "r", "right", {"v": 2})
    assert runtime.wait_until_all_jobs_finished(WAIT)
    joined = {"routine": "r", "event": "out", "data": {"left": 1, "right": 2}, "job_ids": [left.job_id, right.job_id]}
    assert left.outputs == right.outputs == [joined], "an emit naming no job belongs to both jobs of the join"
    assert left.status == right.status == "completed"


def test_custom_policy(make_runtime) -> None:
    policy = custom_policy(lambda slots, ws: slots["in"].get_unconsumed_count() >= 2)
    single_flow("custom", _batch, policy=policy)
    runtime = make_runtime(processes=1)
    _, a = runtime.post("custom", "r", "in", {})
    assert not a.wait(0.2)
    _, b = runtime.post("custom", "r", "in", {})
    assert a.wait(WAIT) and b.wait(WAIT)
    assert a.outputs[0]["data"] == {"n": 2, "reason": "custom"}


def _overlap(routine, slot_data, message, ws):
    now = ws.increment("overlap", "running")
    ws.modify_routine_state("overlap", lambda s: dict(s, peak=max(s.get("peak", 0), now)))
    if slot_data["in"][0]["barrier"]:
        deadline = time.monotonic() + 60
        while ws.get_routine_state("overlap")["peak"] < 2 and time.monotonic() < deadline:
            pass
    ws.increment("overlap", "running", -1)


@pytest.mark.parametrize(("concurrency", "peak"), [(1, 1), (None, 2)], ids=["actor-default", "parallel"])
def test_concurrency_default_is_one_activation_at_a_time(make_runtime, concurrency, peak) -> None:
    single_flow("conc", _overlap, concurrency=concurrency)
    runtime = make_runtime(processes=2)
    ws = runtime.exec("conc")
    for _ in range(4):
        runtime.post("conc", "r", "in", {"barrier": concurrency is None})
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert ws.get_routine_state("overlap")["peak"] == peak


def _unpicklable_emit(routine, slot_data, message, ws):
    routine.emit("out", lock=threading.Lock())


def test_unpicklable_emit_fails_only_that_activation(make_runtime) -> None:
    single_flow("emit", _unpicklable_emit)
    runtime = make_runtime(processes=1)
    _, job = runtime.post("emit", "r", "in", {})
    assert job.wait(WAIT) and job.status == "failed"
    assert job.error["type"] == "routilux_mp.errors.SerializationError"
    assert "emit('out') from routine 'r': the data cannot be pickled" in job.error["message"]
    pid = runtime.stats()["processes"][0]["pid"]
    FlowRegistry.get_instance().register_by_name("echo", Flow("echo"))
    single_flow("echo", echo)
    _, ok = runtime.post("echo", "r", "in", {"x": 1})
    assert ok.wait(WAIT) and ok.status == "completed"
    assert runtime.stats()["processes"][0]["pid"] == pid, "the worker process kept serving"


def test_unshippable_flow_is_refused_at_exec(make_runtime) -> None:
    lock = threading.Lock()
    single_flow("bad", lambda r, d, m, ws: lock.acquire())
    runtime = make_runtime(processes=1)
    with pytest.raises(SerializationError, match="flow 'bad' cannot be sent to worker processes"):
        runtime.exec("bad")


def _hold(routine, slot_data, message, ws):
    with ws.lock("gate"):
        pass


def test_back_pressure_blocks_or_raises_when_the_slot_is_full(make_runtime) -> None:
    single_flow("bp", _hold, max_queue_length=2)
    runtime = make_runtime(processes=1, prefetch=0)
    ws = runtime.exec("bp")
    with ws.lock("gate"):
        runtime.post("bp", "r", "in", {})  # runs and blocks on the gate
        runtime.post("bp", "r", "in", {})
        runtime.post("bp", "r", "in", {})
        with pytest.raises(SlotQueueFullError, match="max_queue_length"):
            runtime.post("bp", "r", "in", {}, block=False)
        with pytest.raises(SlotQueueFullError, match="past the post"):
            runtime.post("bp", "r", "in", {}, timeout=0.2)
        assert len(runtime.list_jobs()) == 3
    runtime.post("bp", "r", "in", {})
    assert runtime.wait_until_all_jobs_finished(WAIT)


def _long_activation(routine, slot_data, message, ws):
    ws.increment("started", "n")
    time.sleep(600)  # an activation that outlasts the test: shutdown must stop it


def test_shutdown_cancels_leftovers_and_leaves_no_process(make_runtime) -> None:
    single_flow("slow", _long_activation)
    runtime = make_runtime(processes=2)
    ws = runtime.exec("slow")
    jobs = [runtime.post("slow", "r", "in", {})[1] for _ in range(3)]
    wait_until(lambda: (ws.get_routine_state("started") or {}).get("n") == 1, "an activation to start")
    children = our_children()
    assert len(children) >= 3, "2 workers and the state server"
    started = time.monotonic()
    runtime.shutdown(wait=False)
    assert time.monotonic() - started < 15
    assert {j.status for j in jobs} == {"cancelled"}
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    with pytest.raises(RuntimeClosedError):
        runtime.post("slow", "r", "in", {})
    with pytest.raises(RuntimeClosedError):
        runtime.exec("slow")
    runtime.shutdown()  # twice is fine


#: id, whether the state is in a file the user named. A runtime shut down before its state server started
#: (its worker was not ready yet) once waited state_timeout for a push that had no server to go to.
EARLY_SHUTDOWNS = [("private-state", False), ("state-file", True)]


@pytest.mark.parametrize("durable", [row[1] for row in EARLY_SHUTDOWNS], ids=[row[0] for row in EARLY_SHUTDOWNS])
def test_a_runtime_shut_down_right_after_exec_stops_at_once_and_keeps_what_it_registered(tmp_path, durable) -> None:
    single_flow("early", _whoami)
    path = str(tmp_path / "run.db") if durable else None
    runtime = Runtime(processes=1, state_path=path, state_timeout=60.0)
    try:
        ws = runtime.exec("early", worker_id="w1")
        started = time.monotonic()
        runtime.shutdown()
        assert time.monotonic() - started < 30, "shutdown waited for a state server that never started"
        assert ws.status == "stopped" and ws.get_routine_state("r") is None
    finally:
        runtime.shutdown()
    if durable:  # the registration reached the file: the next runtime can resume w1
        with Runtime(processes=1, state_path=path) as again:
            assert again.list_workers(stored=True) == ["w1"]


def test_thread_pool_size_is_an_alias_of_processes() -> None:
    with Runtime(thread_pool_size=2) as runtime:
        assert runtime.processes == 2 and len(runtime.stats()["processes"]) == 2
    with pytest.raises(ValueError, match="disagree"):
        Runtime(thread_pool_size=2, processes=3)


PRINT_SCRIPT = textwrap.dedent(
    """
    import os
    from routilux_mp import Routine, Flow, Runtime, FlowRegistry

    class Talk(Routine):
        def __init__(self):
            super().__init__()
            self.add_slot("in")
            def logic(slot_data, message, worker_state):
                i = slot_data["in"][0]["i"]
                print(f"line {i} " + "x" * 2000)
                if i == 4:
                    print("last words")
                    os._exit(1)
            self.set_logic(logic)

    flow = Flow("talk")
    flow.add_routine(Talk(), "talk")
    FlowRegistry.get_instance().register_by_name("talk", flow)
    with Runtime(processes=1) as runtime:
        for i in range(5):
            runtime.post("talk", "talk", "in", {"i": i})
        runtime.wait_until_all_jobs_finished(60)
    print("supervisor done")
    """
)


def test_print_in_logic_reaches_stdout_whole_lines_through_a_pipe(tmp_path, python_env) -> None:
    script = tmp_path / "talk.py"
    script.write_text(PRINT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=WAIT,
                          env=python_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [f"line {i} " + "x" * 2000 for i in range(5)] + ["last words", "supervisor done"]


def _gated(routine, slot_data, message, ws):
    ws.increment("started", "n")
    with ws.lock("gate"):
        pass
    routine.emit("out", done=True)


def test_shutdown_can_drain_running_jobs_and_cancel_the_rest(make_runtime) -> None:
    single_flow("drain", _gated)
    runtime = make_runtime(processes=1, prefetch=0)
    ws = runtime.exec("drain")
    done = []
    with ws.lock("gate"):
        jobs = [runtime.post("drain", "r", "in", {})[1] for _ in range(4)]
        for job in jobs:
            job.add_done_callback(lambda j: done.append(j.job_id))
        wait_until(lambda: (ws.get_routine_state("started") or {}).get("n") == 1, "the first job to start")
        stopper = threading.Thread(target=runtime.shutdown, kwargs={"cancel_pending": True})
        stopper.start()
        wait_until(lambda: runtime.stats()["jobs"].get("cancelled") == 3, "three jobs to be cancelled")
    stopper.join(WAIT)
    assert [j.status for j in jobs] == ["completed", "cancelled", "cancelled", "cancelled"]
    assert jobs[0].outputs == [{"routine": "r", "event": "out", "data": {"done": True}}]
    assert sorted(done) == sorted(j.job_id for j in jobs)


def test_done_callbacks_cannot_deadlock_the_runtime(make_runtime) -> None:
    from routilux_mp.errors import RoutiluxError

    single_flow("cb", echo, max_queue_length=1)
    runtime = make_runtime(processes=1)
    seen: list = []
    finished = threading.Event()

    def callback(job):
        try:
            runtime.wait_until_all_jobs_finished(1)
        except RoutiluxError as exc:
            seen.append(type(exc).__name__)
        runtime.shutdown()  # from the dispatcher thread: stops once the callback returns
        finished.set()

    _, job = runtime.post("cb", "r", "in", {"x": 1})
    job.add_done_callback(callback)
    assert finished.wait(WAIT)
    assert seen == ["RoutiluxError"]
    runtime.shutdown()
    assert runtime.closed
    with pytest.raises(RuntimeClosedError):
        runtime.post("cb", "r", "in", {"x": 2})


def _stamp(routine, slot_data, message, ws) -> None:
    for item in slot_data["in"]:
        started = time.time()
        ws.increment("r", "runs")  # (a state call: short, but not instantaneous)
        routine.emit("out", n=item["n"], started=started, ended=time.time(), pid=os.getpid())


def test_a_one_at_a_time_routine_queued_ahead_still_runs_one_at_a_time_in_post_order(make_runtime) -> None:
    single_flow("actor", _stamp)  # max_concurrency=1, the default: its activations are queued ahead on one lane
    runtime = make_runtime(processes=2)
    jobs = [runtime.post("actor", "r", "in", {"n": n})[1] for n in range(200)]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    runs = [job.outputs[0]["data"] for job in jobs]
    assert [run["n"] for run in sorted(runs, key=lambda run: run["started"])] == list(range(200)), "in post order"
    for before, after in itertools.pairwise(runs):
        assert before["ended"] <= after["started"], f"{before} and {after} overlapped"
