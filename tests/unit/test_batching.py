"""Adaptive batching without processes: sizes, fairness, the lone activation, and faults in the middle of a batch.

The real supervisor over the in-thread stub backend (whose ``send`` takes a
``_Batch`` as a worker process does) on a fake clock; the batch sizes follow
the activations' real (tiny) logic times.
"""

from __future__ import annotations

import signal

import pytest
from helpers import FnRoutine

from routilux_mp import ErrorHandler, ErrorStrategy, Flow, _dispatch
from routilux_mp._batching import BATCH_SECONDS, MAX_BATCH, learn
from routilux_mp._dispatch import PREFETCH_MAX_AGE
from routilux_mp._records import _RoutineRt

CRASH = "routilux_mp.errors.WorkerCrashedError"
TIMEOUT = "routilux_mp.errors.ActivationTimeoutError"

#: Item numbers each logic run saw, in order (the stub runs logic in this process).
RUNS: list[int] = []


def _echo(routine, slot_data, message, ws):
    for item in slot_data["in"]:
        RUNS.append(item["i"])
        routine.emit("out", **item)


@pytest.fixture(autouse=True)
def _fresh_runs():
    RUNS.clear()
    yield
    RUNS.clear()


def _flow(name: str, **kwargs) -> Flow:
    flow = Flow(name)
    flow.add_routine(FnRoutine(_echo, concurrency=None, **kwargs), "r")
    return flow


def _frames(h, slot: int | None = None) -> list[list[int]]:
    """Activation frames sent (to ``slot``), each as the item numbers it carried (a batch: several)."""
    import pickle

    found = []
    for s, message in h.stub.frames:
        acts = message.acts if type(message).__name__ == "_Batch" else (
            (message,) if type(message).__name__ == "_Activation" else ())
        if acts and (slot is None or s == slot):
            found.append([pickle.loads(a.slots["in"][0])["i"] for a in acts])
    return found


@pytest.fixture(autouse=True)
def microsecond_activations(monkeypatch) -> None:
    """Every activation is booked as 1 us of logic: batch sizes follow the test, not the machine's load
    (a lane thread preempted in the middle of a microsecond's logic measures milliseconds)."""
    book = _dispatch.book
    monkeypatch.setattr(_dispatch, "book", lambda act, _seconds, *rest: book(act, 1e-6, *rest))


def _warm(h, flow, items: int = 4) -> None:
    """Run a few activations, so the routine is measured short (a one-item activation takes microseconds)."""
    for i in range(items):
        h.post(flow, {"i": -1 - i})
    h.settle()
    RUNS.clear()


def _batch_on_lane_0(h, flow) -> list:
    """12 jobs posted while both lanes are busy: items 0 and 1 went alone, then lane 0 took items 2-6 in one
    frame (half of the 10 ready) and is busy with item 2; lane 1 is still busy with item 1."""
    _warm(h, flow)
    h.stub.hold(0)
    h.stub.hold(1)
    jobs = [h.post(flow, {"i": i}) for i in range(12)]
    h.settle()
    assert _frames(h)[-2:] == [[0], [1]], "posted one by one: each went alone to an idle lane, the rest wait"
    h.stub.release(0, count=1)
    h.settle()
    assert _frames(h, 0)[-1] == [2, 3, 4, 5, 6], "half of the 10 ready (2 lanes), in one frame, in order"
    return jobs


# -- sizes ------------------------------------------------------------------------------------------


def _fake_rt() -> _RoutineRt:
    rt = _RoutineRt.__new__(_RoutineRt)
    rt.limit, rt.cap, rt.batch, rt.mean = 2, 2, 1, None
    return rt


#: id, the logic seconds of the activations measured in turn, the batch size then
SIZES = [
    ("nothing-measured-goes-alone", [], 1),
    ("microsecond-activations-fill-the-batch-time", [1e-6] * 5, int(BATCH_SECONDS / (1e-6 + 50e-6))),
    ("half-a-millisecond", [5e-4] * 5, 3),
    ("longer-than-the-batch-time-goes-alone", [5e-3] * 5, 1),
    ("one-long-activation-drops-it-to-one-at-once", [1e-6] * 20 + [0.05], 1),
    ("short-ones-again-grow-it-back", [1e-6] * 20 + [0.05] + [1e-6] * 60, int(BATCH_SECONDS / (1e-6 + 50e-6))),
    ("never-past-max-batch", [0.0] * 5, min(MAX_BATCH, int(BATCH_SECONDS / 50e-6))),
]


