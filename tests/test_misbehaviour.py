"""Workers, logic and done-callbacks that misbehave without crashing: they hang, stray, fork, flood.

Each table injects one way to misbehave and checks that only its own job
suffers (or none), that no call hangs (every wait has a deadline) and, through
the autouse fixture, that no process is left behind.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import psutil
import pytest
from helpers import WAIT, by_value, echo, freeze, our_children, pool_ready, pool_refilled, single_flow

from routilux_mp import Runtime, get_current_job
from routilux_mp._exec import _pipes, local
from routilux_mp.errors import RoutiluxError, RuntimeBrokenError

by_value(__name__)

MiB = 2**20
CRASH = "routilux_mp.errors.WorkerCrashedError"
#: TAKE_TIMEOUT in these tests (60 s in production).
TAKE = 1.5


def _pid_and_size(routine, slot_data, message, ws):
    routine.emit("out", pid=os.getpid(), size=len(slot_data["in"][0]["pad"]))


def _gated_echo(routine, slot_data, message, ws):
    with ws.lock("gate"):  # held by the test while it attaches callbacks
        pass
    echo(routine, slot_data, message, ws)


def _hang():
    threading.Event().wait()


class HangsWhenLoaded:
    """Unpickling it never returns: a flow holding it is stuck loading in every worker."""

    def __reduce__(self):
        return _hang, ()


# -- workers that do not take their activation ---------------------------------------------------


def test_a_stopped_idle_worker_blocks_nothing_and_is_replaced(make_runtime, monkeypatch) -> None:
    monkeypatch.setattr(local, "TAKE_TIMEOUT", TAKE)
    single_flow("stall", _pid_and_size, concurrency=None)
    runtime = make_runtime(processes=2)
    runtime.exec("stall")
    pool_ready(runtime)
    victim = runtime._testing.worker_pid(0)
    freeze(victim)  # idle: the first activation goes to it
    try:
        jobs: list = []
        big = {"pad": "x" * 200_000}  # more than a pipe holds: a blocking write would never return

        def post_all() -> None:
            jobs.extend(runtime.post("stall", "r", "in", big)[1] for _ in range(4))

        poster = threading.Thread(target=post_all)
        poster.start()
        poster.join(20)
        assert not poster.is_alive(), "post() blocked on the stopped worker's command pipe"
        assert all(job.wait(WAIT) for job in jobs)
        assert [job.status for job in jobs] == ["completed"] * 4, [job.error for job in jobs]
        assert all(job.outputs[0]["data"] == {"pid": job.outputs[0]["data"]["pid"], "size": 200_000}
                   for job in jobs)
        assert victim not in {job.outputs[0]["data"]["pid"] for job in jobs}
        pool_refilled(runtime, restarts=1)
        assert victim not in {p["pid"] for p in runtime.stats()["processes"]}, "the stopped worker was replaced"
        # A stopped worker at shutdown is stopped all the same.
        other = runtime._testing.worker_pid(1)
        freeze(other)
        children = our_children()
        started = time.monotonic()
        runtime.shutdown()
        assert time.monotonic() - started < 20
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    finally:
        if psutil.pid_exists(victim):  # (only when the test failed before the victim was replaced)
            os.kill(victim, signal.SIGCONT)


#: id, whether the spare worker process is SIGKILLed while it waits, whether the lane then gets it
SPARE_CASES = [("the-spare-takes-over", False, True), ("a-dead-spare-is-not-used", True, False)]


@pytest.mark.parametrize(("kill_spare", "spare_used"), [case[1:] for case in SPARE_CASES],
                         ids=[case[0] for case in SPARE_CASES])
def test_a_killed_worker_is_replaced_by_the_spare_process_started_ahead(make_runtime, kill_spare,
                                                                         spare_used) -> None:
    single_flow("spare", _pid_and_size, concurrency=None)
    runtime = make_runtime(processes=2)
    runtime.exec("spare")
    pool_ready(runtime)
    spare = runtime._testing.wait_spare(WAIT)
    assert spare is not None, "an idle ready pool starts a spare worker"
    if kill_spare:
        os.kill(spare, signal.SIGKILL)
    victim = runtime._testing.worker_pid(0)
    os.kill(victim, signal.SIGKILL)
    pool_refilled(runtime, restarts=1)
    pool_ready(runtime)
    assert (runtime._testing.worker_pid(0) == spare) is spare_used
    jobs = [runtime.post("spare", "r", "in", {"pad": ""})[1] for _ in range(4)]
    assert all(job.wait(WAIT) for job in jobs)
    assert [job.status for job in jobs] == ["completed"] * 4, [job.error for job in jobs]
    assert victim not in {job.outputs[0]["data"]["pid"] for job in jobs}
    assert runtime._testing.wait_spare(WAIT) not in (None, spare), "a new spare follows the one used"


def test_a_stopped_worker_is_replaced_when_nothing_else_happens(make_runtime, monkeypatch) -> None:
    monkeypatch.setattr(local, "TAKE_TIMEOUT", TAKE)
    single_flow("quiet", _pid_and_size)
    runtime = make_runtime(processes=1)
    _, first = runtime.post("quiet", "r", "in", {"pad": ""})  # the worker has the flow from now on
    assert first.wait(WAIT) and first.status == "completed", first.error
    victim = first.outputs[0]["data"]["pid"]
    assert runtime._testing.wait_no_timers(WAIT), "counters flushed, the first activation's take check done"
    freeze(victim)
    try:
        # A small activation fits in the pipe: nothing but the take check can wake the dispatcher now.
        _, job = runtime.post("quiet", "r", "in", {"pad": ""})
        assert job.wait(WAIT) and job.status == "completed", job.error
        assert job.outputs[0]["data"]["pid"] != victim
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGCONT)


def test_a_flow_that_never_finishes_loading_fails_its_job_after_max_crash_retries(make_runtime, monkeypatch) -> None:
    monkeypatch.setattr(local, "TAKE_TIMEOUT", TAKE)
    flow = single_flow("stuck", _pid_and_size)
    flow.routines["r"].trap = HangsWhenLoaded()
    runtime = make_runtime(processes=2, max_crash_retries=2)
    _, job = runtime.post("stuck", "r", "in", {"pad": ""})
    assert job.wait(WAIT)
    assert job.status == "failed" and job.error["type"] == CRASH
    assert f"did not take its activation of routine 'r' within {TAKE:g}s (TAKE_TIMEOUT)" in job.error["message"]
    assert "stuck loading the flow" in job.error["message"]
    assert "2 processes in a row did not take it: given up" in job.error["message"]
    pool_refilled(runtime, restarts=2)


# -- done-callbacks ------------------------------------------------------------------------------


def _wait_for_another_job(runtime, other):
    def callback(job):
        other.wait(WAIT)

    return callback


def _exit_the_interpreter(runtime, other):
    return lambda job: sys.exit(3)


def _raise_base_exception(runtime, other):
    def callback(job):
        raise GeneratorExit("a BaseException that is not an Exception")

    return callback


#: id, what the first job's done-callback does, what the log says
CALLBACK_FAULTS = [
    ("waits-for-another-job", _wait_for_another_job,
     r"job.wait\(\) on job '.+' was called from a job done-callback: .* the thread that finishes jobs"),
    ("exits-the-interpreter", _exit_the_interpreter, r"SystemExit: 3"),
    ("raises-a-base-exception", _raise_base_exception, r"GeneratorExit: a BaseException"),
]


@pytest.mark.parametrize(("fault", "make_callback", "logged"), CALLBACK_FAULTS, ids=[r[0] for r in CALLBACK_FAULTS])
def test_a_misbehaving_done_callback_fails_nothing_else(make_runtime, caplog, fault, make_callback, logged) -> None:
    import re

    single_flow("cb", _gated_echo)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("cb")
    with ws.lock("gate"):
        _, first = runtime.post("cb", "r", "in", {"i": 1})
        _, other = runtime.post("cb", "r", "in", {"i": 2})
        first.add_done_callback(make_callback(runtime, other))
        seen = []
        first.add_done_callback(lambda job: seen.append(job.job_id))
    assert first.wait(WAIT) and other.wait(WAIT)
    _, later = runtime.post("cb", "r", "in", {"i": 3})
    assert later.wait(WAIT), "the runtime keeps working"
    assert [j.status for j in (first, other, later)] == ["completed"] * 3
    assert seen == [first.job_id], "the next callback ran"
    assert re.search(logged, caplog.text), caplog.text
    children = our_children()
    runtime.shutdown()
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


def test_a_blocking_done_callback_cannot_keep_shutdown_from_stopping_every_process(make_runtime) -> None:
    single_flow("cb", _gated_echo)
    runtime = make_runtime(processes=2)
    ws = runtime.exec("cb")
    entered = threading.Event()
    release = threading.Event()
    try:
        with ws.lock("gate"):
            _, first = runtime.post("cb", "r", "in", {"i": 1})
            first.add_done_callback(lambda job: (entered.set(), release.wait()))
            queued = [runtime.post("cb", "r", "in", {"i": i})[1] for i in range(2, 5)]
        assert entered.wait(WAIT), "the callback started"
        children = our_children()
        assert len(children) >= 3
        started = time.monotonic()
        runtime.shutdown(timeout=5)
        assert time.monotonic() - started < 20, "shutdown() returned although a callback blocks the dispatcher"
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], "every process was stopped from the caller's thread"
        assert all(job.done for job in queued), [job.status for job in queued]
        assert not os.path.exists(runtime._testing.socket_dir)
    finally:
        release.set()
    assert runtime._testing.join_dispatcher(WAIT), "the dispatcher finishes once the callback returns"


# -- stray threads and forked children ---------------------------------------------------------------


def _leave_a_thread_running(routine, ws):
    def stray():
        while not (ws.get_routine_state("stray") or {}).get("go"):  # until this activation is over
            time.sleep(0.002)
        while True:
            job = get_current_job()
            if job is not None:
                job.data["stray"] = True
            try:
                routine.emit("out", stray=True)
            except RoutiluxError:
                ws.increment("stray", "refused")
            ws.increment("stray", "attempts")
            time.sleep(0.002)  # a background thread's pace, not a synchronization

    threading.Thread(target=stray, daemon=True).start()


def wait_for_stray(ws):
    """Inside logic: wait (bounded) until the stray thread tried twice more."""
    start = (ws.get_routine_state("stray") or {}).get("attempts", 0)
    deadline = time.monotonic() + 30
    while (ws.get_routine_state("stray") or {}).get("attempts", 0) < start + 2:
        if time.monotonic() > deadline:
            raise AssertionError("the stray thread did not run")


def _fork_and_return(routine, ws):
    if os.fork() == 0:  # the child returns into the worker loop, as careless logic does
        try:
            routine.emit("out", child=True)
        except RoutiluxError:
            pass
        return


#: id, what the first job's logic does
STRAYS = [
    ("thread-left-running", _leave_a_thread_running),
    ("forked-child-returns", _fork_and_return),
]


def _stray_or_own(routine, slot_data, message, ws):
    item = slot_data["in"][0]
    if item.get("stray"):
        STRAY_FUNCS[item["stray"]](routine, ws)
    elif item.get("wait_for_stray"):
        ws.merge_routine_state("stray", {"go": True})
        wait_for_stray(ws)  # the stray thread runs during this activation
    get_current_job().data["mine"] = item["i"]
    routine.emit("out", i=item["i"])


STRAY_FUNCS = dict(STRAYS)


@pytest.mark.parametrize(("stray", "inject"), STRAYS, ids=[r[0] for r in STRAYS])
def test_strays_never_act_for_another_job(make_runtime, stray, inject) -> None:
    single_flow("strays", _stray_or_own)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("strays")
    _, first = runtime.post("strays", "r", "in", {"i": 0, "stray": stray})
    assert first.wait(WAIT) and first.status == "completed", first.error
    pid = runtime.stats()["processes"][0]["pid"]
    wait = stray == "thread-left-running"
    later = [runtime.post("strays", "r", "in", {"i": i, "wait_for_stray": wait})[1] for i in range(1, 9)]
    assert all(job.wait(WAIT) for job in later)
    jobs = [first, *later]
    assert [job.status for job in jobs] == ["completed"] * 9, [job.error for job in jobs]
    assert [[o["data"] for o in job.outputs] for job in jobs] == [[{"i": i}] for i in range(9)]
    assert [job.data for job in jobs] == [{"mine": i} for i in range(9)]
    assert runtime.stats()["processes"][0]["pid"] == pid, "the worker kept serving"
    if stray == "thread-left-running":
        assert ws.get_routine_state("stray")["refused"] >= 16, "the stray's emits were refused"


# -- output, descriptors, start-up -----------------------------------------------------------------------

FLOOD_MB = 20


def _flood(routine, slot_data, message, ws):
    chunk = "é" * (MiB // 2)  # 1 MiB of two-byte characters, without a newline
    for _ in range(FLOOD_MB):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    with ws.lock("gate"):  # held by the test until it has seen the flood
        pass
    sys.stdout.write("\n")


def test_output_without_newlines_is_forwarded_in_bounded_pieces(make_runtime) -> None:
    sizes: list[int] = []
    bad = []
    cond = threading.Condition()

    def collect(stream, text):
        with cond:
            sizes.append(len(text.encode()))
            if text.strip("é\n"):
                bad.append(text[:100])
            cond.notify_all()

    single_flow("flood", _flood)
    runtime = make_runtime(processes=1, worker_output=collect)
    ws = runtime.exec("flood")
    with ws.lock("gate"):
        _, job = runtime.post("flood", "r", "in", {})
        with cond:
            got = cond.wait_for(lambda: sum(sizes) >= FLOOD_MB * MiB, timeout=25)
        assert got, f"only {sum(sizes)} bytes of a {FLOOD_MB} MiB line were forwarded while it was written"
    assert job.wait(WAIT) and job.status == "completed", job.error
    assert max(sizes) <= 2 * _pipes.OUTPUT_CHUNK, "the supervisor never held more than a piece"
    assert bad == [], "pieces end on whole characters"
    assert sum(sizes) == FLOOD_MB * MiB + 1


def _close_stdio(routine, slot_data, message, ws):
    item = slot_data["in"][0]
    if item["close"]:
        for fd in (0, 1, 2):
            os.close(fd)
    else:
        print(f"job {item['i']} prints", flush=True)
    routine.emit("out", pid=os.getpid())


def test_a_worker_whose_stdio_logic_closed_is_recycled(make_runtime) -> None:
    lines: list[str] = []
    single_flow("stdio", _close_stdio)
    runtime = make_runtime(processes=1, worker_output=lambda stream, text: lines.append(text))
    _, closer = runtime.post("stdio", "r", "in", {"i": 0, "close": True})
    later = [runtime.post("stdio", "r", "in", {"i": i, "close": False})[1] for i in range(1, 4)]
    assert closer.wait(WAIT) and all(job.wait(WAIT) for job in later)
    assert [job.status for job in [closer, *later]] == ["completed"] * 4, [job.error for job in later]
    first_pid = closer.outputs[0]["data"]["pid"]
    assert first_pid not in {job.outputs[0]["data"]["pid"] for job in later}, "the worker was replaced"
    assert "".join(lines).splitlines() == [f"job {i} prints" for i in range(1, 4)]
    pool_refilled(runtime, restarts=1)


@pytest.mark.parametrize("processes", [2, 5], ids=["fewer-than-max-start-failures", "as-many"])
def test_workers_that_cannot_be_spawned_raise_a_clear_error_at_start(monkeypatch, processes) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    with pytest.raises(RuntimeBrokenError, match=r"could not start a process: FileNotFoundError: .*nonexistent"):
        Runtime(processes=processes)


def test_post_refuses_unpicklable_data_before_starting_a_worker(make_runtime) -> None:
    single_flow("ok", echo)
    runtime = make_runtime(processes=1)
    with pytest.raises(TypeError, match="cannot be pickled"):
        runtime.post("ok", "r", "in", {"lock": threading.Lock()})
    assert runtime.list_workers() == [] and runtime.list_jobs() == []


def test_processes_are_capped_per_cpu() -> None:
    from routilux_mp.runtime import MAX_PROCESSES_PER_CPU, _cpu_count

    limit = MAX_PROCESSES_PER_CPU * _cpu_count()
    with pytest.raises(ValueError, match=rf"processes={limit + 1} is more than {MAX_PROCESSES_PER_CPU} per CPU"):
        Runtime(processes=limit + 1)

