"""routilux 1.1.0's decorators: a Routine class from a function or from a plain class.

``@routine()`` turns ``fn(item) -> result`` into a Routine class with one slot
and one event: each item that reaches the slot is passed to ``fn``, and what
it returns is emitted as ``result=...``. ``from routilux_mp import routine``
gives the same decorator (the :mod:`routilux_mp.routine` module is callable).

The generated class is shipped to worker processes like any routine, so
``fn`` must be picklable by cloudpickle (a module-level function, a lambda or
a closure over picklable values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .routine import Routine

__all__ = ["routine", "routine_class"]


def _name_class(cls: type, name: str, source: Any) -> None:
    cls.__name__ = name
    cls.__qualname__ = name
    cls.__module__ = source.__module__
    cls.__doc__ = source.__doc__


def routine(
    input_slot: str | Callable[..., Any] = "input",
    output_event: str = "output",
    name: str | None = None,
) -> Any:
    """Make a Routine class from ``fn(item) -> result`` (the decorated function becomes a class).

    Example::

        @routine()
        def double(item):
            return item["x"] * 2

        flow.add_routine(double(), "double")  # slot "input", event "output" (result=...)

    Each item of an activation (the dict given to ``post`` or to ``emit``) is
    passed to ``fn``; its return value is emitted on ``output_event`` as
    ``result=value``. If ``fn`` raises and the routine has an ``"error"``
    event (``r.add_event("error")``), ``error=str(exc), data=item`` is emitted
    there and the other items go on; otherwise the activation fails and the
    routine's error handler decides. ``@routine`` without parentheses works too.

    Args:
        input_slot: the slot's name.
        output_event: the event's name.
        name: the class name (default: the function's).
    """
    if callable(input_slot):  # used bare: @routine
        return routine()(input_slot)

    def decorator(fn: Callable[..., Any]) -> type[Routine]:
        if not callable(fn):
            raise TypeError(f"@routine() decorates a function, got {fn!r}")

        class FunctionRoutine(Routine):
            def __init__(self) -> None:
                super().__init__()
                self.add_slot(input_slot)
                self.add_event(output_event, ["result"])
                self.set_logic(self._run)

            def _run(self, slot_data: dict, policy_message: Any, worker_state: Any) -> None:
                for item in slot_data[input_slot]:
                    try:
                        result = fn(item)
                    except Exception as exc:
                        if "error" not in self._events:
                            raise
                        self.emit("error", error=str(exc), data=item)
                        continue
                    self.emit(output_event, result=result)

        _name_class(FunctionRoutine, name or fn.__name__, fn)
        return FunctionRoutine

    return decorator


def routine_class(
    name: str | None = None,
    slots: Iterable[str] | None = None,
    events: Iterable[str] | None = None,
) -> Callable[[type], type[Routine]]:
    """Make a Routine class from a plain class with a ``process(self, item)`` (or ``logic``) method.

    Example::

        @routine_class(slots=["input"], events=["output"])
        class Upper:
            def process(self, item):
                self.emit("output", text=item["text"].upper())

    The method runs once per item of the first slot, with ``self`` the routine
    (so ``self.emit`` and ``self.get_config`` work); the class's other methods
    are available on it too.
    """
    slot_names = list(slots) if slots is not None else ["input"]
    event_names = list(events) if events is not None else ["output"]
    if not slot_names:
        raise ValueError("routine_class() needs at least one slot")

    def decorator(cls: type) -> type[Routine]:
        method = getattr(cls, "process", None) or getattr(cls, "logic", None)
        if not callable(method):
            raise TypeError(f"@routine_class() needs a process(self, item) or logic(self, item) method on {cls.__name__}")
        helpers = {k: v for k, v in vars(cls).items() if not (k.startswith("__") and k.endswith("__"))}
        helpers.pop("logic", None)  # a logic(self, item) method here is per item, not routilux-mp's logic

        def __init__(self: Routine) -> None:
            Routine.__init__(self)
            for slot in slot_names:
                self.add_slot(slot)
            for event in event_names:
                self.add_event(event)
            self.set_logic(self._run_items)

        def _run_items(self: Routine, slot_data: dict, policy_message: Any, worker_state: Any) -> None:
            for item in slot_data[slot_names[0]]:
                method(self, item)

        ClassRoutine = type(cls.__name__, (Routine,), dict(helpers, __init__=__init__, _run_items=_run_items))
        _name_class(ClassRoutine, name or cls.__name__, cls)
        return ClassRoutine

    return decorator
