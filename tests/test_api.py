"""Declarations, flows, registry, policies and JSON rules: no processes involved."""

from __future__ import annotations

import math
import pickle
import time

import cloudpickle
import pytest

import routilux_mp
from routilux_mp import ErrorHandler, ErrorStrategy, Flow, FlowRegistry, Routine
from routilux_mp._jsonvalue import normalize
from routilux_mp._records import SlotQueue, _Entry
from routilux_mp.activation_policies import (
    all_slots_ready_policy,
    batch_size_policy,
    custom_policy,
    immediate_policy,
    time_interval_policy,
)
from routilux_mp.errors import RoutiluxError, StateNotSerializableError
from routilux_mp.job import JobContext


class Two(Routine):
    def __init__(self) -> None:
        super().__init__()
        self.add_slot("a")
        self.add_slot("b")
        self.add_event("out", ["x"])
        self.set_logic(lambda slot_data, message, worker_state: None)


def test_exports_are_complete_and_public() -> None:
    for name in routilux_mp.__all__:
        assert hasattr(routilux_mp, name), name
        assert not name.startswith("_") or name == "__version__"
    for name in ("Routine", "Flow", "Runtime", "WorkerState", "JobContext", "get_current_job", "ErrorHandler",
                 "ErrorStrategy", "FlowRegistry"):
        assert name in routilux_mp.__all__
    from routilux_mp.monitoring.flow_registry import FlowRegistry as SeedPath

    assert SeedPath is FlowRegistry


def test_every_error_derives_from_routilux_error_and_documents_itself() -> None:
    from routilux_mp import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, RoutiluxError)
        assert cls.__doc__ and cls.__doc__.startswith("Raised"), name


def test_duplicate_slot_and_event_names_raise() -> None:
    routine = Two()
    with pytest.raises(ValueError, match="already has a slot named 'a'"):
        routine.add_slot("a")
    with pytest.raises(ValueError, match="already has an event named 'out'"):
        routine.add_event("out")


def test_emit_outside_logic_and_unknown_event_are_explained() -> None:
    routine = Two()
    with pytest.raises(ValueError, match=r"no event 'nope' \(events: 'out'\)"):
        routine.emit("nope", x=1)
    with pytest.raises(RoutiluxError, match="outside logic"):
        routine.emit("out", x=1)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f: f.connect("missing", "out", "two", "a"), r"no routine 'missing' \(routines: 'one', 'two'\)"),
        (lambda f: f.connect("one", "nope", "two", "a"), r"no event 'nope' \(events: 'out'\)"),
        (lambda f: f.connect("one", "out", "two", "zz"), r"no slot 'zz' \(slots: 'a', 'b'\)"),
        (lambda f: f.add_routine(Two(), "one"), "already has a routine 'one'"),
    ],
)
def test_flow_errors_name_the_unknown_and_list_what_exists(call, message) -> None:
    flow = Flow("f")
    flow.add_routine(Two(), "one")
    flow.add_routine(Two(), "two")
    with pytest.raises(ValueError, match=message):
        call(flow)


def test_flow_entry_slots_and_validation() -> None:
    flow = Flow("f")
    flow.add_routine(Two(), "one")
    flow.add_routine(Two(), "two")
    flow.connect("one", "out", "two", "a")
    assert flow.entry_slots() == [("one", "a"), ("one", "b"), ("two", "b")]
    flow.validate()
    sink = Routine()  # no logic: a sink, accepted
    sink.add_slot("in")
    flow.add_routine(sink, "sink")
    flow.validate()
    handler_only = Routine()  # routilux's pre-1.0 style: the handler would be the only logic
    handler_only.define_slot("in", handler=print)
    flow.add_routine(handler_only, "bare")
    with pytest.raises(ValueError, match="'bare' .* declares slot handlers .* and no logic"):
        flow.validate()


def test_registry_replaces_with_a_warning_and_lists(caplog) -> None:
    registry = FlowRegistry.get_instance()
    assert FlowRegistry.get_instance() is registry
    first, second = Flow("x"), Flow("x")
    registry.register_by_name("x", first)
    registry.register_by_name("x", second)
    assert registry.get_by_name("x") is second
    assert "registered again" in caplog.text
    assert registry.list_names() == ["x"]
    with pytest.raises(ValueError, match=r"no flow is registered as 'y' \(registered: 'x'\)"):
        registry.get("y")
    assert registry.unregister_by_name("x") is True
    assert registry.get_by_name("x") is None


def test_flows_and_policies_pickle_by_value() -> None:
    flow = Flow("f")
    routine = Two()
    routine.set_activation_policy(custom_policy(lambda slots, ws: True))
    flow.add_routine(routine, "one")
    copy = cloudpickle.loads(cloudpickle.dumps(flow))
    assert list(copy.routines) == ["one"]
    for policy in (immediate_policy(), batch_size_policy(3), all_slots_ready_policy(), time_interval_policy(0.5)):
        assert repr(pickle.loads(pickle.dumps(policy))) == repr(policy)


# -- policies on hand-built slot queues ------------------------------------------

def _slots(**counts: int) -> dict[str, SlotQueue]:
    job = JobContext("j", "w", "f")
    seq = 0
    slots = {}
    for name, n in counts.items():
        queue = SlotQueue(name, 100)
        for i in range(n):
            seq += 1
            queue._entries.append(_Entry(seq, job, pickle.dumps({"slot": name, "i": i})))
        slots[name] = queue
    return slots


