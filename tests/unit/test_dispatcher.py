"""The dispatcher without processes: policies, order, limits, deaths, hangs, timeouts, retries, back-pressure.

Each test drives the real supervisor (ledger, router, dispatcher, loop) over
the in-thread stub backend with a fake clock: every step is explicit and the
whole file runs in well under a second.
"""

from __future__ import annotations

import signal
import threading

import pytest
from helpers import FnRoutine

from routilux_mp import ErrorHandler, ErrorStrategy, Flow
from routilux_mp._loop import STATE_START_GRACE
from routilux_mp.activation_policies import batch_size_policy
from routilux_mp.errors import RuntimeBrokenError, SlotQueueFullError, StateServerLostError

CRASH = "routilux_mp.errors.WorkerCrashedError"
TIMEOUT = "routilux_mp.errors.ActivationTimeoutError"


def _echo(routine, slot_data, message, ws):
    for item in slot_data["in"]:
        routine.emit("out", **item)


def _count(routine, slot_data, message, ws):
    routine.emit("out", n=len(slot_data["in"]), items=[item["i"] for item in slot_data["in"]])


def _fail(routine, slot_data, message, ws):
    raise ValueError(f"bad item {slot_data['in'][0]['i']}")


def _increment(routine, slot_data, message, ws):
    ws.increment("r", "seen")
    routine.emit("out", seen=ws.get_routine_state("r")["seen"])


def _flow(name: str, fn=_echo, **kwargs) -> Flow:
    flow = Flow(name)
    flow.add_routine(FnRoutine(fn, **kwargs), "r")
    return flow


def _outputs(job) -> list[dict]:
    return [o["data"] for o in job.outputs]


# -- policies ---------------------------------------------------------------------------------------


def test_the_immediate_policy_runs_one_activation_per_item_and_completes_each_job(harness) -> None:
    h = harness()
    flow = _flow("imm", concurrency=None)
    jobs = [h.post(flow, {"i": i}) for i in range(5)]
    h.settle()
    assert [job.status for job in jobs] == ["completed"] * 5
    assert [_outputs(job) for job in jobs] == [[{"i": i}] for i in range(5)]
    assert len(h.activations()) == 5
    stats = h.sup.stats()
    assert stats["routines"]["r"]["activations"] == 5 and stats["jobs"] == {"completed": 5}


def test_a_batch_policy_waits_for_full_batches_and_flush_delivers_the_rest(harness) -> None:
    h = harness()
    flow = _flow("batch", _count, policy=batch_size_policy(3))
    jobs = [h.post(flow, {"i": i}) for i in range(7)]
    h.settle()
    assert [len(a.slots["in"]) for a in h.activations()] == [3, 3]
    assert [job.status for job in jobs[6:]] == ["pending"], "the partial batch waits"
    h.sup.flush(None)
    h.settle()
    assert [len(a.slots["in"]) for a in h.activations()] == [3, 3, 1]
    assert all(job.status == "completed" for job in jobs)
    assert _outputs(jobs[0]) == [{"n": 3, "items": [0, 1, 2]}], "a batch's output goes to its oldest job"


def test_logic_reads_and_writes_worker_state_through_the_in_process_store(harness) -> None:
    h = harness()
    flow = _flow("state", _increment, concurrency=None)
    jobs = [h.post(flow, {"i": i}) for i in range(4)]
    h.settle()
    assert sorted(_outputs(job)[0]["seen"] for job in jobs) == [1, 2, 3, 4]
    assert h.sup.worker_state("state-1").get_routine_state("r") == {"seen": 4}


# -- order and limits -------------------------------------------------------------------------------


def test_activations_go_out_in_post_order_within_the_routine_limit(harness) -> None:
    h = harness(processes=3, prefetch=0)
    flow = _flow("limit", concurrency=2)
    for slot in range(3):
        h.stub.hold(slot)
    jobs = [h.post(flow, {"i": i}) for i in range(5)]
    h.settle()
    sent = [h.sup.get_job(a.job_id) for a in h.activations()]
    assert sent == jobs[:2], "only max_concurrency=2 run at once, the oldest first"
    assert {s for s, m in h.stub.sent if type(m).__name__ == "_Activation"} == {0, 1}, "idle lanes first"
    for slot in range(3):
        h.stub.release(slot)
    h.settle()
    assert [a.job_id for a in h.activations()] == [job.job_id for job in jobs]
    assert all(job.status == "completed" for job in jobs)


