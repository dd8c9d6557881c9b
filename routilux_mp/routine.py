"""Routines: units of logic with input slots and output events.

A :class:`Routine` is declared in the supervisor (your process) and shipped by
value to every worker process. Its logic always runs in a worker process as
``logic(slot_data, policy_message, worker_state)``; ``self`` there is that
process's copy of the routine, so instance attributes changed in logic do not
travel back. Shared memory is ``worker_state``.

routilux 1.1.0's spellings work too (``define_slot``, ``define_event``,
``config()``, a ``logic`` method, ``get_state``/``set_state``...); this module
is also callable as its ``@routine`` decorator (see :mod:`routilux_mp.decorators`).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import sys
import types
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from . import _context
from .activation_policies import SlotQueueAPI
from .error_handling import ErrorHandler
from .errors import FlowError, RoutiluxError, SlotQueueFullError
from .job import JobContext

__all__ = ["Event", "Routine", "Slot"]

#: Default bound of a slot queue (items waiting for an activation).
DEFAULT_MAX_QUEUE_LENGTH = 1000

# Arrival order of items enqueued on declaration slots, across slots (the
# immediate policy picks the oldest); only this process's local buffers use it.
_local_seq = itertools.count()


class Slot(SlotQueueAPI):
    """An input of a routine. Items posted or emitted to it wait in a bounded queue.

    The runtime keeps its own queue per worker. The queue methods on this
    object (:meth:`enqueue` and those of
    :class:`~routilux_mp.activation_policies.SlotQueueAPI`) work on a local
    buffer, so a policy can be tried in your process::

        slot = routine.get_slot("input")
        slot.enqueue({"x": 1})
        assert my_policy(routine.slots, None)[0]

    The runtime never sees that buffer (it is not shipped to workers): feed a
    running flow with ``runtime.post()``.
    """

    __slots__ = ("_entries", "_seqs", "max_queue_length", "name", "routine")

    def __init__(self, name: str, max_queue_length: int = DEFAULT_MAX_QUEUE_LENGTH,
                 routine: Routine | None = None) -> None:
        self.name = name
        self.max_queue_length = max_queue_length
        #: The routine that declared this slot.
        self.routine = routine
        self._entries: deque[Any] = deque()
        self._seqs: deque[int] = deque()

    def enqueue(self, data: Any, emitted_from: str = "", emitted_at: Any = None) -> None:
        """Add a copy of ``data`` to the local buffer (``emitted_from``/``emitted_at``: routilux 1.1.0's, unused).

        Raises:
            SlotQueueFullError: the buffer already holds ``max_queue_length`` items.
        """
        if len(self._entries) >= self.max_queue_length:
            raise SlotQueueFullError(f"slot {self.name!r} holds {len(self._entries)} items, its max_queue_length")
        self._entries.append(copy.deepcopy(data))
        self._seqs.append(next(_local_seq))

    def _take(self, n: int | None) -> list:
        count = len(self._entries) if n is None else min(n, len(self._entries))
        for _ in range(count):
            self._seqs.popleft()
        return [self._entries.popleft() for _ in range(count)]

    def _head_seq(self) -> int | None:
        return self._seqs[0] if self._seqs else None

    @staticmethod
    def _item(entry: Any) -> Any:
        return copy.deepcopy(entry)

    def __getstate__(self) -> dict:
        # The local buffer stays here: shipping it to workers would only cost.
        return {"name": self.name, "max_queue_length": self.max_queue_length, "routine": self.routine}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["name"], state["max_queue_length"], state["routine"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Slot({self.name!r}, max_queue_length={self.max_queue_length})"


class Event:
    """An output of a routine; ``params`` (alias ``output_params``) documents the keyword arguments it carries."""

    __slots__ = ("name", "params", "routine")

    def __init__(self, name: str, params: Iterable[str] | None = None, routine: Routine | None = None) -> None:
        self.name = name
        self.params = list(params) if params is not None else []
        #: The routine that declared this event.
        self.routine = routine

    @property
    def output_params(self) -> list[str]:
        """routilux 1.1.0's name for :attr:`params`."""
        return self.params

    def __repr__(self) -> str:
        return f"Event({self.name!r}, params={self.params!r})"


class _Config(dict):
    """A copy of a routine's configuration that can also be called, as routilux 1.1.0's ``config()`` was."""

    def __call__(self) -> dict[str, Any]:
        return dict(self)


def _inert_logic(slot_data: dict, policy_message: Any, worker_state: Any) -> None:
    """The logic of a routine that declares none: it consumes its items and does nothing (a sink)."""


class _KeywordLogic:
    """Calls logic the way routilux 1.1.0 did: ``fn(slot_data, policy_message=..., worker_state=...)``."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, slot_data: dict, policy_message: Any, worker_state: Any) -> Any:
        return self.fn(slot_data, policy_message=policy_message, worker_state=worker_state)


def _binds(signature: inspect.Signature, *args: Any, **kwargs: Any) -> bool:
    """Whether a call binds, with ``policy_message``/``worker_state`` (if named) getting the right values."""
    try:
        bound = signature.bind(*args, **kwargs).arguments
    except TypeError:
        return False
    # Positionally, fn(a, b, policy_message=None, worker_state=None) would bind but
    # swallow the message as ``b``: routilux 1.1.0's one-list-per-slot style.
    return bound.get("policy_message", _MESSAGE) is _MESSAGE and bound.get("worker_state", _STATE) is _STATE


_DATA, _MESSAGE, _STATE = object(), object(), object()


def _adapt_logic(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` callable as ``(slot_data, policy_message, worker_state)``; TypeError if it cannot be."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or an odd callable: trust it
        return fn
    if _binds(signature, _DATA, _MESSAGE, _STATE):
        return fn
    if _binds(signature, _DATA, policy_message=_MESSAGE, worker_state=_STATE):
        return _KeywordLogic(fn)
    raise TypeError(
        f"logic {getattr(fn, '__qualname__', fn)}{signature} cannot be called as "
        "logic(slot_data, policy_message, worker_state): routilux-mp passes ONE dict, slot_data "
        "(slot name -> list of items), not one list per slot as routilux 1.1.0 did. "
        "Write it as logic(slot_data, policy_message, worker_state) (or logic(slot_data, **kwargs))"
    )


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{kind} name must be a non-empty string, got {name!r}")
    return name


class Routine:
    """Base class for routines. Subclass it and declare everything in ``__init__``.

    Example::

        class Square(Routine):
            def __init__(self):
                super().__init__()
                self.add_slot("input")
                self.add_event("output", ["value"])

                def logic(slot_data, policy_message, worker_state):
                    for item in slot_data["input"]:
                        self.emit("output", value=item["x"] ** 2)

                self.set_logic(logic)

    Instead of ``set_logic``, a subclass may define a ``logic(self, slot_data,
    policy_message, worker_state)`` method (routilux 1.1.0's style; it may also
    take ``policy_message`` and ``worker_state`` as keywords). A routine with
    neither is a sink: it consumes what reaches it and does nothing.
    """

    def __init__(self) -> None:
        self._slots: dict[str, Slot] = {}
        self._events: dict[str, Event] = {}
        self._logic = None
        self._activation_policy: Any = None
        self._error_handler: ErrorHandler | None = None
        self._config: dict[str, Any] = {}
        self._max_concurrency: int | None = 1
        self._timeout: float | None = None
        self._fusion = True
        self._handler_slots: list[str] = []

    # -- declaration ---------------------------------------------------------

    def add_slot(self, name: str, max_queue_length: int = DEFAULT_MAX_QUEUE_LENGTH, watermark: float = 0.8) -> Slot:
        """Declare an input slot. Duplicate names raise ``ValueError``.

        ``watermark`` is routilux 1.1.0's threshold for compacting its queue;
        it is checked (0..1) and has nothing to do here, where consumed items
        leave the queue at once.
        """
        _check_name("slot", name)
        if name in self._slots:
            raise FlowError(f"{type(self).__name__} already has a slot named {name!r}")
        if not isinstance(max_queue_length, int) or max_queue_length < 1:
            raise ValueError(f"max_queue_length must be a positive int, got {max_queue_length!r}")
        if not 0.0 <= watermark <= 1.0:
            raise ValueError(f"watermark must be between 0.0 and 1.0, got {watermark!r}")
        slot = Slot(name, max_queue_length, self)
        self._slots[name] = slot
        return slot

    def add_event(self, name: str, params: Iterable[str] | None = None, *,
                  output_params: Iterable[str] | None = None) -> Event:
        """Declare an output event (``output_params``: routilux 1.1.0's name for ``params``).

        Duplicate names raise ``ValueError``.
        """
        _check_name("event", name)
        if name in self._events:
            raise FlowError(f"{type(self).__name__} already has an event named {name!r}")
        event = Event(name, params if params is not None else output_params, self)
        self._events[name] = event
        return event

    def define_slot(self, name: str, handler: Callable[..., Any] | None = None,
                    max_queue_length: int = DEFAULT_MAX_QUEUE_LENGTH, watermark: float = 0.8) -> Slot:
        """routilux 1.1.0's alias of :meth:`add_slot`.

        ``handler`` is ignored, as in routilux 1.1.0 (slot handlers are the
        pre-1.0 API); a routine whose only logic is such a handler is refused
        when its flow starts, with the way to port it.
        """
        slot = self.add_slot(name, max_queue_length=max_queue_length, watermark=watermark)
        if handler is not None:
            self._handler_slots.append(name)
        return slot

    def define_event(self, name: str, output_params: Iterable[str] | None = None) -> Event:
        """routilux 1.1.0's alias of :meth:`add_event`."""
        return self.add_event(name, output_params)

    def set_logic(self, logic: Callable[..., Any]) -> Routine:
        """Set ``logic(slot_data, policy_message, worker_state)``; a closure, lambda or method. Returns self."""
        if not callable(logic):
            raise TypeError(f"logic must be callable, got {logic!r}")
        self._logic = logic
        return self

    @property
    def _logic(self) -> Callable[..., Any]:
        """The logic as the worker calls it: ``(slot_data, policy_message, worker_state)``."""
        call = self._logic_call
        if call is None:
            fn = self._logic_fn
            if fn is None:
                method = getattr(type(self), "logic", None)
                fn = self.logic if callable(method) else _inert_logic
            call = self._logic_call = _adapt_logic(fn)
        return call

    @_logic.setter
    def _logic(self, fn: Callable[..., Any] | None) -> None:
        self._logic_fn = fn
        self._logic_call: Callable[..., Any] | None = None

    def _check_logic(self) -> str | None:
        """Why this routine's logic cannot run (``None`` if it can)."""
        if self._logic_fn is None and not callable(getattr(type(self), "logic", None)) and self._handler_slots:
            return (
                f"declares slot handlers ({', '.join(map(repr, self._handler_slots))}) and no logic: "
                "define_slot(name, handler=...) is routilux's pre-1.0 API, ignored by routilux 1.1.0 too. "
                "Move the handler's body into logic(slot_data, policy_message, worker_state) and call "
                "set_logic(...) in __init__ (slot_data[slot] is the list of items that arrived)"
            )
        try:
            self._logic  # noqa: B018 - resolving it checks the signature
        except TypeError as exc:
            return f"has {exc}"
        return None

    def set_activation_policy(self, policy: Any) -> Routine:
        """Set when the logic runs (see :mod:`routilux_mp.activation_policies`). Returns self."""
        if not callable(policy):
            raise TypeError(f"an activation policy must be callable, got {policy!r}")
        self._activation_policy = policy
        return self

    def set_error_handler(self, handler: ErrorHandler | None) -> None:
        """Set what a failure of this routine does to its job (default: the flow's, else STOP)."""
        if handler is not None and not isinstance(handler, ErrorHandler):
            raise TypeError(f"expected an ErrorHandler, got {handler!r}")
        self._error_handler = handler

    def get_error_handler(self) -> ErrorHandler | None:
        """The handler set by :meth:`set_error_handler` (``None``: the flow's, else STOP)."""
        return self._error_handler

    def set_config(self, **config: Any) -> None:
        """Store configuration values, readable in logic with :meth:`get_config`."""
        self._config.update(config)

    def get_config(self, key: str, default: Any = None) -> Any:
        """Return a configuration value set with :meth:`set_config`."""
        return self._config.get(key, default)

    @property
    def config(self) -> _Config:
        """A copy of the configuration; also callable (``routine.config()``) as in routilux 1.1.0."""
        return _Config(self._config)

    def get_all_config(self) -> dict[str, Any]:
        """A copy of the configuration (routilux 1.1.0's name)."""
        return dict(self._config)

    def set_max_concurrency(self, limit: int | None) -> None:
        """How many activations of this routine may run at once per worker.

        The default, 1, makes the routine behave like an actor: its
        read-modify-write of its own state is race-free. ``None`` means as many
        as there are worker processes; use it for stateless CPU-heavy stages.
        """
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"max concurrency must be a positive int or None, got {limit!r}")
        self._max_concurrency = limit

    def set_timeout(self, seconds: float | None) -> None:
        """Kill an activation (and replace its worker process) after ``seconds``.

        The activation fails with :class:`~routilux_mp.errors.ActivationTimeoutError`,
        which the error handler sees like any other failure.
        """
        if seconds is not None:
            seconds = float(seconds)
            if not seconds > 0 or math.isinf(seconds):
                raise ValueError(f"timeout must be a positive number of seconds, got {seconds!r}")
        self._timeout = seconds

    def set_fusion(self, enabled: bool) -> None:
        """Allow (the default) or forbid fused stages into and out of this routine.

        A connection whose target takes each item alone (one slot, the
        immediate policy), where the event has no other target and both ends
        run as many at once as there are processes (``set_max_concurrency(None)``),
        is *fused*: the worker that ran the source runs the target on the first
        item the activation emitted on it at once, without a round trip
        through the supervisor (further items go through the supervisor, so
        other processes share them). Job accounting, error handling, retries,
        outputs, ``stats()`` and what a crash or a timeout fails are the same
        as unfused; only the choice of process differs. Turn it off when the
        supervisor should place every activation of a routine like any other
        (say, to see each stage's activations separately while profiling).
        ``routilux-mp flows`` shows which connections are fused.
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"set_fusion() takes True or False, got {enabled!r}")
        self._fusion = enabled

    # -- introspection -------------------------------------------------------

    @property
    def slots(self) -> dict[str, Slot]:
        """The declared slots by name."""
        return dict(self._slots)

    @property
    def events(self) -> dict[str, Event]:
        """The declared events by name."""
        return dict(self._events)

    def get_slot(self, name: str) -> Slot | None:
        """The slot called ``name``, or None."""
        return self._slots.get(name)

    def get_event(self, name: str) -> Event | None:
        """The event called ``name``, or None."""
        return self._events.get(name)

    @property
    def activation_policy(self) -> Any:
        """The policy set by ``set_activation_policy()`` (None: the default, immediate)."""
        return self._activation_policy

    @property
    def error_handler(self) -> ErrorHandler | None:
        """The handler set by ``set_error_handler()`` (None: the flow's handler, else STOP)."""
        return self._error_handler

    @property
    def max_concurrency(self) -> int | None:
        """Activations that may run at once per worker (1 by default; None: as many as processes)."""
        return self._max_concurrency

    @property
    def timeout(self) -> float | None:
        """Seconds an activation may run before it is stopped (None: no limit)."""
        return self._timeout

    @property
    def fusion(self) -> bool:
        """Whether connections into and out of this routine may be fused (see :meth:`set_fusion`)."""
        return getattr(self, "_fusion", True)

    # -- inside logic --------------------------------------------------------

    def emit(self, event: str, runtime: Any = None, worker_state: Any = None, **data: Any) -> None:
        """Send ``data`` to every slot connected to ``event`` (inside logic only).

        Emits on an event with no connection become the job's ``outputs``. The
        data is copied (pickled) at the moment of the call. ``runtime`` and
        ``worker_state`` are routilux 1.1.0's context arguments: accepted and
        not sent (the running activation is the context).

        In an activation of several jobs (a batch, a join), name the job an
        emit belongs to with ``job=job_of(item)`` (a :class:`JobContext`, or a
        list of them); an emit that names none belongs to all the activation's
        jobs. A ``job`` keyword that is not a ``JobContext`` (or a list of
        them) is data, as before.
        """
        job = data.get("job")
        if job is not None and (isinstance(job, JobContext) or (
                isinstance(job, (list, tuple)) and job and all(isinstance(j, JobContext) for j in job))):
            del data["job"]
        else:
            job = None
        if (runtime is not None and not hasattr(runtime, "post")) or (
                worker_state is not None and not hasattr(worker_state, "get_routine_state")):
            raise TypeError(
                f"emit({event!r}, ...) takes the data as keyword arguments, e.g. emit({event!r}, result=value) "
                "or emit(event, **data); the second and third positions are routilux 1.1.0's runtime and "
                "worker_state context arguments"
            )
        if event not in self._events:
            known = ", ".join(repr(e) for e in self._events) or "none"
            raise FlowError(f"{type(self).__name__} has no event {event!r} (events: {known})")
        ctx = _context.current()
        if ctx is None:
            raise RoutiluxError(
                f"emit({event!r}) was called outside logic: events can only be emitted by logic "
                "running on a worker; use runtime.post() to feed a flow from your code"
            )
        if job is None:
            ctx.emit(self, event, data)
        else:
            ctx.emit(self, event, data, job)

    def _running_id(self, what: str) -> str | None:
        """The routine id of the activation running now, if it is this routine's."""
        ctx = _context.current()
        if ctx is not None and ctx.routine is self:
            return ctx.routine_id
        if what:
            raise RoutiluxError(f"{what}() was called outside this routine's logic: it needs the running "
                                "activation to know the routine id; call it from logic")
        return None

    def get_state(self, worker_state: Any, key: str | None = None, default: Any = None) -> Any:
        """This routine's state (or its ``key``) in ``worker_state``; ``default`` outside logic or when unset."""
        rid = self._running_id("")
        state = worker_state.get_routine_state(rid) if rid is not None else None
        if state is None:
            return default
        return state if key is None else state.get(key, default)

    def set_state(self, worker_state: Any, key: str, value: Any) -> None:
        """Set ``key`` of this routine's state, atomically (a merge in the state server)."""
        worker_state.merge_routine_state(self._running_id("set_state"), {key: value})

    def update_state(self, worker_state: Any, updates: dict[str, Any]) -> None:
        """Set several keys of this routine's state, atomically (a merge in the state server)."""
        worker_state.merge_routine_state(self._running_id("update_state"), dict(updates))

    def set_job_data(self, key: str, value: Any) -> None:
        """Set ``job.data["<routine_id>_<key>"]`` of the running job (routilux 1.1.0's namespacing)."""
        rid = self._running_id("set_job_data")
        _context.current().job.data[f"{rid}_{key}"] = value

    def get_job_data(self, key: str, default: Any = None) -> Any:
        """Read what :meth:`set_job_data` set; ``default`` outside logic or when unset."""
        rid = self._running_id("")
        if rid is None:
            return default
        return _context.current().job.data.get(f"{rid}_{key}", default)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} slots={list(self._slots)} events={list(self._events)} "
            f"max_concurrency={self._max_concurrency}>"
        )


class _RoutineModule(types.ModuleType):
    """This module, callable as routilux 1.1.0's ``@routine`` decorator.

    ``from routilux_mp import routine`` finds this module (the package's
    submodule of that name): calling it is :func:`routilux_mp.decorators.routine`,
    so ``@routine()`` works, and ``from routilux_mp.routine import Routine``
    works as before.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .decorators import routine

        return routine(*args, **kwargs)


sys.modules[__name__].__class__ = _RoutineModule
