"""routilux 1.1.0's public API, as its documentation describes it, with ``routilux`` -> ``routilux_mp``.

Written from routilux 1.1.0's docstrings and guides (not from its tests): every
name imports from the path its users import it from and behaves as documented,
except for the deliberate differences listed in ``docs/migrating.md``.
``compat_examples/`` holds scripts in routilux 1.1.0's style; each runs with
only the import prefix changed.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import cloudpickle
import pytest
from helpers import WAIT, by_value, wait_until

import routilux_mp
from routilux_mp import (
    Connection,
    ErrorHandler,
    ErrorStrategy,
    Flow,
    FlowRegistry,
    JobContext,
    JobStatus,
    Routine,
    WorkerState,
    errors,
)
from routilux_mp.activation_policies import batch_size_policy, immediate_policy

by_value(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "compat_examples")


# -- names and import paths -------------------------------------------------------

CORE_NAMES = [
    ("routilux_mp.core", "Connection"), ("routilux_mp.core", "ErrorHandler"), ("routilux_mp.core", "ErrorStrategy"),
    ("routilux_mp.core", "Event"), ("routilux_mp.core", "ExecutionStatus"), ("routilux_mp.core", "Flow"),
    ("routilux_mp.core", "FlowRegistry"), ("routilux_mp.core", "JobContext"), ("routilux_mp.core", "JobStatus"),
    ("routilux_mp.core", "Routine"), ("routilux_mp.core", "RoutineConfig"), ("routilux_mp.core", "Runtime"),
    ("routilux_mp.core", "Slot"), ("routilux_mp.core", "SlotQueueFullError"),
    ("routilux_mp.core", "WorkerNotRunningError"), ("routilux_mp.core", "WorkerState"),
    ("routilux_mp.core", "get_current_job"), ("routilux_mp.core", "get_current_job_id"),
    ("routilux_mp.core", "get_flow_registry"),
    ("routilux_mp.core.routine", "Routine"), ("routilux_mp.core.flow", "Flow"),
    ("routilux_mp.core.flow", "RoutineConfig"), ("routilux_mp.core.runtime", "Runtime"),
    ("routilux_mp.core.registry", "FlowRegistry"), ("routilux_mp.core.registry", "get_flow_registry"),
    ("routilux_mp.core.error", "ErrorHandler"), ("routilux_mp.core.error", "ErrorStrategy"),
    ("routilux_mp.core.context", "JobContext"), ("routilux_mp.core.context", "get_current_job"),
    ("routilux_mp.core.worker", "WorkerState"), ("routilux_mp.core.slot", "Slot"),
    ("routilux_mp.core.slot", "SlotQueueFullError"), ("routilux_mp.core.event", "Event"),
    ("routilux_mp.core.connection", "Connection"), ("routilux_mp.core.status", "JobStatus"),
    ("routilux_mp.core.status", "ExecutionStatus"),
    ("routilux_mp.exceptions", "RoutiluxError"), ("routilux_mp.exceptions", "ExecutionError"),
    ("routilux_mp.exceptions", "SerializationError"), ("routilux_mp.exceptions", "ConfigurationError"),
    ("routilux_mp.exceptions", "StateError"), ("routilux_mp.exceptions", "SlotHandlerError"),
    ("routilux_mp.exceptions", "ValidationError"),
    ("routilux_mp", "Connection"), ("routilux_mp", "routine"), ("routilux_mp", "routine_class"),
    ("routilux_mp", "JobStatus"), ("routilux_mp", "ExecutionStatus"), ("routilux_mp", "ConfigurationError"),
    ("routilux_mp", "ExecutionError"), ("routilux_mp", "StateError"), ("routilux_mp", "SlotHandlerError"),
    ("routilux_mp", "SlotQueueFullError"), ("routilux_mp", "get_current_job_id"),
    ("routilux_mp.decorators", "routine"), ("routilux_mp.decorators", "routine_class"),
]


@pytest.mark.parametrize(("module", "name"), CORE_NAMES, ids=[f"{m}.{n}" for m, n in CORE_NAMES])
def test_upstream_import_paths_give_routilux_mp_objects(module: str, name: str) -> None:
    obj = getattr(importlib.import_module(module), name)
    top = getattr(routilux_mp, name, None)
    if top is not None and name != "routine":
        assert obj is top  # one class per name, whatever the path


def test_the_migration_guide_is_linked_from_the_readme() -> None:
    root = Path(HERE).parent
    assert "[docs/migrating.md](docs/migrating.md)" in (root / "README.md").read_text(encoding="utf-8")
    guide = (root / "docs" / "migrating.md").read_text(encoding="utf-8")
    for heading in ("## Names", "## Deliberate differences, and why", "## Not provided, and why"):
        assert heading in guide


def test_core_all_is_honest() -> None:
    from routilux_mp import core

    assert [n for n in core.__all__ if not hasattr(core, n)] == []
    from routilux_mp import exceptions

    assert exceptions.__all__ == errors.__all__


# -- exceptions ----------------------------------------------------------------------

EXCEPTIONS = [
    # (constructor, expected str(), attribute, value)
    (lambda: errors.ExecutionError("Failed to execute", routine_id="parse"),
     "Failed to execute (routine_id=parse)", "routine_id", "parse"),
    (lambda: errors.ExecutionError("Failed"), "Failed", "routine_id", ""),
    (lambda: errors.SerializationError("Cannot serialize", object_type="MyClass"),
     "Cannot serialize (type=MyClass)", "object_type", "MyClass"),
    (lambda: errors.SlotHandlerError("Handler failed", slot_name="input"),
     "Handler failed (slot=input)", "slot_name", "input"),
    (lambda: errors.ConfigurationError("duplicate ids"), "duplicate ids", None, None),
    (lambda: errors.StateError("cannot resume"), "cannot resume", None, None),
]


@pytest.mark.parametrize(("make", "text", "attr", "value"), EXCEPTIONS)
def test_upstream_exceptions_carry_their_context(make, text, attr, value) -> None:
    exc = make()
    assert isinstance(exc, errors.RoutiluxError) and str(exc) == text
    if attr is not None:
        assert getattr(exc, attr) == value


@pytest.mark.parametrize(
    ("ours", "family"),
    [
        (errors.FlowError, errors.ConfigurationError),
        (errors.ActivationError, errors.ExecutionError),
        (errors.ActivationError, errors.SlotHandlerError),
        (errors.WorkerCrashedError, errors.ExecutionError),
        (errors.ActivationTimeoutError, errors.ExecutionError),
        (errors.WorkerMemoryError, errors.ExecutionError),
        (errors.StateNotSerializableError, errors.StateError),
        (errors.StateNotSerializableError, errors.SerializationError),
        (errors.StaleStateError, errors.StateError),
        (errors.StateTooLargeError, errors.StateError),
        (errors.RuntimeClosedError, RuntimeError),
        (errors.FlowError, ValueError),
        (errors.WorkerNotRunningError, errors.FlowError),
    ],
)
def test_our_errors_sit_under_upstream_families(ours: type, family: type) -> None:
    assert issubclass(ours, family)


# -- routines ------------------------------------------------------------------------


def test_routine_declaration_aliases_and_back_references() -> None:
    routine = Routine()
    slot = routine.define_slot("input", max_queue_length=5, watermark=0.5)
    event = routine.define_event("output", ["result", "status"])
    assert slot.routine is routine and slot.name == "input" and slot.max_queue_length == 5
    assert event.routine is routine and event.output_params == ["result", "status"]
    assert routine.add_event("other", output_params=["x"]).params == ["x"]
    assert routine.get_slot("input") is slot and routine.get_event("output") is event
    with pytest.raises(ValueError):
        routine.define_slot("input")
    with pytest.raises(ValueError, match="watermark"):
        routine.add_slot("bad", watermark=1.5)


def test_config_is_callable_and_readable_and_a_copy() -> None:
    routine = Routine()
    assert routine.config() == {} and routine.config == {}
    routine.set_config(count=1, result="success")
    config = routine.config()
    assert config == {"count": 1, "result": "success"} == routine.config == routine.get_all_config()
    config["new_key"] = "x"
    routine.config["other"] = "y"
    assert routine.config() == {"count": 1, "result": "success"}
    assert type(routine.config()) is dict


def test_setters_chain_and_getters_read_back() -> None:
    routine = Routine()
    handler = ErrorHandler("continue")
    policy = immediate_policy()
    assert routine.set_logic(lambda d, m, w: None).set_activation_policy(policy) is routine
    assert routine.get_error_handler() is None
    routine.set_error_handler(handler)
    assert routine.get_error_handler() is handler


def _one(slot_data, policy_message, worker_state):
    return None


LOGIC_SIGNATURES = [
    # (logic, accepted)
    (_one, True),
    (lambda slot_data, **kwargs: None, True),
    (lambda input_data, policy_message=None, worker_state=None: None, True),
    (lambda *slot_lists, policy_message=None, worker_state=None: None, True),
    (lambda first, second, policy_message=None, worker_state=None: None, False),  # one list per slot
    (lambda: None, False),
]


@pytest.mark.parametrize(("logic", "accepted"), LOGIC_SIGNATURES)
def test_logic_signatures_are_checked_when_the_flow_starts(logic, accepted: bool) -> None:
    routine = Routine()
    routine.add_slot("a")
    routine.add_slot("b")
    routine.set_logic(logic)
    flow = Flow("sig")
    flow.add_routine(routine, "r")
    if accepted:
        flow.validate()
    else:
        with pytest.raises(ValueError, match=r"routine 'r' of flow 'sig' has logic .* ONE dict, slot_data"):
            flow.validate()


def test_slot_handlers_alone_are_refused_with_the_way_to_port() -> None:
    class OldStyle(Routine):
        def __init__(self):
            super().__init__()
            self.define_slot("input", handler=self.process)

        def process(self, data=None, **kwargs):
            pass

    flow = Flow("old")
    flow.add_routine(OldStyle(), "old")
    with pytest.raises(errors.FlowError, match=r"declares slot handlers \('input'\) and no logic.*set_logic"):
        flow.validate()

    class WithLogic(OldStyle):
        def logic(self, slot_data, policy_message, worker_state):
            pass

    Flow("ok").pipe(WithLogic(), "ok").validate()  # a handler next to real logic is ignored, as upstream did


def test_declaration_slots_hold_a_local_buffer_for_trying_policies(caplog) -> None:
    routine = Routine()
    slot = routine.add_slot("input", max_queue_length=3)
    item = {"value": 1}
    slot.enqueue(data=item, emitted_from="test", emitted_at=None)
    item["value"] = 99  # enqueue took a copy
    slot.enqueue({"value": 2})
    assert slot.get_unconsumed_count() == slot.get_total_count() == 2
    assert slot.peek_one_new() == {"value": 1} and slot.peek_latest() == {"value": 2}
    assert slot.peek_all_new() == [{"value": 1}, {"value": 2}]
    assert batch_size_policy(2)(routine.slots, None) == (
        True, {"input": [{"value": 1}, {"value": 2}]}, {"reason": "batch_ready", "batch_size": 2})
    for value in (3, 4, 5):
        slot.enqueue({"value": value})
    with pytest.raises(errors.SlotQueueFullError, match="max_queue_length"):
        slot.enqueue({"value": 6})
    assert slot.consume_one_new() == {"value": 3}
    assert slot.consume_latest_and_mark_all_consumed() == {"value": 5}
    assert slot.consume_all() == [] and slot.consume_one_new() is None and slot.peek_latest() is None
    slot.enqueue({"value": 7})
    shipped = cloudpickle.loads(cloudpickle.dumps(routine))  # the buffer is not shipped to workers
    assert shipped.get_slot("input").get_unconsumed_count() == 0 and shipped.get_slot("input").routine is shipped
    flow = Flow("buffered")
    flow.add_routine(routine, "r")
    flow.validate()
    assert "holds 1 items put there with Slot.enqueue()" in caplog.text


def test_emit_refuses_data_in_the_context_positions() -> None:
    routine = Routine()
    routine.add_event("output")
    with pytest.raises(TypeError, match=r"emit\('output', \.\.\.\) takes the data as keyword arguments"):
        routine.emit("output", {"result": "processed"})


# -- decorators ----------------------------------------------------------------------


def test_routine_module_is_the_decorator_and_still_the_module() -> None:
    from routilux_mp import routine

    @routine()
    def double(item):
        return item * 2

    @routine(input_slot="data_in", output_event="result", name="CustomName")
    def process(item):
        return item

    @routine
    def bare(item):
        return item

    assert isinstance(double, type) and issubclass(double, Routine) and double.__name__ == "double"
    instance = double()
    assert list(instance.slots) == ["input"] and instance.events["output"].params == ["result"]
    assert process.__name__ == "CustomName" and list(process().slots) == ["data_in"]
    assert list(process().events) == ["result"] and issubclass(bare, Routine)
    import routilux_mp.routine as module
    from routilux_mp.routine import Routine as Same

    assert module is routine and module.Routine is Same is Routine


def test_routine_class_wraps_a_plain_class() -> None:
    from routilux_mp import routine_class

    @routine_class(slots=["input"], events=["output", "error"])
    class Upper:
        """Upper-cases text."""

        def process(self, item):
            self.emit("output", text=self.shout(item["text"]))

        def shout(self, text):
            return text.upper()

    instance = Upper()
    assert isinstance(instance, Routine) and Upper.__name__ == "Upper" and Upper.__doc__ == "Upper-cases text."
    assert list(instance.slots) == ["input"] and list(instance.events) == ["output", "error"]
    with pytest.raises(TypeError, match="needs a process"):
        routine_class()(type("Nothing", (), {}))


# -- flows -----------------------------------------------------------------------------


class Step(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("input")
        self.add_event("output", ["value"])
        self.add_event("data", ["value"])


def test_pipe_chains_and_connects() -> None:
    flow = Flow("pipeline").pipe(Step(), "a").pipe(Step(), "b").pipe(Step(), "c", from_routine="a", from_event="data")
    assert list(flow.routines) == ["a", "b", "c"]
    assert [(c.source_id, c.event, c.target_id, c.slot) for c in flow.connections] == [
        ("a", "output", "b", "input"), ("a", "data", "c", "input")]
    conn = flow.connections[0]
    assert isinstance(conn, Connection) and conn.source_event is flow.routines["a"].get_event("output")
    assert conn.target_slot is flow.routines["b"].get_slot("input") and conn.source_event.name == "output"
    with pytest.raises(ValueError, match="no slot 'nope'"):
        flow.pipe(Step(), "d", to_slot="nope")
    assert "d" not in flow.routines  # a failed pipe leaves the flow as it was
    assert flow.pipe(Step(), "d") is flow and flow.connections[-1].source_id == "c"


def test_find_routines_by_type_and_flow_error_handler() -> None:
    class Custom(Step):
        pass

    flow = Flow("find")
    flow.add_routine(Step(), "standard")
    flow.add_routine(Custom(), "custom1")
    flow.add_routine(Custom(), "custom2")
    assert [rid for rid, _ in flow.find_routines_by_type(Custom)] == ["custom1", "custom2"]
    assert len(flow.find_routines_by_type(Routine)) == 3
    assert flow.get_error_handler() is None
    handler = ErrorHandler(strategy=ErrorStrategy.STOP)
    flow.set_error_handler(handler)
    assert flow.get_error_handler() is handler


def test_generated_routine_ids_never_collide_with_given_ones() -> None:
    # Regression: the id was made from the routine count, so an explicit
    # "routine_2" given first made the next generated id collide.
    flow = Flow("ids")
    flow.add_routine(Routine(), "routine_2")
    flow.add_routine(Routine(), "routine_3")
    first = flow.add_routine(Routine())
    second = flow.add_routine(Routine())
    assert len({first, second, "routine_2", "routine_3"}) == 4 and len(flow.routines) == 4


def test_routine_config_helper_chains() -> None:
    from routilux_mp import RoutineConfig

    routine = Routine()
    handler = ErrorHandler("skip")
    RoutineConfig(routine).config("factor", 2).error_handler(handler)
    assert routine.config() == {"factor": 2} and routine.get_error_handler() is handler


def test_flows_are_found_by_flow_id_while_they_exist() -> None:
    from routilux_mp import get_flow_registry

    registry = get_flow_registry()
    assert registry is FlowRegistry.get_instance()
    flow = Flow("by_id")
    assert registry.get("by_id") is flow and registry.get_by_name("by_id") is None
    assert flow in registry.list_all()
    named = Flow("other")
    registry.register_by_name("by_id", named)
    assert registry.get("by_id") is named  # a registered name wins
    registry.unregister_by_name("by_id")
    del flow, named
    import gc

    gc.collect()
    with pytest.raises(ValueError, match="no flow is registered as 'by_id'.*keep the Flow object alive"):
        registry.get("by_id")


def test_flow_execution_timeout_is_refused_with_the_replacement() -> None:
    with pytest.raises(TypeError, match=r"routine\.set_timeout"):
        Flow("t", execution_timeout=30)


# -- error handler and statuses ---------------------------------------------------------


def test_error_handler_options() -> None:
    default = ErrorHandler()
    assert default.retryable_exceptions == (Exception,) and default.is_critical is False
    assert default.is_retryable(["ValueError", "Exception", "BaseException"])
    assert not default.is_retryable(["SystemExit", "BaseException"])
    handler = ErrorHandler(ErrorStrategy.RETRY, retryable_exceptions=(ConnectionError, TimeoutError), is_critical=True)
    assert handler.retryable_exceptions == (ConnectionError, TimeoutError) and handler.is_critical
    assert handler.is_retryable(["ConnectionRefusedError", "ConnectionError", "OSError", "Exception"])
    assert not handler.is_retryable(["ValueError", "Exception"])
    assert "is_critical=True" in repr(handler)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"strategy": 5}, TypeError, "strategy must be an ErrorStrategy or its string value, got int"),
        ({"strategy": None}, TypeError, "got NoneType"),
        ({"strategy": "sometimes"}, ValueError, "unknown error strategy 'sometimes'"),
        ({"retryable_exceptions": [42]}, TypeError, "exception classes or their names, got 42"),
        ({"retryable_exceptions": [dict]}, TypeError, "got <class 'dict'>"),
        ({"max_retries": -1}, ValueError, "max_retries must be >= 0"),
    ],
)
def test_error_handler_refuses_bad_options(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ErrorHandler(**kwargs)


def test_job_status_is_an_enum_equal_to_its_string() -> None:
    job = JobContext("j", "w", "f")
    assert job.status is JobStatus.PENDING and job.status == "pending" and job.status.value == "pending"
    job.status = "completed"  # the runtime sets plain strings
    assert job.status is JobStatus.COMPLETED
    assert f"{job.status}" == str(job.status) == "completed" and repr(job.status) == "'completed'"
    assert json.dumps({"s": job.status}) == '{"s": "completed"}' and job.to_dict()["status"] == "completed"
    assert {"completed": 1}[job.status] == 1 and pickle.loads(pickle.dumps(job)).status is JobStatus.COMPLETED
    job.set_data("processed", True)
    assert job.get_data("processed") is True and job.get_data("missing", 0) == 0


def test_execution_status_compares_with_worker_status() -> None:
    from routilux_mp import ExecutionStatus

    assert ExecutionStatus.RUNNING == "running" and ExecutionStatus("stopped") is ExecutionStatus.STOPPED


# -- with worker processes ------------------------------------------------------------


class MethodLogic(Routine):
    """routilux 1.1.0's style: a ``logic`` method taking the context by keyword."""

    def __init__(self):
        super().__init__()
        self.add_slot("input")
        self.add_event("output", ["text"])

    def logic(self, slot_data, policy_message=None, worker_state=None):
        for item in slot_data["input"]:
            self.set_state(worker_state, "last", item["text"])
            self.set_job_data("seen", True)
            self.emit("output", text=item["text"].upper(), reason=policy_message["reason"],
                      state=self.get_state(worker_state, "last"))


