"""The seed page's statistics pattern, run in parallel with atomic operations.

``track`` opts into parallel activations (``set_max_concurrency(None)``), so a
read-modify-write of its state could lose updates. It uses ``increment`` for
counters and ``merge_routine_state`` for the last-seen value instead, which
are atomic in the state server whatever process calls them.

Run it: ``python workers/stats_tracker.py``.
"""

from __future__ import annotations

import time

from routilux_mp import Flow, FlowRegistry, Routine, Runtime


class StatsTracker(Routine):
    def __init__(self) -> None:
        super().__init__()
        self.add_slot("event")

        def track_stats(slot_data, policy_message, worker_state):
            for event in slot_data["event"]:
                worker_state.increment("stats", "processed")
                if event.get("error"):
                    worker_state.increment("stats", "errors")
                worker_state.merge_routine_state("stats", {"last_processed": time.time()})

        self.set_logic(track_stats)
        self.set_max_concurrency(None)


def build_flow() -> Flow:
    flow = Flow("stats")
    flow.add_routine(StatsTracker(), "stats")
    return flow


FlowRegistry.get_instance().register_by_name("stats", build_flow())


def main() -> int:
    with Runtime() as runtime:
        ws = runtime.exec("stats")
        for i in range(200):
            runtime.post("stats", "stats", "event", {"i": i, "error": i % 10 == 0})
        runtime.wait_until_all_jobs_finished(timeout=60)
        state = ws.get_routine_state("stats")
        print(f"processed={state['processed']} errors={state['errors']} (expected 200 and 20)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