def test_a_busy_lane_gets_at_most_prefetch_activations_ahead(harness) -> None:
    h = harness(processes=1, prefetch=1, capacity=10)
    flow = _flow("prefetch", concurrency=8)  # (None would mean one per process: no prefetch at all)
    h.stub.hold(0)
    jobs = [h.post(flow, {"i": i}) for i in range(4)]
    h.settle()
    assert len(h.activations()) == 2, "one running and one prefetched"
    h.stub.release(0)
    h.settle()
    assert all(job.status == "completed" for job in jobs)


#: id, the routine's max_concurrency, the runtime's prefetch, activations its busy lane holds after 6 posts
QUEUE_AHEAD = [
    ("one-at-a-time-short-activations-queue-ahead-on-their-lane", 1, 1, 6),
    ("no-prefetch-keeps-one-in-flight", 1, 0, 1),
    ("a-parallel-routine-never-queues-behind-itself", None, 1, 1),
]


@pytest.mark.parametrize(("concurrency", "prefetch", "held"), [case[1:] for case in QUEUE_AHEAD],
                         ids=[case[0] for case in QUEUE_AHEAD])
def test_a_one_at_a_time_routine_queues_short_activations_ahead_on_its_one_lane(harness, concurrency, prefetch,
                                                                                 held) -> None:
    h = harness(processes=2, prefetch=prefetch, capacity=10)
    flow = _flow("ahead", concurrency=concurrency)
    first = h.post(flow, {"i": -1})
    h.settle()  # one short activation measured: its routine's activations are known to be short
    assert first.status == "completed"
    h.stub.hold(0)
    h.stub.hold(1)
    jobs = [h.post(flow, {"i": i}) for i in range(6)]
    h.settle()
    sent = h.activations()[1:]
    lanes = {s for s, m in h.stub.sent[1:] if type(m).__name__ == "_Activation"}
    if concurrency == 1:
        assert len(sent) == held and len(lanes) == 1, "one lane only: they still run one after another"
    else:
        assert len(sent) == 2 * held and lanes == {0, 1}, "one in flight per lane, none queued behind its own"
    h.stub.release(0)
    h.stub.release(1)
    h.settle()
    assert [job.status for job in jobs] == ["completed"] * 6
    assert [a.job_id for a in h.activations()[1:]] == [job.job_id for job in jobs], "in post order"


def test_nothing_is_sent_ahead_behind_a_long_activation_nor_to_the_older_of_two_busy_lanes(harness) -> None:
    from routilux_mp._dispatch import PREFETCH_MAX_AGE

    h = harness(processes=2, prefetch=1, capacity=10)
    flow = _flow("ahead", concurrency=8)
    long_one = h.post_held(flow, {"i": 0}, lane=0)
    h.advance(PREFETCH_MAX_AGE / 2)
    short_one = h.post_held(flow, {"i": 1}, lane=1)
    waiting = h.post(flow, {"i": 2})
    h.settle()
    assert [a.job_id for a in h.activations(1)] == [short_one.job_id, waiting.job_id], (
        "sent ahead to the lane whose activation began last")
    h.advance(PREFETCH_MAX_AGE)
    queued = h.post(flow, {"i": 3})
    h.settle()
    assert queued.status == "pending", "both lanes' activations ran past PREFETCH_MAX_AGE: it stays queued here"
    h.stub.release(1)
    h.settle()
    assert [a.job_id for a in h.activations(0)] == [long_one.job_id], "never behind the long one"
    assert queued.status == "completed" and waiting.status == "completed"
    h.stub.release(0)
    h.settle()
    assert long_one.status == "completed"