class Sink(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("input")


def test_logic_methods_sinks_and_routine_name_run_on_workers(make_runtime) -> None:
    flow = Flow("styles").pipe(MethodLogic(), "upper")
    sink_flow = Flow("sink").pipe(Sink(), "sink")
    runtime = make_runtime(processes=2)
    ws, job = runtime.post(flow.flow_id, routine_name="upper", slot_name="input", data={"text": "hi"})
    _, sunk = runtime.post(sink_flow.flow_id, "sink", "input", {"x": 1})
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert job.status == JobStatus.COMPLETED, job.error
    assert job.outputs == [{"routine": "upper", "event": "output",
                            "data": {"text": "HI", "reason": "immediate", "state": "hi"}}]
    assert job.data == {"upper_seen": True} and ws.get_routine_state("upper") == {"last": "hi"}
    assert sunk.status == "completed" and sunk.outputs == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"routine_id": "upper", "routine_name": "other", "slot_name": "input", "data": {}}, "give one"),
        ({"routine_name": "upper", "data": {}}, "missing required argument 'slot_name'"),
        ({"slot_name": "input", "data": {}}, "missing required argument 'routine_id'"),
        ({"routine_name": "upper", "slot_name": "input"}, "missing required argument 'data'"),
    ],
)
def test_post_names_its_missing_or_conflicting_arguments(make_runtime, kwargs: dict, message: str) -> None:
    flow = Flow("styles").pipe(MethodLogic(), "upper")
    runtime = make_runtime(processes=1)
    with pytest.raises(TypeError, match=message):
        runtime.post(flow.flow_id, **kwargs)
    assert runtime.list_jobs() == []


