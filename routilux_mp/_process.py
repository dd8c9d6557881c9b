"""Starting, watching and stopping our child processes (workers and the state server).

Children are fresh interpreters started with ``subprocess`` (never ``fork``,
never ``multiprocessing`` spawn), so they do not re-run the user's
``__main__``: the seed page's scripts have no main guard. Each child leads its
own session and process group, so a terminal's Ctrl-C does not reach it and
``killpg`` also stops whatever it started.

Parent death is noticed twice over. A watchdog thread in the child blocks on a
pipe whose other end only the supervisor holds (EOF -> exit). The state server
arms ``PR_SET_PDEATHSIG`` as a second line (it fires when the *thread* that
spawned the child exits, so the runtime spawns every child from its dispatcher
thread, which lives until shutdown). A worker must take its whole process group
with it (whatever logic started), which a kernel SIGKILL of the worker alone
would prevent, so its second line is a *group guard*: a tiny process forked from
the worker before it runs any logic, blocked on the same pipe. Either one that
sees EOF first removes the runtime's socket directory and kills the worker's
descendants and group (the guard is in the group; it dies with it, or with the
worker through its own ``PR_SET_PDEATHSIG``). The guard runs even while logic
holds the GIL in C code, where no thread of the worker could. (Workers are not
made ``PR_SET_CHILD_SUBREAPER``: orphans of daemonizing logic would then stay
zombies of the worker until it exits, and reaping them could steal the exit
status of children logic waits for.)

The state server, killed by ``PR_SET_PDEATHSIG`` as its supervisor dies, has a
guard of its own (``start_dir_guard``) that removes the runtime's private
directory then: on a cluster no local worker guard is there to do it.
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import sys
import termios
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

# ``subprocess`` and ``shutil`` are imported where they are used: a worker imports this module but never
# starts a process, and seldom removes a directory (its start-up is shorter without them).

#: Exit code of a child that noticed its supervisor died.
EXIT_PARENT_GONE = 70
#: Prefix of the runtime's private temporary directory (it holds the state server's socket).
SOCKET_DIR_PREFIX = "routilux-mp-"

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: ``subprocess.DEVNULL`` and ``subprocess.PIPE``, for :func:`spawn`'s defaults without importing ``subprocess``.
DEVNULL, PIPE = -3, -1


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # The program's own symbols include libc's. (ctypes.util.find_library would
        # run `ldconfig -p` in a subprocess: tens of milliseconds at every start.)
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def child_env() -> dict[str, str]:
    """The environment of a child: ours, with this package importable first."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + path if path else "")
    return env


def spawn(
    module: str,
    title: str,
    *,
    pass_fds: Sequence[int] = (),
    stdin: int | None = DEVNULL,
    stdout: int | None = PIPE,
    stderr: int | None = PIPE,
) -> subprocess.Popen:
    """Start ``python -c "import module; module.main()" title *fds`` in its own session.

    ``title`` shows in ``ps`` (e.g. ``routilux-mp worker 2``); the file
    descriptors are passed on and their numbers appended to ``sys.argv``.
    """
    import subprocess

    code = f"import {module} as _m; _m.main()"
    args = [sys.executable, "-c", code, title, *(str(fd) for fd in pass_fds)]
    return subprocess.Popen(
        args,
        pass_fds=tuple(pass_fds),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        env=child_env(),
        close_fds=True,
    )


def open_pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits (Linux >= 5.3), else ``None``."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return opener(pid)
    except OSError:
        return None


def signal_group(pid: int, sig: int) -> bool:
    """Send ``sig`` to the process group led by ``pid``; False when it is already gone."""
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        try:
            os.kill(pid, sig)
            return True
        except OSError:
            return False


def stop_process(
    popen: subprocess.Popen,
    *,
    join_timeout: float,
    term_timeout: float,
    ask: Callable[[], None] | None = None,
) -> int | None:
    """Stop a child, escalating: ask -> wait -> SIGTERM (group) -> wait -> SIGKILL (group).

    Returns the exit code (negative signal number when killed).
    """
    import subprocess

    if popen.poll() is None and ask is not None:
        try:
            ask()
        except OSError:
            pass
    for sig, timeout in ((None, join_timeout), (signal.SIGTERM, term_timeout), (signal.SIGKILL, None)):
        if sig is not None and popen.poll() is None:
            signal_group(popen.pid, sig)
        try:
            popen.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    # Whatever the child started in its group goes with it.
    signal_group(popen.pid, signal.SIGKILL)
    return popen.returncode