def test_immediate_policy_takes_one_item_oldest_first() -> None:
    slots = _slots(a=2, b=1)
    activate, data, message = immediate_policy()(slots, None)
    assert activate and message == {"reason": "immediate"}
    assert list(data) == ["a"] and len(data["a"]) == 1
    assert slots["a"].get_unconsumed_count() == 1


def test_batch_size_policy_waits_for_every_slot_and_flushes_partials() -> None:
    policy = batch_size_policy(2)
    slots = _slots(a=3, b=1)
    assert policy(slots, None)[0] is False
    slots = _slots(a=3, b=2)
    activate, data, message = policy(slots, None)
    assert activate and {k: len(v) for k, v in data.items()} == {"a": 2, "b": 2}
    assert message == {"reason": "batch_ready", "batch_size": 2}
    data, message = policy.flush(slots)
    assert {k: len(v) for k, v in data.items()} == {"a": 1} and message["reason"] == "flush"
    assert policy.flush(slots) is None


def test_all_slots_ready_policy_is_a_join() -> None:
    policy = all_slots_ready_policy()
    assert policy(_slots(a=2, b=0), None)[0] is False
    activate, data, message = policy(_slots(a=2, b=1), None)
    assert activate and {k: len(v) for k, v in data.items()} == {"a": 1, "b": 1}
    assert message == {"reason": "all_slots_ready"}


def test_time_interval_policy_fires_at_most_once_per_interval_and_never_empty() -> None:
    policy = time_interval_policy(60)
    assert policy(_slots(a=0), None)[0] is False
    slots = _slots(a=3)
    activate, data, _ = policy(slots, None)
    assert activate and len(data["a"]) == 3
    later = _slots(a=1)
    assert policy(later, None)[0] is False
    wake = policy.next_wakeup(later)
    assert wake is not None and wake - time.monotonic() > 50
    data, message = policy.flush(later)
    assert len(data["a"]) == 1 and message == {"reason": "flush", "interval": 60.0}


def test_custom_policy_consumes_everything_when_check_passes() -> None:
    policy = custom_policy(lambda slots, ws: slots["a"].get_unconsumed_count() >= 2)
    assert policy(_slots(a=1), None)[0] is False
    activate, data, message = policy(_slots(a=2, b=1), None)
    assert activate and {k: len(v) for k, v in data.items()} == {"a": 2, "b": 1}
    assert message == {"reason": "custom"}


def test_slot_queue_public_methods_return_copies() -> None:
    slots = _slots(a=2)
    queue = slots["a"]
    peeked = queue.peek_all_new()
    peeked[0]["i"] = 99
    assert queue.peek_all_new()[0]["i"] == 0
    assert queue.consume_one_new() == {"slot": "a", "i": 0}
    assert queue.consume_all_new() == [{"slot": "a", "i": 1}]
    assert queue.consume_one_new() is None


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda: {"s": {1, 2}}, r"^state\['s'\]: set is not JSON-serializable"),
        (lambda: {"x": float("nan")}, r"^state\['x'\]: float nan is not allowed"),
        (lambda: {"x": [1, math.inf]}, r"^state\['x'\]\[1\]: float inf"),
        (lambda: {"d": {3: "int key"}}, r"^state\['d'\]: key 3 \(int\) is not a str"),
        (lambda: {"b": b"bytes"}, r"^state\['b'\]: bytes is not JSON-serializable"),
        (lambda: {"pool": {"get_connection": lambda: None}}, r"^state\['pool'\]\['get_connection'\]: function is not"),
    ],
)
def test_non_json_values_are_refused_with_their_path(bad, message) -> None:
    with pytest.raises(StateNotSerializableError, match=message):
        normalize(bad())


def test_cycles_are_refused_and_tuples_become_lists() -> None:
    cyclic: dict = {"a": {}}
    cyclic["a"]["back"] = cyclic
    with pytest.raises(StateNotSerializableError, match=r"state\['a'\]\['back'\]: circular reference"):
        normalize(cyclic)
    value, size = normalize({"t": (1, 2), "n": None, "ok": [True, 1.5, "s"]})
    assert value == {"t": [1, 2], "n": None, "ok": [True, 1.5, "s"]}
    assert size == len('{"t":[1,2],"n":null,"ok":[true,1.5,"s"]}')


def test_error_handler_validates_and_matches_retryable_names() -> None:
    with pytest.raises(ValueError, match="unknown error strategy 'sometimes'"):
        ErrorHandler(strategy="sometimes")
    handler = ErrorHandler(ErrorStrategy.RETRY, retryable_exceptions=[ValueError, "mypkg.Flaky"])
    assert handler.is_retryable(["ValueError", "Exception"])
    assert handler.is_retryable(["mypkg.Flaky", "Exception"])
    assert not handler.is_retryable(["KeyError", "LookupError", "Exception"])
    timing = ErrorHandler("retry", retry_delay=0.5, retry_backoff=3)
    assert [timing.delay_before(a) for a in (2, 3, 4)] == [0.5, 1.5, 4.5]


def test_routine_settings_are_validated() -> None:
    routine = Two()
    with pytest.raises(ValueError):
        routine.set_max_concurrency(0)
    with pytest.raises(ValueError):
        routine.set_timeout(-1)
    with pytest.raises(TypeError):
        routine.set_logic("not callable")  # type: ignore[arg-type]
    routine.set_config(model="small", threshold=0.5)
    assert routine.get_config("model") == "small" and routine.config == {"model": "small", "threshold": 0.5}
