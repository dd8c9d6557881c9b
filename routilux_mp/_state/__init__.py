"""The state service: every WorkerState lives in one state-server process.

::

    protocol   the RPC: the exposed methods (``Method``), frames, limits, the server's config
    client     this process's link to the server (``StoreClient``, one connection per thread) and
               the supervisor's fire-and-forget ``StatePusher``; ``state.WorkerState`` calls it
    server     the server process: accepts, authenticates, serves ``Method`` calls on the store
    store      ``StateStore``: the live semantics (versions, lost updates, size and JSON rules,
               lock leases and their waiters, ``modify`` with a budget) over a backend
    modify     runs ``modify_routine_state`` functions on runner threads, each within a budget
    backend    ``StateBackend``: where routine states and worker meta are kept (``MemoryBackend``;
               chosen by name from ``BACKENDS``)
    launcher   the supervisor's side: the private socket, the authkey, start, death, stop

Processes that only use state import ``client`` (and ``protocol``); the rest
runs in the state server, or in the supervisor (``launcher``).
"""
