"""The supervisor's side of process life: start, watch, replace and stop children.

``ProcessPool`` is a mixin of :class:`~routilux_mp._supervisor.Supervisor`; its
methods run in the dispatcher thread (the one thread that spawns children, see
``_process``) with the supervisor's lock held unless they say otherwise.

* Start: the supervisor binds the state server's socket, starts the workers,
  and starts the state server on that socket once the first worker is ready
  (clients that connect earlier wait in the socket's backlog). Nothing waits.
* Watch: every child's pidfd (its death), result pipe and stdout/stderr pipes
  sit in one epoll selector; output is forwarded line by line (a line longer
  than ``OUTPUT_CHUNK`` in pieces of that size). Command pipes are written
  without blocking: what a pipe has no room for waits in the process's outbox
  until the selector says the pipe has room.
* Hangs and protocol breaks: see ``_guards``.
* Replace: a dead worker's first held activation fails with a
  ``WorkerCrashedError`` saying how it died and why that likely happened; the
  rest go back to their queues. Workers that die while starting are respawned
  with a growing delay; after ``MAX_START_FAILURES`` in a row the runtime is
  broken, with their error output in the message.
* Stop: workers first (stop message, join, SIGTERM, SIGKILL, each group), the
  state server last (``_guards`` kills them from the caller's thread if a
  done-callback keeps the dispatcher from doing it).
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import wait as wait_for

from . import _process
from ._ledger import _Act, _Proc
from ._messages import STOP, ServerConfig, _WorkerConfig, describe_exit, dumps, error_data, likely_cause, write_frame
from .errors import (
    RoutiluxError,
    RuntimeBrokenError,
    WorkerCrashedError,
    WorkerMemoryError,
)

#: Seconds the state server gets to exit after its stdin closes, before SIGTERM / SIGKILL.
STATE_STOP_TIMEOUT = 5.0
#: Seconds after the workers' start at which the state server starts, if no worker was ready sooner.
STATE_START_DELAY = 0.3
#: Seconds a worker gets after SIGTERM before SIGKILL (shutdown and timeouts).
TERM_GRACE = 2.0
#: Consecutive start-up failures of worker processes before the runtime gives up.
MAX_START_FAILURES = 5
#: Longest pause between respawns of a worker that keeps dying at start-up.
MAX_RESPAWN_DELAY = 5.0
#: How often worker RSS is sampled when a memory limit is set.
MEMORY_SAMPLE_INTERVAL = 0.1
#: Longest piece of output without a newline the supervisor holds; longer lines are forwarded in
#: pieces of this size, so a flood without newlines costs no memory.
OUTPUT_CHUNK = 64 * 1024

logger = logging.getLogger("routilux_mp.runtime")


class ProcessPool:
    """Process life for the supervisor (a mixin: it uses the supervisor's ledger and timers)."""

    def _start(self) -> None:
        """Bind the state server's socket and start the workers; wait for none of them.

        The supervisor binds the socket itself and later hands it to the state
        server, so clients may connect at once: the kernel holds their
        connections until the server accepts them. The state server starts once
        the first worker is ready (or after ``STATE_START_DELAY``), so on a
        small machine it does not compete with the workers' start-up for CPU.
        """
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.state_address)
            os.chmod(self.state_address, 0o600)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._state_listener = listener
        errors = [error for index in range(self.processes) if (error := self._spawn_worker(index))]
        if len(errors) == self.processes:
            self._break(RuntimeBrokenError, f"no worker process could be started: {errors[-1]}. Check that "
                                            f"{sys.executable} runs, and the limits on processes (ulimit -u) "
                                            "and memory")
        self._add_timer(time.monotonic() + STATE_START_DELAY, "state-start", None)

    def _start_state_server(self) -> None:
        """Spawn the state server on the bound socket (once)."""
        listener = self._state_listener
        if listener is None:
            return
        self._state_listener = None
        try:
            popen = _process.spawn(
                "routilux_mp._state_server", "routilux-mp state-server", pass_fds=(listener.fileno(),),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            )
            config = ServerConfig(self.state_address, listener.fileno(), self._authkey, os.getpid(),
                                  self._sys_path, self.max_state_bytes, self.strict_state, self.lock_timeout)
        except OSError as exc:
            self._state_lost(f"the state server could not be started ({exc})")
            return
        finally:
            listener.close()
        self.state_popen = popen
        assert popen.stdin is not None and popen.stdout is not None
        write_frame(popen.stdin.fileno(), dumps(config))
        # Its death shows on its pidfd, or (without pidfd support) as EOF on its stdout.
        self._state_pidfd = _process.open_pidfd(popen.pid)
        self._watch(self._state_pidfd if self._state_pidfd is not None else popen.stdout.fileno(), "state", None)

    def _close_state_listener(self) -> None:
        """Close the state server's socket if the server never started to take it over."""
        if self._state_listener is not None:
            self._state_listener.close()
            self._state_listener = None

    def _spawn_worker(self, index: int) -> str | None:
        """Start worker ``index``; the error if no process could be started."""
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            popen = _process.spawn("routilux_mp._worker", f"routilux-mp worker {index}",
                                   pass_fds=(cmd_r, res_w, self._life_r))
        except OSError as exc:
            for fd in (cmd_r, cmd_w, res_r, res_w):
                os.close(fd)
            why = f"worker {index}: could not start a process: {type(exc).__name__}: {exc}"
            self._start_failed(index, why)
            return why
        os.close(cmd_r)
        os.close(res_w)
        proc = _Proc(index, popen, cmd_w, res_r, _process.open_pidfd(popen.pid), time.monotonic())
        for stream, pipe in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            assert pipe is not None
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            proc.outputs[fd] = [stream, b"", pipe]
            self._watch(fd, "output", proc)
        self._watch(res_r, "results", proc)
        if proc.pidfd is not None:
            self._watch(proc.pidfd, "death", proc)
        config = _WorkerConfig(index, os.getpid(), self._sys_path, self.state_address, self._authkey,
                               self.state_timeout, self.lock_timeout, self.max_worker_rss,
                               self.max_activations_per_process)
        try:
            proc.queue(dumps(config))  # a fresh pipe has room for it
        except OSError:
            proc.broken_pipe = True
        self.procs[index] = proc
        if self.max_worker_rss is not None and index == 0 and not any(t[2] == "memory" for t in self.timers):
            self._add_timer(time.monotonic() + MEMORY_SAMPLE_INTERVAL, "memory", None)
        return None

    def _watch(self, fd: int, kind: str, proc: _Proc | None) -> None:
        self._selector.register(fd, selectors.EVENT_READ, (kind, proc))

    def _unwatch(self, fd: int) -> None:
        """Stop waiting on ``fd`` (always before closing it: fd numbers are reused)."""
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _pump(self, proc: _Proc, final: bool = False) -> None:
        """Forward what a process wrote to stdout/stderr (everything, when ``final``)."""
        for fd in list(proc.outputs):
            self._pump_fd(proc, fd, final)

    def _pump_fd(self, proc: _Proc, fd: int, final: bool = False) -> None:
        """Forward the complete lines waiting on one output pipe, and a partial line past ``OUTPUT_CHUNK``.

        Reads at most ``OUTPUT_CHUNK`` bytes per call (16 times that when
        ``final``), so a flood neither grows memory nor starves the dispatcher:
        the selector calls again while more waits.
        """
        slot = proc.outputs.get(fd)
        if slot is None:
            return
        stream, partial, pipe = slot
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
            cut = buf.rfind(b"\n") + 1
            if len(buf) - cut >= OUTPUT_CHUNK:  # a long line: forward it in pieces, never half a character
                cut = len(buf)
                for back in range(1, min(4, len(buf)) + 1):
                    byte = buf[-back]
                    if byte & 0xC0 != 0x80:  # the last byte that starts a character
                        if back < (2 if byte < 0xE0 else 3 if byte < 0xF0 else 4) and byte >= 0xC0:
                            cut -= back  # not all its bytes are here yet: they go with the next piece
                        break
            complete, slot[1] = buf[:cut], buf[cut:]
            if complete:
                self._forward(proc, stream, complete.decode("utf-8", "replace"))
        if (eof or final) and slot[1]:
            text = slot[1].decode("utf-8", "replace") + "\n"
            slot[1] = b""
            self._forward(proc, stream, text)
        if eof:
            del proc.outputs[fd]
            self._unwatch(fd)
            pipe.close()

    def _forward(self, proc: _Proc, stream: str, text: str) -> None:
        if stream == "stderr":  # kept (clipped) for the message of a crash
            proc.stderr_tail.extend(line[:2000] for line in text.splitlines()[-40:])
        self.output(stream, text)

    def _on_death(self, proc: _Proc) -> None:
        self._read_results(proc)
        if self.procs[proc.index] is not proc:  # handled while draining (no pidfd)
            return
        _process.signal_group(proc.pid, signal.SIGKILL)  # anything it started goes too
        try:
            code = proc.popen.wait(TERM_GRACE)
        except subprocess.TimeoutExpired:
            return  # not dead after all; the pidfd will fire again
        self._pump(proc, final=True)
        self.procs[proc.index] = None
        self._close_proc(proc)
        if self.broken is None:
            self.pusher.push("release_pid", proc.pid)
        planned = proc.exiting is not None or proc.stopping
        exitcode, signame = describe_exit(code)
        inflight = list(proc.inflight)
        proc.inflight.clear()
        if inflight and proc.ready and not planned and not inflight[0].resolved:
            running = inflight.pop(0)
            self.inflight -= 1
            running.rt.running -= 1
            running.crashes += 1
            running.rt.stats.errors += 1
            self._on_failure(running, self._crasherror_data(proc, running, exitcode, signame))
        self._requeue(proc, inflight)
        if self.stop_requested or self.closed and self.active_jobs == 0:
            return
        if not proc.ready and not planned:
            tail = "\n".join(proc.stderr_tail)
            how = f"({'signal ' + signame if signame else 'exit code ' + str(exitcode)})"
            self._start_failed(
                proc.index,
                (proc.hung or f"worker {proc.index} (pid {proc.pid}) exited during start-up {how}")
                + (f"; its last error output:\n{tail}" if tail else ""),
            )
        else:
            self._respawn(proc.index)

    def _close_proc(self, proc: _Proc) -> None:
        """Release every descriptor of a dead process (unwatched first: fd numbers are reused)."""
        fds = [proc.results, proc.commands, *proc.outputs]
        if proc.pidfd is not None:
            fds.append(proc.pidfd)
        for fd in fds:
            self._unwatch(fd)
        for fd in (proc.commands, proc.results):
            os.close(fd)
        if proc.pidfd is not None:
            os.close(proc.pidfd)
            proc.pidfd = None
        for _stream, _partial, pipe in proc.outputs.values():
            pipe.close()
        proc.outputs.clear()

    def _respawn(self, index: int) -> None:
        if self.procs[index] is None and not self.stop_requested and self.broken is None:
            self.restarts[index] += 1
            self._spawn_worker(index)

    def _start_failed(self, index: int, why: str) -> None:
        """Count a worker that could not start: respawn it later, or give up after too many in a row."""
        self.start_failures += 1
        if self.start_failures >= MAX_START_FAILURES:
            self._break(RuntimeBrokenError, f"worker processes failed to start {self.start_failures} times "
                                            f"in a row; giving up. Last failure: {why}")
        else:
            delay = min(MAX_RESPAWN_DELAY, 0.1 * 2 ** (self.start_failures - 1))
            self._add_timer(time.monotonic() + delay, "respawn", index)

    def _crasherror_data(self, proc: _Proc, act: _Act, exitcode: int | None, signame: str | None) -> dict:
        how = f"was killed by {signame}" if signame else f"exited with code {exitcode}"
        cause = likely_cause(exitcode, signame)
        message = (
            f"worker {proc.index} (pid {proc.pid}) {how} while running routine {act.rt.rid!r} "
            f"of worker {act.rt.inst.worker_id!r}: {cause}. The process was replaced; other jobs carry on"
        )
        tail = "\n".join(proc.stderr_tail)
        return error_data(WorkerCrashedError, message, traceback=tail, exitcode=exitcode, signal=signame,
                      pid=proc.pid, process=proc.index, crashed=True)

    def _kill_activation(self, act: _Act, cls: type[RoutiluxError], message: str, sig: int) -> None:
        """Fail ``act`` now and kill the process running it (it is replaced once dead)."""
        proc = act.proc
        assert proc is not None
        act.resolved = True
        proc.exiting = proc.exiting or f"killed: {cls.__name__}"
        act.rt.stats.errors += 1
        _process.signal_group(proc.pid, sig)
        if sig != signal.SIGKILL:
            self._add_timer(time.monotonic() + TERM_GRACE, "kill", proc)
        self._on_failure(act, error_data(cls, message, pid=proc.pid, process=proc.index))

    def _state_died(self) -> None:
        popen = self.state_popen
        assert popen is not None
        fd = self._state_pidfd if self._state_pidfd is not None else popen.stdout.fileno()
        self._unwatch(fd)
        if self._state_pidfd is not None:
            os.close(self._state_pidfd)
            self._state_pidfd = None
        try:
            code = popen.wait(TERM_GRACE)
        except subprocess.TimeoutExpired:
            code = None  # it closed its stdout but lives on: treat it as lost all the same
        if self.stop_requested:
            return
        exitcode, signame = describe_exit(code)
        how = f"was killed by {signame}" if signame else f"exited with code {exitcode}"
        self._state_lost(f"the state server (pid {popen.pid}) {how}")

    def _check_memory(self) -> None:
        import psutil

        limit = self.kill_worker_rss
        if limit is None:
            return
        for proc in self.procs:
            if proc is None or not proc.inflight or proc.inflight[0].resolved:
                continue
            try:
                if proc.ps is None:
                    proc.ps = psutil.Process(proc.pid)
                rss = proc.ps.memory_info().rss
            except psutil.Error:
                continue
            if rss > limit:
                act = proc.inflight[0]
                self._kill_activation(
                    act, WorkerMemoryError,
                    f"worker {proc.index} (pid {proc.pid}) used {rss // 2**20} MiB while running routine "
                    f"{act.rt.rid!r}, over the hard limit of {limit // 2**20} MiB; it was killed and replaced. "
                    "Process less data per activation, or raise Runtime(max_worker_rss=...)",
                    signal.SIGKILL,
                )

    def _stop_children(self) -> None:
        procs = [p for p in self.procs if p is not None]
        stop = dumps(STOP)
        for proc in procs:
            proc.stopping = True
            try:  # never blocks: a worker that does not read gets SIGTERM after the grace
                proc.queue(stop)
                proc.flush()
            except OSError:
                pass
        deadline = time.monotonic() + self.stop_grace
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in procs if p.popen.poll() is None]
            if not alive:
                break
            if sig is not None:
                for proc in alive:
                    _process.signal_group(proc.pid, sig)
                deadline = time.monotonic() + TERM_GRACE
            self._wait_exit(alive, deadline)
        for proc in procs:
            _process.signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.popen.wait(TERM_GRACE)
            except subprocess.TimeoutExpired:
                logger.error("worker %d (pid %d) survived SIGKILL", proc.index, proc.pid)
            self._pump(proc, final=True)
            self._close_proc(proc)
            self.procs[proc.index] = None
        self._close_state_listener()
        popen = self.state_popen
        if popen is not None:
            def close_stdin() -> None:
                if popen.stdin is not None:
                    popen.stdin.close()

            _process.stop_process(popen, join_timeout=STATE_STOP_TIMEOUT, term_timeout=TERM_GRACE, ask=close_stdin)
            if popen.stdout is not None:
                popen.stdout.close()
        if self._state_pidfd is not None:
            self._unwatch(self._state_pidfd)
            os.close(self._state_pidfd)
            self._state_pidfd = None
        self._selector.close()
        for fd in (self._wake_r, self._wake_w, self._life_r, self._life_w):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _wait_exit(self, procs: list[_Proc], deadline: float) -> None:
        """Wait until ``procs`` exit or ``deadline`` passes, forwarding their output meanwhile."""
        while True:
            alive = [p for p in procs if p.popen.poll() is None]
            remaining = deadline - time.monotonic()
            if not alive or remaining <= 0:
                return
            fds: list[int] = []
            for proc in alive:
                fds.extend(proc.outputs)
                if proc.pidfd is not None:
                    fds.append(proc.pidfd)
            if not any(p.pidfd is not None for p in alive):
                remaining = min(remaining, 0.05)  # no pidfd on this system: check exits often
            for fd in wait_for(fds, remaining) if fds else []:
                for proc in alive:
                    if fd in proc.outputs:
                        self._pump(proc)
            if not fds:
                time.sleep(min(remaining, 0.05))
