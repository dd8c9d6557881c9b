"""A routilux 1.1.0-style activation policy: a function over the slots' queue methods, tried offline first."""

from routilux_mp import Flow, Routine, Runtime


def pairs_policy(slots, worker_state):
    """Activate on two items at a time; the message says how many wait."""
    slot = slots["input"]
    if slot.get_unconsumed_count() < 2:
        return False, {}, None
    first = slot.peek_one_new()
    items = [slot.consume_one_new(), slot.consume_one_new()]
    return True, {"input": items}, {"first": first["n"], "left": slot.get_unconsumed_count()}


class Pairs(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("input")
        self.add_event("pair", ["total"])
        self.set_activation_policy(pairs_policy)

    def logic(self, slot_data, policy_message, worker_state):
        total = sum(item["n"] for item in slot_data["input"])
        self.update_state(worker_state, {"last_total": total})
        self.set_job_data("first", policy_message["first"])
        self.emit("pair", total=total)


# Offline: the declaration slots hold a local buffer the policy can be tried on.
probe = Pairs()
probe.get_slot("input").enqueue(data={"n": 1}, emitted_from="test", emitted_at=None)
print(pairs_policy(probe.slots, None)[0])
probe.get_slot("input").enqueue(data={"n": 2}, emitted_from="test", emitted_at=None)
print(pairs_policy(probe.slots, None))

flow = Flow("pairs")  # known to the registry by its flow_id
flow.add_routine(Pairs(), "pairs")
with Runtime(thread_pool_size=2) as runtime:
    worker = runtime.exec("pairs")
    jobs = [runtime.post("pairs", "pairs", "input", {"n": n}, worker_id=worker.worker_id)[1] for n in (1, 2, 3, 4)]
    runtime.wait_until_all_jobs_finished(timeout=60)
    # A pair's emit names no job: it belongs to both jobs of the pair ("job_ids" lists them).
    print([[(out["data"], len(out["job_ids"])) for out in job.outputs] for job in jobs])
    print(worker.get_routine_state("pairs"), jobs[0].data, jobs[2].data)
