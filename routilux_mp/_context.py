"""The activation a worker process is running right now, and who may act for it.

A worker runs one activation at a time in its main thread. Threads that logic
starts during the activation may ``emit`` and call ``get_current_job()`` for
it, so the activation is not a thread-local. But a thread that an *earlier*
activation left running, or a child that logic forked, must never speak for
the activation that happens to run now: their emits are refused and
``get_current_job()`` gives them ``None``, with a warning, so nothing of theirs
is ever attributed to another job (SPEC section 6). A thread is "earlier" when
it was alive before the current activation began.

The supervisor's dispatcher thread marks itself here too, so ``job.wait()``
can refuse to run there (the dispatcher is the thread that finishes jobs).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

logger = logging.getLogger("routilux_mp.worker")

_current: Any = None
#: Why nobody may act for an activation now, when no activation runs in a worker process.
_idle_reason: str | None = None
#: This process is a worker process (an in-thread stub lane runs activations in other processes too).
_in_worker = False
_local = threading.local()
#: Threads already warned about (one warning each, not one per emit).
_warned: set[int] = set()


class _Refused:
    """Stands in for the activation when the caller may not act for it: emits fail, no job."""

    __slots__ = ("why",)

    job = None
    jobs = ()

    def jobs_of(self, item: Any) -> list:
        from .errors import RoutiluxError

        raise RoutiluxError(f"job_of() refused: it came from {self.why}; it belongs to no running activation")

    def __init__(self, why: str) -> None:
        self.why = why

    def emit(self, routine: Any, event: str, data: dict, job: Any = None) -> None:
        from .errors import RoutiluxError

        raise RoutiluxError(f"emit({event!r}) refused: it came from {self.why}; it belongs to no running "
                            "activation and is dropped. Emit from the logic's own thread, or join the threads "
                            "logic starts before it returns")


def set_current(ctx: Any) -> None:
    """Enter (``ctx``) or leave (``None``) an activation, in the worker's main thread."""
    global _current, _idle_reason
    if ctx is not None:
        me = threading.current_thread()
        ctx.thread = me
        ctx.earlier = frozenset(t for t in threading.enumerate() if t is not me)
    elif _in_worker:
        _idle_reason = "a thread that an earlier activation left running"
    _current = ctx


def current() -> Any:
    """The running activation if the caller may act for it; a refusal if not; ``None`` outside workers."""
    ctx = _current
    if ctx is None:
        return None if _idle_reason is None else _refuse(_idle_reason)
    me = threading.current_thread()
    if me is ctx.thread or me not in ctx.earlier:
        return ctx
    return _refuse("a thread that an earlier activation left running")


def running() -> Any:
    """The running activation if the calling thread may act for it, else ``None``; never warns (for logging)."""
    ctx = _current
    if ctx is None:
        return None
    me = threading.current_thread()
    return ctx if me is ctx.thread or me not in ctx.earlier else None


def _refuse(why: str) -> _Refused:
    ident = threading.get_ident()
    if ident not in _warned:
        _warned.add(ident)
        logger.warning("routilux-mp: %s (pid %d) tried to act for the running activation (emit or "
                       "get_current_job); refused, so nothing of it reaches another job", why, os.getpid())
    return _Refused(why)


def _forked() -> None:
    """In a child forked by logic: nothing here may act for the parent's activation."""
    global _current, _idle_reason
    _current = None
    _idle_reason = f"a child process (pid {os.getpid()}) that logic forked"
    _warned.clear()


def enter_worker() -> None:
    """Called once by a worker process: from now on, emits outside an activation are refused with a reason."""
    global _in_worker
    _in_worker = True
    os.register_at_fork(after_in_child=_forked)


def mark_dispatcher() -> None:
    """Called by the supervisor's dispatcher thread on start."""
    _local.dispatcher = True


def on_dispatcher() -> bool:
    """Whether the calling thread is a runtime's dispatcher thread."""
    return getattr(_local, "dispatcher", False)
