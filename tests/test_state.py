"""WorkerState through a real state server, from the supervisor and from worker processes."""

from __future__ import annotations

import os
import stat

import pytest
from helpers import WAIT, by_value, single_flow, wait_until

from routilux_mp.errors import (
    LockTimeoutError,
    RuntimeClosedError,
    StateNotSerializableError,
    StateTooLargeError,
)

by_value(__name__)



def _bump_increment(routine, slot_data, message, ws):
    for _ in range(slot_data["in"][0]["n"]):
        ws.increment("shared", "count")
    routine.emit("out", pid=os.getpid())


def _bump_lock(routine, slot_data, message, ws):
    for _ in range(slot_data["in"][0]["n"]):
        with ws.lock("shared") as state:
            state["count"] = state.get("count", 0) + 1
    routine.emit("out", pid=os.getpid())


def _bump_modify(routine, slot_data, message, ws):
    for _ in range(slot_data["in"][0]["n"]):
        ws.modify_routine_state("shared", lambda s: {"count": s.get("count", 0) + 1})
    routine.emit("out", pid=os.getpid())


@pytest.mark.parametrize("bump", [_bump_increment, _bump_lock, _bump_modify], ids=["increment", "lock", "modify"])
def test_four_processes_times_1000_atomic_updates_lose_nothing(make_runtime, bump) -> None:
    single_flow("bump", bump, concurrency=None)
    runtime = make_runtime(processes=4)
    ws = runtime.exec("bump")
    jobs = [runtime.post("bump", "r", "in", {"n": 1000})[1] for _ in range(4)]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert [j.status for j in jobs] == ["completed"] * 4
    pids = {j.outputs[0]["data"]["pid"] for j in jobs}
    assert os.getpid() not in pids and len(pids) == 4, "the four activations should run on four processes"
    assert ws.get_routine_state("shared") == {"count": 4000}


BAD_VALUES = [
    ({"tags": {"a", "b"}}, r"state\['tags'\]: set is not JSON-serializable"),
    ({"ratio": float("nan")}, r"state\['ratio'\]: float nan"),
    ({"by_id": {7: "x"}}, r"state\['by_id'\]: key 7 \(int\) is not a str"),
    ({"raw": b"\x00"}, r"state\['raw'\]: bytes"),
    ({"pool": {"get_connection": lambda: {"id": 1}}}, r"state\['pool'\]\['get_connection'\]: function"),
]


@pytest.mark.parametrize(("value", "message"), BAD_VALUES, ids=["set", "nan", "int-key", "bytes", "function"])
def test_non_json_state_is_refused_in_a_worker_with_path_and_state_intact(make_runtime, value, message) -> None:
    def write(routine, slot_data, message_, ws):
        ws.update_routine_state("r", value)

    single_flow("bad", write)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("bad")
    ws.update_routine_state("r", {"good": 1})
    _, job = runtime.post("bad", "r", "in", {})
    assert job.wait(WAIT)
    assert job.status == "failed"
    assert job.error["type"] == "routilux_mp.errors.StateNotSerializableError"
    import re

    assert re.search(message, job.error["message"]), job.error["message"]
    assert "Traceback" in job.error["traceback"]
    assert ws.get_routine_state("r") == {"good": 1}
    for call in (lambda: ws.update_routine_state("r", value), lambda: ws.merge_routine_state("r", value)):
        with pytest.raises(StateNotSerializableError, match=message):
            call()
    with pytest.raises(StateNotSerializableError):
        ws.modify_routine_state("r", lambda s: dict(s, **value))
    assert ws.get_routine_state("r") == {"good": 1}