def _flaky_then_exit(slot_data, policy_message, worker_state):
    for item in slot_data["in"]:
        if item["kind"] == "exit":
            raise SystemExit(3)
        if worker_state.increment("tries", item["kind"]) == 1:
            raise ConnectionError("dropped")


@pytest.mark.parametrize(
    ("kind", "retryable", "status", "attempts"),
    [
        ("net", (ConnectionError,), "completed", 2),
        ("net", (ValueError,), "failed", 1),
        ("exit", None, "failed", 1),  # the default (Exception,) does not retry SystemExit
    ],
)
def test_retryable_exception_classes_decide_retries(make_runtime, kind, retryable, status, attempts) -> None:
    routine = Routine()
    routine.add_slot("in")
    routine.set_logic(_flaky_then_exit)
    routine.set_error_handler(ErrorHandler("retry", max_retries=2, retry_delay=0.01, retryable_exceptions=retryable))
    flow = Flow("retry").pipe(routine, "r")
    runtime = make_runtime(processes=1)
    _, job = runtime.post(flow.flow_id, "r", "in", {"kind": kind})
    assert job.wait(WAIT)
    assert (job.status, job.attempts) == (status, attempts), job.error


class Gated(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("in")
        self.add_event("out")

    def logic(self, slot_data, policy_message, worker_state):
        worker_state.increment("started", "n")
        with worker_state.lock("gate"):
            pass
        self.emit("out", done=True)


def test_complete_job_ends_a_running_job_early(make_runtime) -> None:
    flow = Flow("gated").pipe(Gated(), "g")
    runtime = make_runtime(processes=1, prefetch=0)
    ws = runtime.exec(flow.flow_id)
    with ws.lock("gate"):
        _, running = runtime.post("gated", "g", "in", {})
        _, queued = runtime.post("gated", "g", "in", {})
        wait_until(lambda: (ws.get_routine_state("started") or {}).get("n") == 1, "the first job to start",
                   job=running)
        assert runtime.complete_job(running.job_id, "failed", error="operator stopped it")
        assert running.status == JobStatus.FAILED and running.error["message"] == "operator stopped it"
        assert running.error["type"] == "routilux_mp.errors.RoutiluxError"
        assert runtime.complete_job(queued.job_id, "cancelled")
        assert queued.status == "cancelled" and queued.error is None
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert running.outputs == [] and queued.outputs == []  # the running activation's emit was dropped
    assert not runtime.complete_job(running.job_id) and not runtime.complete_job("no-such-job")
    _, later = runtime.post("gated", "g", "in", {})
    assert later.wait(WAIT) and later.status == "completed" and later.outputs[0]["data"] == {"done": True}
    with pytest.raises(ValueError, match="status must be"):
        runtime.complete_job(later.job_id, "done")
    assert ws.jobs_processed == 2 and ws.jobs_failed == 1  # cancelled jobs are not processed


def test_wait_for_completion_waits_for_one_worker(make_runtime) -> None:
    flow = Flow("gated").pipe(Gated(), "g")
    batch = Routine()
    batch.add_slot("in")
    batch.set_activation_policy(batch_size_policy(10))
    batch_flow = Flow("batch").pipe(batch, "b")
    runtime = make_runtime(processes=2, prefetch=0)
    gated_ws = runtime.exec("gated")
    batch_ws = runtime.exec("batch")
    with gated_ws.lock("gate"):
        _, held = runtime.post("gated", "g", "in", {})
        _, partial = runtime.post("batch", "b", "in", {"x": 1})  # a partial batch: flushed by the wait
        assert WorkerState.wait_for_completion(batch_flow, batch_ws, timeout=WAIT)
        assert partial.status == "completed" and not held.done
        assert not runtime.wait_until_all_jobs_finished(0.2, worker_id=gated_ws.worker_id)
        with pytest.raises(ValueError, match="runs flow 'gated', not 'batch'"):
            WorkerState.wait_for_completion(batch_flow, gated_ws)
    assert WorkerState.wait_for_completion(flow, gated_ws, timeout=WAIT) and held.status == "completed"
    assert runtime.wait_until_all_workers_idle(timeout=WAIT)
    with pytest.raises(errors.WorkerNotRunningError, match="no worker 'nope'"):
        runtime.wait_until_all_jobs_finished(1, worker_id="nope")
    runtime.shutdown()
    assert WorkerState.wait_for_completion(None, gated_ws)  # its runtime is gone: nothing of it runs


def _wait_inside(slot_data, policy_message, worker_state):
    WorkerState.wait_for_completion(None, worker_state, timeout=1)


def test_wait_for_completion_inside_logic_is_refused(make_runtime) -> None:
    routine = Routine()
    routine.add_slot("in")
    routine.set_logic(_wait_inside)
    flow = Flow("inside").pipe(routine, "r")
    runtime = make_runtime(processes=1)
    _, job = runtime.post(flow.flow_id, "r", "in", {})
    assert job.wait(WAIT) and job.status == "failed"
    assert "no Runtime of this process runs worker" in job.error["message"]


def test_emitting_a_dict_positionally_fails_the_activation_clearly(make_runtime) -> None:
    routine = Routine()
    routine.add_slot("in")
    routine.add_event("output")
    routine.set_logic(lambda slot_data, message, ws: routine.emit("output", {"result": 1}))
    flow = Flow("dict-emit").pipe(routine, "r")
    runtime = make_runtime(processes=1)
    _, job = runtime.post(flow.flow_id, "r", "in", {})
    assert job.wait(WAIT) and job.status == "failed" and job.error["type"] == "TypeError"
    assert "takes the data as keyword arguments" in job.error["message"]


def test_decorated_routines_run_and_route_errors(make_runtime) -> None:
    from routilux_mp import routine

    @routine()
    def invert(item):
        return 1 / item["x"]

    guarded = invert()
    guarded.add_event("error")
    flows = [Flow("invert").pipe(invert(), "plain"), Flow("guarded").pipe(guarded, "guarded")]
    runtime = make_runtime(processes=2)
    jobs = {flow.flow_id: [runtime.post(flow.flow_id, rid, "input", {"x": x})[1] for x in (2, 0)]
            for flow, rid in zip(flows, ("plain", "guarded"))}
    assert runtime.wait_until_all_jobs_finished(WAIT)
    plain_ok, plain_bad = jobs["invert"]
    assert plain_ok.outputs[0]["data"] == {"result": 0.5}
    assert plain_bad.status == "failed" and plain_bad.error["type"] == "ZeroDivisionError"
    guarded_ok, guarded_bad = jobs["guarded"]
    assert guarded_ok.outputs[0]["data"] == {"result": 0.5} and guarded_bad.status == "completed"
    assert guarded_bad.outputs[0]["event"] == "error"
    assert guarded_bad.outputs[0]["data"] == {"error": "division by zero", "data": {"x": 0}}


def test_flow_started_by_flow_id_without_registering(make_runtime) -> None:
    flow = Flow()  # a random flow_id
    flow.pipe(MethodLogic(), "upper")
    runtime = make_runtime(processes=1)
    ws = runtime.exec(flow.flow_id)
    _, job = runtime.post(flow.flow_id, "upper", "input", {"text": "x"}, worker_id=ws.worker_id)
    assert job.wait(WAIT) and job.status == "completed"


def test_a_routine_holding_a_lock_is_refused_with_the_way_out(make_runtime) -> None:
    routine = Sink()
    routine._lock = threading.Lock()
    flow = Flow("locked").pipe(routine, "r")
    runtime = make_runtime(processes=1)
    with pytest.raises(errors.SerializationError, match="cannot be sent to worker processes.*no open files, locks"):
        runtime.exec(flow.flow_id)


# -- examples in routilux 1.1.0's style -------------------------------------------------

EXAMPLE_OUTPUTS = {
    "quickstart.py": ["True completed", "True 123", "['processor: test']"],
    "pipeline.py": [
        "['double', 'add_ten', 'printer']",
        "[('output', 'result'), ('done', 'done')]",
        "AddTen",
        "['completed', 'completed', 'completed']",
        "{'result': 20}",
    ],
    "error_handling.py": [
        "True True",
        "continue",
        "completed 2 {'value': 'a'}",
        "failed routilux_mp.errors.ExecutionError bad input (routine_id=strict)",
        "True RuntimeClosedError",
    ],
    "custom_policy.py": [
        "False",
        "(True, {'input': [{'n': 1}, {'n': 2}]}, {'first': 1, 'left': 0})",
        "[[({'total': 3}, 2)], [({'total': 3}, 2)], [({'total': 7}, 2)], [({'total': 7}, 2)]]",
        "{'last_total': 7} {'pairs_first': 1} {'pairs_first': 3}",
    ],
    "resources.py": ["SerializationError True", "{'value': 'ABC'} {'fetched': 1}"],
}


def test_every_example_is_checked() -> None:
    assert sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py")) == sorted(EXAMPLE_OUTPUTS)


@pytest.mark.parametrize("name", sorted(EXAMPLE_OUTPUTS))
def test_upstream_style_examples_run(name: str, tmp_path, python_env) -> None:
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name)], check=False, capture_output=True,
                          text=True, timeout=WAIT, env=python_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == EXAMPLE_OUTPUTS[name], proc.stderr
