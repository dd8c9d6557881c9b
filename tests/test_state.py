"""WorkerState through a real state server, from the supervisor and from worker processes."""

from __future__ import annotations

import os
import stat
import struct
import sys
import threading
import time

import pytest
from helpers import WAIT, by_value, pool_ready, single_flow, wait_until

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
def test_four_processes_times_1000_atomic_updates_lose_nothing(make_runtime, backend, bump) -> None:
    single_flow("bump", bump, concurrency=None)
    runtime = make_runtime(processes=4, **backend)
    pool_ready(runtime)  # (Ray places lanes one by one: work posted before goes to the first ones)
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
def test_non_json_state_is_refused_in_a_worker_with_path_and_state_intact(make_runtime, backend, value,
                                                                          message) -> None:
    def write(routine, slot_data, message_, ws):
        ws.update_routine_state("r", value)

    single_flow("bad", write)
    runtime = make_runtime(processes=1, **backend)
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


def test_lost_update_is_warned_once_and_counted_in_stats(make_runtime, caplog) -> None:
    single_flow("race", _read_then_write_late, concurrency=None)
    runtime = make_runtime(processes=2)
    ws = runtime.exec("race")
    jobs = _race(runtime, rounds=2)
    assert [j.status for j in jobs] == ["completed"] * 4
    assert ws.get_routine_state("r") == {"count": 2}, "each round lost one of its two updates"
    assert runtime.stats()["routines"]["r"]["lost_updates"] == 2
    runtime.shutdown()
    # Logged where the write happened (a worker) and replayed in this process's logging, with its job.
    warned = [r for r in caplog.records if "lost update on routine state 'r'" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert warned[0].levelname == "WARNING" and warned[0].job_id in {j.job_id for j in jobs}


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

    from routilux_mp._state.protocol import SERIALIZER
    from routilux_mp._state.server import StoreManager

    single_flow("sec", lambda *a: None)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("sec")
    ws.update_routine_state("r", {"v": 1})
    address = runtime._testing.state_address
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


# -- deadlines: a server that stops mid-reply, or sends what no server of ours would ------------


class _Relay:
    """A unix-socket relay to the real state server that can tamper with the next reply once armed.

    ``mode``: "stall" forwards the first bytes of the reply and nothing after;
    "huge" and "absurd" rewrite its header to announce 2 GiB or 2**50 bytes;
    "silent" never forwards anything (not even the handshake).
    """

    def __init__(self, target: str, path: str, mode: str) -> None:
        import socket

        self.target, self.mode = target, mode
        self.armed = threading.Event()
        self.sockets: list = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(8)
        self.path = path
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.target)
            self.sockets += [client, server]
            if self.mode != "silent":
                threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
                threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source, sink, replies: bool) -> None:
        import struct

        while True:
            try:
                data = source.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            if replies and self.armed.is_set():
                if self.mode == "stall":
                    sink.sendall(data[:1000])
                    return  # the rest of the reply never comes; the connection stays open
                header = struct.pack("!i", 0x7FFFFFFF) if self.mode == "huge" else struct.pack("!iQ", -1, 1 << 50)
                data = header + data[4:]
                self.armed.clear()
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


#: id, what the relay does to the reply; a call must fail with StateServerLostError within state_timeout
BAD_REPLIES = [("stops-mid-reply", "stall"), ("header-claims-2-GiB", "huge"), ("header-claims-2**50-bytes", "absurd"),
               ("never-answers-the-handshake", "silent")]
CLIENT_TIMEOUT = 2.0


@pytest.mark.parametrize("mode", [row[1] for row in BAD_REPLIES], ids=[row[0] for row in BAD_REPLIES])
def test_a_state_call_ends_within_its_deadline_whatever_the_server_sends(make_runtime, tmp_path, mode) -> None:
    from routilux_mp._state.client import StoreClient
    from routilux_mp.errors import StateServerLostError
    from routilux_mp.state import WorkerState

    single_flow("relay", lambda *a: None)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("relay")
    ws.update_routine_state("big", {"blob": "x" * 500_000})  # a reply of many socket buffers
    relay = _Relay(runtime._testing.state_address, str(tmp_path / "relay.sock"), mode)
    client = StoreClient(relay.path, runtime._testing.authkey, CLIENT_TIMEOUT, CLIENT_TIMEOUT)
    other = WorkerState(ws.worker_id, ws.flow_id, client)
    if mode != "silent":
        assert other.get_routine_state("big")["blob"] == "x" * 500_000, "the relay passes replies through"
        relay.armed.set()
    outcome: dict = {}

    def read() -> None:
        started = time.monotonic()
        try:
            other.get_routine_state("big")
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(CLIENT_TIMEOUT + 30)  # the connect deadline is at least 10 s
    try:
        assert not reader.is_alive(), "the call is still blocked: its deadline did not hold"
        assert isinstance(outcome["error"], StateServerLostError), outcome
        assert ws.get_routine_state("big")["blob"] == "x" * 500_000, "the real server and its clients are fine"
    finally:
        relay.close()


