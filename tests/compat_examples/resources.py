"""A routilux 1.1.0 routine that keeps a lock and a client in attributes, and its routilux-mp port.

Routines are shipped to worker processes, so a ``threading.Lock`` attribute
is refused when the flow starts (a clear SerializationError); per-process
objects come from ``worker_state.resource()`` and shared counters from the
atomic state operations.
"""

import threading

from routilux_mp import Flow, Routine, Runtime, SerializationError


class Client:
    def __init__(self):
        self.calls = 0

    def fetch(self, key):
        self.calls += 1
        return key.upper()


class Upstream(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("input")
        self.add_event("output", ["value"])
        self._lock = threading.Lock()
        self._client = Client()

    def logic(self, slot_data, policy_message, worker_state):
        with self._lock:
            for item in slot_data["input"]:
                self.emit("output", value=self._client.fetch(item["key"]))


class Ported(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("input")
        self.add_event("output", ["value"])

    def logic(self, slot_data, policy_message, worker_state):
        client = worker_state.resource("client", Client)
        for item in slot_data["input"]:
            worker_state.increment("ported", "fetched")
            self.emit("output", value=client.fetch(item["key"]))


upstream = Flow("upstream")  # flows are found by flow_id while they exist: keep them
upstream.add_routine(Upstream(), "fetch")
ported = Flow("ported")
ported.add_routine(Ported(), "fetch")
with Runtime(thread_pool_size=2) as runtime:
    try:
        runtime.exec("upstream")
    except SerializationError as exc:
        print(type(exc).__name__, "cannot be sent to worker processes" in str(exc))
    worker, job = runtime.post("ported", "fetch", "input", {"key": "abc"})
    job.wait(60)
    print(job.outputs[0]["data"], worker.get_routine_state("ported"))