def test_a_lane_without_room_keeps_activations_queued_until_it_has_room(harness) -> None:
    h = harness(processes=1, prefetch=5, capacity=1)
    flow = _flow("room", concurrency=8)
    h.stub.hold(0)
    jobs = [h.post(flow, {"i": i}) for i in range(3)]
    h.settle()
    assert len(h.activations()) == 1, "send() said no room: the others stay queued"
    assert [job.status for job in jobs] == ["running", "pending", "pending"]
    h.stub.release(0)
    h.settle()
    assert [job.status for job in jobs] == ["completed"] * 3


def test_a_full_slot_queue_refuses_a_post_until_an_activation_starts(harness) -> None:
    h = harness(processes=1, prefetch=0)
    flow = _flow("full", concurrency=1, max_queue_length=2)
    h.stub.hold(0)
    first = h.post(flow, {"i": 0})  # sent: no longer in the queue
    queued = [h.post(flow, {"i": i}) for i in (1, 2)]
    with pytest.raises(SlotQueueFullError, match="holds 2 items, its max_queue_length"):
        h.post(flow, {"i": 3})
    h.stub.release(0)
    h.sup.run_once(0)  # the first finishes, the second starts: room for one
    later = h.post(flow, {"i": 3})
    h.settle()
    assert [job.status for job in (first, *queued, later)] == ["completed"] * 4


# -- deaths and hangs -------------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "exitcode", "how"), [
    (signal.SIGKILL, 1, "was killed by SIGKILL"),
    (signal.SIGSEGV, 1, "was killed by SIGSEGV"),
    (None, 3, "exited with code 3"),
], ids=["sigkill", "segfault", "exit-3"])
def test_a_worker_death_fails_what_it_ran_and_requeues_what_it_never_started(harness, sig, exitcode, how) -> None:
    h = harness(processes=2, prefetch=1)
    flow = _flow("death", concurrency=8)
    h.stub.hold(0)
    h.stub.hold(1)
    running, prefetched, other = (h.post(flow, {"i": i}) for i in range(3))
    h.settle()
    assert [a.job_id for a in h.activations(0)] == [running.job_id, other.job_id]
    assert [a.job_id for a in h.activations(1)] == [prefetched.job_id]
    h.stub.crash(0, sig=sig, exitcode=exitcode, stderr="Fatal Python error: oops")
    h.stub.release(1)
    h.settle()
    assert running.status == "failed" and running.error["type"] == CRASH
    assert how in running.error["message"] and "while running routine 'r'" in running.error["message"]
    assert running.error["traceback"] == "Fatal Python error: oops"
    assert other.status == "completed" and prefetched.status == "completed", "the never-started one ran elsewhere"
    assert h.sup.stats()["processes"][0]["restarts"] == 1, "the dead lane was refilled"


def test_a_crashing_activation_is_retried_then_given_up_as_poison(harness) -> None:
    h = harness(processes=1, max_crash_retries=2)
    handler = ErrorHandler(ErrorStrategy.RETRY, max_retries=5, retry_delay=1.0, retry_backoff=1.0)
    flow = _flow("poison", handler=handler)
    job = h.post_held(flow, {"i": 0})
    h.stub.crash(0)
    h.settle()  # attempt 1 crashed: retried in 1 s; the lane is refilled
    h.stub.hold(0)
    h.advance(1.0)  # attempt 2 goes to the (held) new lane
    h.stub.crash(0)
    h.settle()
    assert job.status == "failed" and job.error["type"] == CRASH
    assert "it crashed a worker 2 times: given up as a poison activation" in job.error["message"]
    assert [a.attempt for a in h.activations()] == [1, 2]


def test_a_stalled_worker_is_killed_and_its_activations_run_elsewhere(harness) -> None:
    h = harness(processes=2, prefetch=0)
    flow = _flow("stall", concurrency=None)
    h.stub.hold(0)
    h.stub.hold(1)
    job = h.post(flow, {"i": 0})
    h.settle()
    assert [a.job_id for a in h.activations(0)] == [job.job_id]
    h.stub.stall(0)
    h.stub.release(1)
    h.settle()
    assert h.stub.kills and h.stub.kills[0][0] == 0 and h.stub.kills[0][2] is True
    assert "did not take its activation of routine 'r' within 60s (TAKE_TIMEOUT)" in h.stub.kills[0][1]
    assert job.status == "completed" and [a.job_id for a in h.activations(1)] == [job.job_id]


