"""Durable WorkerState (``Runtime(state_path=...)``) with real processes: crashes lose and repeat nothing.

The state server is SIGKILLed or frozen in the middle of a storm of writes, a
lock is held across a crash, the supervisor itself is SIGKILLed, and a later
runtime resumes a worker by id. Every wait has a deadline; crashes are
triggered by progress read from the state or a child's output, never by time.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading

import psutil
import pytest
from helpers import WAIT, by_value, freeze, single_flow, wait_until

from routilux_mp import Runtime
from routilux_mp.errors import FlowError, LockLostError, StateFileError, StateServerLostError

by_value(__name__)

#: Seconds a killed runtime's processes get to exit.
GONE = 15.0


def _storm(routine, slot_data, message, ws):
    for _ in range(slot_data["in"][0]["n"]):
        ws.increment("shared", "count")
    routine.emit("out", pid=os.getpid())


def _count(ws) -> int:
    return (ws.get_routine_state("shared") or {}).get("count", 0)


def _restarted(runtime, pid: int) -> bool:
    assert not runtime._testing.broken, "the runtime broke instead of restarting its state server (see its log)"
    return runtime._testing.state_pid not in (None, pid) and runtime._testing.state_watched


def _kill_server(runtime, sig: int = signal.SIGKILL) -> int:
    pid = runtime._testing.state_pid
    os.kill(pid, sig)
    return pid


#: id, how many times the state server is SIGKILLed during 4 processes x 1,000 increments
STORMS = [("one-sigkill", 1), ("two-sigkills", 2)]


@pytest.mark.parametrize("kills", [row[1] for row in STORMS], ids=[row[0] for row in STORMS])
def test_an_increment_storm_ends_exactly_right_across_sigkills_of_the_state_server(make_runtime, tmp_path,
                                                                                  kills) -> None:
    single_flow("storm", _storm, concurrency=None)
    runtime = make_runtime(processes=4, state_path=tmp_path / "run.db")
    ws = runtime.exec("storm")
    jobs = [runtime.post("storm", "r", "in", {"n": 1000})[1] for _ in range(4)]
    for k in range(1, kills + 1):
        wait_until(lambda k=k: _count(ws) >= 4000 * k // (kills + 2), f"the storm to pass {k}/{kills + 2}")
        pid = _kill_server(runtime)
        wait_until(lambda pid=pid: _restarted(runtime, pid), "the supervisor to restart the state server")
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert [job.status for job in jobs] == ["completed"] * 4, [job.error for job in jobs]
    assert _count(ws) == 4000, "a write committed before a crash was never applied twice, none was lost"
    _, job = runtime.post("storm", "r", "in", {"n": 10})  # and the runtime keeps working
    assert job.wait(WAIT) and job.status == "completed"
    assert _count(ws) == 4010


def test_a_hung_state_server_is_killed_and_restarted_keeping_every_acknowledged_write(make_runtime, tmp_path) -> None:
    single_flow("hang", _storm)
    runtime = make_runtime(processes=1, state_path=tmp_path / "run.db", state_timeout=2.0)
    ws = runtime.exec("hang")
    for _ in range(50):
        ws.increment("shared", "count")
    pid = runtime._testing.state_pid
    # Stopped for sure before the next call: a server still finishing its stop could answer it, and then
    # no call would ever find it hung (nobody else calls an idle runtime's server), so none restarts it.
    freeze(pid)
    try:
        ws.increment("shared", "count")  # never acknowledged by the hung server: it may or may not be applied
    except StateServerLostError as exc:
        assert re.search("gave no sign of life for 2s .* restarted from its state file", str(exc)), exc
    # (Or it succeeded: a call of the supervisor's own threads, begun a moment earlier, found the server hung
    # first, so it was killed and restarted while this call waited, and this call was sent again to the new one.)
    wait_until(lambda: _restarted(runtime, pid), "the hung server to be replaced")
    assert _count(ws) in (50, 51)
    _, job = runtime.post("hang", "r", "in", {"n": 5})
    assert job.wait(WAIT) and job.status == "completed"
    assert _count(ws) in (55, 56)


def test_a_lock_held_at_a_crash_is_released_and_its_holder_told_that_nothing_was_written(make_runtime,
                                                                                        tmp_path) -> None:
    single_flow("locks", _storm)
    runtime = make_runtime(processes=1, state_path=tmp_path / "run.db", lock_timeout=WAIT)
    ws = runtime.exec("locks")
    ws.update_routine_state("shared", {"count": 1})
    holding, release, outcome = threading.Event(), threading.Event(), {}

    def hold() -> None:
        try:
            with ws.lock("shared") as state:
                state["count"] = 99
                holding.set()
                release.wait(WAIT)
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcome["holder"] = exc

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(WAIT)
    pid = _kill_server(runtime)
    wait_until(lambda: _restarted(runtime, pid), "the state server to restart")
    assert ws.increment("shared", "count") == 2, "the dead server's lock holds nobody up"
    release.set()
    holder.join(WAIT)
    assert isinstance(outcome.get("holder"), LockLostError), outcome
    assert ws.get_routine_state("shared") == {"count": 2}


SUPERVISOR_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from routilux_mp import Flow, FlowRegistry, Routine, Runtime

    class Noop(Routine):
        def __init__(self):
            super().__init__()
            self.add_slot("in")
            self.set_logic(lambda slot_data, message, worker_state: None)

    flow = Flow("kept")
    flow.add_routine(Noop(), "r")
    FlowRegistry.get_instance().register_by_name("kept", flow)
    with Runtime(processes=1, state_path=sys.argv[1]) as runtime:
        ws = runtime.exec("kept", worker_id="w1")
        ws.get_routine_state("count")  # the state server runs from here on
        print(json.dumps({"server": runtime._testing.state_pid}), flush=True)
        i = 0
        while True:
            i += 1
            n = ws.increment("count", "n")
            ws.update_routine_state("last", {"i": i})
            ws.merge_routine_state("merged", {"i": i})
            ws.modify_routine_state("modified", lambda state, i=i: {"i": i})
            with ws.lock("locked") as state:
                state["i"] = i
            print(json.dumps({"i": i, "n": n}), flush=True)  # every write of round i was acknowledged
    """
)


