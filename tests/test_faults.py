"""Fault isolation: whatever an activation does, only its own job fails; nothing is orphaned.

One table of injected faults (what the logic does, the runtime options, the
expected error type and message). Every row checks the faulty job's status and
error, that the jobs around it completed, that the pool is back to full
size, and (through the autouse fixture) that no process leaked. Faults that
break the runtime on purpose (state server lost, start-up failures) and
deaths of the supervisor itself follow the table.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
from helpers import WAIT, by_value, pool_ready, pool_refilled, single_flow, wait_until

from routilux_mp import ErrorHandler
from routilux_mp.errors import RuntimeBrokenError, StateServerLostError

by_value(__name__)

MiB = 2**20


class LockHoldingError(Exception):
    """An exception that cannot be pickled (it holds a lock)."""

    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


class NeedsTwoArgs(Exception):
    """An exception that pickles but cannot be unpickled (its __init__ wants two args)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}{b}")


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no string for you")


def _leak_past_limit(ws):
    hoard = []
    for _ in range(400):  # up to ~4 GiB, far past any limit used here
        hoard.append(b"x" * (10 * MiB))
    raise AssertionError("the memory limit was never enforced")


def _die_holding_lock(ws):
    with ws.lock("shared") as state:
        state["dying"] = True
        os.kill(os.getpid(), signal.SIGKILL)


def _ignore_sigterm(ws):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        pass


def _spin(ws):
    while True:
        pass


def _result_fd() -> int:
    """The worker's result pipe (argv: -c, title, command fd, result fd, life fd)."""
    return int(sys.argv[3])


def _write_result_pipe(data: bytes):
    def fault(ws):
        os.write(_result_fd(), data)
        _spin(ws)  # the supervisor kills the process as soon as it reads that

    return fault


def _forge_result(ws):
    from routilux_mp._messages import _Result, dumps

    message = dumps(_Result(10**9, None, [], None, None, None, 0.0))
    os.write(_result_fd(), len(message).to_bytes(4, "big") + message)
    _spin(ws)


def _only_here(pid):
    if os.getpid() != pid:
        raise RuntimeError("this object unpickles only in the process that made it")
    return "fine"


class OnlyInWorker:
    """Pickles anywhere, unpickles only in the process that pickled it."""

    def __reduce__(self):
        return _only_here, (os.getpid(),)


def _grandchild_then_spin(ws):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
    ws.update_routine_state("grandchild", {"pid": child.pid})
    while True:
        pass


def _modify_forever(state):  # runs in the state server
    while True:
        pass


def _increment_past_jsons_int_limit(ws):
    ws.increment("huge", "n", 9 * 10**4299)  # 4,300 digits: still encodable
    ws.increment("huge", "n", 9 * 10**4299)  # 4,301 digits: not


def _increment_wide_keys(ws):
    for i in range(10):
        ws.increment("wide", "ключ" * 50 + str(i))  # 1,200 bytes of escaped JSON per key


def _nested(depth):
    value = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _fake_frame_header(ws):
    # The worker's result pipe is its third argument; a header announcing 2 GiB, then nothing.
    os.write(int(sys.argv[3]), struct.pack("!i", 0x7FFFFFFF))
    while True:
        pass


CRASH = "routilux_mp.errors.WorkerCrashedError"
TIMEOUT = "routilux_mp.errors.ActivationTimeoutError"
NOT_JSON = "routilux_mp.errors.StateNotSerializableError"
SERIALIZATION = "routilux_mp.errors.SerializationError"
BROKEN_PROTOCOL = r"worker \d \(pid \d+\) sent .*: its protocol with the supervisor is broken"

