"""Small building blocks for tests: a routine made from a function, one-routine flows.

This module (and every test module that imports it) is shipped to worker
processes by value, so tests may define logic as plain functions or lambdas.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle

from routilux_mp import ErrorHandler, Flow, FlowRegistry, Routine


def by_value(module_name: str) -> None:
    """Ship functions and classes of ``module_name`` to workers by value."""
    cloudpickle.register_pickle_by_value(sys.modules[module_name])


by_value(__name__)


class FnRoutine(Routine):
    """A routine whose logic is ``fn(routine, slot_data, policy_message, worker_state)``."""

    def __init__(
        self,
        fn: Callable[..., Any],
        slots: Iterable[str] = ("in",),
        events: Iterable[str] = ("out",),
        *,
        concurrency: int | None = 1,
        policy: Any = None,
        timeout: float | None = None,
        handler: ErrorHandler | None = None,
        max_queue_length: int = 1000,
    ) -> None:
        super().__init__()
        for slot in slots:
            self.add_slot(slot, max_queue_length=max_queue_length)
        for event in events:
            self.add_event(event)
        self.set_logic(lambda slot_data, message, worker_state: fn(self, slot_data, message, worker_state))
        self.set_max_concurrency(concurrency)
        if policy is not None:
            self.set_activation_policy(policy)
        if timeout is not None:
            self.set_timeout(timeout)
        if handler is not None:
            self.set_error_handler(handler)


def single_flow(name: str, fn: Callable[..., Any], **kwargs: Any) -> Flow:
    """Register a flow ``name`` with one FnRoutine ``"r"`` (slot ``in``, event ``out``)."""
    flow = Flow(name)
    flow.add_routine(FnRoutine(fn, **kwargs), "r")
    FlowRegistry.get_instance().register_by_name(name, flow)
    return flow


#: Seconds a test waits for a condition before it fails.
WAIT = 120.0


def wait_until(predicate: Callable[[], Any], what: str, *, job: Any = None, timeout: float = WAIT) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` or as soon as ``job`` ends."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if job is not None and job.done:
            raise AssertionError(f"waiting for {what}, but job {job.job_id} ended {job.status}: {job.error}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s; threads now:\n{thread_summary()}")
        time.sleep(0.002)  # a short pause between polls, not a synchronization


def freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped: ``kill`` returns before it is, and until then it runs on."""
    import os
    import signal

    import psutil

    process = psutil.Process(pid)
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: process.status() == psutil.STATUS_STOPPED, f"process {pid} to be stopped")


def thread_summary(frames: int = 4) -> str:
    """Where every thread of this process stands (its innermost ``frames`` frames): why a wait timed out."""
    import threading
    import traceback

    names = {thread.ident: thread.name for thread in threading.enumerate()}
    lines = []
    for ident, frame in sys._current_frames().items():
        stack = traceback.extract_stack(frame)[-frames:]
        where = " <- ".join(f"{entry.name} ({entry.filename.rsplit('/', 1)[-1]}:{entry.lineno})"
                            for entry in reversed(stack))
        lines.append(f"  {names.get(ident, ident)}: {where}")
    return "\n".join(sorted(lines))


def pool_refilled(runtime: Any, restarts: int, timeout: float = WAIT) -> None:
    """Wait (on the supervisor's condition, no polling) until dead workers were replaced."""
    assert runtime._testing.wait_pool_refilled(restarts, timeout), f"the pool was not refilled within {timeout}s"


def pool_ready(runtime: Any, timeout: float = WAIT) -> None:
    """Wait (on the supervisor's condition) until every worker process reported ready."""
    assert runtime._testing.wait_pool_ready(timeout), f"the workers were not ready within {timeout}s"


def echo(routine: Routine, slot_data: dict, message: Any, worker_state: Any) -> None:
    """Emit every item received, unchanged."""
    for items in slot_data.values():
        for item in items:
            routine.emit("out", **item)


def our_children() -> list[Any]:
    """This process's descendants, but Ray's own (a Ray cluster of the session runs under this process)."""
    import psutil
    from ray_support import is_ray_process

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if not is_ray_process(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found
