"""routilux 1.1.0's ``@routine()`` decorator and ``Flow.pipe`` chaining, with the prefix changed."""

from routilux_mp import Flow, Routine, Runtime, routine


@routine()
def double(item):
    return item["value"] * 2


@routine(input_slot="result", output_event="done", name="AddTen")
def add_ten(item):
    return item["result"] + 10


class Printer(Routine):
    """A sink: it declares no logic of its own, so it only consumes."""

    def __init__(self):
        super().__init__()
        self.define_slot("done")


flow = (Flow("pipeline")
        .pipe(double(), "double")
        .pipe(add_ten(), "add_ten", to_slot="result")
        .pipe(Printer(), "printer", from_event="done", to_slot="done"))

print([rid for rid, _ in flow.find_routines_by_type(Routine)])
print([(c.source_event.name, c.target_slot.name) for c in flow.connections])
print(type(flow.routines["add_ten"]).__name__)

with Runtime(thread_pool_size=2) as runtime:
    jobs = [runtime.post("pipeline", "double", "input", {"value": v})[1] for v in (1, 2, 3)]
    runtime.wait_until_all_workers_idle(timeout=60)
    print([job.status.value for job in jobs])

# The same chain without the sink: results are the job's outputs.
flow2 = Flow("pipeline2").pipe(double(), "double").pipe(add_ten(), "add_ten", to_slot="result")
with Runtime(thread_pool_size=2) as runtime:
    _, job = runtime.post("pipeline2", "double", "input", {"value": 5})
    job.wait(60)
    print(job.outputs[0]["data"])