#: id, what the faulty logic does, Runtime options, routine options, error type, message regex, replaced
FAULTS = [
    ("os-exit", lambda ws: os._exit(13), {}, {}, CRASH,
     r"worker \d \(pid \d+\) exited with code 13 while running routine 'r'", True),
    ("self-sigkill", lambda ws: os.kill(os.getpid(), signal.SIGKILL), {}, {}, CRASH,
     r"killed by SIGKILL .*possibly the out-of-memory killer", True),
    ("segfault", lambda ws: ctypes.string_at(0), {}, {}, CRASH, r"killed by SIGSEGV .*segmentation fault", True),
    ("sys-exit", lambda ws: sys.exit(4), {}, {}, "SystemExit", r"^4$", False),
    ("keyboard-interrupt", lambda ws: (_ for _ in ()).throw(KeyboardInterrupt()), {}, {}, "KeyboardInterrupt", "",
     False),
    ("unpicklable-exception", lambda ws: (_ for _ in ()).throw(LockHoldingError()), {}, {},
     "test_faults.LockHoldingError", "holds a lock", False),
    ("exception-fails-to-unpickle", lambda ws: (_ for _ in ()).throw(NeedsTwoArgs("a", "b")), {}, {},
     "test_faults.NeedsTwoArgs", "ab", False),
    ("exception-str-raises", lambda ws: (_ for _ in ()).throw(BadStr()), {}, {}, "test_faults.BadStr",
     "<unprintable BadStr>", False),
    ("unpicklable-emit", "emit-lock", {}, {}, SERIALIZATION,
     r"emit\('out'\) from routine 'r': the data cannot be pickled", False),
    ("emit-fails-to-unpickle", "emit-needs-two-args", {}, {}, SERIALIZATION,
     r"emit\('out'\) from routine 'r': the data cannot be unpickled \(TypeError", False),
    ("emit-fails-to-unpickle-in-the-supervisor", "emit-only-in-worker", {}, {}, SERIALIZATION,
     r"an output of emit\('out'\) from routine 'r' cannot be unpickled in the supervisor", False),
    ("garbage-on-the-result-pipe", _write_result_pipe(b"garbage!"), {}, {}, CRASH,
     BROKEN_PROTOCOL + r" .*did logic write to the worker's pipes", True),
    ("non-pickle-frame-on-the-result-pipe", _write_result_pipe(b"\x00\x00\x00\x05junk!"), {}, {}, CRASH,
     BROKEN_PROTOCOL, True),
    ("pickle-that-is-no-message", _write_result_pipe(b"\x00\x00\x00\x05\x80\x05K\x07."), {}, {}, CRASH,
     r"sent an unexpected message \(int\) on its result pipe", True),
    ("result-for-another-activation", _forge_result, {}, {}, CRASH,
     r"sent a result for activation #1000000000 while it held activation #\d+: its protocol", True),
    ("infinite-loop-timeout", _spin, {}, {"timeout": 3.0}, TIMEOUT, r"ran longer than its timeout of 3s", True),
    ("ignores-sigterm", _ignore_sigterm, {}, {"timeout": 3.0}, TIMEOUT, r"ran longer than its timeout", True),
    ("grandchild-and-timeout", _grandchild_then_spin, {}, {"timeout": 3.0}, TIMEOUT, r"timeout", True),
    ("rss-past-hard-limit", _leak_past_limit, {"max_worker_rss": 150 * MiB}, {},
     "routilux_mp.errors.WorkerMemoryError", r"over the hard limit of 225 MiB", True),
    ("killed-holding-lock", _die_holding_lock, {}, {}, CRASH, r"killed by SIGKILL", True),
    ("modify-past-its-budget", lambda ws: ws.modify_routine_state("slow", _modify_forever, timeout=0.5), {}, {},
     "routilux_mp.errors.ModifyTimeoutError", r"ran past its time budget of 0\.5s; nothing was written", False),
    ("increment-past-jsons-int-limit", _increment_past_jsons_int_limit, {}, {}, NOT_JSON,
     r"state\['n'\] of routine 'huge' would become an int of about 4301 digits", False),
    ("non-ascii-keys-past-max-state-bytes", _increment_wide_keys, {"max_state_bytes": 4000}, {},
     "routilux_mp.errors.StateTooLargeError", r"state of routine 'wide' would be \d+ bytes .*max_state_bytes=4000",
     False),
    ("deeply-nested-state", lambda ws: ws.update_routine_state("deep", _nested(100_000)), {}, {}, NOT_JSON,
     r"nested 100000 levels deep", False),
    ("fake-frame-header", _fake_frame_header, {}, {}, CRASH,
     (r"sent bytes that are not a frame \(a frame header announces 2147483647 bytes.*its protocol with the "
     r"supervisor is broken"), True),
]


def _faulty(routine, slot_data, message, ws):
    item = slot_data["in"][0]
    if item.get("fault"):
        fault = FAULT_FUNCS[item["fault"]]
        if fault == "emit-lock":
            routine.emit("out", lock=threading.Lock())
        elif fault == "emit-needs-two-args":
            routine.emit("out", error=NeedsTwoArgs("a", "b"))
        elif fault == "emit-only-in-worker":
            routine.emit("out", value=OnlyInWorker())
            return  # the activation succeeds here; the supervisor cannot read its output
        else:
            fault(ws)
    with ws.lock("shared") as state:
        state["ok"] = state.get("ok", 0) + 1
    routine.emit("out", pid=os.getpid())


