"""The Ray side of a worker lane: a nanny actor that runs the ordinary worker process and watches it.

:class:`~routilux_mp._exec.ray.RayBackend` places one nanny actor per lane
on the cluster. The nanny's :meth:`LaneNanny.run` call starts the worker
(``_raychild``: the same activation loop as a local worker) as its own child
process and waits for it, so the supervisor learns its exact exit code or
signal, which Ray alone never reports for an actor. Nothing per activation
goes through Ray: the nanny opens two authenticated connections to the
supervisor (the HMAC challenge of ``multiprocessing.connection`` runs before
anything is unpickled):

* the *wire*, handed to the worker process: frames of the wire protocol
  (``_messages``), exactly what a local worker reads from and writes to its
  pipes;
* the *control* connection, kept by the nanny: the worker's stdout and
  stderr, its memory and CPU use, kill requests from the supervisor, and
  finally ``("exit", returncode)``, sent after the last byte of output.

A control connection that ends means the supervisor is gone: the nanny kills
the worker's process group. A nanny that dies (``ray.kill``, its node lost)
closes the worker's life pipe: the worker's watchdog kills its group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
from multiprocessing.connection import Client, Connection
from typing import Any

from .. import _process
from ._pipes import OUTPUT_CHUNK, _cut_point
from ._raychild import NODE_VARIABLE

#: Seconds a worker gets after SIGTERM before SIGKILL (a kill with a grace).
TERM_GRACE = 2.0
#: Seconds between two reports of the worker's memory and CPU use (the hard memory limit is checked on them).
USAGE_INTERVAL = 0.1
#: Seconds the nanny waits for its output readers once the worker is gone (a grandchild may hold the pipes).
DRAIN_TIMEOUT = 2.0


def _connect(address: tuple[str, int], authkey: bytes) -> Connection:
    """An authenticated connection to the supervisor, with Nagle's algorithm off (frames are small)."""
    conn = Client(tuple(address), authkey=authkey)
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:  # (the option is the socket's, not the fd's)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


class LaneNanny:
    """One lane's actor: starts the worker process, forwards its output and usage, reports how it ended.

    Made a Ray actor by :class:`~routilux_mp._exec.ray.RayBackend`
    (``ray.remote(LaneNanny).options(...)``), so this module needs Ray only
    where it runs.
    """

    def __init__(self) -> None:
        #: The worker process of the current run (``None`` between runs).
        self.popen: subprocess.Popen | None = None
        #: Serializes writes on the control connection (output readers, usage reporter, the run itself).
        self.send_lock = threading.Lock()

    def run(self, address: tuple[str, int], authkey: bytes, slot: int, gen: int) -> int | None:
        """Start the worker of ``slot`` (generation ``gen``), serve it until it exits; its return code.

        ``None`` when no process could be started (the reason went to the
        supervisor on the control connection).
        """
        import ray

        ctx = ray.get_runtime_context()
        hello = {"slot": slot, "gen": gen, "nanny_pid": os.getpid(), "node_id": ctx.get_node_id(),
                 "actor_id": ctx.get_actor_id(), "ip": ray.util.get_node_ip_address()}
        ctrl = _connect(address, authkey)
        ctrl.send(("nanny", hello))
        wire = _connect(address, authkey)
        wire.send(("wire", hello))
        os.environ[NODE_VARIABLE] = hello["node_id"]  # the worker's state locks are owned by (node, pid)
        life_r, life_w = os.pipe()  # the worker's watchdog: EOF when this process dies, however it dies
        try:
            popen = _process.spawn("routilux_mp._exec._raychild", f"routilux-mp worker {slot}",
                                   pass_fds=(wire.fileno(), wire.fileno(), life_r))
        except OSError as exc:
            why = f"could not start a process on node {hello['ip']}: {type(exc).__name__}: {exc}"
            self._send(ctrl, ("failed", why))
            ctrl.close()
            return None
        finally:
            os.close(life_r)
            wire.close()  # the worker holds it now: its EOF is the worker's end
        self.popen = popen
        done = threading.Event()
        readers = [threading.Thread(target=self._forward, args=(ctrl, stream, pipe), daemon=True)
                   for stream, pipe in (("stdout", popen.stdout), ("stderr", popen.stderr))]
        helpers = [threading.Thread(target=self._report_usage, args=(ctrl, popen.pid, done), daemon=True),
                   threading.Thread(target=self._obey, args=(ctrl, popen, done), daemon=True)]
        for thread in readers + helpers:
            thread.start()
        code = popen.wait()
        done.set()
        _process.signal_group(popen.pid, signal.SIGKILL)  # whatever it started goes with it
        for thread in readers:
            thread.join(DRAIN_TIMEOUT)
        helpers[0].join(DRAIN_TIMEOUT)
        self._send(ctrl, ("exit", code))
        helpers[1].join(DRAIN_TIMEOUT)  # the supervisor closes the control connection on ("exit", ...)
        ctrl.close()
        os.close(life_w)
        self.popen = None
        return code

    def _send(self, ctrl: Connection, message: Any) -> None:
        """Send one message to the supervisor (any thread); a gone supervisor is noticed by ``_obey``."""
        with self.send_lock, contextlib.suppress(OSError, ValueError):
            ctrl.send(message)

    def _forward(self, ctrl: Connection, stream: str, pipe: Any) -> None:
        """Send what the worker writes on one of its output pipes, whole lines (or long pieces), until EOF."""
        fd = pipe.fileno()
        partial = b""
        while True:
            try:
                data = os.read(fd, OUTPUT_CHUNK)
            except OSError:
                data = b""
            if not data:
                break
            buf = partial + data
            cut = _cut_point(buf)
            if cut:
                self._send(ctrl, ("out", stream, buf[:cut].decode("utf-8", "replace")))
            partial = buf[cut:]
        if partial:
            self._send(ctrl, ("out", stream, partial.decode("utf-8", "replace") + "\n"))
        pipe.close()

    def _report_usage(self, ctrl: Connection, pid: int, done: threading.Event) -> None:
        """Report the worker's RSS and CPU seconds every ``USAGE_INTERVAL`` while it runs."""
        import psutil

        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            return
        while True:  # the first report at once: it arrives long before the worker's Ready (its imports take longer)
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    usage = ("usage", proc.memory_info().rss, times.user + times.system)
            except psutil.Error:
                return
            self._send(ctrl, usage)
            if done.wait(USAGE_INTERVAL):
                return

    def _obey(self, ctrl: Connection, popen: subprocess.Popen, done: threading.Event) -> None:
        """Carry out the supervisor's kill requests; the supervisor gone (EOF) kills the worker's group."""
        while True:
            try:
                message = ctrl.recv()
            except (EOFError, OSError):
                if not done.is_set():  # the supervisor is gone: never outlive it
                    _process.signal_group(popen.pid, signal.SIGKILL)
                return
            if message[0] == "kill" and not done.is_set():
                hard = message[1]
                _process.signal_group(popen.pid, signal.SIGKILL if hard else signal.SIGTERM)
                if not hard:
                    timer = threading.Timer(TERM_GRACE, self._escalate, args=(popen, done))
                    timer.daemon = True
                    timer.start()

    @staticmethod
    def _escalate(popen: subprocess.Popen, done: threading.Event) -> None:
        """SIGKILL a worker that outlived its SIGTERM by ``TERM_GRACE``."""
        if not done.is_set():
            _process.signal_group(popen.pid, signal.SIGKILL)
