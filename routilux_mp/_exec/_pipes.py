"""One local worker process and its pipes: non-blocking command writes, framed results, chunked output.

Used by :class:`~routilux_mp._exec.local.LocalProcessBackend` only.

* Command pipe: written without ever blocking (:meth:`Child.queue`): what the
  pipe has no room for waits in the child's outbox, written when the pipe has
  room again. A worker that does not read (stopped, frozen) hangs nothing.
* Result pipe: read with a :class:`~routilux_mp._messages.FrameReader`, many
  frames per call, never blocking.
* stdout / stderr: forwarded as they arrive (:meth:`Child.pump`), complete
  lines at once and a line longer than ``OUTPUT_CHUNK`` in pieces of that
  size, never cut inside a UTF-8 character; the last lines of stderr are kept
  for the message of a crash.
"""

from __future__ import annotations

import collections
import itertools
import os
import subprocess
from typing import Any

from .._messages import FrameReader, frame
from .._process import unread_bytes
from .base import Output, Usage

#: Longest piece of output without a newline a child holds; longer lines are forwarded in pieces of
#: this size, so a flood without newlines costs no memory.
OUTPUT_CHUNK = 64 * 1024
#: Lines of a worker's stderr kept for the message of its crash (each clipped to ``TAIL_LINE_CHARS``).
TAIL_LINES = 40
TAIL_LINE_CHARS = 2000


