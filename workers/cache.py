"""The seed page's caching pattern: an expensive computation cached in WorkerState.

The routine keeps a cache and hit/miss statistics in its routine state. Unlike
the page (whose cache-hit branch never saves its statistics, so the hit count
repeats), this version saves them on hits too, with one atomic
``modify_routine_state``. Activations of one routine run one at a time per
worker, so the read-then-write is race-free.

Run it: ``python workers/cache.py`` (prints miss, miss, hit, miss, hit, hit).
"""

from __future__ import annotations

import hashlib
import time

from routilux_mp import Flow, FlowRegistry, Routine, Runtime
from routilux_mp.activation_policies import immediate_policy

#: Seconds the "expensive" computation takes.
WORK_SECONDS = 0.2


class ExpensiveDataProcessor(Routine):
    """Processes data with caching to avoid expensive recomputation."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("input")
        self.add_slot("clear_cache")
        self.add_event("output", ["result", "cached"])

        def process(slot_data, policy_message, worker_state):
            if slot_data["clear_cache"]:
                worker_state.update_routine_state("processor", {"cache": {}, "stats": {"hits": 0, "misses": 0}})
                print("Cache cleared!")
                return
            for item in slot_data["input"]:
                data = item.get("data", "")
                key = hashlib.md5(data.encode()).hexdigest()
                state = worker_state.get_routine_state("processor") or {}
                cache = state.get("cache", {})
                stats = state.get("stats", {"hits": 0, "misses": 0})
                if key in cache:
                    stats["hits"] += 1
                    print(f"CACHE HIT! Reusing cached result (hits: {stats['hits']})")
                    self.emit("output", result=cache[key], cached=True)
                else:
                    time.sleep(WORK_SECONDS)  # the expensive part
                    cache[key] = f"processed_{data.upper()}"
                    stats["misses"] += 1
                    print(f"Cache miss - processed and cached (misses: {stats['misses']})")
                    self.emit("output", result=cache[key], cached=False)
                worker_state.update_routine_state("processor", {"cache": cache, "stats": stats})

        self.set_logic(process)
        self.set_activation_policy(immediate_policy())


def build_flow() -> Flow:
    flow = Flow("cached_processor")
    flow.add_routine(ExpensiveDataProcessor(), "processor")
    return flow


FlowRegistry.get_instance().register_by_name("cached_processor", build_flow())


def main() -> int:
    with Runtime(processes=2) as runtime:
        ws = runtime.exec("cached_processor")
        jobs = [runtime.post("cached_processor", "processor", "input", {"data": d})[1]
                for d in ["hello", "world", "hello", "test", "hello", "world"]]
        runtime.wait_until_all_jobs_finished(timeout=30)
        print("cached flags:", [j.outputs[0]["data"]["cached"] for j in jobs])
        print("stats:", ws.get_routine_state("processor")["stats"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
