"""routilux 1.1.0's error-handling guide (routine-level over flow-level handlers), with the prefix changed."""

from routilux_mp import ErrorHandler, ErrorStrategy, Flow, FlowRegistry, Routine, Runtime
from routilux_mp.exceptions import ExecutionError, RoutiluxError


class Flaky(Routine):
    """Fails with ConnectionError on the first attempt of an item, then succeeds."""

    def __init__(self):
        super().__init__()
        self.add_slot("input")
        self.add_event("output", ["value"])

    def logic(self, slot_data, policy_message, worker_state):
        for item in slot_data["input"]:
            if worker_state.increment("flaky", item["key"]) == 1:
                raise ConnectionError("the service hung up")
            self.emit("output", value=item["key"])


class Strict(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("input")

    def logic(self, slot_data, policy_message, worker_state):
        raise ExecutionError("bad input", routine_id="strict")


flow = Flow("errors")
flow.set_error_handler(ErrorHandler(strategy=ErrorStrategy.CONTINUE))
flaky = Flaky()
flaky.set_error_handler(ErrorHandler(strategy=ErrorStrategy.RETRY, max_retries=3, retry_delay=0.01,
                                     retryable_exceptions=(ConnectionError, TimeoutError), is_critical=True))
flow.add_routine(flaky, "flaky")
strict = Strict()
strict.set_error_handler(ErrorHandler(strategy="stop"))
flow.add_routine(strict, "strict")
FlowRegistry.get_instance().register_by_name("errors", flow)

handler = flaky.get_error_handler()
print(handler.retryable_exceptions == (ConnectionError, TimeoutError), handler.is_critical)
print(flow.get_error_handler().strategy.value)

with Runtime(thread_pool_size=2) as runtime:
    _, ok = runtime.post("errors", "flaky", "input", {"key": "a"})
    _, bad = runtime.post("errors", "strict", "input", {})
    runtime.wait_until_all_jobs_finished(timeout=60)
    print(ok.status.value, ok.attempts, ok.outputs[0]["data"])
    print(bad.status.value, bad.error["type"], bad.error["message"])

try:
    runtime.post("errors", "strict", "input", {})
except RuntimeError as exc:  # routilux 1.1.0 raised RuntimeError after shutdown
    print(isinstance(exc, RoutiluxError), type(exc).__name__)