def test_a_done_callback_of_the_first_job_may_use_worker_state_at_once(make_runtime) -> None:
    """Callbacks run on the dispatcher thread, which starts the state server: it starts it for them first."""
    single_flow("first-callback", lambda *a: None)
    runtime = make_runtime(processes=1, state_timeout=5.0)
    ws = runtime.exec("first-callback")
    seen, done = [], threading.Event()

    def read_state(job) -> None:
        try:
            seen.append(ws.get_routine_state("r"))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            seen.append(exc)
        done.set()

    _, job = runtime.post("first-callback", "r", "in", {})
    job.add_done_callback(read_state)
    assert done.wait(WAIT)
    assert seen == [None] and job.status == "completed"


def _authenticated_peer(address: str, authkey: bytes):
    import socket
    import struct

    from multiprocess import connection

    sock = socket.socket(socket.AF_UNIX)
    sock.connect(address)
    bound = struct.pack("ll", int(WAIT), 0)  # no wait in this test may block for longer
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
    conn = connection.Connection(sock.detach())
    connection.answer_challenge(conn, authkey)
    connection.deliver_challenge(conn, authkey)
    return conn


def _read_until_eof(fd: int, timeout: float) -> bool:
    import select

    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return False
        if not os.read(fd, 1 << 16):
            return True


#: id, when the bogus header comes, the header's bytes
BOGUS_REQUESTS = [
    ("first-message-2-GiB", "first", struct.pack("!i", 0x7FFFFFFF)),
    ("request-2-GiB", "serving", struct.pack("!i", 0x7FFFFFFF)),
    ("request-negative-size", "serving", struct.pack("!i", -5)),
    ("request-2**40-bytes", "serving", struct.pack("!iQ", -1, 1 << 40)),
]


@pytest.mark.parametrize(("phase", "header"), [row[1:] for row in BOGUS_REQUESTS], ids=[row[0] for row in BOGUS_REQUESTS])
def test_a_bogus_frame_header_from_an_authenticated_peer_closes_that_connection_only(make_runtime, capfd, phase,
                                                                                      header) -> None:
    import psutil

    from routilux_mp._messages import dumps

    single_flow("bogus", lambda *a: None)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("bogus")
    ws.update_routine_state("r", {"v": 1})
    server = psutil.Process(runtime._testing.state_pid)
    vms_before = server.memory_info().vms
    peer = _authenticated_peer(runtime._testing.state_address, runtime._testing.authkey)
    if phase == "serving":
        peer.send_bytes(dumps((None, "accept_connection", ("peer",), {})))
        assert peer.recv_bytes(1 << 16)
    os.write(peer.fileno(), header)
    try:
        assert _read_until_eof(peer.fileno(), 30.0), "the server kept the connection open, waiting for the body"
    finally:
        peer.close()
    assert server.memory_info().vms - vms_before < 512 * 2**20, "the server allocated what the header announced"
    assert ws.get_routine_state("r") == {"v": 1}, "the server serves everyone else"
    assert ws.increment("r", "n") == 1
    if phase == "serving":
        assert "closed a client connection: a frame header announces" in capfd.readouterr().err


def test_frame_readers_refuse_an_absurd_header_without_waiting_or_allocating() -> None:
    from routilux_mp._messages import FrameError, FrameReader, read_frame

    for header in (struct.pack("!i", 0x7FFFFFFF), struct.pack("!i", -2), struct.pack("!iQ", -1, 1 << 40)):
        r, w = os.pipe()
        try:
            os.write(w, header)
            with pytest.raises(FrameError, match="not written by routilux-mp's protocol"):
                FrameReader(r).read()
            os.set_blocking(r, True)
            os.write(w, header)
            with pytest.raises(FrameError):
                read_frame(r)
        finally:
            os.close(r)
            os.close(w)


# -- modify_routine_state functions have a time budget ------------------------------------------


def _mark_then_spin(marker: str):
    def fn(state):
        with open(marker, "w"):
            pass
        while True:
            pass

    return fn