@pytest.mark.parametrize(("seconds", "size"), [case[1:] for case in SIZES], ids=[case[0] for case in SIZES])
def test_the_batch_size_follows_the_measured_activations(seconds, size) -> None:
    rt = _fake_rt()
    for each in seconds:
        learn(rt, each)
    assert rt.batch == size
    assert rt.cap == rt.limit * size, "beyond its limit only by whole batches"


# -- what goes out in one frame ---------------------------------------------------------------------


def test_ready_activations_of_a_short_routine_go_to_idle_lanes_in_shares_of_one_frame(harness) -> None:
    h = harness(processes=2, capacity=10)
    jobs = _batch_on_lane_0(h, _flow("share"))
    h.stub.release(0)
    h.stub.release(1)
    h.settle()
    assert [job.status for job in jobs] == ["completed"] * 12
    assert sorted(RUNS) == list(range(12)), "each ran exactly once"
    assert all(len(frame) <= 5 for frame in _frames(h)), "never more than a lane's share"


def test_a_lone_activation_is_sent_at_once_by_the_post_never_held_for_a_batch(harness) -> None:
    h = harness(processes=2, capacity=10)
    flow = _flow("lone")
    _warm(h, flow, items=8)
    before = len(h.stub.frames)
    job = h.post(flow, {"i": 0})
    assert len(h.stub.frames) == before + 1 and _frames(h)[-1] == [0], (
        "sent by post() itself, alone, without a dispatcher pass")
    h.settle()
    assert job.status == "completed"


def test_a_busy_lane_gets_no_batch_and_a_parallel_routine_stays_within_its_lanes(harness) -> None:
    h = harness(processes=3, capacity=10)
    flow = Flow("two-lanes")
    flow.add_routine(FnRoutine(_echo, concurrency=2), "r")
    _warm(h, flow)
    for slot in range(3):
        h.stub.hold(slot)
    jobs = [h.post(flow, {"i": i}) for i in range(9)]
    h.settle()
    lanes = {s for s, m in h.stub.frames[-2:]}
    assert _frames(h)[-2:] == [[0], [1]] and len(lanes) == 2, "max_concurrency=2: two lanes, the third stays free"
    h.stub.release(0, count=1)
    h.settle()
    assert _frames(h)[-1] == [2, 3, 4, 5], "the freed lane takes half of the ready ones (two lanes usable to it)"
    assert _frames(h, 1)[-1] == [1], "nothing went behind the busy lane's running activation"
    assert all(i < 0 for frame in _frames(h, 2) for i in frame), "the third lane got nothing: two lanes at most"
    for slot in range(3):
        h.stub.release(slot)
    h.settle()
    assert [job.status for job in jobs] == ["completed"] * 9
    assert sorted(RUNS) == list(range(9))


def test_a_batch_never_takes_activations_younger_than_another_routines_waiting_one(harness) -> None:
    h = harness(processes=2, capacity=10)
    flow = Flow("fair")
    flow.add_routine(FnRoutine(_echo, concurrency=None), "r")
    flow.add_routine(FnRoutine(_echo, concurrency=None), "slow")
    _warm(h, flow)
    h.stub.hold(0)
    h.stub.hold(1)
    early = [h.post(flow, {"i": i}) for i in range(10)]
    h.advance(PREFETCH_MAX_AGE * 2)  # nothing is sent ahead behind the running ones any more: all wait here
    slow = h.post(flow, {"i": 100}, routine="slow")
    late = [h.post(flow, {"i": i}) for i in range(10, 20)]
    h.stub.release(0)
    h.stub.release(1)
    h.settle()
    assert all(job.status == "completed" for job in (*early, slow, *late))
    order = [i for frame in _frames(h) for i in frame]
    assert order.index(100) < order.index(10), "the other routine's activation went before any posted after it"
    assert max(len(frame) for frame in _frames(h)) > 1, "the fast routine was batched all the same"


def test_a_lane_without_room_for_a_whole_batch_still_gets_what_fits_one_by_one(harness) -> None:
    h = harness(processes=1, capacity=3)  # (a worker's pipe has room for PIPE_BUDGET bytes of prefetch)
    flow = Flow("room")
    flow.add_routine(FnRoutine(_echo, concurrency=1), "r")  # one at a time: queued ahead on its lane
    _warm(h, flow)
    h.stub.hold(0)
    jobs = [h.post(flow, {"i": i}) for i in range(6)]
    h.settle()
    assert _frames(h)[-3:] == [[0], [1], [2]], "posted one by one, up to the lane's room"
    h.stub.release(0, count=2)  # 0 and 1 finish: 3, 4 and 5 are ready at once, the lane has room for two
    h.settle()
    assert _frames(h)[-2:] == [[3], [4]], "the batch of three did not fit: two went one by one"
    assert [job.status for job in jobs] == ["completed"] * 2 + ["running"] * 3 + ["pending"]
    h.stub.release(0)
    h.settle()
    assert [job.status for job in jobs] == ["completed"] * 6
    assert sorted(RUNS) == list(range(6))