FAULT_FUNCS = {row[0]: row[1] for row in FAULTS}


@pytest.mark.parametrize(("fault", "inject", "options", "routine_options", "error_type", "message", "replaced"),
                         FAULTS, ids=[row[0] for row in FAULTS])
def test_a_fault_fails_only_its_own_job(make_runtime, backend, fault, inject, options, routine_options, error_type,
                                        message, replaced) -> None:
    single_flow("faults", _faulty, concurrency=None, **routine_options)
    runtime = make_runtime(processes=2, **backend, **options)
    ws = runtime.exec("faults")
    before = [runtime.post("faults", "r", "in", {})[1] for _ in range(2)]
    assert all(job.wait(WAIT) for job in before)
    pool_ready(runtime)  # (a Ray lane shows its pid once its nanny started it)
    pids_before = {p["pid"] for p in runtime.stats()["processes"]}

    started = time.monotonic()
    _, bad = runtime.post("faults", "r", "in", {"fault": fault})
    after = [runtime.post("faults", "r", "in", {})[1] for _ in range(4)]
    assert bad.wait(WAIT), f"the faulty job did not end within {WAIT}s"
    assert all(job.wait(WAIT) for job in after)

    assert bad.status == "failed"
    assert bad.error["type"] == error_type, bad.error
    assert re.search(message, bad.error["message"]), bad.error["message"]
    assert bad.error["routine"] == "r" and bad.error["worker_id"] == "faults-1"
    others = before + after
    assert [job.status for job in others] == ["completed"] * 6, [(j.status, j.error) for j in others]
    if "timeout" in routine_options:
        assert time.monotonic() - started < routine_options["timeout"] + 30

    if replaced:
        pool_refilled(runtime, restarts=1)
        pool_ready(runtime)  # (a Ray lane has a process, and a pid to show, once its nanny started it)
    processes = runtime.stats()["processes"]
    assert len(processes) == 2 and all(p["alive"] for p in processes), "the pool is back to full size"
    restarted = sum(p["restarts"] for p in processes)
    if replaced:
        assert restarted == 1 and {p["pid"] for p in processes} != pids_before
    else:
        assert restarted == 0 and {p["pid"] for p in processes} == pids_before, "the process kept serving"
    assert ws.get_routine_state("shared")["ok"] == 6, "the lock works (and was released by a dead holder)"
    if fault == "grandchild-and-timeout":
        grandchild = ws.get_routine_state("grandchild")["pid"]
        _, alive = psutil.wait_procs([psutil.Process(grandchild)] if psutil.pid_exists(grandchild) else [],
                                     timeout=10)
        assert not alive, "the worker's process group went with it"


def test_memory_soft_limit_recycles_between_activations(make_runtime, backend) -> None:
    def keep_memory(routine, slot_data, message, ws):
        routine._hoard = getattr(routine, "_hoard", []) + [b"x" * (40 * MiB)]
        routine.emit("out", pid=os.getpid())

    single_flow("leaky", keep_memory)
    runtime = make_runtime(processes=1, max_worker_rss=100 * MiB, kill_worker_rss=2048 * MiB, **backend)
    jobs = [runtime.post("leaky", "r", "in", {})[1] for _ in range(6)]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert [j.status for j in jobs] == ["completed"] * 6
    pids = [j.outputs[0]["data"]["pid"] for j in jobs]
    assert len(set(pids)) >= 2, "the worker was recycled when it grew past the soft limit"
    pool_refilled(runtime, restarts=1)


def test_max_activations_per_process_recycles(make_runtime, backend) -> None:
    single_flow("recycle", lambda r, d, m, ws: r.emit("out", pid=os.getpid()))
    runtime = make_runtime(processes=1, max_activations_per_process=2, **backend)
    jobs = [runtime.post("recycle", "r", "in", {})[1] for _ in range(6)]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    pids = [j.outputs[0]["data"]["pid"] for j in jobs]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]
    assert all(j.status == "completed" for j in jobs)


def test_a_poison_job_is_failed_after_max_crash_retries(make_runtime, backend) -> None:
    single_flow("poison", lambda r, d, m, ws: os._exit(1),
                handler=ErrorHandler("retry", max_retries=10, retry_delay=0.01))
    runtime = make_runtime(processes=2, max_crash_retries=3, **backend)
    _, job = runtime.post("poison", "r", "in", {})
    assert job.wait(WAIT)
    assert job.status == "failed" and job.error["type"] == CRASH
    assert "crashed a worker 3 times: given up as a poison activation" in job.error["message"]
    assert job.attempts == 3
    pool_refilled(runtime, restarts=3)
    assert sum(p["restarts"] for p in runtime.stats()["processes"]) == 3