def _modify_slowly(routine, slot_data, message, ws):
    item = slot_data["in"][0]
    if "marker" in item:
        ws.modify_routine_state("slow", _mark_then_spin(item["marker"]))
    ws.increment("slow", "after")


def test_a_modify_function_past_its_budget_fails_alone_and_the_server_lives_on(make_runtime, tmp_path) -> None:
    import psutil

    import routilux_mp
    from routilux_mp import errors

    assert routilux_mp.ModifyTimeoutError is errors.ModifyTimeoutError
    assert issubclass(errors.ModifyTimeoutError, TimeoutError) and issubclass(errors.ModifyTimeoutError,
                                                                              errors.RoutiluxError)
    single_flow("slow", _modify_slowly)
    # The old client gave up after 2 x lock_timeout + state_timeout = 5 s and declared the server lost.
    runtime = make_runtime(processes=1, state_timeout=3.0, lock_timeout=1.0)
    ws = runtime.exec("slow")
    ws.update_routine_state("slow", {"v": 1})
    server = psutil.Process(runtime._testing.state_pid)
    marker = str(tmp_path / "running")
    _, job = runtime.post("slow", "r", "in", {"marker": marker})
    wait_until(lambda: os.path.exists(marker), "the modify function to start", job=job)
    assert ws.increment("other", "n") == 1, "other routine states are served while the function runs"
    assert ws.get_routine_state("slow") == {"v": 1}, "reads do not wait for the lock"
    assert job.wait(WAIT)
    assert job.status == "failed" and job.error["type"] == "routilux_mp.errors.ModifyTimeoutError", job.error
    assert "ran past its time budget of 3s; nothing was written" in job.error["message"]
    assert ws.increment("slow", "n") == 1, "the routine state was unlocked"
    assert ws.get_routine_state("slow") == {"v": 1, "n": 1}
    _, after = runtime.post("slow", "r", "in", {})
    assert after.wait(WAIT) and after.status == "completed", after.error
    assert runtime._testing.state_pid == server.pid and server.is_running() and server.status() != psutil.STATUS_ZOMBIE, (
        "the state server was not replaced")
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        ws.modify_routine_state("slow", lambda s: s, timeout=0)


def _start_then_spin(box):
    box["started"].set()
    while True:
        pass


def _start_then_block(box):
    box["started"].set()
    box["release"].wait()  # one C call: the asynchronous exception waits for it to return
    return {"late": True}


def test_an_abandoned_modify_function_is_stopped_and_its_runner_reused(monkeypatch) -> None:
    import cloudpickle

    from routilux_mp._state import modify as _state_fn
    from routilux_mp.errors import ModifyTimeoutError

    runners = _state_fn.FnRunners()
    box = {"started": threading.Event()}
    spinning = _state_fn.FnTask(cloudpickle.dumps(_start_then_spin), box)
    runners.submit(spinning)
    assert box["started"].wait(WAIT)
    assert runners.abandon(spinning) and runners.overdue == 1
    wait_until(lambda: runners.overdue == 0, "the abandoned Python loop to stop")
    assert not spinning.done.is_set(), "an abandoned function has no outcome"

    monkeypatch.setattr(_state_fn, "MAX_OVERDUE", 1)
    box = {"started": threading.Event(), "release": threading.Event()}
    blocked = _state_fn.FnTask(cloudpickle.dumps(_start_then_block), box)
    runners.submit(blocked)
    assert box["started"].wait(WAIT)
    assert runners.abandon(blocked)
    with pytest.raises(ModifyTimeoutError, match="1 modify_routine_state functions that ran past"):
        runners.submit(_state_fn.FnTask(cloudpickle.dumps(lambda s: s), {}))
    box["release"].set()
    wait_until(lambda: runners.overdue == 0, "the blocked function to return")
    assert blocked.result is None and not blocked.done.is_set(), "its late result was discarded"
    quick = _state_fn.FnTask(cloudpickle.dumps(lambda s: dict(s, x=1)), {})
    runners.submit(quick)
    assert quick.done.wait(WAIT) and quick.result == {"x": 1} and quick.error is None


# -- a lock block is a transaction on the held dict -----------------------------------------------


def _transaction(routine, slot_data, message, ws):
    with ws.lock("tx") as state:
        state["seen"] = state.get("seen", 0) + 1
        assert ws.increment("tx", "n") == state["n"] == 1
        assert ws.increment_many("tx", {"n": 1, "m": 5}) == {"n": 2, "m": 5}
        assert ws.merge_routine_state("tx", {"merged": True})["n"] == 2
        assert ws.modify_routine_state("tx", lambda s: dict(s, modified=True))["modified"] is True
        assert ws.get_routine_state("tx") == state
        if slot_data["in"][0]["fail"]:
            raise RuntimeError("roll back")