def test_without_prefetch_nothing_is_batched(harness) -> None:
    h = harness(processes=2, capacity=10, prefetch=0)
    flow = _flow("off")
    _warm(h, flow)
    h.stub.hold(0)
    h.stub.hold(1)
    jobs = [h.post(flow, {"i": i}) for i in range(8)]
    h.stub.release(0)
    h.stub.release(1)
    h.settle()
    assert [job.status for job in jobs] == ["completed"] * 8
    assert all(len(frame) == 1 for frame in _frames(h))


# -- faults in the middle of a batch ----------------------------------------------------------------


def _crash(sig, exitcode=1):
    return lambda h: h.stub.crash(0, sig=sig, exitcode=exitcode, stderr="Fatal Python error: oops")


def _time_out(h):
    h.advance(5.1)


RETRY = ErrorHandler(ErrorStrategy.RETRY, max_retries=2, retry_delay=1.0, retry_backoff=1.0)

#: id, routine options, what happens while item 4 runs (items 2, 3 done; 5, 6 not started), item 4's
#: outcome (status, error type, message part; None: it is retried and completes)
MID_BATCH_FAULTS = [
    ("sigkill", {}, _crash(signal.SIGKILL), ("failed", CRASH, "was killed by SIGKILL while running routine 'r'")),
    ("segfault", {}, _crash(signal.SIGSEGV), ("failed", CRASH, "was killed by SIGSEGV while running routine 'r'")),
    ("os-exit", {}, _crash(None, 3), ("failed", CRASH, "exited with code 3 while running routine 'r'")),
    ("crash-retried", {"handler": RETRY}, _crash(signal.SIGKILL), None),
    ("timeout", {"timeout": 5.0}, _time_out, ("failed", TIMEOUT, "ran longer than its timeout of 5s")),
]


@pytest.mark.parametrize(("options", "fault", "outcome"), [case[1:] for case in MID_BATCH_FAULTS],
                         ids=[case[0] for case in MID_BATCH_FAULTS])
def test_a_fault_in_the_middle_of_a_batch_blames_the_running_activation_only(harness, options, fault,
                                                                            outcome) -> None:
    h = harness(processes=2, capacity=10)
    jobs = _batch_on_lane_0(h, _flow("mid", **options))
    h.stub.release(0, count=2)  # items 2 and 3 finish; item 4 is taken and runs
    h.stub.release(1)  # the other lane runs everything else meanwhile
    h.settle()
    assert [job.status for job in jobs[2:4]] == ["completed"] * 2 and jobs[4].status == "running"
    assert [job.status for job in jobs[5:7]] == ["running"] * 2, "sent in the batch, not started"
    fault(h)
    h.settle()
    h.advance(1.0)  # (a retry's delay)
    h.settle()
    faulty = jobs[4]
    if outcome is None:
        assert faulty.status == "completed" and RUNS.count(4) == 1, "retried after the crash, ran once to the end"
        assert [a.attempt for a in h.activations() if a.job_id == faulty.job_id] == [1, 2]
    else:
        status, error_type, message = outcome
        assert faulty.status == status and faulty.error["type"] == error_type
        assert message in faulty.error["message"]
        assert 4 not in RUNS, "its run never finished"
    others = [job for i, job in enumerate(jobs) if i != 4]
    assert [job.status for job in others] == ["completed"] * 11, "nothing lost"
    assert sorted(i for i in RUNS if i != 4) == [i for i in range(12) if i != 4], "each of the others ran once"
    assert [a.attempt for a in h.activations() if a.job_id in (jobs[5].job_id, jobs[6].job_id)] == [1, 1, 1, 1], (
        "the never-started ones were sent again as the same attempt: not counted as crashed")
    assert h.sup.stats()["routines"]["r"]["errors"] == 1


def test_a_worker_recycled_in_the_middle_of_a_batch_gives_back_what_it_never_started(harness) -> None:
    h = harness(processes=2, capacity=10)
    jobs = _batch_on_lane_0(h, _flow("recycle"))
    h.stub.recycle_after(0, 2)
    h.stub.release(0)
    h.stub.release(1)
    h.settle()
    assert [job.status for job in jobs] == ["completed"] * 12
    assert sorted(RUNS) == list(range(12)), "each ran exactly once"
    assert h.sup.stats()["routines"]["r"]["errors"] == 0
    assert h.sup.stats()["processes"][0]["restarts"] == 1
