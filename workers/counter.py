"""The seed page's counter pattern: total requests and counts by type, in WorkerState.

The routine reads its state, updates it and writes it back. That is safe here
because activations of one routine run one at a time per worker (the default,
actor-like concurrency); a routine opened up with ``set_max_concurrency()``
would use ``increment`` instead.

Run it: ``python workers/counter.py``.
"""

from __future__ import annotations

from routilux_mp import Flow, FlowRegistry, Routine, Runtime
from routilux_mp.activation_policies import immediate_policy


class RequestCounter(Routine):
    def __init__(self) -> None:
        super().__init__()
        self.add_slot("request")
        self.add_event("response", ["request_id", "count"])

        def count_logic(slot_data, policy_message, worker_state):
            state = worker_state.get_routine_state("counter") or {}
            total = state.get("total_requests", 0)
            by_type = state.get("by_type", {})
            for req in slot_data["request"]:
                req_id = req.get("request_id", "unknown")
                req_type = req.get("type", "unknown")
                total += 1
                by_type[req_type] = by_type.get(req_type, 0) + 1
                worker_state.update_routine_state("counter", {"total_requests": total, "by_type": by_type})
                print(f"Request {req_id} ({req_type}) - Total: {total}")
                self.emit("response", request_id=req_id, count=total)

        self.set_logic(count_logic)
        self.set_activation_policy(immediate_policy())


def build_flow() -> Flow:
    flow = Flow("request_counter")
    flow.add_routine(RequestCounter(), "counter")
    return flow


FlowRegistry.get_instance().register_by_name("request_counter", build_flow())


def main() -> int:
    with Runtime(processes=2) as runtime:
        ws = runtime.exec("request_counter")
        for i, kind in enumerate(["read", "write", "read", "read", "delete"]):
            runtime.post("request_counter", "counter", "request", {"request_id": f"r{i}", "type": kind})
        runtime.wait_until_all_jobs_finished(timeout=30)
        print("final:", ws.get_routine_state("counter"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
