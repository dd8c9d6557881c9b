"""The state-server launcher on its own (real processes): private socket, deferred start, death, stop."""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import textwrap
import threading

import psutil
import pytest
from helpers import WAIT, wait_until

from routilux_mp._state.client import StoreClient
from routilux_mp._state.launcher import StateServerLauncher
from routilux_mp._state.protocol import Method
from routilux_mp.errors import StateServerLostError


def _launcher(backend: str | None = None) -> StateServerLauncher:
    return StateServerLauncher(max_state_bytes=1000, strict=False, lock_timeout=1.0, backend=backend)


#: backend, what the first increment after a restart returns: the memory backend starts empty again
RESTARTS = [("memory", ([1], 1)), ("sqlite", ([2], 2))]


@pytest.mark.parametrize(("backend", "after"), RESTARTS, ids=[row[0] for row in RESTARTS])
def test_a_client_that_connects_before_the_start_is_served_a_death_shows_and_a_restart_serves_again(
        backend, after) -> None:
    launcher = _launcher(backend)
    try:
        assert stat.S_IMODE(os.stat(launcher.socket_dir).st_mode) == 0o700
        launcher.listen()
        assert stat.S_IMODE(os.stat(launcher.address).st_mode) & 0o077 == 0
        client = StoreClient(launcher.address, launcher.authkey, WAIT, 1.0)
        outcome: dict = {}
        caller = threading.Thread(target=lambda: outcome.update(r=client.call(Method.INCREMENT, "w", "r", {"n": 1})))
        caller.start()  # it connects to the bound socket and waits in the backlog
        sentinel = launcher.start()
        assert sentinel is not None and launcher.start() is None, "started once"
        caller.join(WAIT)
        assert outcome == {"r": ([1], 1)}
        assert not select.select([sentinel], [], [], 0)[0], "alive: the sentinel is quiet"
        pid = launcher.pid
        os.kill(pid, signal.SIGKILL)
        assert select.select([sentinel], [], [], WAIT)[0], "its death shows on the sentinel"
        assert launcher.reap() == f"the state server (pid {pid}) was killed by SIGKILL"
        assert launcher.sentinel is None
        launcher.listen()  # a restart: same address and key, a new server (with the state kept in a file)
        assert launcher.start() is not None and launcher.pid != pid
        again = StoreClient(launcher.address, launcher.authkey, WAIT, 1.0)
        assert again.call(Method.INCREMENT, "w", "r", {"n": 1}) == after
    finally:
        launcher.stop()
        launcher.cleanup()
    assert not os.path.exists(launcher.socket_dir)


def test_stop_escalates_to_sigkill_when_the_server_does_not_exit() -> None:
    launcher = _launcher()
    try:
        launcher.listen()
        launcher.start()
        client = StoreClient(launcher.address, launcher.authkey, WAIT, 1.0)
        assert client.call(Method.META, "w")["status"] == "running", "it serves"
        os.kill(launcher.pid, signal.SIGSTOP)  # deaf to its stdin's EOF and to SIGTERM
        server = psutil.Process(launcher.pid)
        wait_until(lambda: server.status() == psutil.STATUS_STOPPED, "the server to be stopped")
        assert launcher.stop(timeout=0.2) == -signal.SIGKILL
    finally:
        launcher.stop()
        launcher.cleanup()


def test_stopped_before_its_start_the_socket_refuses_clients_at_once() -> None:
    launcher = _launcher()
    try:
        launcher.listen()
        assert launcher.stop() is None and not launcher.started
        assert launcher.start() is None, "nothing to start once the socket is closed"
        # A client that never reached a server may be waiting for a restart: it retries until its deadline.
        client = StoreClient(launcher.address, launcher.authkey, 1.0, 1.0)
        with pytest.raises(StateServerLostError, match="the state server is gone"):
            client.call(Method.META, "w")
    finally:
        launcher.cleanup()


def test_an_unknown_backend_is_refused_before_anything_is_made() -> None:
    with pytest.raises(ValueError, match=r"unknown state backend 'nope'; choose one of 'memory', 'sqlite'"):
        StateServerLauncher(max_state_bytes=1000, strict=False, lock_timeout=1.0, backend="nope")


SUPERVISOR = textwrap.dedent(
    """
    import json, sys
    from routilux_mp._state.launcher import StateServerLauncher

    launcher = StateServerLauncher(max_state_bytes=1000, strict=False, lock_timeout=1.0)
    launcher.listen()
    launcher.start()
    print(json.dumps([launcher.socket_dir, launcher.pid]), flush=True)
    sys.stdin.read()  # until the test closes it
    launcher.stop()
    launcher.cleanup()
    """
)

#: id, which process the test kills, whether the private directory outlives it (the supervisor's own
#: cleanup removes it later). The state server dies with its supervisor before it could remove anything:
#: its guard does (on a cluster there is no local worker guard to do it). "group": SIGTERM to the
#: supervisor's whole process group, as Ray's reaper does when a driver of a private Ray instance dies.
DEATHS = [("supervisor-killed", "supervisor", False), ("server-killed", "server", True),
          ("group-terminated", "group", False)]


@pytest.mark.parametrize(("victim", "kept"), [row[1:] for row in DEATHS], ids=[row[0] for row in DEATHS])
def test_the_private_directory_goes_with_a_dead_supervisor_and_stays_for_a_live_one(python_env, victim,
                                                                                   kept) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISOR], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=python_env, start_new_session=True)
    try:
        socket_dir, server_pid = json.loads(proc.stdout.readline())
        server = psutil.Process(server_pid)
        guards: list = []  # (named as soon as it runs: until then it shows the server's name)
        wait_until(lambda: guards.extend(c for c in server.children() if c.name() == "rmp-state-guard") or guards,
                   "the server to fork its guard")
        (guard,) = guards
        if victim == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            os.kill(proc.pid if victim == "supervisor" else server_pid, signal.SIGKILL)
        for process, what in ((server, "the server"), (guard, "its guard")):
            wait_until(lambda p=process: not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, f"{what}'s end")
        if kept:
            assert os.path.isdir(socket_dir), "a live supervisor keeps its directory (to restart the server)"
            proc.stdin.close()
            assert proc.wait(WAIT) == 0
        wait_until(lambda: not os.path.exists(socket_dir), "the private directory to be removed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        if not proc.stdin.closed:
            proc.stdin.close()
