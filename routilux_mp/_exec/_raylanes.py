"""The driver's side of one Ray lane (:class:`Lane`) and the listener its nanny connects to (:class:`Listener`).

Used by :class:`~routilux_mp._exec.ray.RayBackend` only, as ``_pipes`` is by
the local backend.

* Listener: a TCP socket on this machine's cluster address; every connection
  must pass the HMAC challenge of ``multiprocessing.connection`` with a random
  key, both ways, within ``HANDSHAKE_TIMEOUT``, before anything it sends is
  unpickled; then it says who it is (a nanny's control connection, or a
  worker's wire) and is handed over.
* Lane: one run of a worker: its nanny's call, its two connections, the
  frames that wait for room on the wire, and the reading of the wire (the
  same frames as a local worker's result pipe, plus TOOK).
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

from .._messages import (
    FrameReader,
    _Exiting,
    _Ready,
    _Result,
    _WorkerConfig,
    dumps,
    frame,
    read_messages,
)
from ._pipes import TAIL_LINE_CHARS, TAIL_LINES
from .base import Broken, Exiting, Finished, Output, Ready, Usage, WorkerEvent, WorkerSettings
from .local import PIPE_BUDGET

#: Seconds a connecting nanny has to pass the challenge and say who it is.
HANDSHAKE_TIMEOUT = 10.0


class Listener:
    """Where nannies connect to: authenticates each connection in a thread of its own, then hands it on."""

    def __init__(self, host: str, hand_over: Callable[[tuple], None]) -> None:
        """Listen on ``(host, a free port)``; ``hand_over(("conn", role, hello, conn))`` gets each connection."""
        #: The key every connection must prove it holds (sent to nannies inside Ray's own authenticated calls).
        self.authkey = os.urandom(32)
        self._server = socket.create_server((host, 0))
        self.address = self._server.getsockname()[:2]
        self._hand_over = hand_over
        self._thread = threading.Thread(target=self._accept, name="routilux-mp ray listener", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        """The thread: authenticate each connection, read who it is, hand it over."""
        timeout = struct.pack("ll", int(HANDSHAKE_TIMEOUT), 0)
        while True:
            try:
                sock, _peer = self._server.accept()
            except OSError:
                return  # closed
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames are small: no Nagle delay
            conn = Connection(sock.detach())
            try:
                deliver_challenge(conn, self.authkey)
                answer_challenge(conn, self.authkey)
                role, hello = conn.recv()  # authenticated: only a nanny of ours gets here
            except Exception:  # noqa: BLE001 - a stranger or a broken peer: drop it, read nothing more
                conn.close()
                continue
            self._hand_over(("conn", role, hello, conn))

    def close(self) -> None:
        """Stop listening and wait for the thread."""
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the thread (close alone does not)
        self._server.close()
        self._thread.join(HANDSHAKE_TIMEOUT)


class Lane:
    """One run of a worker in a slot: its nanny's call, its two connections, what waits to be written."""

    def __init__(self, slot: int, gen: int, actor: Any, ref: Any) -> None:
        self.slot = slot
        self.gen = gen
        self.actor = actor
        #: The nanny's ``run`` call: its result is the worker's return code; an error, the nanny is lost.
        self.ref = ref
        self.ctrl: Connection | None = None
        #: The wire (non-blocking fd owned by ``wire_conn``) and its frame reader.
        self.wire_conn: Connection | None = None
        self.wire: int | None = None
        self.reader: FrameReader | None = None
        #: Frames not written yet (the wire had no room).
        self.outbox = bytearray()
        #: Sizes of the activations sent and not finished; bytes of other messages since the last one.
        self.acts: collections.deque[int] = collections.deque()
        self.extra = 0
        #: Activations of ``acts`` the worker took (read); when the first one went first; a stall was reported.
        self.took = 0
        self.first_since = 0.0
        self.stalled = False
        self.ready = False
        #: Who the worker is: its pid, its nanny's pid, node and actor.
        self.pid: int | None = None
        self.info: dict[str, Any] = {}
        #: Its latest usage report: RSS bytes, CPU seconds; and the CPU seconds at the previous usage().
        self.rss: int | None = None
        self.cpu: float | None = None
        self.cpu_seen: tuple[float, float] | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        #: Why it was killed; it was asked to stop; it broke the protocol; its slot is free.
        self.killed: str | None = None
        self.stopping = False
        self.broken = False
        self.closed = False
        #: EVENT_WRITE is registered for the wire; the control connection ended.
        self.writing = False
        self.ctrl_eof = False
        #: When to give up waiting (for Ray's verdict, for a kill to be carried out).
        self.deadline: float | None = None

    def where(self) -> str:
        """``" (Ray actor abc on node 10.0.0.2)"``, for the cause of a death."""
        if not self.info:
            return " (its Ray actor never connected back)"
        return f" (Ray actor {self.info['actor_id'][:16]} on node {self.info['ip']})"

    def queue(self, blob: bytes) -> None:
        """Write a frame now as far as the wire takes it, the rest to ``outbox``; ``OSError`` if it is gone."""
        if self.outbox or self.wire is None:
            self.outbox += blob
            return
        try:
            n = os.write(self.wire, blob)
        except BlockingIOError:
            n = 0
        if n < len(blob):
            self.outbox += memoryview(blob)[n:]

    def flush(self) -> None:
        """Write as much of ``outbox`` as the wire takes now (``OSError`` if the worker is gone)."""
        while self.outbox and self.wire is not None:
            try:
                n = os.write(self.wire, self.outbox)
            except BlockingIOError:
                return
            del self.outbox[:n]

    def attach_wire(self, conn: Connection, settings: WorkerSettings) -> bool:
        """Its worker's wire connected: send its config (its parent is its nanny); True if bytes wait for room."""
        s = settings
        config = _WorkerConfig(self.slot, self.info["nanny_pid"], s.sys_path, s.state_address, s.authkey,
                               s.state_timeout, s.lock_timeout, s.max_rss, s.max_activations)
        self.wire_conn, self.wire, self.reader = conn, conn.fileno(), FrameReader(conn.fileno())
        self.outbox[:0] = frame(dumps(config))  # before anything sent while it was starting
        try:
            self.flush()
        except OSError:  # the worker is gone; its death comes from its nanny
            self.outbox.clear()
        return bool(self.outbox)

    def offer(self, data: bytes, activation: bool) -> bool:
        """Send a pickled message if its prefetch budget allows (the backend's lock held); False if not sent."""
        queued = sum(self.acts) - (self.acts[0] if self.acts else 0) + self.extra
        if self.acts and (self.outbox or queued + len(data) > PIPE_BUDGET):
            return False  # busy: it reads this only after the activation it runs
        try:
            self.queue(frame(data))
        except OSError:  # the worker is gone; its death comes from its nanny
            return False
        if activation:
            self.acts.append(len(data) + self.extra)
            self.extra = 0
            if len(self.acts) == 1:
                self.first_since = time.monotonic()
        else:
            self.extra += len(data)
        return True

    def output(self, stream: str, text: str) -> Output:
        """What its worker wrote, as its nanny forwarded it (the end of stderr is kept for a crash report)."""
        if stream == "stderr":
            self.stderr_tail.extend(line[:TAIL_LINE_CHARS] for line in text.splitlines())
        return Output(self.slot, stream, text)

    def read(self, events: list[WorkerEvent], lock: threading.Lock) -> bool:
        """Turn what the worker wrote on the wire into events (``lock`` guards ``acts``).

        Returns True when nothing more is to be read: EOF, or bytes that are
        not ours (then :class:`~routilux_mp._exec.base.Broken` is reported).
        """
        reader = self.reader
        assert reader is not None
        messages, corrupt = read_messages(reader)
        for message in messages:
            kind = type(message)
            if message is None:  # TOOK: it read its next activation
                self.took += 1
            elif kind is _Result:
                with lock:
                    if self.acts:
                        self.acts.popleft()
                        self.first_since = time.monotonic()
                    self.took = max(0, self.took - 1)
                events.append(Finished(self.slot, message))
            elif kind is _Ready:
                self.pid, self.ready = message.pid, True
                events.append(Ready(self.slot, message.pid))
            elif kind is _Exiting:
                with lock:
                    self.acts.clear()
                    self.took = 0
                events.append(Exiting(self.slot, message.reason))
            else:
                corrupt = f"an unexpected message ({kind.__name__})"
                break
        if corrupt is not None:
            self.broken = True
            events.append(Broken(self.slot, f"sent {corrupt} on its result pipe"))
        return corrupt is not None or reader.eof

    def usage(self, now: float) -> Usage:
        """Its pid, RSS and CPU% since the previous call, from its nanny's latest report."""
        percent = None
        if self.cpu is not None:
            if self.cpu_seen is not None and now > self.cpu_seen[0]:
                percent = 100.0 * (self.cpu - self.cpu_seen[1]) / (now - self.cpu_seen[0])
            self.cpu_seen = (now, self.cpu)
        return Usage(self.pid, self.rss, percent)