def test_a_worker_that_breaks_the_protocol_is_killed_and_fails_what_it_ran(harness) -> None:
    h = harness(processes=2)
    flow = _flow("broken", concurrency=None)
    job = h.post_held(flow, {"i": 0})
    h.stub.corrupt(0, "sent bytes that are not a frame")
    h.settle()
    assert job.status == "failed" and job.error["type"] == CRASH
    assert "sent bytes that are not a frame: its protocol with the supervisor is broken" in job.error["message"]


def test_workers_that_keep_failing_to_start_break_the_runtime(harness) -> None:
    h = harness(processes=1)
    flow = _flow("never")
    running = h.post_held(flow, {"i": 0})
    h.stub.spawn_error = "worker 0: could not start a process: OSError: out of processes"
    h.stub.crash(0)
    h.settle()
    queued = h.post(flow, {"i": 1})
    for delay in (0.1, 0.2, 0.4, 0.8):  # the respawns back off
        assert h.sup.closed is False and queued.status == "pending"
        h.advance(delay)
    assert running.status == "failed" and running.error["type"] == CRASH
    assert queued.status == "failed" and queued.error["type"] == "routilux_mp.errors.RuntimeBrokenError"
    assert "failed to start 5 times in a row; giving up. Last failure: worker 0: could not start" in (
        queued.error["message"])
    with pytest.raises(RuntimeBrokenError, match="failed to start 5 times in a row"):
        h.post(flow, {"i": 2})


# -- timeouts and retries ---------------------------------------------------------------------------


def test_an_activation_past_its_timeout_is_killed_and_fails(harness) -> None:
    h = harness(processes=1)
    flow = _flow("slow", timeout=5.0)
    job = h.post_held(flow, {"i": 0})
    h.advance(4.9)
    assert not h.stub.kills and job.status == "running"
    h.advance(0.2)
    assert job.status == "failed" and job.error["type"] == TIMEOUT
    assert "ran longer than its timeout of 5s" in job.error["message"]
    assert h.stub.kills == [(0, job.error["message"], False)], "SIGTERM first, with a grace"
    h.settle()
    assert h.sup.stats()["processes"][0]["restarts"] == 1


def test_a_stalled_activation_does_not_time_out_until_it_is_taken(harness) -> None:
    h = harness(processes=1, max_crash_retries=5)
    flow = _flow("late", timeout=5.0)
    job = h.post_held(flow, {"i": 0})
    h.stub.loading(0)  # still loading the flow: it has not taken the activation
    h.advance(6)
    assert not h.stub.kills and job.status == "running", "the timeout counts from when it is taken"
    h.stub.loading(0, still=False)
    h.advance(5.1)
    assert job.status == "failed" and job.error["type"] == TIMEOUT


def test_retries_wait_with_backoff_then_give_up(harness) -> None:
    h = harness(processes=1)
    handler = ErrorHandler(ErrorStrategy.RETRY, max_retries=2, retry_delay=1.0, retry_backoff=3.0)
    flow = _flow("retry", _fail, handler=handler)
    job = h.post(flow, {"i": 7})
    h.settle()
    assert [a.attempt for a in h.activations()] == [1]
    h.advance(0.9)
    assert len(h.activations()) == 1, "not before retry_delay"
    h.advance(0.2)
    assert [a.attempt for a in h.activations()] == [1, 2]
    h.advance(2.8)
    assert len(h.activations()) == 2, "the next delay is retry_delay * retry_backoff"
    h.advance(0.3)
    assert [a.attempt for a in h.activations()] == [1, 2, 3]
    assert job.status == "failed" and job.attempts == 3
    assert "bad item 7 (gave up after 3 attempts; max_retries=2)" in job.error["message"]
    assert [t["action"] for t in job.traces] == ["retry", "retry"]


