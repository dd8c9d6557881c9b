"""The local backend's own deadlines: SIGKILL a worker that outlived its SIGTERM, check that a worker took
the activation it holds first (see ``local``)."""

from __future__ import annotations

import heapq
import itertools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._pipes import Child


class TermGrace:
    """Deadline: SIGKILL a worker that outlived its SIGTERM by ``TERM_GRACE``."""

    __slots__ = ("child",)

    def __init__(self, child: Child) -> None:
        self.child = child


class TakeCheck:
    """Deadline: check that a worker took the activation it holds first."""

    __slots__ = ("child",)

    def __init__(self, child: Child) -> None:
        self.child = child


class Deadlines:
    """The backend's own deadlines (kill escalations, take checks), soonest first.

    Pushed under the backend's lock (``send()`` runs on posting threads);
    popped by the polling thread only, so it may peek without the lock.
    """

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, when: float, deadline: Any) -> None:
        """Schedule ``deadline`` (a ``TermGrace`` or a ``TakeCheck``) at ``when``."""
        heapq.heappush(self._heap, (when, next(self._seq), deadline))

    def next_due(self) -> float | None:
        """When the soonest is due, if any."""
        heap = self._heap
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> Any:
        """The soonest deadline if it is due by ``now``, else ``None``."""
        heap = self._heap
        if not heap or heap[0][0] > now:
            return None
        return heapq.heappop(heap)[2]