def test_state_api_semantics_from_the_supervisor(make_runtime) -> None:
    single_flow("api", lambda *a: None)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("api", worker_id="w1")
    assert (ws.worker_id, ws.flow_id, ws.status) == ("w1", "api", "running")
    assert ws.get_routine_state("x") is None
    ws.update_routine_state("x", {"items": [1, 2], "nested": {"a": 1}})
    copy = ws.get_routine_state("x")
    copy["items"].append(3)
    assert ws.get_routine_state("x")["items"] == [1, 2], "reads are copies"
    assert ws.merge_routine_state("x", {"b": True}) == {"items": [1, 2], "nested": {"a": 1}, "b": True}
    assert ws.increment("counts", "hits") == 1
    assert ws.increment("counts", "hits", 2.5) == 3.5
    assert ws.increment_many("counts", {"hits": 1, "misses": 4}) == {"hits": 4.5, "misses": 4}
    with pytest.raises(TypeError, match="finite numbers"):
        ws.increment("counts", "hits", float("inf"))
    with pytest.raises(TypeError, match="not a number"):
        ws.increment("x", "items")
    assert ws.modify_routine_state("x", lambda s: s.update(c=3)) ["c"] == 3
    with pytest.raises(ZeroDivisionError):
        ws.modify_routine_state("x", lambda s: 1 / 0)
    with ws.lock("x") as state:
        state["locked"] = True
        assert ws.increment("x", "n") == 1, "the holder's own calls go through"
    assert ws.get_routine_state("x")["locked"] is True
    with pytest.raises(RuntimeError), ws.lock("x") as state:
        state["discarded"] = True
        raise RuntimeError("boom")
    assert "discarded" not in ws.get_routine_state("x")
    assert set(ws.routine_states) == {"x", "counts"}


def test_state_size_bound(make_runtime) -> None:
    single_flow("big", lambda *a: None)
    runtime = make_runtime(processes=1, max_state_bytes=1000)
    ws = runtime.exec("big")
    ws.update_routine_state("r", {"blob": "x" * 900})
    with pytest.raises(StateTooLargeError, match="over max_state_bytes=1000"):
        ws.update_routine_state("r", {"blob": "x" * 1000})
    with pytest.raises(StateTooLargeError):
        ws.merge_routine_state("r", {"more": "y" * 200})
    assert ws.get_routine_state("r") == {"blob": "x" * 900}


SPIN_DEADLINE = 60.0


def _spin_until(ws, key, count):
    import time

    deadline = time.monotonic() + SPIN_DEADLINE
    while (ws.get_routine_state("gate") or {}).get(key) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {key!r} never reached {count}")


def _read_then_write_late(routine, slot_data, message, ws):
    """Activation 'first' reads, lets 'second' read and write, then writes: a lost update."""
    item = slot_data["in"][0]
    state = ws.get_routine_state("r") or {}
    if item["first"]:
        ws.increment("gate", "read")
        _spin_until(ws, "written", item["round"])
    else:
        _spin_until(ws, "read", item["round"])
    ws.update_routine_state("r", {"count": state.get("count", 0) + 1})
    if not item["first"]:
        ws.increment("gate", "written")


def _race(runtime, rounds=1):
    jobs = []
    for round_ in range(1, rounds + 1):
        _, first = runtime.post("race", "r", "in", {"first": True, "round": round_})
        _, second = runtime.post("race", "r", "in", {"first": False, "round": round_})
        assert first.wait(WAIT) and second.wait(WAIT)
        jobs += [first, second]
    return jobs


def test_lost_update_is_warned_once_and_counted_in_stats(make_runtime, capfd) -> None:
    single_flow("race", _read_then_write_late, concurrency=None)
    runtime = make_runtime(processes=2)
    ws = runtime.exec("race")
    jobs = _race(runtime, rounds=2)
    assert [j.status for j in jobs] == ["completed"] * 4
    assert ws.get_routine_state("r") == {"count": 2}, "each round lost one of its two updates"
    assert runtime.stats()["routines"]["r"]["lost_updates"] == 2
    runtime.shutdown()
    err = capfd.readouterr().err
    assert err.count("lost update on routine state 'r'") == 1, err


def test_strict_state_raises_stale_state_and_writes_nothing(make_runtime) -> None:
    single_flow("race", _read_then_write_late, concurrency=None)
    runtime = make_runtime(processes=2, strict_state=True)
    ws = runtime.exec("race")
    first, second = _race(runtime)
    assert second.status == "completed"
    assert first.status == "failed" and first.error["type"] == "routilux_mp.errors.StaleStateError"
    assert "between this activation's read and its write" in first.error["message"]
    assert ws.get_routine_state("r") == {"count": 1}
    assert runtime.stats()["routines"]["r"]["lost_updates"] == 0


def test_lock_timeout_is_clear(make_runtime) -> None:
    def hold(routine, slot_data, message, ws):
        with ws.lock("x"):
            ws.increment("flag", "in")
            with ws.lock("release"):
                pass

    single_flow("hold", hold)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("hold")
    with ws.lock("release"):
        _, job = runtime.post("hold", "r", "in", {})
        wait_until(lambda: (ws.get_routine_state("flag") or {}).get("in") == 1, "the lock holder to start", job=job)
        with pytest.raises(LockTimeoutError, match="stayed locked by process"), ws.lock("x", timeout=0.3):
            pass
    assert job.wait(WAIT) and job.status == "completed"