def _touch_state_forever(routine, slot_data, message, ws):
    ws.increment("progress", "started")
    while True:
        ws.get_routine_state("progress")


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_losing_the_state_server_fails_jobs_in_flight_promptly(make_runtime, how) -> None:
    single_flow("lost", _touch_state_forever)
    runtime = make_runtime(processes=2, state_timeout=5.0)
    ws = runtime.exec("lost")
    _, job = runtime.post("lost", "r", "in", {})
    wait_until(lambda: (ws.get_routine_state("progress") or {}).get("started") == 1, "the activation to start",
               job=job)
    server = runtime._testing.state_pid
    started = time.monotonic()
    os.kill(server, signal.SIGKILL if how == "sigkill" else signal.SIGSTOP)
    assert job.wait(WAIT)
    assert time.monotonic() - started < 20, "lost promptly, not after a hang"
    assert job.status == "failed" and job.error["type"] == "routilux_mp.errors.StateServerLostError"
    with pytest.raises(StateServerLostError, match="shared worker state is lost"):
        runtime.post("lost", "r", "in", {})
    with pytest.raises(StateServerLostError):
        ws.get_routine_state("progress")
    runtime.shutdown()


#: Seconds past state_timeout within which a call must notice a lost server (a loaded machine is slow).
NOTICE_MARGIN = 20.0


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_a_lost_state_server_breaks_the_runtime_and_is_never_reported_as_empty(make_runtime, how) -> None:
    single_flow("lost", lambda *a: None)
    state_timeout = 3.0
    runtime = make_runtime(processes=1, state_timeout=state_timeout, lock_timeout=WAIT)
    ws = runtime.exec("lost")
    ws.update_routine_state("r", {"kept": 1})
    holding, release = threading.Event(), threading.Event()
    outcomes: dict = {}

    def hold() -> None:
        try:
            with ws.lock("held"):
                holding.set()
                release.wait(WAIT)
        except StateServerLostError as exc:
            outcomes["holder"] = exc

    def write() -> None:
        try:
            ws.increment("held", "n")  # waits in the server for the lock `hold` has
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcomes["writer"] = exc

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(WAIT)
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    os.kill(runtime._testing.state_pid, signal.SIGKILL if how == "sigkill" else signal.SIGSTOP)
    writer.join(state_timeout + NOTICE_MARGIN)
    release.set()
    holder.join(WAIT)
    assert not writer.is_alive(), "a write waiting for a lock must notice a hung server within state_timeout"
    assert isinstance(outcomes["writer"], StateServerLostError), outcomes

    # The loss breaks the runtime visibly, although no job was in flight.
    for call in (lambda: runtime.post("lost", "r", "in", {}), lambda: runtime.exec("lost"),
                 lambda: ws.get_routine_state("r")):
        with pytest.raises(StateServerLostError):
            call()
    assert ws.status == "failed"
    runtime.shutdown()
    # Lost state is never reported as empty, not even after shutdown.
    with pytest.raises(StateServerLostError, match="shared worker state"):
        ws.get_routine_state("r")
    with pytest.raises(StateServerLostError):
        ws.routine_states  # noqa: B018 - the property raises
    assert ws.status == "failed"


def test_workers_that_keep_failing_at_start_up_break_the_runtime_clearly(make_runtime, tmp_path, monkeypatch) -> None:
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(
        """
        import os, sys
        if len(sys.argv) > 1 and sys.argv[1].startswith("routilux-mp worker"):
            sys.stderr.write("simulated start-up failure\\n")
            os._exit(3)
        """
    ))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    single_flow("never", lambda *a: None)
    runtime = make_runtime(processes=2)
    _, job = runtime.post("never", "r", "in", {})
    assert job.wait(WAIT)
    assert job.status == "failed" and job.error["type"] == "routilux_mp.errors.RuntimeBrokenError"
    assert "failed to start 5 times in a row" in job.error["message"]
    assert "simulated start-up failure" in job.error["message"]
    with pytest.raises(RuntimeBrokenError):
        runtime.post("never", "r", "in", {})


