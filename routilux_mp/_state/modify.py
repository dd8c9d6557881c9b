"""Runs ``modify_routine_state`` functions in the state server, each within a time budget.

A function runs on a runner thread, never on the thread serving the call. The
serving thread waits for it with a deadline (telling the client it is alive
meanwhile) and, past the budget, *abandons* it: the call fails with
``ModifyTimeoutError``, the routine state's lock is released at once, and the
function's result, if it ever comes, is discarded. An abandoned function is
also stopped where Python can stop it: it gets an asynchronous exception at
its next bytecode (``PyThreadState_SetAsyncExc``), so a Python loop ends at
once; a function blocked inside one C call (``time.sleep``) ends when that
call returns. While ``MAX_OVERDUE`` abandoned functions still run, new ones
are refused rather than piling up threads.

Why threads and not a sandbox process: a function works on the state under
its lock and must be quick; a process per call would ship the state twice and
cost a process round trip per modify. The price: a function stuck in one C
call that holds the GIL (a huge builtin computation) stalls the whole server,
and its clients then report the server as hung.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from typing import Any

import cloudpickle

from ..errors import ModifyTimeoutError

#: Abandoned functions still running past which new functions are refused.
MAX_OVERDUE = 8


class _Abandoned(BaseException):
    """Raised inside a function abandoned past its budget (a BaseException: ``except Exception`` misses it)."""


_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.restype = ctypes.c_int


def _raise_in(thread_id: int) -> None:
    """Make thread ``thread_id`` raise ``_Abandoned`` at its next bytecode."""
    _set_async_exc(ctypes.c_ulong(thread_id), ctypes.py_object(_Abandoned))


def _clear_pending() -> None:
    """Drop an asynchronous exception aimed at this thread that has not fired yet."""
    _set_async_exc(ctypes.c_ulong(threading.get_ident()), None)


_QUEUED, _RUNNING, _DONE, _ABANDONED = range(4)


class FnTask:
    """One function call: ``fn(arg)`` where ``fn`` arrives pickled."""

    __slots__ = ("_lock", "_state", "_thread", "arg", "blob", "done", "error", "overdue", "result")

    def __init__(self, blob: bytes, arg: Any) -> None:
        """A call of the function pickled in ``blob`` on ``arg``, not started yet."""
        self.blob = blob
        self.arg = arg
        self.result: Any = None
        self.error: BaseException | None = None
        #: Set once ``result``/``error`` hold the outcome (never for an abandoned task).
        self.done = threading.Event()
        #: Abandoned while its function was running: counted in ``FnRunners.overdue``.
        self.overdue = False
        self._lock = threading.Lock()  # orders the outcome against abandonment
        self._state = _QUEUED
        self._thread = 0

    def run(self) -> None:
        """Run the function here (on a runner thread) unless the call was abandoned before it started."""
        with self._lock:
            if self._state != _QUEUED:
                return
            self._state = _RUNNING
            self._thread = threading.get_ident()
        result, error = None, None
        try:
            result = cloudpickle.loads(self.blob)(self.arg)
        except _Abandoned:
            raise
        except BaseException as exc:  # noqa: BLE001 - the user's function: its error goes to the caller
            error = exc
        with self._lock:
            if self._state == _RUNNING:
                self.result, self.error, self._state = result, error, _DONE
                self.done.set()

    def abandon(self, runners: FnRunners) -> bool:
        """Give up on this call; False if its outcome arrived first (then ``done`` is set)."""
        with self._lock:
            if self._state == _DONE:
                return False
            if self._state == _RUNNING:
                self.overdue = True
                runners.count_overdue(1)
                _raise_in(self._thread)
            self._state = _ABANDONED
            return True


class FnRunners:
    """Runner threads for :class:`FnTask`: idle ones are reused, a new one starts when none is free."""

    def __init__(self) -> None:
        """No runner thread yet: the first call starts one."""
        self._tasks: queue.SimpleQueue[FnTask] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._free = 0  # runners that will take a queued task without a new thread
        #: Abandoned functions that still run.
        self.overdue = 0

    def submit(self, task: FnTask) -> None:
        """Queue ``task``; refuse it while too many abandoned functions still run."""
        with self._lock:
            if self.overdue >= MAX_OVERDUE:
                raise ModifyTimeoutError(
                    f"{self.overdue} modify_routine_state functions that ran past their time budget are still "
                    "running in the state server (blocked in C code that cannot be interrupted?), so this one "
                    "was not started; nothing was written. Make the functions quick and free of blocking calls"
                )
            if self._free:
                self._free -= 1
            else:
                threading.Thread(target=self._serve, name="routilux-mp modify runner", daemon=True).start()
        self._tasks.put(task)

    def abandon(self, task: FnTask) -> bool:
        """Abandon ``task`` (see :meth:`FnTask.abandon`)."""
        return task.abandon(self)

    def count_overdue(self, delta: int) -> None:
        """Count abandoned functions that still run (+1 when abandoned, -1 when they end)."""
        with self._lock:
            self.overdue += delta

    def _serve(self) -> None:
        """A runner thread: run queued tasks one after another, forever (it is a daemon)."""
        while True:
            task = self._tasks.get()
            try:
                try:
                    task.run()
                finally:
                    # Past this point nobody aims an exception at this task: one that
                    # has not fired yet must not hit our bookkeeping or the next task.
                    _clear_pending()
            except _Abandoned:
                pass
            with self._lock:
                if task.overdue:  # set under the task's lock, which run() took after it
                    self.overdue -= 1
                self._free += 1