# -- the state server -------------------------------------------------------------------------------


def test_a_lost_state_server_fails_open_jobs_and_breaks_the_runtime(harness) -> None:
    h = harness(processes=1)
    flow = _flow("lost")
    job = h.post_held(flow, {"i": 0})
    h.sup.state.lose("the state server (pid 1) was killed by SIGKILL")
    h.settle()
    assert job.status == "failed" and job.error["type"] == "routilux_mp.errors.StateServerLostError"
    with pytest.raises(StateServerLostError, match="all shared worker state is lost"):
        h.post(flow, {"i": 1})


def test_the_state_server_starts_a_grace_after_the_first_ready_worker_not_before_the_first_result(
        harness, monkeypatch) -> None:
    """Its spawn holds the dispatcher for milliseconds: the first activation goes out and comes back first."""
    h = harness(processes=2)  # (the lanes reported ready while it was built)
    starts = []
    monkeypatch.setattr(h.sup.state, "start_server", lambda: starts.append(h.clock()))
    job = h.post(_flow("first"), {"i": 0})
    h.settle()
    assert job.status == "completed" and starts == []
    ready_at = h.clock()
    h.advance(STATE_START_GRACE)
    assert starts == [ready_at + STATE_START_GRACE]


# -- waking job.wait() callers -----------------------------------------------------------------------