def test_a_lock_holders_own_calls_commit_with_the_block_or_not_at_all(make_runtime) -> None:
    single_flow("tx", _transaction)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("tx")
    committed = {"seen": 1, "n": 2, "m": 5, "merged": True, "modified": True}
    _, job = runtime.post("tx", "r", "in", {"fail": False})
    assert job.wait(WAIT) and job.status == "completed", job.error
    assert ws.get_routine_state("tx") == committed, "the holder's increments were not overwritten by the write-back"
    _, job = runtime.post("tx", "r", "in", {"fail": True})
    assert job.wait(WAIT) and job.status == "failed"
    assert ws.get_routine_state("tx") == committed, "a block that raised wrote nothing, its increments included"
    with ws.lock("tx") as state:
        ws.update_routine_state("tx", {"replaced": True})
        assert state == {"replaced": True}
    assert ws.get_routine_state("tx") == {"replaced": True}


# -- the size rule and the JSON-only rule hold for every operation ------------------------------------


def _grow_under_lock(ws):
    with ws.lock("r") as state:
        state["more"] = "y" * 500


def _huge_int_under_lock(ws):
    with ws.lock("r") as state:
        state["n"] = 10**5000


#: id, an operation on routine state 'r' ({"pad": "x" * 600}) that would take it past max_state_bytes=1000
TOO_LARGE = [
    ("update", lambda ws: ws.update_routine_state("r", {"pad": "x" * 1000})),
    ("merge", lambda ws: ws.merge_routine_state("r", {"more": "y" * 500})),
    ("increment-non-ascii-key", lambda ws: ws.increment("r", "é" * 80)),  # 480 bytes as escaped JSON
    ("increment-long-number", lambda ws: ws.increment("r", "n", 10**400)),
    ("increment_many-non-ascii-keys", lambda ws: ws.increment_many("r", {"ü" * 40: 1, "ß" * 40: 1})),
    ("modify", lambda ws: ws.modify_routine_state("r", lambda s: dict(s, more="y" * 500))),
    ("lock-write-back", _grow_under_lock),
]


@pytest.mark.parametrize("operation", [row[1] for row in TOO_LARGE], ids=[row[0] for row in TOO_LARGE])
def test_no_operation_grows_a_state_past_max_state_bytes(make_runtime, operation) -> None:
    import json

    single_flow("size", lambda *a: None)
    runtime = make_runtime(processes=1, max_state_bytes=1000)
    ws = runtime.exec("size")
    ws.update_routine_state("r", {"pad": "x" * 600})
    with pytest.raises(StateTooLargeError, match=r"state of routine 'r' would be \d+ bytes as JSON, over max_state_bytes=1000"):
        operation(ws)
    state = ws.get_routine_state("r")
    assert state == {"pad": "x" * 600}, "nothing was written"
    assert len(json.dumps(state, separators=(",", ":"))) <= 1000
    assert ws.increment("r", "fits") == 1, "the size is still counted right afterwards"


#: id, an operation storing a value JSON cannot encode, the path its error names
NOT_JSON = [
    ("update", lambda ws: ws.update_routine_state("r", {"n": 10**5000}), r"state\['n'\]"),
    ("merge", lambda ws: ws.merge_routine_state("r", {"n": 10**5000}), r"state\['n'\]"),
    ("increment", lambda ws: ws.increment("r", "n", 10**5000), r"state\['n'\] of routine 'r'"),
    ("increment-sum", lambda ws: [ws.increment("r", "big", 9 * 10**4299) for _ in range(2)],
     r"state\['big'\] of routine 'r' would become an int of about 4301 digits"),
    ("increment_many", lambda ws: ws.increment_many("r", {"ok": 1, "n": 10**5000}), r"state\['n'\] of routine 'r'"),
    ("modify", lambda ws: ws.modify_routine_state("r", lambda s: dict(s, n=10**5000)), r"state\['n'\]"),
    ("lock-write-back", _huge_int_under_lock, r"state\['n'\]"),
]


@pytest.mark.parametrize(("operation", "path"), [row[1:] for row in NOT_JSON], ids=[row[0] for row in NOT_JSON])
def test_no_operation_stores_a_number_json_cannot_encode(make_runtime, operation, path) -> None:
    single_flow("json", lambda *a: None)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("json")
    ws.update_routine_state("r", {"pad": 1})
    before = None
    with pytest.raises(StateNotSerializableError, match=path):
        try:
            operation(ws)
        finally:
            before = ws.get_routine_state("r")
    assert "n" not in before and "ok" not in before, "nothing was written"
    assert ws.merge_routine_state("r", {"after": 1})["after"] == 1, "the state stays encodable"


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _nest_under_lock(ws):
    with ws.lock("r") as state:
        state["deep"] = _nested(DEPTH)


