"""The seed page's connection-pool pattern, done the way that works across processes.

The page stores a pool (a dict of functions) in WorkerState. State is shared
JSON held by another process, so routilux-mp refuses that write with a
``StateNotSerializableError`` naming ``state['connection_pool']['get_connection']``.
A connection pool belongs to one process: ``worker_state.resource(name,
factory)`` makes it once per worker process, reuses it for every activation
there, and closes it when the process exits. Shared state keeps only JSON
(here, how many queries ran).

Run it: ``python workers/connection_pool.py`` (uses sqlite3 as the "database").
"""

from __future__ import annotations

import os
import sqlite3

from routilux_mp import Flow, FlowRegistry, Routine, Runtime


class ConnectionPool:
    """A tiny pool of sqlite3 connections to one in-memory database per process."""

    def __init__(self, size: int = 2) -> None:
        print(f"Initializing database connection pool in process {os.getpid()}...")
        self._free = [sqlite3.connect(":memory:", check_same_thread=False) for _ in range(size)]

    def get_connection(self) -> sqlite3.Connection:
        return self._free.pop()

    def return_connection(self, conn: sqlite3.Connection) -> None:
        self._free.append(conn)

    def close(self) -> None:
        for conn in self._free:
            conn.close()


class DatabaseQueryRoutine(Routine):
    def __init__(self) -> None:
        super().__init__()
        self.add_slot("query")
        self.add_event("result", ["data"])

        def query_logic(slot_data, policy_message, worker_state):
            pool = worker_state.resource("db_pool", ConnectionPool)
            for query in slot_data["query"]:
                conn = pool.get_connection()
                try:
                    rows = conn.execute(query["sql"]).fetchall()
                finally:
                    pool.return_connection(conn)
                worker_state.increment("db_accessor", "queries")
                self.emit("result", data=rows)

        self.set_logic(query_logic)
        self.set_max_concurrency(None)


def build_flow() -> Flow:
    flow = Flow("db")
    flow.add_routine(DatabaseQueryRoutine(), "db_accessor")
    return flow


FlowRegistry.get_instance().register_by_name("db", build_flow())


def main() -> int:
    with Runtime(processes=2) as runtime:
        ws = runtime.exec("db")
        jobs = [runtime.post("db", "db_accessor", "query", {"sql": f"SELECT {i} * {i}"})[1] for i in range(6)]
        runtime.wait_until_all_jobs_finished(timeout=30)
        print("results:", [j.outputs[0]["data"]["data"] for j in jobs])
        print("queries run:", ws.get_routine_state("db_accessor")["queries"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
