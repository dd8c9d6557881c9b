"""Activation policies: when a routine's logic runs, and on which items.

A policy is called in the supervisor as ``policy(slots, worker_state)`` after
every arrival (and when its timer fires) and returns ``(activate, data_slice,
policy_message)``. ``slots`` maps slot names to queues offering the methods of
:class:`SlotQueueAPI` (``get_unconsumed_count()``, ``consume_one_new()``,
``consume_all_new()``, ``peek_all_new()``, ... as in routilux 1.1.0). Items a
policy consumes are the activation's input; the runtime gives the logic every
slot of the routine (``[]`` for slots with nothing this time).

Policies here are small picklable classes (no module globals, no closures). A
policy keeps its own state (e.g. the time of its last activation) per routine
per worker: the runtime gives each worker its own copy.

**Jobs in a batch.** An activation that consumes items of several jobs (a
batch, a join, a custom policy) keeps each item's job. Logic names the job an
emit belongs to with ``self.emit(event, job=job_of(item), **data)``; an emit
that names none belongs to all the activation's jobs: it is one output in each
of their ``job.outputs`` with ``"job_ids"`` listing them (the CLI writes it
once, with those ids), and downstream it holds all of them open. No output is
ever given to a job it does not belong to. If the activation fails, all its
jobs fail.

Besides ``__call__``, a policy may define ``flush(slots)`` (deliver what it
holds back, called by ``runtime.flush()``) and ``next_wakeup(slots)`` (a
``time.monotonic()`` deadline at which to be called again).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "AllSlotsReadyPolicy",
    "BatchSizePolicy",
    "CustomPolicy",
    "ImmediatePolicy",
    "SlotQueueAPI",
    "TimeIntervalPolicy",
    "all_slots_ready_policy",
    "batch_size_policy",
    "custom_policy",
    "immediate_policy",
    "time_interval_policy",
]

_NO = (False, {}, None)


class SlotQueueAPI:
    """The queue methods a policy may call on a slot, oldest item first; items are copies.

    Consuming an item makes it part of this activation: the runtime ties the
    activation to the item's job even when the policy leaves the item out of
    the data slice it returns (``consume_latest_and_mark_all_consumed`` does).
    Built on three primitives of the queue: ``_entries`` (the waiting entries,
    oldest first), ``_take(n)`` (consume up to ``n`` entries, all when
    ``None``) and ``_item(entry)`` (a copy of an entry's item).
    """

    __slots__ = ()

    def get_unconsumed_count(self) -> int:
        """Items waiting in this slot."""
        return len(self._entries)

    def get_total_count(self) -> int:
        """Items counted against ``max_queue_length``."""
        return len(self._entries)

    def consume_one_new(self) -> Any:
        """Consume the oldest item and return it (``None`` if the slot is empty)."""
        taken = self._take(1)
        return self._item(taken[0]) if taken else None

    def consume_all_new(self) -> list:
        """Consume every waiting item; return them oldest first."""
        return [self._item(entry) for entry in self._take(None)]

    def consume_all(self) -> list:
        """Same as :meth:`consume_all_new`: consumed items have already left the queue."""
        return self.consume_all_new()

    def consume_latest_and_mark_all_consumed(self) -> Any:
        """Consume every waiting item and return only the newest (``None`` if empty)."""
        taken = self._take(None)
        return self._item(taken[-1]) if taken else None

    def peek_all_new(self) -> list:
        """Every waiting item, oldest first, without consuming them."""
        return [self._item(entry) for entry in self._entries]

    def peek_one_new(self) -> Any:
        """The oldest waiting item without consuming it (``None`` if empty)."""
        return self._item(self._entries[0]) if self._entries else None

    def peek_latest(self) -> Any:
        """The newest waiting item without consuming it (``None`` if empty)."""
        return self._item(self._entries[-1]) if self._entries else None

#: What the immediate policy passes as ``policy_message`` (logic gets its own copy).
IMMEDIATE_MESSAGE = {"reason": "immediate"}


def _oldest_slot(slots: dict[str, Any]) -> Any:
    """The non-empty slot whose next item arrived first."""
    best = None
    best_seq = None
    for slot in slots.values():
        seq = slot._head_seq()
        if seq is not None and (best_seq is None or seq < best_seq):
            best, best_seq = slot, seq
    return best


class ImmediatePolicy:
    """One activation per arriving item (the default policy)."""

    def __call__(self, slots: dict[str, Any], worker_state: Any) -> tuple[bool, dict, Any]:
        slot = _oldest_slot(slots)
        if slot is None:
            return _NO
        return True, {slot.name: slot._take(1)}, IMMEDIATE_MESSAGE

    def __repr__(self) -> str:
        return "immediate_policy()"


class BatchSizePolicy:
    """``n`` items from every slot once every slot holds ``n``; ``flush`` delivers the rest."""

    def __init__(self, batch_size: int) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size

    def __call__(self, slots: dict[str, Any], worker_state: Any) -> tuple[bool, dict, Any]:
        n = self.batch_size
        if not slots or any(s.get_unconsumed_count() < n for s in slots.values()):
            return _NO
        data = {name: s._take(n) for name, s in slots.items()}
        return True, data, {"reason": "batch_ready", "batch_size": n}

    def flush(self, slots: dict[str, Any]) -> tuple[dict, Any] | None:
        data = {name: s._take(self.batch_size) for name, s in slots.items() if s.get_unconsumed_count()}
        if not data:
            return None
        return data, {"reason": "flush", "batch_size": self.batch_size}

    def __repr__(self) -> str:
        return f"batch_size_policy({self.batch_size})"


class AllSlotsReadyPolicy:
    """One item from each slot once every slot holds at least one (a join)."""

    def __call__(self, slots: dict[str, Any], worker_state: Any) -> tuple[bool, dict, Any]:
        if not slots or any(s.get_unconsumed_count() == 0 for s in slots.values()):
            return _NO
        return True, {name: s._take(1) for name, s in slots.items()}, {"reason": "all_slots_ready"}

    def __repr__(self) -> str:
        return "all_slots_ready_policy()"


class TimeIntervalPolicy:
    """At most one activation per ``seconds``, carrying everything queued; never on empty slots."""

    def __init__(self, seconds: float) -> None:
        seconds = float(seconds)
        if not seconds > 0 or math.isinf(seconds):
            raise ValueError(f"interval must be a positive number of seconds, got {seconds!r}")
        self.seconds = seconds
        self._last: float | None = None

    def _take_all(self, slots: dict[str, Any]) -> dict:
        return {name: s._take(None) for name, s in slots.items() if s.get_unconsumed_count()}

    def __call__(self, slots: dict[str, Any], worker_state: Any) -> tuple[bool, dict, Any]:
        if not any(s.get_unconsumed_count() for s in slots.values()):
            return _NO
        now = time.monotonic()
        if self._last is not None and now - self._last < self.seconds:
            return _NO
        self._last = now
        return True, self._take_all(slots), {"reason": "time_interval", "interval": self.seconds}

    def next_wakeup(self, slots: dict[str, Any]) -> float | None:
        if self._last is None or not any(s.get_unconsumed_count() for s in slots.values()):
            return None
        return self._last + self.seconds

    def flush(self, slots: dict[str, Any]) -> tuple[dict, Any] | None:
        data = self._take_all(slots)
        if not data:
            return None
        return data, {"reason": "flush", "interval": self.seconds}

    def __repr__(self) -> str:
        return f"time_interval_policy({self.seconds})"


class CustomPolicy:
    """Activate with every new item whenever ``check(slots, worker_state)`` is true."""

    def __init__(self, check: Callable[[dict[str, Any], Any], bool]) -> None:
        if not callable(check):
            raise TypeError(f"custom_policy needs a callable check(slots, worker_state), got {check!r}")
        self.check = check

    def __call__(self, slots: dict[str, Any], worker_state: Any) -> tuple[bool, dict, Any]:
        if not any(s.get_unconsumed_count() for s in slots.values()):
            return _NO
        if not self.check(slots, worker_state):
            return _NO
        data = {name: s._take(None) for name, s in slots.items() if s.get_unconsumed_count()}
        return True, data, {"reason": "custom"}

    def __repr__(self) -> str:
        return f"custom_policy({getattr(self.check, '__name__', self.check)!r})"


def immediate_policy() -> ImmediatePolicy:
    """One activation per arriving item, ``slot_data`` holding that item alone.

    Message: ``{"reason": "immediate"}``.
    """
    return ImmediatePolicy()


def batch_size_policy(batch_size: int) -> BatchSizePolicy:
    """``batch_size`` items per slot once every slot holds that many.

    Message: ``{"reason": "batch_ready", "batch_size": n}``. A partial batch
    stays queued until ``runtime.flush()`` or
    ``wait_until_all_jobs_finished()`` delivers it with ``{"reason": "flush", ...}``.
    Each item keeps its job: emit per item with ``emit(event, job=job_of(item), ...)``;
    an emit naming no job belongs to every job of the batch (see the module docstring).
    """
    return BatchSizePolicy(batch_size)


def all_slots_ready_policy() -> AllSlotsReadyPolicy:
    """One item from each slot once every slot holds one. Message: ``{"reason": "all_slots_ready"}``."""
    return AllSlotsReadyPolicy()


def time_interval_policy(seconds: float) -> TimeIntervalPolicy:
    """At most one activation per ``seconds`` per routine per worker, carrying everything queued.

    A real timer fires the activation when the interval has passed; it never
    fires on empty slots. Message: ``{"reason": "time_interval", "interval": s}``.
    """
    return TimeIntervalPolicy(seconds)


def custom_policy(check: Callable[[dict[str, Any], Any], bool]) -> CustomPolicy:
    """Activate with all new items whenever ``check(slots, worker_state)`` returns true.

    Message: ``{"reason": "custom"}``.
    """
    return CustomPolicy(check)
