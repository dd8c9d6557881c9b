"""The supervisor's timers: typed, on one heap, read from an injectable clock.

Each kind of timer is a small named tuple; the supervisor dispatches a due timer by
its type (``Supervisor._fire_timers``). The clock is ``time.monotonic`` in a
runtime and a fake one in the dispatcher's unit tests (huey's ``loop(now)``,
trio's ``MockClock``).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Union


class PolicyWakeup(NamedTuple):
    """Run a routine's (interval) policy again."""

    rt: Any


class RetryDue(NamedTuple):
    """A failed activation's retry delay is over: queue its new attempt."""

    act: Any


class ActivationDeadline(NamedTuple):
    """An activation may be running past its routine's timeout (``when``: the deadline it was set for)."""

    act: Any
    when: float


class RespawnDue(NamedTuple):
    """Start a worker again in a slot whose worker failed to start."""

    slot: int


class StartStateServer(NamedTuple):
    """Start the state server, if no worker got ready sooner."""


class StartHoldOver(NamedTuple):
    """No worker got ready yet, and the hold is over: activations may go to workers still starting."""


class FlushCounts(NamedTuple):
    """Send the job counters collected since the last flush to the state server."""


class CheckMemory(NamedTuple):
    """Sample the RSS of workers running an activation (hard memory limit)."""


#: Any timer (dispatched by its type).
Timer = Union[PolicyWakeup, RetryDue, ActivationDeadline, RespawnDue, StartStateServer, StartHoldOver,  # noqa: UP007
              FlushCounts, CheckMemory]


class Timers:
    """A heap of timers on the supervisor's clock."""

    def __init__(self, clock: Callable[[], float], on_added: Callable[[], None]) -> None:
        #: The time source (``time.monotonic``, or a test's fake clock).
        self.clock = clock
        #: Called after a timer was added (wakes the dispatcher when another thread added it).
        self._on_added = on_added
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def add(self, timer: Timer, when: float) -> None:
        """Fire ``timer`` at ``when`` (on the clock)."""
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        self._on_added()

    def next_due(self) -> float | None:
        """When the earliest timer is due, ``None`` when there is none."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> Iterator[Timer]:
        """The timers due at ``now``, earliest first (timers added meanwhile are seen too)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            yield heapq.heappop(heap)[2]

    def pending(self) -> Iterator[Timer]:
        """Every timer not yet fired, in no particular order."""
        return (timer for _, _, timer in self._heap)

    def clear(self) -> None:
        """Forget every timer."""
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._heap)
