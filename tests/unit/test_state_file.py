"""State files in this process, no child process: formats refused or migrated, the lock, replays and effects.

What a restarted server finds is simulated by closing a backend and opening
another on the same file; a crash, by dropping a backend's connection before
it committed (nothing of what it staged may be found then).
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import threading

import pytest

from routilux_mp._jsonvalue import normalize
from routilux_mp._state import statefile
from routilux_mp._state.backend import BackendFailed
from routilux_mp._state.replay import set_call
from routilux_mp._state.sqlite import SqliteBackend
from routilux_mp._state.statefile import SCHEMA_VERSION, StateFile, connect
from routilux_mp._state.store import StateStore
from routilux_mp.errors import LockLostError, StateFileError

SESSION = "this-runtime"


@pytest.fixture(autouse=True)
def no_child_process(monkeypatch) -> None:
    """Everything here runs in this process (as in test_state_store)."""
    import subprocess

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a state-file unit test started a process")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(os, "fork", refuse)


def _store(path: str, session: str = SESSION) -> StateStore:
    return StateStore(SqliteBackend(path), 1 << 20, False, 5.0, session)


def _write(store: StateStore, rid: str, value: dict) -> tuple[int, int]:
    plain, size = normalize(value)
    return store.replace("w", rid, plain, size, None)


def _read(store: StateStore, rid: str) -> dict | None:
    blob, _ = store.get("w", rid)
    return None if blob is None else pickle.loads(blob)


def _call(request: tuple | None = None, effect: tuple | None = None):
    """Serve the next store call as the server does for a request that names itself."""
    set_call(request, effect)


@pytest.fixture(autouse=True)
def no_call_left() -> None:
    yield
    set_call(None, None)


# -- formats: ours, another program's, another version -------------------------------------------------


def _other_program(path: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")


def _newer(path: str) -> None:
    connect(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE routilux_mp SET value = ? WHERE key = 'version'", (str(SCHEMA_VERSION + 1),))


def _garbage(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"these are not the bytes of an SQLite database" * 100)


#: id, how the file is made, what opening it says
REFUSED = [
    ("not-sqlite", _garbage, r"is not a routilux-mp state file \(SQLite says: file is not a database\)"),
    ("another-program", _other_program, r"is an SQLite database of another program \(its tables: invoices\)"),
    ("newer-format", _newer, (rf"written by a newer routilux-mp \(state format {SCHEMA_VERSION + 1}; this "
                              rf"version reads format {SCHEMA_VERSION}\): upgrade")),
    ("a-directory", os.mkdir, r"is a directory; give a file name"),
]


@pytest.mark.parametrize(("make", "message"), [row[1:] for row in REFUSED], ids=[row[0] for row in REFUSED])
def test_a_file_that_is_not_a_state_file_of_this_format_is_refused_and_left_alone(tmp_path, make, message) -> None:
    path = str(tmp_path / "run.db")
    make(path)
    before = None if os.path.isdir(path) else open(path, "rb").read()  # noqa: SIM115 - read whole, at once
    with pytest.raises(StateFileError, match=message):
        StateFile(path).close()
    if before is not None:
        assert open(path, "rb").read() == before, "a refused file is not written"  # noqa: SIM115


def test_an_older_format_is_migrated_in_one_step_and_a_format_without_migration_refused(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "run.db")
    connect(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE routilux_mp SET value = ? WHERE key = 'version'", (str(SCHEMA_VERSION - 1),))
    with pytest.raises(StateFileError, match=rf"state format {SCHEMA_VERSION - 1}, which this routilux-mp cannot"):
        connect(path)
    migrated = []
    monkeypatch.setitem(statefile.MIGRATIONS, SCHEMA_VERSION - 1, lambda conn: migrated.append(conn.in_transaction))
    connect(path).close()
    assert migrated == [True], "a migration runs inside the transaction that checks the format"
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM routilux_mp WHERE key = 'version'").fetchone() == (str(SCHEMA_VERSION),)


def test_a_file_locked_by_a_live_runtime_is_refused_naming_it_and_free_once_released(tmp_path) -> None:
    path = str(tmp_path / "run.db")
    held = StateFile(path)
    try:
        with pytest.raises(StateFileError, match=rf"in use by another live runtime \(process {os.getpid()}: .*\); "
                                                 "a state file serves one runtime at a time"):
            StateFile(path)
    finally:
        held.close()
    StateFile(path).close()


def test_the_state_file_remembers_workers_and_counts_and_forgets_the_requests_of_an_earlier_runtime(tmp_path) -> None:
    path = str(tmp_path / "run.db")
    store = _store(path)
    store.register_worker("w", "flow-a", "running")
    store.add_job_counts({"w": (7, 2)})
    _call(("client-1", 1, 1))
    _write(store, "r", {"v": 1})
    store.close()
    held = StateFile(path)
    held.close()
    assert (held.workers, held.counts) == ({"w": "flow-a"}, {"w": (7, 2)})
    store = _store(path, session="a later runtime")
    _call(("client-1", 1, 1))
    assert _write(store, "r", {"v": 2}) == (2, 0), "an earlier runtime's request is gone: this is a new write"
    store.close()


# -- replays: nothing applied twice --------------------------------------------------------------------


#: id, a write named by a request, applied twice to a store (the second time after a restart)
WRITES = [
    ("increment", lambda s: s.increment("w", "r", {"n": 5})),
    ("merge", lambda s: s.merge("w", "r", {"m": [1]})),
    ("replace", lambda s: _write(s, "r", {"n": 100})),
    ("modify", lambda s: s.modify("w", "r", __import__("cloudpickle").dumps(lambda d: {**d, "n": d["n"] * 3}), 5.0)),
]


@pytest.mark.parametrize("write", [row[1] for row in WRITES], ids=[row[0] for row in WRITES])
def test_a_retried_write_that_was_committed_before_a_restart_gets_its_reply_and_applies_nothing(tmp_path, write) -> None:
    path = str(tmp_path / "run.db")
    store = _store(path)
    _write(store, "r", {"n": 1})
    _call(("client-1", 42, 7))
    first = write(store)
    set_call(None, None)
    after_first = store.get("w", "r")
    store.close()  # the server restarts: a new store over the same file
    store = _store(path)
    _call(("client-1", 42, 7))  # the same request: its connection broke before the reply arrived
    assert write(store) == first
    set_call(None, None)
    assert store.get("w", "r") == after_first, "same value, same version: not applied again"
    _call(("client-1", 42, 8))  # the client's next write is a new one
    write(store)
    set_call(None, None)
    assert store.get("w", "r")[1] == after_first[1] + 1
    store.close()


def test_a_write_sealed_but_never_committed_is_not_in_the_file(tmp_path) -> None:
    path = str(tmp_path / "run.db")
    backend = SqliteBackend(path, synchronous="FULL")  # group commit: sealed operations wait for a sync
    backend.save("w", "r", {"kept": True}, 1, 13)
    backend.sync(backend.seal())
    backend.save("w", "r", {"kept": False}, 2, 14)
    backend.save_request("client-1", 1, 1, b"reply")
    backend.seal()
    backend._conn.close()  # the server is killed before the commit
    reopened = SqliteBackend(path, synchronous="FULL")
    try:
        assert (reopened.load("w", "r").value, reopened.load_request("client-1")) == ({"kept": True}, None)
    finally:
        reopened.close()


def test_a_failed_commit_fails_every_later_sync_so_the_server_restarts_from_the_file(tmp_path) -> None:
    backend = SqliteBackend(str(tmp_path / "run.db"))
    backend.save("w", "r", {"ok": 1}, 1, 8)
    backend.sync(backend.seal())
    backend._conn.execute("PRAGMA query_only = ON")  # every write of the next commit fails
    backend.save("w", "r", {"ok": 2}, 2, 8)
    with pytest.raises(BackendFailed, match="could not be written"):
        backend.sync(backend.seal())
    backend._conn.execute("PRAGMA query_only = OFF")
    backend.save("w", "r", {"ok": 3}, 3, 8)
    with pytest.raises(BackendFailed):
        backend.sync(backend.seal())
    backend._conn.close()


def test_writers_that_arrive_during_a_commit_share_the_next_one(tmp_path) -> None:
    backend = SqliteBackend(str(tmp_path / "run.db"), synchronous="FULL")
    assert backend.group_commit, "a commit that waits for fsync is worth grouping"
    store = StateStore(backend, 1 << 20, False, 5.0)
    write, first, sizes = backend._write, threading.Event(), []

    def slow_first_commit(batch) -> None:
        if not first.is_set():  # the first commit lasts until three other writers wait for theirs
            first.set()
            assert _until(lambda: backend._sealed - backend._durable >= 4)
        sizes.append(len(batch.cells))
        write(batch)

    backend._write = slow_first_commit  # type: ignore[method-assign]
    threads = [threading.Thread(target=lambda k=k: store.increment("w", f"r{k}", {"n": 1})) for k in range(4)]
    threads[0].start()
    assert first.wait(10)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(10)
    store.close()
    assert sizes == [1, 3], "the three writers that came during the first commit shared the second"
    reopened = SqliteBackend(str(tmp_path / "run.db"))
    try:
        assert [reopened.load("w", f"r{k}").value for k in range(4)] == [{"n": 1}] * 4
    finally:
        reopened.close()


def _until(predicate, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)  # a short pause between polls, not a synchronization
    return True


# -- exactly-once runs: effects replayed to re-run activations, dropped once their line is journaled ------


def test_effects_are_replayed_to_a_re_run_activation_and_dropped_when_its_line_is_journaled(tmp_path) -> None:
    path = str(tmp_path / "run.db")
    store = _store(path)
    effect = ("line-3", "count", b"digest", 0)
    _call(None, effect)
    assert store.increment("w", "r", {"n": 1}) == ([1], 1), "no journal yet: effects are not recorded"
    _call(None, effect)
    assert store.increment("w", "r", {"n": 1}) == ([2], 2)
    set_call(None, None)
    store.journal_begin({"input": "x"}, True)
    _call(None, effect)
    assert store.increment("w", "r", {"n": 1}) == ([3], 3)
    store.close()
    store = _store(path)  # a later server of this runtime (the same session): the run is resumed
    _call(None, effect)
    assert store.increment("w", "r", {"n": 1}) == ([3], 3), "replayed: the activation ran before"
    _call(None, ("line-3", "count", b"digest", 1))
    assert store.increment("w", "r", {"n": 1}) == ([4], 4), "its next write is new"
    set_call(None, None)
    store.journal_record([(3, "line-3", "completed", None)], {"output": 10})
    _call(None, effect)
    assert store.increment("w", "r", {"n": 1}) == ([5], 5), "dropped with the completed line"
    set_call(None, None)
    assert tuple(store.journal_read(True)) == ({"input": "x", "session": SESSION}, {"output": 10}, [3], [])
    store.close()
    assert _store(path, session="another runtime")._log.effects is False, "effects belong to the journaling runtime"


def test_a_lock_block_replayed_from_its_effect_unlocks_without_writing(tmp_path) -> None:
    store = _store(str(tmp_path / "run.db"))
    store.journal_begin({"input": "x"}, True)
    effect = ("line-1", "r", b"d", 0)
    store.acquire("w", "r", "t1", os.getpid(), 1.0)
    _call(None, effect)
    assert store.release("w", "r", "t1", {"n": 1}, 7) == 1
    set_call(None, None)
    store.acquire("w", "r", "t2", os.getpid(), 1.0)  # the activation runs again: same block, same write
    _call(None, effect)
    assert store.release("w", "r", "t2", {"n": 1}, 7) == 1
    set_call(None, None)
    assert store.get("w", "r")[1] == 1, "not written twice"
    store.acquire("w", "r", "t3", os.getpid(), 0.5)  # and the lock is free
    store.close()


def test_a_lock_lost_in_a_restart_fails_its_release_with_lock_lost_and_writes_nothing(tmp_path) -> None:
    path = str(tmp_path / "run.db")
    store = _store(path)
    _write(store, "r", {"v": 1})
    store.acquire("w", "r", "holder", os.getpid(), 1.0)
    store.close()
    store = _store(path)  # leases are never stored: the new server holds none
    with pytest.raises(LockLostError, match="the state server restarted .* Nothing of the block was written"):
        store.release("w", "r", "holder", {"v": 99}, 8)
    assert _read(store, "r") == {"v": 1}
    store.close()