def test_every_acknowledged_write_survives_the_sigkill_of_the_supervisor(tmp_path, python_env) -> None:
    import json

    path = str(tmp_path / "run.db")
    script = tmp_path / "supervisor.py"
    script.write_text(SUPERVISOR_SCRIPT)
    child = subprocess.Popen([sys.executable, str(script), path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=python_env, start_new_session=True)
    try:
        server = json.loads(child.stdout.readline() or "null")
        assert server is not None, child.stderr.read()
        last = None
        for line in child.stdout:
            last = json.loads(line)
            if last["i"] >= 40:
                break
        assert last is not None and last["i"] >= 40, child.stderr.read()
        child.kill()  # SIGKILL; its state server and worker follow it
        child.wait(WAIT)
        # It went on while we read: the rounds it acknowledged before the kill are in the pipe still.
        for line in child.stdout:
            if line.endswith("\n"):
                last = json.loads(line)
    finally:
        child.kill()
        child.wait(WAIT)
    wait_until(lambda: _gone(server["server"]), "the state server of the SIGKILLed supervisor to exit", timeout=GONE)
    single_flow("kept", _storm)
    with Runtime(processes=1, state_path=path) as runtime:
        assert runtime.list_workers(stored=True) == ["w1"]
        ws = runtime.exec("kept", worker_id="w1")
        states = ws.routine_states
    i = last["i"]
    assert last["n"] <= states["count"]["n"] <= last["n"] + 1
    for rid in ("last", "merged", "modified", "locked"):
        assert i <= states[rid]["i"] <= i + 1, (rid, states[rid], i)


def _gone(pid: int) -> bool:
    """The process exited (a zombie nobody reaped counts as gone)."""
    assert isinstance(pid, int) and pid != os.getpid(), pid
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_state_file_held_by_a_live_runtime_is_refused_before_anything_starts(make_runtime, tmp_path) -> None:
    path = tmp_path / "run.db"
    make_runtime(processes=1, state_path=path)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(StateFileError, match=rf"is in use by another live runtime \(process {os.getpid()}"):
        Runtime(processes=1, state_path=path)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children, "the refused runtime started none"


def test_a_later_runtime_resumes_a_worker_by_id_and_lists_what_the_file_holds(make_runtime, tmp_path) -> None:
    single_flow("kept", _storm)
    single_flow("other", _storm)
    path = tmp_path / "run.db"
    with Runtime(processes=1, state_path=path) as runtime:
        ws = runtime.exec("kept", worker_id="w1")
        _, job = runtime.post("kept", "r", "in", {"n": 3}, worker_id="w1")
        assert job.wait(WAIT) and job.status == "completed"
        ws.merge_routine_state("notes", {"by": "the first runtime"})
        assert runtime.exec("kept").worker_id == "kept-1"
    runtime = make_runtime(processes=1, state_path=path)
    assert (runtime.list_workers(), runtime.list_workers(stored=True)) == ([], ["w1", "kept-1"])
    ws = runtime.exec("kept", worker_id="w1")
    assert ws.routine_states == {"shared": {"count": 3}, "notes": {"by": "the first runtime"}}
    assert ws.jobs_processed == 1, "its job counters go on too"
    _, job = runtime.post("kept", "r", "in", {"n": 2}, worker_id="w1")
    assert job.wait(WAIT) and _count(ws) == 5 and ws.jobs_processed == 2
    assert runtime.exec("kept").worker_id == "kept-2", "made-up ids skip the ones the file holds"
    with pytest.raises(FlowError, match=r"worker 'kept-1' in the state file .* ran flow 'kept', not 'other'"):
        runtime.exec("other", worker_id="kept-1")
    assert runtime.list_workers(stored=True) == ["w1", "kept-1", "kept-2"]


#: id, Runtime keyword arguments that are refused, the error, its message
BAD_OPTIONS = [
    ("unknown-sync", {"state_sync": "sometimes"}, ValueError, r"state_sync must be one of 'normal', 'full'"),
    ("a-directory", {"state_path": "."}, StateFileError, r"is a directory; give a file name"),
]


@pytest.mark.parametrize(("options", "error", "message"), [row[1:] for row in BAD_OPTIONS],
                         ids=[row[0] for row in BAD_OPTIONS])
def test_bad_state_options_are_refused_by_the_constructor(options, error, message) -> None:
    with pytest.raises(error, match=message):
        Runtime(processes=1, **options)


def test_a_state_server_that_cannot_start_again_breaks_the_runtime_with_its_reason(make_runtime, tmp_path,
                                                                                  monkeypatch) -> None:
    from routilux_mp._state import launcher

    monkeypatch.setattr(launcher, "MAX_RESTARTS", 2)
    single_flow("doomed", _storm)
    path = tmp_path / "run.db"
    runtime = make_runtime(processes=1, state_path=path)
    ws = runtime.exec("doomed")
    ws.increment("shared", "count")
    pid = _kill_server(runtime)
    wait_until(lambda: _restarted(runtime, pid), "the first restart")
    with open(path, "r+b") as f:  # the file is destroyed: the next server cannot open it
        f.write(b"\0" * 100)
    _kill_server(runtime)  # restarted once more, the server finds the file destroyed and exits
    wait_until(lambda: runtime._testing.broken, "the runtime to break")
    with pytest.raises(StateServerLostError, match=r"exited with code 3: .* is not a routilux-mp state file .*; it "
                                                   r"died 3 times within 60 s, so it was not restarted"):
        runtime.post("doomed", "r", "in", {"n": 1})
    with pytest.raises(StateServerLostError):
        ws.get_routine_state("shared")


#: Installed as ``sitecustomize`` for the state server only: the first server dies right after it committed the
#: ``CRASH_AT``-th call of one method, before it could reply (the window a replayed request id covers).
CRASH_AFTER_COMMIT = textwrap.dedent(
    """
    import os, sys
    if len(sys.argv) > 1 and sys.argv[1] == "routilux-mp state-server":
        import routilux_mp._state.server as server

        answer = server.StoreServer.answer
        seen = []

        def crash_after_commit(self, request, keepalive=None):
            reply = answer(self, request, keepalive)  # applied and committed
            if {method!r}.encode() in request and not os.path.exists({marker!r}):
                seen.append(1)
                if len(seen) == {at}:
                    open({marker!r}, "w").close()
                    os._exit(9)  # the reply is never sent
            return reply

        server.StoreServer.answer = crash_after_commit
    """
)
CRASH_AT = 5


def _locked_count(ws) -> int:
    with ws.lock("locked") as state:
        state["n"] = state.get("n", 0) + 1
    return ws.get_routine_state("locked")["n"]


#: id, the method whose committed call loses its reply, a call that counts (1, 2, ...) through it
UNACKNOWLEDGED = [
    ("increment", "increment", lambda ws: ws.increment("c", "n")),
    ("modify", "modify", lambda ws: ws.modify_routine_state("m", lambda s: {"n": s.get("n", 0) + 1})["n"]),
    ("lock-block", "release", _locked_count),
]


@pytest.mark.parametrize(("method", "count"), [row[1:] for row in UNACKNOWLEDGED], ids=[row[0] for row in UNACKNOWLEDGED])
def test_a_write_committed_but_not_acknowledged_before_a_crash_is_answered_not_applied_again(
        make_runtime, tmp_path, monkeypatch, method, count) -> None:
    marker = tmp_path / "crashed"
    (tmp_path / "sitecustomize.py").write_text(
        CRASH_AFTER_COMMIT.format(method=method, marker=str(marker), at=CRASH_AT))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    single_flow("once", _storm)
    runtime = make_runtime(processes=1, state_path=tmp_path / "run.db")
    ws = runtime.exec("once")
    assert [count(ws) for _ in range(2 * CRASH_AT)] == list(range(1, 2 * CRASH_AT + 1))
    assert marker.exists(), "the state server died after its commit, and the call was sent again"