SUPERVISOR_SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    from routilux_mp import Routine, Flow, Runtime, FlowRegistry

    GRANDCHILDREN = {grandchildren}

    class Busy(Routine):
        def __init__(self):
            super().__init__()
            self.add_slot("in")
            def logic(slot_data, message, worker_state):
                if GRANDCHILDREN:  # one in the worker's process group, one in a session of its own
                    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
                    pids = [subprocess.Popen(sleep).pid, subprocess.Popen(sleep, start_new_session=True).pid]
                    worker_state.merge_routine_state("grandchildren", {str(os.getpid()): pids})
                worker_state.increment("busy", "started")
                while True:
                    pass
            self.set_logic(logic)
            self.set_max_concurrency(None)

    flow = Flow("busy")
    flow.add_routine(Busy(), "busy")
    FlowRegistry.get_instance().register_by_name("busy", flow)

    def main(runtime):
        ws = runtime.exec("busy")
        for _ in range(4):
            runtime.post("busy", "busy", "in", {})
        deadline = time.monotonic() + 60
        while (ws.get_routine_state("busy") or {}).get("started") != 2:
            if time.monotonic() > deadline:
                sys.exit("the busy activations never started")
        grandchildren = [pid for pids in (ws.get_routine_state("grandchildren") or {}).values() for pid in pids]
        pids = [p["pid"] for p in runtime.stats()["processes"]] + [runtime._testing.state_pid] + grandchildren
        print(json.dumps({"pids": pids, "socket_dir": runtime._testing.socket_dir}), flush=True)
        {then}

    {run}
    """
)
#: How the script runs ``main``: in a ``with`` block, or in the seed page's style (no ``with``).
WITH_BLOCK = "with Runtime(processes=2) as runtime:\n    main(runtime)"
NO_WITH = "main(Runtime(processes=2))"


def _start_supervisor(tmp_path, env, then: str, *, run: str = WITH_BLOCK,
                      grandchildren: bool = False) -> tuple[subprocess.Popen, dict]:
    import json

    script = tmp_path / "supervisor.py"
    script.write_text(SUPERVISOR_SCRIPT.replace("{then}", then).replace("{run}", run)
                      .replace("{grandchildren}", str(grandchildren)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path, start_new_session=True)
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return proc, json.loads(line)


def _still_running(pids: list[int], timeout: float) -> list[int]:
    """The pids still running (zombies count as gone) after waiting up to ``timeout``."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    running = []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return running


def test_sigkill_of_the_supervisor_leaves_no_process_of_ours_nor_its_socket_directory(tmp_path, python_env) -> None:
    proc, info = _start_supervisor(tmp_path, python_env, "runtime.wait_until_all_jobs_finished()",
                                   grandchildren=True)
    assert len(info["pids"]) == 2 + 1 + 4, "2 workers, the state server, 2 grandchildren each"
    assert os.path.isdir(info["socket_dir"])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(WAIT)
    proc.stdout.close()
    proc.stderr.close()
    try:
        alive = _still_running(info["pids"], timeout=5)
        assert alive == [], f"survived the supervisor's SIGKILL by 5s (grandchildren included): {alive}"
        assert not os.path.exists(info["socket_dir"]), "the socket directory was removed"
    finally:
        for pid in _still_running(info["pids"], timeout=0):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("run", [WITH_BLOCK, NO_WITH], ids=["with-block", "no-with-block"])
def test_ctrl_c_in_a_script_cancels_queued_work_and_stops_everything_promptly(tmp_path, python_env, run) -> None:
    proc, info = _start_supervisor(tmp_path, python_env, "runtime.wait_until_all_jobs_finished()", run=run)
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the foreground group
    _, err = proc.communicate(timeout=WAIT)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert err.count("Traceback") == 1 and err.rstrip().endswith("KeyboardInterrupt"), err
    # The 2 running activations never end: waiting for the 2 queued ones would take shutdown's 30 s timeout.
    assert elapsed < 20, f"the script took {elapsed:.1f}s to exit after Ctrl-C"
    assert _still_running(info["pids"], timeout=10) == []
    assert not os.path.exists(info["socket_dir"])


def test_soak_script_loses_and_duplicates_nothing_while_workers_are_killed(python_env) -> None:
    import json

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "soak.py")
    proc = subprocess.run([sys.executable, script, "--jobs", "600", "--kills", "6", "--json"], check=False, capture_output=True,
                          text=True, timeout=WAIT * 2, env=python_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["lost"] == 0 and report["duplicated"] == 0
    assert report["statuses"] == {"completed": 600} and report["kills"] == 6
