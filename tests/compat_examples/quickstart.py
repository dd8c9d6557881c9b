"""routilux 1.1.0's quick start (the ``routilux.core`` docstring), with ``routilux`` -> ``routilux_mp``.

A routine declares its slots and events and defines a ``logic`` method; the
job context carries per-request data; ``post`` names the routine with
``routine_name=``; ``WorkerState.wait_for_completion`` waits for the worker.
The one deliberate difference: logic receives ``slot_data``, a dict of slot
name -> items, where routilux 1.1.0 passed one list per slot.
"""

from routilux_mp.core import Flow, FlowRegistry, JobStatus, Routine, Runtime, WorkerState, get_current_job


class MyRoutine(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("input")
        self.add_event("output", ["result"])
        self.set_config(name="processor")

    def logic(self, slot_data, **kwargs):
        job = get_current_job()
        for item in slot_data["input"]:
            job.set_data("processed", True)
            job.trace("processor", "completed", {"count": 1})
            self.emit("output", result=f"{self.get_config('name')}: {item['data']}")


flow = Flow("my_flow")
flow.add_routine(MyRoutine(), "processor")
FlowRegistry.get_instance().register_by_name("my_flow", flow)

with Runtime(thread_pool_size=2) as runtime:
    worker, job = runtime.post("my_flow", routine_name="processor", slot_name="input", data={"data": "test"},
                               metadata={"user_id": "123"})
    assert WorkerState.wait_for_completion(flow, worker, timeout=60)
    print(job.status == JobStatus.COMPLETED, job.status.value)
    print(job.get_data("processed"), job.metadata["user_id"])
    print([output["data"]["result"] for output in job.outputs])
