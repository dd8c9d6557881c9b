"""Unit tests of the dispatcher: the real supervisor over the in-thread stub backend, on a fake clock.

No process may start here: the autouse fixture makes every way of starting
one raise, and checks with psutil that this process has no new child after
each test (on top of the suite-wide leftover check).
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from routilux_mp._exec.stub import StubBackend, StubState
from routilux_mp._messages import encode
from routilux_mp._supervisor import Settings, Supervisor

#: Dispatcher passes a test may need before nothing changes any more.
MAX_PASSES = 200


class _NoProcesses(AssertionError):
    """Raised when code under a unit test tries to start a process."""


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise _NoProcesses("a dispatcher unit test tried to start a process")


@pytest.fixture(autouse=True)
def no_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse every way of starting a process; fail if a child appeared anyway."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse)
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse)
    yield
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before, f"a unit test started processes: {after - before}"


class FakeClock:
    """The supervisor's clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    """One supervisor on stub lanes, driven pass by pass."""

    def __init__(self, sup: Supervisor, clock: FakeClock) -> None:
        self.sup = sup
        self.stub: StubBackend = sup.backend  # type: ignore[assignment]
        self.clock = clock

    def settle(self) -> None:
        """Run dispatcher passes until nothing changes (held lanes stay held)."""
        for _ in range(MAX_PASSES):
            self.sup.run_once(0)
            if self.stub.idle():
                self.sup.run_once(0)  # (the pass that applies the last events may dispatch more)
                if self.stub.idle():
                    return
        raise AssertionError(f"the dispatcher did not settle within {MAX_PASSES} passes")

    def advance(self, seconds: float) -> None:
        """Move the clock, then let due timers fire."""
        self.clock.advance(seconds)
        self.settle()

    def post(self, flow: Any, data: dict, *, routine: str = "r", slot: str = "in", **kwargs: Any) -> Any:
        """Post ``data`` to ``flow``'s routine (its worker is started on first use); the job."""
        if not self.sup.has_current(flow.flow_id):
            flow.validate()
            self.sup.add_worker(flow.flow_id, flow, None)
        kwargs.setdefault("block", False)
        _, job = self.sup.post(flow.flow_id, flow, routine, slot, encode(data), worker_id=None, job_id=None,
                               metadata=None, timeout=None, **kwargs)
        return job

    def post_held(self, flow: Any, data: dict, lane: int = 0) -> Any:
        """Post ``data`` while ``lane`` holds what it gets (as if busy running it); the job."""
        self.stub.hold(lane)
        job = self.post(flow, data)
        self.settle()
        return job

    def activations(self, slot: int | None = None) -> list[Any]:
        """Every activation sent so far (to ``slot``), in order."""
        return [m for s, m in self.stub.sent if type(m).__name__ == "_Activation" and (slot is None or s == slot)]


@pytest.fixture
def harness() -> Iterator[Callable[..., Harness]]:
    """Build supervisors on stub lanes (always closed at the end)."""
    made: list[Supervisor] = []

    def make(*, processes: int = 2, capacity: int = 2, **settings: Any) -> Harness:
        clock = FakeClock()
        sup = Supervisor(Settings(processes=processes, **settings),
                         backend=functools.partial(StubBackend, capacity=capacity), state=StubState, clock=clock)
        sup.start(thread=False)
        made.append(sup)
        h = Harness(sup, clock)
        h.settle()  # the lanes report ready
        return h

    yield make
    for sup in made:
        sup.close()
