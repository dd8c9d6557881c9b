"""Starting, watching and stopping our child processes (workers and the state server).

Children are fresh interpreters started with ``subprocess`` (never ``fork``,
never ``multiprocessing`` spawn), so they do not re-run the user's
``__main__``: the seed page's scripts have no main guard. Each child leads its
own session and process group, so a terminal's Ctrl-C does not reach it and
``killpg`` also stops whatever it started.

Parent death is noticed twice over: a watchdog thread in the child blocks on a
pipe whose other end only the supervisor holds (EOF -> exit), and
``PR_SET_PDEATHSIG`` is armed as a second line. The latter fires when the
*thread* that spawned the child exits, so the runtime spawns every child from
its dispatcher thread, which lives until shutdown.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

#: Exit code of a child that noticed its supervisor died.
EXIT_PARENT_GONE = 70

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.PIPE,
    stderr: int | None = subprocess.PIPE,
) -> subprocess.Popen:
    """Start ``python -c "import module; module.main()" title *fds`` in its own session.

    ``title`` shows in ``ps`` (e.g. ``routilux-mp worker 2``); the file
    descriptors are passed on and their numbers appended to ``sys.argv``.
    """
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


def describe_exit(returncode: int | None) -> tuple[int | None, str | None]:
    """``(exitcode, signal_name)`` of a finished child."""
    if returncode is None:
        return None, None
    if returncode < 0:
        try:
            return returncode, signal.Signals(-returncode).name
        except ValueError:
            return returncode, f"signal {-returncode}"
    return returncode, None


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


def watch_for_eof(fd: int, name: str, exit_code: int = EXIT_PARENT_GONE) -> threading.Thread:
    """Exit this process (``os._exit``) as soon as ``fd`` reads EOF: the supervisor is gone."""

    def watch() -> None:
        while True:
            try:
                data = os.read(fd, 4096)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                data = b""
            if not data:
                os._exit(exit_code)

    thread = threading.Thread(target=watch, name=name, daemon=True)
    thread.start()
    return thread


def monotonic() -> float:
    return time.monotonic()
