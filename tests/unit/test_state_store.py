"""The state server's semantics in this process: ``StateStore`` over every ``StateBackend``, no child process.

The first part is a conformance test every backend of ``BACKENDS`` must pass
(a backend on disk joins by adding its options to ``BACKEND_OPTIONS``). The
rest drives a ``StateStore`` directly, over each backend: versions, lost
updates, the size and JSON rules, lock leases and their waiters, ``modify``
with its budget, and the server's answers as error data. Last, the layout:
no import cycle in the package, and the client side never imports the
server side.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import threading
from collections.abc import Callable, Iterator

import cloudpickle
import pytest

from routilux_mp._jsonvalue import normalize
from routilux_mp._messages import error_data, exception_from
from routilux_mp._state.backend import JournalLine, StateBackend, WorkerMeta
from routilux_mp._state.backends import BACKENDS, open_backend
from routilux_mp._state.protocol import ERROR, EXPOSED, Method, encode_request, take_frame
from routilux_mp._state.server import StoreServer
from routilux_mp._state.store import FnRaised, StateStore, set_heartbeat
from routilux_mp.errors import (
    LockTimeoutError,
    ModifyTimeoutError,
    RoutiluxError,
    StaleStateError,
    StateNotSerializableError,
    StateTooLargeError,
)

#: No wait in these tests may block for longer (seconds).
WAIT = 10.0
MAX_BYTES = 1000

#: What each backend needs besides its name (a backend on disk puts its file under ``tmp_path``).
BACKEND_OPTIONS: dict[str, Callable[..., dict]] = {
    "memory": lambda tmp_path: {},
    "sqlite": lambda tmp_path: {"path": str(tmp_path / "state.db")},
}


@pytest.fixture(autouse=True)
def no_child_process(monkeypatch) -> None:
    """Everything here runs in this process: starting a child fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a state-store unit test started a process")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(os, "posix_spawn", refuse)


def _open(name: str, tmp_path) -> StateBackend:
    if name not in BACKEND_OPTIONS:
        pytest.fail(f"backend {name!r} is in BACKENDS but not in BACKEND_OPTIONS: add the options it needs")
    return open_backend(name, **BACKEND_OPTIONS[name](tmp_path))


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path) -> Iterator[StateBackend]:
    made = _open(request.param, tmp_path)
    yield made
    made.close()


@pytest.fixture
def make_store(backend) -> Callable[..., StateStore]:
    """``make_store(strict=False, lock_timeout=WAIT)``: a store over this test's backend."""

    def make(strict: bool = False, lock_timeout: float = WAIT) -> StateStore:
        return StateStore(backend, MAX_BYTES, strict, lock_timeout)

    return make


def _write(store: StateStore, rid: str, value: dict, expected: int | None = None, wid: str = "w") -> tuple[int, int]:
    plain, size = normalize(value)
    return store.replace(wid, rid, plain, size, expected)


def _read(store: StateStore, rid: str, wid: str = "w") -> tuple[dict | None, int]:
    blob, version = store.get(wid, rid)
    return (None if blob is None else pickle.loads(blob)), version


def _modify(store: StateStore, rid: str, fn: Callable, budget: float = WAIT) -> tuple[dict, int]:
    blob, version = store.modify("w", rid, cloudpickle.dumps(fn), budget)
    return pickle.loads(blob), version


def _json_size(value: dict) -> int:
    return len(json.dumps(value, separators=(",", ":"), allow_nan=False))


def _unused_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        top = int(f.read())
    return next(pid for pid in range(top - 1, 1, -1) if not os.path.exists(f"/proc/{pid}"))


class _Beats:
    """A heartbeat that is always due; ``sent`` is set once a waiting call used it (so it is waiting)."""

    interval = 0.01

    def __init__(self) -> None:
        self.sent = threading.Event()

    def due(self) -> bool:
        return True

    def send(self) -> None:
        self.sent.set()