class Child:
    """One worker process of the local backend: its pipes and what waits to be written to it."""

    __slots__ = (
        "acts",
        "broken",
        "closed",
        "commands",
        "extra",
        "first_since",
        "fusing",
        "killed",
        "outbox",
        "outputs",
        "pid",
        "pidfd",
        "pipe_broken",
        "popen",
        "ps",
        "reader",
        "ready",
        "results",
        "results_closed",
        "sent",
        "slot",
        "stalled",
        "stderr_tail",
        "stopping",
        "take_armed",
        "writing",
    )

    def __init__(self, slot: int, popen: subprocess.Popen, commands: int, results: int, pidfd: int | None) -> None:
        self.slot = slot
        self.popen = popen
        self.pid = popen.pid
        #: Write end of the command pipe (non-blocking), read end of the result pipe.
        self.commands = commands
        self.results = results
        #: Readable once the process exited (Linux >= 5.3); without it, EOF on the result pipe is its death.
        self.pidfd = pidfd
        #: fd -> [stream name, partial line, pipe object] for stdout and stderr.
        self.outputs: dict[int, list] = {}
        #: Reads the result pipe without ever blocking.
        self.reader = FrameReader(results)
        self.results_closed = False
        #: It reported ready (its start-up succeeded).
        self.ready = False
        #: Bytes for the command pipe that it had no room for yet (written when it has).
        self.outbox = bytearray()
        #: Bytes ever queued for the command pipe (written or in ``outbox``).
        self.sent = 0
        #: ``[wire end, bytes]`` of each activation sent and not finished, in order: the first is the one it
        #: runs (or must take next); it has taken an activation once it has read up to its wire end.
        self.acts: collections.deque[tuple[int, int]] = collections.deque()
        #: Bytes of other messages (a flow) sent since the last activation: they travel with the next one.
        self.extra = 0
        #: When the first activation in ``acts`` went first (its take deadline counts from then).
        self.first_since = 0.0
        #: A take check is scheduled; a stall was reported (once per process).
        self.take_armed = False
        self.stalled = False
        #: It runs a fused stage (``_fusion``): its first activation in ``acts`` waits, not yet due.
        self.fusing = False
        #: The dispatcher waits for room in the command pipe (EVENT_WRITE is registered).
        self.writing = False
        #: Why it was killed, if it was; it was asked to stop; its command pipe is broken.
        self.killed: str | None = None
        self.stopping = False
        self.pipe_broken = False
        #: It broke the protocol: nothing more is read from its result pipe.
        self.broken = False
        #: Its descriptors are closed and its slot is free.
        self.closed = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        #: psutil handle (made on first use) for usage() and rss().
        self.ps: Any = None
        os.set_blocking(commands, False)

    # -- the command pipe ---------------------------------------------------------------------------

    def queue(self, data: bytes) -> None:
        """Send one frame: write what the pipe takes now, keep the rest in ``outbox``; never block.

        Raises ``OSError`` when the worker's end of the pipe is gone.
        """
        blob = frame(data)
        self.sent += len(blob)
        if self.outbox:
            self.outbox += blob
            return
        try:
            n = os.write(self.commands, blob)
        except BlockingIOError:
            n = 0
        if n < len(blob):
            self.outbox += memoryview(blob)[n:]

    def flush(self) -> None:
        """Write as much of ``outbox`` as the pipe takes now (``OSError`` if the worker is gone)."""
        while self.outbox:
            try:
                n = os.write(self.commands, self.outbox)
            except BlockingIOError:
                return
            del self.outbox[:n]

    def taken(self, wire_end: int) -> bool:
        """Whether the worker has read everything sent up to ``wire_end`` off its command pipe."""
        return self.sent - len(self.outbox) - unread_bytes(self.commands) >= wire_end

    def queued_bytes(self) -> int:
        """Bytes sent to it that wait behind the activation it runs (its prefetch)."""
        return sum(size for _end, size in itertools.islice(self.acts, 1, None)) + self.extra

    # -- stdout / stderr ----------------------------------------------------------------------------

    def watch_output(self) -> list[int]:
        """Make its stdout/stderr pipes non-blocking and ready to pump; their fds."""
        for stream, pipe in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr)):
            assert pipe is not None
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self.outputs[fd] = [stream, b"", pipe]
        return list(self.outputs)

    def pump(self, fd: int, events: list, final: bool = False) -> bool:
        """Forward the complete lines waiting on one output pipe, and a partial line past ``OUTPUT_CHUNK``.

        Appends :class:`~routilux_mp._exec.base.Output` events. Reads at most
        ``OUTPUT_CHUNK`` bytes per call (16 times that when ``final``), so a
        flood neither grows memory nor starves the dispatcher: the selector
        calls again while more waits. Returns True at EOF (the pipe is then
        closed; unwatch it first).
        """
        entry = self.outputs.get(fd)
        if entry is None:
            return False
        stream, partial, _pipe = entry
        chunks = []
        eof = False
        budget = OUTPUT_CHUNK * (16 if final else 1)
        while budget > 0:
            try:
                data = os.read(fd, budget)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not data:
                eof = True
                break
            chunks.append(data)
            budget -= len(data)
        if chunks:
            buf = partial + b"".join(chunks)
            cut = _cut_point(buf)
            complete, entry[1] = buf[:cut], buf[cut:]
            if complete:
                self._forward(stream, complete.decode("utf-8", "replace"), events)
        if (eof or final) and entry[1]:
            text = entry[1].decode("utf-8", "replace") + "\n"
            entry[1] = b""
            self._forward(stream, text, events)
        return eof

    def close_output(self, fd: int) -> None:
        """Close one output pipe (already unwatched)."""
        entry = self.outputs.pop(fd, None)
        if entry is not None:
            entry[2].close()

    def _forward(self, stream: str, text: str, events: list) -> None:
        """Report ``text`` as output; keep the last lines of stderr for a crash message."""
        if stream == "stderr":  # kept (clipped) for the message of a crash
            self.stderr_tail.extend(line[:TAIL_LINE_CHARS] for line in text.splitlines()[-TAIL_LINES:])
        events.append(Output(self.slot, stream, text))

    # -- usage --------------------------------------------------------------------------------------

    def usage(self) -> Usage:
        """Its pid, RSS and CPU% since the previous call (``None`` values once it is gone)."""
        import psutil

        try:
            ps = self.ps = self.ps or psutil.Process(self.pid)
            return Usage(self.pid, ps.memory_info().rss, ps.cpu_percent(None))
        except psutil.Error:
            return Usage(self.pid, None, None)

    def rss(self) -> int | None:
        """Its resident memory in bytes, ``None`` once it is gone."""
        import psutil

        try:
            ps = self.ps = self.ps or psutil.Process(self.pid)
            return ps.memory_info().rss
        except psutil.Error:
            return None

    # -- the end ------------------------------------------------------------------------------------

    def fds(self) -> list[int]:
        """Every descriptor it still holds open (unwatch them all before closing: fd numbers are reused)."""
        fds = [self.results, self.commands, *self.outputs]
        if self.pidfd is not None:
            fds.append(self.pidfd)
        return fds

    def close(self) -> None:
        """Release every descriptor (they must be unwatched already)."""
        for fd in (self.commands, self.results):
            os.close(fd)
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        for _stream, _partial, pipe in self.outputs.values():
            pipe.close()
        self.outputs.clear()

    def __repr__(self) -> str:
        return f"<Child slot={self.slot} pid={self.pid} acts={len(self.acts)}>"


def _cut_point(buf: bytes) -> int:
    """Where to cut ``buf`` for forwarding: after its last newline, or, for a long line, at a character boundary."""
    cut = buf.rfind(b"\n") + 1
    if len(buf) - cut < OUTPUT_CHUNK:
        return cut
    cut = len(buf)  # a long line: forward it in pieces, never half a character
    for back in range(1, min(4, len(buf)) + 1):
        byte = buf[-back]
        if byte & 0xC0 != 0x80:  # the last byte that starts a character
            if back < (2 if byte < 0xE0 else 3 if byte < 0xF0 else 4) and byte >= 0xC0:
                cut -= back  # not all its bytes are here yet: they go with the next piece
            break
    return cut