def test_state_survives_shutdown_as_a_read_only_snapshot(make_runtime) -> None:
    single_flow("snap", lambda r, d, m, ws: ws.increment("r", "n"))
    runtime = make_runtime(processes=1)
    ws = runtime.exec("snap")
    for _ in range(3):
        runtime.post("snap", "r", "in", {})
    runtime.shutdown()
    assert ws.get_routine_state("r") == {"n": 3}
    assert ws.routine_states == {"r": {"n": 3}}
    assert ws.status == "stopped" and ws.jobs_processed == 3 and ws.jobs_failed == 0
    with pytest.raises(RuntimeClosedError):
        ws.update_routine_state("r", {})


def test_resource_is_made_once_per_process(make_runtime, tmp_path) -> None:
    marker = str(tmp_path)

    class Pool:
        def __init__(self):
            with open(os.path.join(marker, f"made-{os.getpid()}"), "a") as f:
                f.write("x")

        def close(self):
            with open(os.path.join(marker, f"closed-{os.getpid()}"), "w") as f:
                f.write("closed")

    def use(routine, slot_data, message, ws):
        pool = ws.resource("pool", Pool)
        routine.emit("out", pid=os.getpid(), same=pool is ws.resource("pool", Pool))

    single_flow("res", use, concurrency=None)
    runtime = make_runtime(processes=2)
    jobs = [runtime.post("res", "r", "in", {})[1] for _ in range(10)]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert all(j.outputs[0]["data"]["same"] for j in jobs)
    runtime.shutdown()
    made = sorted(n for n in os.listdir(marker) if n.startswith("made-"))
    for name in made:
        with open(os.path.join(marker, name)) as f:
            assert f.read() == "x", "one factory call per process"
    closed = sorted(n for n in os.listdir(marker) if n.startswith("closed-"))
    assert [n.split("-")[1] for n in closed] == [n.split("-")[1] for n in made]


def test_state_server_socket_is_private_and_rejects_a_wrong_key(make_runtime) -> None:
    from multiprocess import AuthenticationError

    from routilux_mp._state_server import SERIALIZER, StoreManager

    single_flow("sec", lambda *a: None)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("sec")
    ws.update_routine_state("r", {"v": 1})
    address = runtime._sup.state_address
    assert stat.S_IMODE(os.stat(os.path.dirname(address)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(address).st_mode) & 0o077 == 0
    intruder = StoreManager(address=address, authkey=os.urandom(32), serializer=SERIALIZER)
    with pytest.raises(AuthenticationError):
        intruder.connect()
    assert ws.get_routine_state("r") == {"v": 1}


def test_runtime_never_writes_user_routine_state(make_runtime) -> None:
    single_flow("quiet", lambda r, d, m, ws: None)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("quiet")
    ws.update_routine_state("r", {"mine": True})
    for _ in range(5):
        runtime.post("quiet", "r", "in", {})
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert ws.routine_states == {"r": {"mine": True}}
    assert ws.jobs_processed == 5


def test_blind_writes_are_never_counted_as_lost_updates(make_runtime) -> None:
    def blind(routine, slot_data, message, ws):
        ws.update_routine_state("r", {"first": True})
        ws.increment("gate", "written")
        _spin_until(ws, "other", 1)
        ws.update_routine_state("r", {"second": True})

    def other(routine, slot_data, message, ws):
        _spin_until(ws, "written", 1)
        ws.update_routine_state("r", {"other": True})
        ws.increment("gate", "other")

    def logic(routine, slot_data, message, ws):
        (blind if slot_data["in"][0]["blind"] else other)(routine, slot_data, message, ws)

    single_flow("blind", logic, concurrency=None)
    runtime = make_runtime(processes=2)
    ws = runtime.exec("blind")
    jobs = [runtime.post("blind", "r", "in", {"blind": b})[1] for b in (True, False)]
    assert all(j.wait(WAIT) for j in jobs) and [j.status for j in jobs] == ["completed"] * 2
    assert ws.get_routine_state("r") == {"second": True}
    assert runtime.stats()["routines"]["r"]["lost_updates"] == 0