def _in_thread(call: Callable[[], object]) -> tuple[threading.Thread, _Beats, dict]:
    """Run ``call`` on a thread that serves it like a server thread (with a heartbeat); its outcome in a dict."""
    beats, outcome = _Beats(), {}

    def run() -> None:
        set_heartbeat(beats)
        try:
            outcome["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome["error"] = exc
        finally:
            set_heartbeat(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, beats, outcome


# -- every backend keeps cells and meta whole ------------------------------------------------


def _commit(backend: StateBackend) -> None:
    """End an operation as the store does: seal what it staged, and sync a durable backend's ticket."""
    if backend.durable:
        ticket = backend.seal()
        assert isinstance(ticket, int) and ticket > 0
        backend.sync(ticket)


def test_a_backend_keeps_a_cell_whole_and_its_latest_save(backend) -> None:
    assert backend.load("w", "r") is None
    assert backend.load_worker("w") == {}
    for args in [("w", "r", {"a": 1}, 1, 7), ("w", "r", {"a": 22}, 2, 8), ("w", "q", {}, 1, 2),
                 ("v", "r", {"b": [1, 2]}, 1, 11)]:
        backend.save(*args)
        _commit(backend)
    cell = backend.load("w", "r")
    assert (cell.value, cell.version, cell.size) == ({"a": 22}, 2, 8)
    assert {rid: (c.value, c.version, c.size) for rid, c in backend.load_worker("w").items()} == {
        "r": ({"a": 22}, 2, 8), "q": ({}, 1, 2)}
    assert backend.load("v", "q") is None


def test_a_backend_keeps_worker_meta_and_adds_job_counts_in_one_call(backend) -> None:
    assert backend.load_meta("w") is None
    backend.save_meta("w", WorkerMeta("flow-a", "running"))
    backend.add_job_counts({"w": (3, 1), "new": (2, 2)})
    _commit(backend)
    assert backend.load_meta("w") == WorkerMeta("flow-a", "running", 3, 1)
    assert backend.load_meta("new") == WorkerMeta("", "running", 2, 2), "counts for an unknown worker: default meta"
    backend.save_meta("w", WorkerMeta("flow-a", "stopped", 3, 1))
    assert backend.load_meta("w").status == "stopped"


def test_a_backend_lists_and_snapshots_every_worker_with_meta_or_cells(backend) -> None:
    backend.save("cells-only", "r", {"x": 1}, 1, 7)
    backend.save_meta("meta-only", WorkerMeta("f", "running"))
    backend.save_meta("both", WorkerMeta("g", "running"))
    backend.save("both", "r", {"y": 2}, 1, 7)
    assert backend.list_workers() == ["cells-only", "meta-only", "both"], "first-saved order"
    snap = backend.snapshot()
    assert {wid: (meta, {rid: c.value for rid, c in cells.items()}) for wid, (meta, cells) in snap.items()} == {
        "cells-only": (None, {"r": {"x": 1}}),
        "meta-only": (WorkerMeta("f", "running"), {}),
        "both": (WorkerMeta("g", "running"), {"r": {"y": 2}}),
    }


def test_a_backend_keeps_the_last_request_of_each_client_until_its_process_is_dropped(backend) -> None:
    assert backend.load_request("c1") is None
    backend.save_request("c1", 11, 1, b"one")
    backend.save_request("c1", 11, 2, b"two")
    backend.save_request("c2", 11, 1, b"other thread")
    backend.save_request("c3", 12, 7, b"other process")
    _commit(backend)
    assert (backend.load_request("c1"), backend.load_request("c3")) == ((2, b"two"), (7, b"other process"))
    backend.drop_requests(11)
    _commit(backend)
    assert (backend.load_request("c1"), backend.load_request("c2"), backend.load_request("c3")) == (
        None, None, (7, b"other process"))


def test_a_backend_keeps_effects_by_job_until_the_job_is_dropped(backend) -> None:
    keys = [("line-1", "count", b"d1", 0), ("line-1", "count", b"d1", 1), ("line-2", "count", b"d2", 0)]
    for n, key in enumerate(keys):
        backend.save_effect(key, f"reply {n}".encode())
    _commit(backend)
    assert [backend.load_effect(key) for key in keys] == [b"reply 0", b"reply 1", b"reply 2"]
    assert backend.load_effect(("line-1", "count", b"d1", 2)) is None
    backend.drop_effects(["line-1", "never-seen"])
    _commit(backend)
    assert [backend.load_effect(key) for key in keys] == [None, None, b"reply 2"]


def test_a_backend_journals_a_run_its_ended_lines_and_its_offsets(backend) -> None:
    assert backend.load_journal() is None
    backend.save_journal({"input": "a.jsonl"}, [], {"output": 0}, new_run=True)
    backend.save_journal(None, [JournalLine(1, "line-1", "completed", None),
                                JournalLine(3, "line-3", "failed", '{"type": "ValueError"}')], {"output": 120})
    backend.save_journal(None, [JournalLine(2, "line-2", "completed", None),
                                JournalLine(3, "line-3", "completed", None)], {"output": 200, "failed": 40})
    _commit(backend)
    assert tuple(backend.load_journal()) == ({"input": "a.jsonl"}, {"output": 200, "failed": 40}, [1, 2, 3], [])
    assert tuple(backend.load_journal(lines=False)) == ({"input": "a.jsonl"}, {"output": 200, "failed": 40}, [], [])
    backend.save_journal({"input": "b.jsonl"}, [JournalLine(9, "line-9", "failed", None)], None, new_run=True)
    _commit(backend)
    assert tuple(backend.load_journal()) == ({"input": "b.jsonl"}, {}, [], [9]), "a new run forgets the old one"


def test_backends_are_chosen_by_name_and_an_unknown_name_says_which_exist() -> None:
    for name, cls in BACKENDS.items():
        assert cls.name == name and issubclass(cls, StateBackend)
    with pytest.raises(ValueError, match=r"unknown state backend 'nope'; choose one of 'memory', 'sqlite'"):
        open_backend("nope")


# -- versions and lost updates -----------------------------------------------------------------


def test_every_write_bumps_the_version_and_reads_return_it(make_store) -> None:
    store = make_store()
    assert _read(store, "r") == (None, 0)
    assert _write(store, "r", {"a": 1}) == (1, 0)
    assert pickle.loads(store.merge("w", "r", {"b": 2})[0]) == {"a": 1, "b": 2}
    assert store.increment("w", "r", {"n": 1}) == ([1], 3)
    assert _modify(store, "r", lambda s: s.update(m=True)) == ({"a": 1, "b": 2, "n": 1, "m": True}, 4)
    blob, version = store.acquire("w", "r", "tok", os.getpid(), None)
    assert (pickle.loads(blob), version) == ({"a": 1, "b": 2, "n": 1, "m": True}, 4)
    assert store.release("w", "r", "tok", {"z": 0}, 7) == 5
    store.acquire("w", "r", "tok2", os.getpid(), None)
    assert store.release("w", "r", "tok2", None, 0) == 5, "a release without a value writes nothing"
    assert _read(store, "r") == ({"z": 0}, 5)
    blob, versions = store.get_all("w")
    assert (pickle.loads(blob), versions) == ({"r": {"z": 0}}, {"r": 5})


def test_a_write_over_a_stale_read_is_a_lost_update_and_a_blind_write_never_is(make_store) -> None:
    store = make_store()
    _write(store, "r", {"v": 0})
    assert _write(store, "r", {"v": 1}, expected=1) == (2, 0), "it read the current version"
    assert _write(store, "r", {"v": 2}, expected=1) == (3, 1), "it read version 1; version 2 is lost"
    assert _write(store, "r", {"v": 3}, expected=1) == (4, 2)
    assert _write(store, "r", {"v": 4}) == (5, 0), "a blind write sets no expectation"
    _write(store, "r", {"v": 0}, wid="other")
    assert _write(store, "r", {"v": 1}, expected=0, wid="other") == (2, 1)
    assert store.lost_updates() == {"r": 3}, "summed over workers, per routine id"
    assert _read(store, "r") == ({"v": 4}, 5)


def test_strict_refuses_a_stale_write_and_writes_nothing(make_store) -> None:
    store = make_store(strict=True)
    _write(store, "r", {"v": 0})
    _write(store, "r", {"v": 1})
    with pytest.raises(StaleStateError, match=r"routine state 'r' of worker 'w' changed \(version 1 -> 2\)"):
        _write(store, "r", {"v": 2}, expected=1)
    assert _read(store, "r") == ({"v": 1}, 2)
    assert store.lost_updates() == {}


# -- size and JSON rules ---------------------------------------------------------------------------


def _hold_and_write_back(value: dict) -> Callable[[StateStore], object]:
    def run(store: StateStore) -> object:
        store.acquire("w", "r", "tok", os.getpid(), None)
        plain, size = normalize(value)
        return store.release("w", "r", "tok", plain, size)

    return run


#: id, an operation on routine state 'r' ({"pad": "x" * 600}) that would take it past MAX_BYTES
TOO_LARGE = [
    ("replace", lambda store: _write(store, "r", {"pad": "x" * 2000})),
    ("merge", lambda store: store.merge("w", "r", {"more": "y" * 600})),
    ("increment-many-new-keys", lambda store: store.increment("w", "r", {f"key{i:03}": 1 for i in range(60)})),
    ("increment-a-huge-int", lambda store: store.increment("w", "r", {"n": 10 ** 500})),
    ("modify", lambda store: _modify(store, "r", lambda s: dict(s, more="y" * 600))),
    ("release-with-a-value", _hold_and_write_back({"pad": "x" * 2000})),
]


@pytest.mark.parametrize("operation", [row[1] for row in TOO_LARGE], ids=[row[0] for row in TOO_LARGE])
def test_no_operation_grows_a_state_past_max_state_bytes(make_store, operation) -> None:
    store = make_store(lock_timeout=0.05)
    _write(store, "r", {"pad": "x" * 600})
    with pytest.raises(StateTooLargeError, match=r"state of routine 'r' would be \d+ bytes as JSON, over "
                                                 r"max_state_bytes=1000; nothing was written"):
        operation(store)
    assert _read(store, "r") == ({"pad": "x" * 600}, 1)
    assert store.increment("w", "r", {"n": 1})[0] == [1], "no lease is left behind (it would time out)"


def test_increments_keep_the_size_exact_without_re_encoding(make_store, backend) -> None:
    store = make_store()
    steps = [{"a": 1}, {"a": -11}, {"ü\n\"": 2.5}, {"a": 10 ** 30, "b": 0.1}, {"b": 1e300}, {"c": -0.0},
             {"c": 0}, {"back\\slash": 1, "quo\"te": 2, "del\x7f": 3, "tab\t": 4, "": 5}, {"a": 0.5},
             {f"k{i}": i for i in range(60)}, {f"k{i}": -i * 1.5 for i in range(0, 60, 3)}]
    for amounts in steps:
        store.increment("w", "r", amounts)
        cell = backend.load("w", "r")
        assert cell.size == _json_size(cell.value), (amounts, cell.value)


def _spin() -> None:
    while True:
        pass


#: id, a modify function that fails, the error the store raises (FnRaised: the function's own), its message
MODIFY_FAILURES = [
    ("raises", lambda s: s["missing"], FnRaised, r"KeyError: 'missing'"),
    ("returns-a-list", lambda s: [1], TypeError, r"function returned list; it must return the new state"),
    ("returns-a-set", lambda s: {"tags": {1}}, StateNotSerializableError, r"state\['tags'\]: set"),
    ("runs-past-its-budget", lambda s: _spin(), ModifyTimeoutError,
     r"ran past its time budget of 0.2s; nothing was written and the routine state is unlocked"),
]


@pytest.mark.parametrize(("fn", "error", "message"), [row[1:] for row in MODIFY_FAILURES],
                         ids=[row[0] for row in MODIFY_FAILURES])
def test_a_failed_modify_writes_nothing_and_releases_the_state(make_store, fn, error, message) -> None:
    store = make_store(lock_timeout=0.05)
    _write(store, "r", {"v": 1})
    with pytest.raises(error, match=message):
        _modify(store, "r", fn, budget=0.2)
    assert _read(store, "r") == ({"v": 1}, 1)
    assert store.increment("w", "r", {"n": 1})[0] == [1], "the lease was released"


def test_modify_works_on_a_copy_and_keeps_its_changes_when_it_returns_none(make_store) -> None:
    store = make_store()
    _write(store, "r", {"items": [1]})
    assert _modify(store, "r", lambda s: s["items"].append(2)) == ({"items": [1, 2]}, 2)
    assert _modify(store, "r", lambda s: {"fresh": (1, 2)}) == ({"fresh": [1, 2]}, 3), "normalized (tuple -> list)"


# -- lock leases and their waiters ----------------------------------------------------------------


def test_a_writer_waits_for_the_lease_then_builds_on_the_holders_write(make_store) -> None:
    store = make_store()
    store.acquire("w", "r", "holder", os.getpid(), None)
    thread, beats, outcome = _in_thread(lambda: store.increment("w", "r", {"n": 1}))
    assert beats.sent.wait(WAIT), "the writer should wait for the lease, telling its client it is alive"
    assert store.get("w", "r") == (None, 0), "reads never wait"
    assert store.release("w", "r", "holder", {"n": 10}, 8) == 1
    thread.join(WAIT)
    assert outcome == {"result": ([11], 2)}


def test_a_lease_of_a_dead_owner_is_taken_over_and_its_release_refused(make_store) -> None:
    store = make_store(lock_timeout=0.05)
    store.acquire("w", "r", "dead-holder", _unused_pid(), None)
    assert store.increment("w", "r", {"n": 1}) == ([1], 1), "no wait: the owner is gone"
    with pytest.raises(RoutiluxError, match="the lock on routine state 'r' was lost"):
        store.release("w", "r", "dead-holder", {"n": 99}, 8)
    assert _read(store, "r") == ({"n": 1}, 1)


def test_release_pid_frees_every_lease_of_a_process_and_wakes_its_waiters(make_store) -> None:
    store = make_store()
    pid = os.getpid()  # alive: only release_pid frees its leases
    store.acquire("w", "a", "t1", pid, None)
    store.acquire("v", "b", "t2", pid, None)
    thread, beats, outcome = _in_thread(lambda: store.increment("w", "a", {"n": 1}))
    assert beats.sent.wait(WAIT)
    assert store.release_pid(pid) == 2
    thread.join(WAIT)
    assert outcome == {"result": ([1], 1)}
    with pytest.raises(RoutiluxError, match="was lost"):
        store.release("v", "b", "t2", None, 0)
    assert store.release_pid(pid) == 0


def test_a_lease_held_too_long_fails_writers_and_acquirers_with_lock_timeout(make_store) -> None:
    store = make_store(lock_timeout=0.2)
    _write(store, "r", {"v": 1})
    store.acquire("w", "r", "holder", os.getpid(), None)
    with pytest.raises(LockTimeoutError, match=rf"routine state 'r' stayed locked by process {os.getpid()} for 0.2s"):
        _write(store, "r", {"v": 2})
    with pytest.raises(LockTimeoutError, match="for 0.05s"):
        store.acquire("w", "r", "other", os.getpid(), 0.05)
    assert store.release("w", "r", "holder", None, 0) == 1
    assert _read(store, "r") == ({"v": 1}, 1)


# -- worker meta and the snapshot -------------------------------------------------------------------


def test_worker_meta_job_counts_and_the_final_snapshot(make_store) -> None:
    store = make_store()
    assert store.meta("w") == {"flow_id": "", "status": "running", "jobs_processed": 0, "jobs_failed": 0}
    store.register_worker("w", "flow-a", "running")
    store.add_job_counts({"w": (5, 2)})
    store.register_worker("w", "flow-a", "stopped")
    assert store.meta("w") == {"flow_id": "flow-a", "status": "stopped", "jobs_processed": 5, "jobs_failed": 2}
    _write(store, "r", {"v": 1})
    _write(store, "r", {"early": True}, wid="unregistered")
    assert pickle.loads(store.snapshot()) == {
        "w": {"meta": store.meta("w"), "states": {"r": {"v": 1}}},
        "unregistered": {"meta": {"flow_id": "", "status": "running", "jobs_processed": 0, "jobs_failed": 0},
                         "states": {"r": {"early": True}}},
    }


# -- the RPC: an explicit method list, errors as data ------------------------------------------------


def test_the_exposed_methods_are_exactly_the_stores_public_calls() -> None:
    public = {name for name in vars(StateStore) if not name.startswith("_") and callable(getattr(StateStore, name))}
    assert public - {"close"} == set(EXPOSED), "close() is the server's, never a client's"
    assert [method.value for method in Method] == list(EXPOSED)


def _modify_request(fn: Callable) -> tuple:
    return Method.MODIFY, ("w", "r", cloudpickle.dumps(fn), WAIT)


#: id, a request (method, args), what the client raises from the error data, its message
BAD_REQUESTS = [
    ("modify-raises-keyerror", _modify_request(lambda s: {}["k"]), KeyError, r"^'k'$"),
    ("modify-raises-its-own-class", _modify_request(lambda s: 1 / 0), ZeroDivisionError, "division by zero"),
    ("increment-a-string", (Method.INCREMENT, ("w", "r", {"s": 1})), TypeError, r"state\['s'\].* not a number"),
    ("replace-too-large", (Method.REPLACE, ("w", "r", {"x": 1}, 5000, None)), StateTooLargeError,
     "would be 5000 bytes"),
    ("unknown-method", ("shutdown", (), 1.0, None, None), AttributeError,
     r"the state server has no method 'shutdown' \(it serves"),
    ("not-a-request", ("garbage",), ValueError, "unpack"),
]


@pytest.mark.parametrize(("request_", "error", "message"), [row[1:] for row in BAD_REQUESTS],
                         ids=[row[0] for row in BAD_REQUESTS])
def test_the_server_answers_failures_with_plain_data_that_the_client_raises_again(
        make_store, tmp_path, request_, error, message) -> None:
    store = make_store()
    _write(store, "r", {"s": "text"})
    server = StoreServer(store, {"max_request_bytes": 1 << 20}, str(tmp_path / "s.sock"), b"k" * 32)
    try:
        if len(request_) == 2:
            method, args = request_
            body = encode_request(method, args, 1.0) if isinstance(method, Method) else pickle.dumps((method, args, 1.0))
        else:
            body = pickle.dumps(request_)
        reply, _ = take_frame(bytearray(server.answer(body)), 1 << 30)
    finally:
        server.listener.close()
    kind, data = pickle.loads(reply)
    assert kind == ERROR
    assert json.loads(json.dumps(data)) == data, "error data is plain data, never an exception object"
    raised = exception_from(data, "the state server's call")
    assert type(raised) is error and raised.remote_traceback
    with pytest.raises(error, match=message):
        raise raised
    assert _read(store, "r") == ({"s": "text"}, 1), "nothing was written"


class _NeedsTwo(Exception):
    def __init__(self, a: object, b: object) -> None:
        super().__init__(a, b)


#: id, an exception on the server, what exception_from rebuilds here, its message
REBUILT = [
    ("builtin-with-args", error_data(KeyError("k"), keep_args=True), KeyError, r"^'k'$"),
    ("ours", error_data(StaleStateError("changed"), keep_args=True), StaleStateError, "^changed$"),
    ("args-that-are-not-plain", error_data(_NeedsTwo(object(), 1), keep_args=True), RoutiluxError,
     r"^the server raised test_state_store._NeedsTwo: \(<object"),
    ("a-module-not-imported-here", {"type": "not_imported_here.Boom", "message": "bang", "traceback": "tb"},
     RoutiluxError, r"^the server raised not_imported_here\.Boom: bang$"),
    ("not-an-exception-class", {"type": "os.path", "message": "x", "traceback": ""}, RoutiluxError,
     r"^the server raised os\.path: x$"),
]


@pytest.mark.parametrize(("data", "error", "message"), [row[1:] for row in REBUILT], ids=[row[0] for row in REBUILT])
def test_error_data_is_raised_again_as_its_class_or_a_stand_in_that_names_it(data, error, message) -> None:
    raised = exception_from(data, "the server")
    assert type(raised) is error
    with pytest.raises(error, match=message):
        raise raised


# -- layout: the client side never pulls in the server side; no import cycle ------------------------

PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _package_modules() -> dict[str, str]:
    """``{dotted module name: file}`` of every module of the package."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(PACKAGE, "routilux_mp")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                modules[os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".").removesuffix(".__init__")] = path
    return modules


def _module_imports(module: str, modules: dict[str, str]) -> set[str]:
    """What ``module`` imports at module level (``TYPE_CHECKING`` blocks aside), resolved to module names.

    ``from . import x`` names the submodule ``x``, not the package itself.
    """
    path = modules[module]
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    with open(path) as f:
        tree = ast.parse(f.read())
    statements = list(tree.body)
    found: set[str] = set()
    while statements:
        sub = statements.pop()
        if isinstance(sub, ast.If) and "TYPE_CHECKING" not in ast.dump(sub.test) or isinstance(sub, ast.Try):
            statements.extend(ast.iter_child_nodes(sub))  # their bodies run at import; functions' do not
        elif isinstance(sub, ast.Import):
            found.update(alias.name for alias in sub.names)
        elif isinstance(sub, ast.ImportFrom):
            base = package[: len(package) - sub.level + 1] if sub.level else []
            target = ".".join(base + ([sub.module] if sub.module else []))
            submodules = {f"{target}.{alias.name}" for alias in sub.names} & modules.keys()
            found |= submodules
            if len(submodules) < len(sub.names):
                found.add(target)
    return found


def _package_graph() -> dict[str, set[str]]:
    """``{module: the package's modules it imports at module level}``."""
    modules = _package_modules()
    return {module: (_module_imports(module, modules) & modules.keys()) - {module} for module in modules}


def test_no_module_level_import_cycle_in_the_package() -> None:
    graph = _package_graph()
    done: set[str] = set()
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph[module]):
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_the_client_side_never_imports_the_server_side() -> None:
    graph = _package_graph()
    server_side = {"routilux_mp._state.server", "routilux_mp._state.store", "routilux_mp._state.backend",
                   "routilux_mp._state.modify", "routilux_mp._state.launcher"}
    for client in ("routilux_mp.state", "routilux_mp._state.client", "routilux_mp._state.protocol"):
        reached, todo = set(), [client]
        while todo:
            for dep in graph[todo.pop()] - reached:
                reached.add(dep)
                todo.append(dep)
        assert not reached & server_side, f"{client} imports {sorted(reached & server_side)}"
        imported = _module_imports(client, _package_modules())
        assert "multiprocess" not in imported, f"{client} imports multiprocess at start-up (~100 ms per worker)"