def unread_bytes(fd: int) -> int:
    """Bytes written to a pipe (either end) that its reader has not read yet; 0 when unknown."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    except OSError:
        return 0
    return int.from_bytes(buf, sys.byteorder, signed=True)


# -- inside a child -----------------------------------------------------------


def set_process_name(name: str) -> None:
    """Name this process for ``top`` (``ps`` shows the command line with the title)."""
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def arm_parent_death(parent_pid: int) -> None:
    """Second line of defence: SIGKILL this process when its parent thread dies."""
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the prctl above
        os._exit(EXIT_PARENT_GONE)


def exit_if_orphaned(parent_pid: int) -> None:
    """Exit now if the supervisor died before this process got going."""
    if os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_GONE)


def _wait_eof(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 4096)
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            return
        if not data:
            return


def watch_for_eof(fd: int, name: str, exit_code: int = EXIT_PARENT_GONE,
                  on_eof: Callable[[], None] | None = None) -> None:
    """Exit this process (``os._exit``) as soon as ``fd`` reads EOF: the supervisor is gone.

    ``on_eof`` runs first (a worker kills its process group there). The
    watcher is a bare thread (``_thread``): ``threading.Thread.start`` would
    wait until it is scheduled, milliseconds of a worker's start-up on a busy
    machine. It ends the process, so nobody ever joins it.
    """

    def watch() -> None:
        threading.current_thread().name = name  # (a dummy Thread object: the name shows in tracebacks)
        _wait_eof(fd)
        if on_eof is not None:
            on_eof()
        os._exit(exit_code)

    _thread.start_new_thread(watch, ())


def kill_group_tree(cleanup_dir: str | None) -> None:
    """The supervisor is gone: remove its socket directory, kill this worker's descendants and group.

    Runs in the worker (pgid = its pid, it leads its session) or in its group
    guard. Descendants are killed one by one first because logic may have
    started some in a session of their own; ``killpg`` then takes the rest,
    the caller included.
    """
    if cleanup_dir and os.path.basename(cleanup_dir).startswith(SOCKET_DIR_PREFIX):
        import shutil

        shutil.rmtree(cleanup_dir, ignore_errors=True)
    group = os.getpgrp()
    # Best effort (psutil may fail in any way here): the group kill below is what must happen.
    with contextlib.suppress(Exception):
        import psutil

        for child in psutil.Process(group).children(recursive=True):
            if child.pid != os.getpid():
                with contextlib.suppress(psutil.Error):
                    child.kill()
    os.killpg(group, signal.SIGKILL)


def _guard_until_eof(fd: int, name: str) -> None:
    """In a just-forked guard: take ``name``, close every descriptor but ``fd`` (it holds nothing open for
    anyone), and block until ``fd`` reads EOF."""
    set_process_name(name)
    os.closerange(0, fd)
    os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
    _wait_eof(fd)


def start_group_guard(life_fd: int, name: str, cleanup_dir: str | None) -> int | None:
    """Fork this worker's group guard (see the module docstring); its pid, or None if fork failed.

    Call it before any thread starts: the child of a multi-threaded fork may
    deadlock. The guard keeps only ``life_fd``, so it never holds the
    worker's pipes open.
    """
    leader = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        return None
    if pid:
        return pid
    try:
        libc = _libc()
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the worker ended normally: so do we
        if os.getppid() != leader:
            os._exit(0)
        _guard_until_eof(life_fd, name)
        kill_group_tree(cleanup_dir)
    finally:
        os._exit(EXIT_PARENT_GONE)


#: ``PF_EXITING`` in the flags of ``/proc/PID/stat``: the process is exiting (set as ``do_exit`` begins).
_PF_EXITING = 0x4


def ending(pid: int) -> bool:
    """Whether process ``pid`` is gone, a zombie, or exiting (Linux ``/proc``; elsewhere: gone or not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False
    state, flags = fields[0], int(fields[6])
    return state in (b"Z", b"X", b"x") or bool(flags & _PF_EXITING)


def start_dir_guard(supervisor: int, cleanup_dir: str, name: str) -> int | None:
    """Fork a guard that removes ``cleanup_dir`` when this process ends because ``supervisor`` died.

    For the state server, which ``PR_SET_PDEATHSIG`` kills with its
    supervisor before it could remove anything (on a cluster no local worker
    guard is there to do it). The guard waits for this process to end (EOF on
    a pipe only this process holds); if the supervisor is ending too, the
    directory is removed; otherwise the supervisor lives on (a stop, or a
    restart of the server in the same directory) and the guard just exits.
    Call it before any thread starts. Returns its pid, or None if fork failed.
    """
    read_end, write_end = os.pipe()  # (not inheritable: no child of this process holds it)
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None
    if pid:
        os.close(read_end)
        return pid  # ``write_end`` stays open until this process ends: that is the guard's signal
    try:
        _guard_until_eof(read_end, name)
        # The supervisor's death kills this process through PR_SET_PDEATHSIG as the supervisor begins to
        # exit, so by now it is at least exiting.
        if ending(supervisor) and os.path.basename(cleanup_dir).startswith(SOCKET_DIR_PREFIX):
            import shutil

            shutil.rmtree(cleanup_dir, ignore_errors=True)
    finally:
        os._exit(0)
