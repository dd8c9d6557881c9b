"""Fused stages: which connections a worker runs itself, inside the activation that emitted.

A connection ``A.event -> B.slot`` is *fused* when nothing the supervisor does
with an item on it could differ from running ``B`` at once in the worker that
ran ``A``:

* ``event`` has that one target (a fan-out needs the supervisor to copy it);
* ``B`` has one slot and the immediate policy (one item = one activation; a
  batch, a join or an interval policy must see the items in the supervisor);
* ``A`` and ``B`` run as many at once as there are processes
  (``set_max_concurrency(None)``): a worker process runs one activation at a
  time, so a fused ``B`` never exceeds its limit, and ``A`` spreads over every
  process as ``B`` would (fused into a one-at-a-time ``A``, ``B`` would run
  one at a time too);
* neither turned it off (``Routine.set_fusion(False)``).

At run time the worker fuses only the first emit on a fused connection of an
activation that succeeded and has one job; the rest goes through the
supervisor as usual (so the other processes share an activation's many
emits, and a failed activation's emits meet its error strategy first). The backend must support it (local processes and the
in-process lanes do; Ray lanes do not).

How it stays identical to the unfused run: the worker sends the emitting
activation's result *before* it runs the fused one, naming the emits it runs
itself (``_Result.fused``); the supervisor books each as an activation of
``B`` on that lane (job holds, ``running``, a timeout's deadline), so a crash
or a timeout in the fused stage fails ``B``'s activation, never ``A``'s, and
``B``'s own result (``_Result.chain``) is handled like any other: stats,
error strategy and retries (a retry runs unfused), emits, outputs.
"""

from __future__ import annotations

from typing import Any

from .activation_policies import ImmediatePolicy

#: A connection: (source routine id, event, target routine id, slot).
Connection = tuple[str, str, str, str]


def allows_fusion(routine: Any) -> bool:
    """Whether ``routine`` takes part in fusion (``Routine.set_fusion``; routines pickled before it: yes)."""
    return getattr(routine, "_fusion", True)


def _immediate(routine: Any) -> bool:
    """The routine activates once per item: the immediate policy on one slot."""
    policy = routine._activation_policy
    return len(routine._slots) == 1 and (policy is None or type(policy) is ImmediatePolicy)


def fusion_plan(flow: Any) -> dict[Connection, str | None]:
    """Per connection of ``flow``: ``None`` when it is fused, else why not (in words, for ``routilux-mp flows``)."""
    fan_out: dict[tuple[str, str], int] = {}
    for conn in flow.connections:
        key = (conn.source_id, conn.event)
        fan_out[key] = fan_out.get(key, 0) + 1
    plan: dict[Connection, str | None] = {}
    for conn in flow.connections:
        source, target = flow.routines[conn.source_id], flow.routines[conn.target_id]
        why = None
        if fan_out[(conn.source_id, conn.event)] > 1:
            why = f"event {conn.event!r} has {fan_out[(conn.source_id, conn.event)]} targets"
        elif not allows_fusion(source) or not allows_fusion(target):
            off = conn.source_id if not allows_fusion(source) else conn.target_id
            why = f"{off!r} turned fusion off (set_fusion(False))"
        elif not _immediate(target):
            why = f"{conn.target_id!r} has a policy or several slots: the supervisor must see its items"
        elif target._max_concurrency is not None:
            why = f"{conn.target_id!r} runs at most {target._max_concurrency} at a time"
        elif source._max_concurrency is not None:
            why = f"{conn.source_id!r} runs at most {source._max_concurrency} at a time (fused, so would its target)"
        plan[(conn.source_id, conn.event, conn.target_id, conn.slot)] = why
    return plan


def fused_targets(flow: Any) -> dict[str, dict[str, tuple[str, str]]]:
    """Source routine id -> event -> (target routine id, slot), for every fused connection of ``flow``."""
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for (source, event, target, slot), why in fusion_plan(flow).items():
        if why is None:
            found.setdefault(source, {})[event] = (target, slot)
    return found


__all__ = ["allows_fusion", "fused_targets", "fusion_plan"]
