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
activation that succeeded and has one job, and nothing once its process is
due to be recycled; the rest goes through the supervisor as usual (so the
other processes share an activation's many emits, and a failed activation's
emits meet its error strategy first). The backend must support it (local
processes and the in-process lane do; Ray lanes do not: ``fusion`` of
``WorkerBackend``).

How it stays identical to the unfused run: the worker sends the emitting
activation's result *before* it runs the fused one, naming the emit it runs
itself (``_Result.fused``); the supervisor books it as an activation of
``B`` on that lane (job holds, ``running``, a timeout's deadline), so a crash
or a timeout in the fused stage fails ``B``'s activation, never ``A``'s, and
``B``'s own result (``_Result.chain``) is handled like any other: stats,
error strategy and retries (a retry runs unfused), emits, outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .activation_policies import ImmediatePolicy

if TYPE_CHECKING:
    from ._ledger import Ledger
    from ._messages import _Result
    from ._records import _Act

#: A connection: (source routine id, event, target routine id, slot).
Connection = tuple[str, str, str, str]


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
        elif not source.fusion or not target.fusion:  # (``Routine.set_fusion``)
            off = conn.source_id if not source.fusion else conn.target_id
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


# -- in the supervisor: the results of a lane that runs fused stages ---------------------------------


def unexpected_result(first: _Act | None, res: _Result) -> str | None:
    """Why ``res`` is not the result a lane whose first activation is ``first`` should send (``None``: it is).

    That is the result of ``first``: an activation sent (its ``act_id``), or
    a fused run booked on the lane (``act_id`` and ``chain``). A result that
    names an emit to run fused must name one on a fused connection, of an
    activation of one job.
    """
    if first is None:
        return f"sent a result for activation #{res.act_id} while it held no activation"
    if (first.chain != (res.act_id, res.chain)) if res.chain else (first.act_id != res.act_id or first.chain):
        held = f"#{first.act_id}" if first.chain is None else f"the fused run {first.chain[0]}.{first.chain[1]}"
        sent = f"#{res.act_id}" + (f".{res.chain}" if res.chain else "")
        return f"sent a result for activation {sent} while it held activation {held}"
    if res.fused is not None and (len(first.jobs) != 1 or not 0 <= res.fused < len(res.emits)
                                  or res.emits[res.fused][0] not in first.rt.fused):
        return f"claimed to run emit {res.fused} of activation #{res.act_id} fused, which is not on a fused connection"
    return None


def book_fused_run(ledger: Ledger, act: _Act, res: _Result, lane: int) -> _Act:
    """The fused run ``act``'s result ``res`` announces, booked on ``lane`` (the caller puts it first there)."""
    event, blob, _ = res.emits[res.fused]
    target, slot = act.rt.fused[event]
    root = act.act_id if act.chain is None else act.chain[0]
    return ledger.new_fused_activation(target, slot, act.jobs[0], blob, (root, res.chain + 1), lane, act.resolved)


__all__ = ["book_fused_run", "fused_targets", "fusion_plan", "unexpected_result"]