DEPTH = 100_000
#: Seconds refusing DEPTH levels may take: linear work takes well under one; quadratic took minutes.
REFUSE_WITHIN = 20.0

#: id, an operation storing DEPTH levels of nesting
DEEP = [
    ("update", lambda ws, runtime: ws.update_routine_state("r", _nested(DEPTH))),
    ("merge", lambda ws, runtime: ws.merge_routine_state("r", {"deep": _nested(DEPTH)})),
    ("modify", lambda ws, runtime: ws.modify_routine_state("r", lambda s: _nested(DEPTH))),
    ("lock-write-back", lambda ws, runtime: _nest_under_lock(ws)),
    ("post-metadata", lambda ws, runtime: runtime.post("deep", "r", "in", {}, metadata=_nested(DEPTH))),
]


@pytest.mark.parametrize("operation", [row[1] for row in DEEP], ids=[row[0] for row in DEEP])
def test_deep_nesting_is_refused_in_linear_time_with_a_path(make_runtime, operation) -> None:
    single_flow("deep", lambda *a: None)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("deep")
    ws.update_routine_state("r", {"v": 1})
    started = time.monotonic()
    with pytest.raises(StateNotSerializableError, match=r"\['a'\]\.\.\.\d+ levels\.\.\.\['a'\].*levels deep") as info:
        operation(ws, runtime)
    assert time.monotonic() - started < REFUSE_WITHIN
    assert len(str(info.value)) < 1000, "the path is shortened, not 100,000 steps long"
    assert ws.get_routine_state("r") == {"v": 1}


# -- trust: all flows of a runtime share one trust domain -----------------------------------------


def _reach_into_another_flow(routine, slot_data, message, ws):
    other = type(ws)(slot_data["in"][0]["victim"], "b", ws._client)
    routine.emit("out", seen=other.get_routine_state("r"))
    other.merge_routine_state("r", {"written_by": ws.flow_id})


def test_flows_of_one_runtime_share_one_trust_domain(make_runtime) -> None:
    """Pinned on purpose (README, WorkerState docstring): a handle is not a security boundary.

    Logic holds the state server's key in its process, so refusing handles in
    the client would only pretend to isolate flows; separate runtimes do.
    """
    single_flow("a", _reach_into_another_flow)
    single_flow("b", lambda *a: None)
    runtime = make_runtime(processes=1)
    victim = runtime.exec("b")
    victim.update_routine_state("r", {"secret": 1})
    _, job = runtime.post("a", "r", "in", {"victim": victim.worker_id})
    assert job.wait(WAIT) and job.status == "completed", job.error
    assert job.outputs[0]["data"]["seen"] == {"secret": 1}
    assert victim.get_routine_state("r") == {"secret": 1, "written_by": "a"}


# -- a modify function's own error reaches its caller, as data ----------------------------------


class _CallersError(Exception):
    """Defined here: the state server gets it by value, the caller has it by name."""


def _raise_callers_error(state):
    raise _CallersError("mine")


#: id, a modify_routine_state function that raises, what its caller gets, the message
MODIFY_RAISES = [
    ("system-exit", lambda s: sys.exit(3), SystemExit, "^3$"),
    ("key-error", lambda s: s["missing"], KeyError, "^'missing'$"),
    ("a-class-of-the-callers", _raise_callers_error, _CallersError, "^mine$"),
]


@pytest.mark.parametrize(("fn", "error", "message"), [row[1:] for row in MODIFY_RAISES],
                         ids=[row[0] for row in MODIFY_RAISES])
def test_a_modify_function_that_raises_fails_that_call_alone_with_its_own_error(make_runtime, fn, error,
                                                                                message) -> None:
    single_flow("raising", lambda *a: None)
    runtime = make_runtime(processes=1)
    ws = runtime.exec("raising")
    ws.update_routine_state("r", {"v": 1})
    with pytest.raises(error, match=message) as info:
        ws.modify_routine_state("r", fn)
    assert "Traceback" in info.value.remote_traceback, "the function's traceback, from the state server"
    assert ws.get_routine_state("r") == {"v": 1}, "nothing was written"
    assert ws.increment("r", "n") == 1, "the server, and the routine state's lock, carry on"