class _WakeRecorder:
    """A job's wait() latch (held until the job finishes) that notes whether the supervisor's lock was
    held when it was released."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.latch = threading.Lock()
        self.latch.acquire()
        self.lock_held: list[bool] = []

    def acquire(self, *args) -> bool:
        return self.latch.acquire(*args)

    def release(self) -> None:
        self.lock_held.append(self.lock.locked())
        self.latch.release()


@pytest.mark.parametrize("how", ["its last activation's result", "complete_job"])
def test_a_job_wakes_its_waiters_once_the_supervisor_lock_is_released(harness, how) -> None:
    # Woken with the lock held, a waiter that posts its next job at once blocks on it: a thread switch
    # more per job posted and waited for one at a time.
    h = harness(processes=1)
    flow = _flow("wake", concurrency=None)
    h.stub.hold(0)
    job = h.post(flow, {"i": 0})
    h.settle()
    assert job.wait(0) is False  # (makes the job's latch, as a waiting thread does)
    recorder = job._done = _WakeRecorder(h.sup.lock)
    if how == "complete_job":
        assert h.sup.complete_job(job.job_id, "completed", None)
    h.stub.release(0)
    h.settle()
    assert job.status == "completed" and job.wait(0) is True
    assert recorder.lock_held == [False], "set once, with the lock released"


def test_every_thread_waiting_for_a_job_returns_when_it_finishes(harness) -> None:
    h = harness(processes=1)
    flow = _flow("waiters", concurrency=None)
    h.stub.hold(0)
    job = h.post(flow, {"i": 0})
    h.settle()
    assert job.wait(0) is False and job.wait(0.01) is False, "not finished yet: a wait that times out says so"
    results: list[bool] = []
    waiters = [threading.Thread(target=lambda: results.append(job.wait(30))) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    h.stub.release(0)
    h.settle()
    for waiter in waiters:
        waiter.join(30)
    assert results == [True] * 3, "one wake-up reaches every waiter"
    assert job.wait(0) is True and job.wait() is True


def test_a_blocking_done_callback_does_not_keep_another_jobs_waiters_asleep(harness) -> None:
    # Jobs that finish in one pass have their waiters woken before any done-callback of that pass runs:
    # a callback that blocks (here: until the other job's waiter returned) must not hold them back.
    h = harness(processes=1, prefetch=1, capacity=10)
    flow = _flow("blocking", concurrency=None)
    h.stub.hold(0)
    first, second = (h.post(flow, {"i": i}) for i in range(2))
    h.settle()
    assert h.stub.holding(0) and second.wait(0) is False  # (the waiting thread's latch, made now)
    returned = threading.Event()
    waiter = threading.Thread(target=lambda: second.wait(30) and returned.set())
    waiter.start()
    seen: list[bool] = []
    first.add_done_callback(lambda job: seen.append(returned.wait(10)))
    h.stub.release(0)
    h.settle()
    waiter.join(30)
    assert first.status == second.status == "completed"
    assert seen == [True], "the other job's waiter returned while the done-callback still ran"


# -- with a dispatcher thread ------------------------------------------------------------------------


def test_the_dispatcher_thread_runs_over_stub_lanes_and_shuts_down() -> None:
    import functools

    from routilux_mp._exec.stub import StubBackend, StubState
    from routilux_mp._messages import encode
    from routilux_mp._supervisor import Settings, Supervisor

    sup = Supervisor(Settings(processes=2), backend=functools.partial(StubBackend, capacity=2), state=StubState)
    sup.start()
    flow = _flow("threaded", _increment, concurrency=None)
    flow.validate()
    sup.add_worker("threaded", flow, None)
    done = []
    jobs = []
    for i in range(20):
        _, job = sup.post("threaded", flow, "r", "in", encode({"i": i}), worker_id=None, job_id=None,
                          metadata=None, block=True, timeout=5.0)
        job.add_done_callback(done.append)
        jobs.append(job)
    assert sup.wait_idle(5.0), "the dispatcher thread ran every activation"
    assert sorted(_outputs(job)[0]["seen"] for job in jobs) == list(range(1, 21))
    assert len(done) == 20, "every done-callback ran"
    sup.shutdown(wait=True, timeout=5.0, cancel_pending=False)
    assert sup.testing().join_dispatcher(5.0)
    assert sup.worker_state("threaded-1").get_routine_state("r") == {"seen": 20}, "read from the final snapshot"


def test_a_waiting_thread_returns_when_shutdown_gives_up_on_a_stuck_done_callback() -> None:
    import functools

    from routilux_mp._exec.stub import StubBackend, StubState
    from routilux_mp._loop import CALLBACK_STOP_GRACE
    from routilux_mp._messages import encode
    from routilux_mp._supervisor import Settings, Supervisor

    sup = Supervisor(Settings(processes=1), backend=functools.partial(StubBackend, capacity=2), state=StubState)
    sup.start()
    flow = _flow("stuck", concurrency=None)
    flow.validate()
    sup.add_worker("stuck", flow, None)
    sup.backend.hold(0)
    jobs = [sup.post("stuck", flow, "r", "in", encode({"i": i}), worker_id=None, job_id=None, metadata=None,
                     block=True, timeout=5.0)[1] for i in range(2)]
    in_callback, unblock = threading.Event(), threading.Event()
    jobs[0].add_done_callback(lambda job: (in_callback.set(), unblock.wait(30)))
    woken: list[bool] = []
    waiter = threading.Thread(target=lambda: woken.append(jobs[1].wait(30)))
    waiter.start()
    try:
        sup.backend.release(0, count=1)  # the first job finishes; its callback keeps the dispatcher
        assert in_callback.wait(5)
        sup.shutdown(wait=False, timeout=5.0, cancel_pending=False)  # gives up on the callback, ends the rest
        waiter.join(CALLBACK_STOP_GRACE + 10)
        assert woken == [True] and jobs[1].status == "cancelled", "the waiter returned once its job ended"
    finally:
        unblock.set()
        waiter.join(10)
        assert sup.testing().join_dispatcher(10)


# -- the harness itself -----------------------------------------------------------------------------


def test_these_tests_cannot_start_a_process() -> None:
    import subprocess

    from routilux_mp._supervisor import Settings, Supervisor

    with pytest.raises(AssertionError, match="tried to start a process"):
        subprocess.Popen(["true"])
    sup = Supervisor(Settings(processes=1))  # the local backend: its workers are processes
    with pytest.raises(AssertionError, match="tried to start a process"):
        sup.start(thread=False)
    sup.state.finish({}, 1.0)
    sup.state.stop()
    sup.backend.stop(0.0, lambda piece: None)
