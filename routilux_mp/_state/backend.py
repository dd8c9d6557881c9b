"""Where the state server keeps routine states and worker meta: the ``StateBackend`` seam.

The store (``store.StateStore``) owns the semantics: versions, lost-update
detection, the size and JSON rules, lock leases and their waiters, ``modify``
with its budget. A backend only keeps what must outlive a call, in the shape
of huey's ``BaseStorage``: whole operations, no partial reads or writes.

* A **cell** is one routine state of one worker: its value (a JSON dict), its
  version (1 for the first write, +1 per write) and its size (bytes as compact
  JSON, kept exact so size checks never re-encode). A cell is loaded and saved
  whole: value, version and size in one transaction.
* **Worker meta** is a worker's flow id, status and job counters.
* **Lock leases never persist**: they belong to live processes and stay in
  the store, as do waiters and lost-update counters.

Calling rules (so backends need no locking):

* The store calls every method with its condition held, one call at a time,
  except :meth:`StateBackend.sync`, the only method called without it (see
  below).
* ``load*`` may return the backend's own objects (``MemoryBackend`` does:
  no copy per call). The store reads them under its condition and never
  mutates them, except that it may build a new value in place from a loaded
  one (``increment``) and then passes it to ``save`` at once, in the same
  hold of the condition. A backend whose ``save`` can fail must not leave
  such a mutation visible to later loads (drop its cached copy).
* ``save`` takes ownership of the value it is given.

Durability and group commit (for a backend on disk, e.g. SQLite in WAL mode):
every write method (``save``, ``save_meta``, ``add_job_counts``) returns a
*ticket*. The store acknowledges a write to its caller only after
``sync(ticket)`` returned, and it calls ``sync`` **after releasing its
condition**, so while one commit runs other threads go on staging writes,
and the next commit takes all of them (group commit). So a disk backend
stages writes (applies them to what ``load`` sees, and queues them) in the
write methods, and in ``sync`` makes sure a commit that includes the ticket
has finished: ``sync`` must be safe to call from many threads at once and must
not wait for the store's condition. Ticket ``0`` means "nothing to wait for":
``MemoryBackend`` always returns 0 and the store then skips ``sync``.
(Request-id deduplication for retried calls belongs in the same transaction
as the write it guards: a disk backend stages both together.)

Backends are chosen by name from :data:`BACKENDS` (``open_backend``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class StoredCell:
    """One routine state as kept: ``value`` (JSON dict), ``version`` and ``size`` (compact JSON bytes)."""

    __slots__ = ("size", "value", "version")

    def __init__(self, value: dict, version: int, size: int) -> None:
        """A cell holding ``value`` at ``version``."""
        self.value, self.version, self.size = value, version, size

    def __repr__(self) -> str:
        return f"StoredCell(version={self.version}, size={self.size})"


@dataclasses.dataclass
class WorkerMeta:
    """A worker's flow id, status and job counters.

    A worker process may write state before the supervisor's registration
    arrives: such a worker has the defaults until then.
    """

    flow_id: str = ""
    status: str = "running"
    jobs_processed: int = 0
    jobs_failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The meta as the plain dict ``WorkerState`` reads."""
        return {"flow_id": self.flow_id, "status": self.status, "jobs_processed": self.jobs_processed,
                "jobs_failed": self.jobs_failed}


class StateBackend:
    """Keeps routine states and worker meta for the store; see the module docstring for the calling rules."""

    #: The name this backend is chosen by (its key in :data:`BACKENDS`).
    name: ClassVar[str] = ""

    def load(self, worker_id: str, routine_id: str) -> StoredCell | None:
        """The cell of ``routine_id`` of worker ``worker_id``, or ``None`` if it was never saved."""
        raise NotImplementedError

    def save(self, worker_id: str, routine_id: str, value: dict, version: int, size: int) -> int:
        """Store a cell whole (value, version and size in one transaction); return its durability ticket.

        The store has checked everything: ``value`` is a JSON dict of ``size``
        bytes as compact JSON, ``version`` is the previous version + 1. Later
        loads see the new cell at once; it is durable once ``sync(ticket)``
        returned.
        """
        raise NotImplementedError

    def load_worker(self, worker_id: str) -> dict[str, StoredCell]:
        """Every cell of worker ``worker_id`` by routine id (empty if none); read-only to the caller."""
        raise NotImplementedError

    def load_meta(self, worker_id: str) -> WorkerMeta | None:
        """Worker ``worker_id``'s meta, or ``None`` if it was never saved."""
        raise NotImplementedError

    def save_meta(self, worker_id: str, meta: WorkerMeta) -> int:
        """Store worker ``worker_id``'s meta whole; return its durability ticket."""
        raise NotImplementedError

    def add_job_counts(self, deltas: dict[str, tuple[int, int]]) -> int:
        """Add ``(processed, failed)`` to each worker's job counters, all in one transaction.

        A worker without meta gets default meta first (see :class:`WorkerMeta`).
        Returns the durability ticket.
        """
        raise NotImplementedError

    def list_workers(self) -> list[str]:
        """Ids of every worker with meta or at least one cell, in the order they were first saved."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, tuple[WorkerMeta | None, dict[str, StoredCell]]]:
        """Every worker's meta (``None`` if never saved) and cells, as one consistent view; read-only."""
        raise NotImplementedError

    def sync(self, ticket: int) -> None:
        """Return once every write up to ``ticket`` is durable (committed).

        The one method called *without* the store's condition, possibly from
        many threads at once: concurrent callers should share one commit. The
        store never calls it with ticket 0.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Make every staged write durable and release the backend's resources (the server is stopping)."""
        raise NotImplementedError


class MemoryBackend(StateBackend):
    """Dicts in the state server's memory: fast, and gone with the process (nothing to sync)."""

    name = "memory"

    def __init__(self) -> None:
        """An empty store."""
        #: ``{worker_id: {routine_id: StoredCell}}``
        self._cells: dict[str, dict[str, StoredCell]] = {}
        #: ``{worker_id: WorkerMeta}``
        self._metas: dict[str, WorkerMeta] = {}
        #: Every worker id ever saved, in first-saved order (a dict as an ordered set).
        self._workers: dict[str, None] = {}

    def load(self, worker_id: str, routine_id: str) -> StoredCell | None:
        """The kept cell itself (no copy)."""
        cells = self._cells.get(worker_id)
        return None if cells is None else cells.get(routine_id)

    def save(self, worker_id: str, routine_id: str, value: dict, version: int, size: int) -> int:
        """Update the kept cell in place, or add it (``value`` itself, no copy); nothing to sync."""
        cells = self._cells.get(worker_id)
        if cells is None:
            cells = self._cells[worker_id] = {}
            self._workers[worker_id] = None
        cell = cells.get(routine_id)
        if cell is None:
            cells[routine_id] = StoredCell(value, version, size)
        else:
            cell.value, cell.version, cell.size = value, version, size
        return 0

    def load_worker(self, worker_id: str) -> dict[str, StoredCell]:
        """The kept cells themselves (no copy)."""
        return self._cells.get(worker_id) or {}

    def load_meta(self, worker_id: str) -> WorkerMeta | None:
        """The kept meta itself (no copy)."""
        return self._metas.get(worker_id)

    def save_meta(self, worker_id: str, meta: WorkerMeta) -> int:
        """Keep ``meta``; nothing to sync."""
        self._metas[worker_id] = meta
        self._workers[worker_id] = None
        return 0

    def add_job_counts(self, deltas: dict[str, tuple[int, int]]) -> int:
        """Add to the kept counters in place; nothing to sync."""
        for worker_id, (processed, failed) in deltas.items():
            meta = self._metas.get(worker_id)
            if meta is None:
                meta = self._metas[worker_id] = WorkerMeta()
                self._workers[worker_id] = None
            meta.jobs_processed += processed
            meta.jobs_failed += failed
        return 0

    def list_workers(self) -> list[str]:
        """Every worker id saved so far."""
        return list(self._workers)

    def snapshot(self) -> dict[str, tuple[WorkerMeta | None, dict[str, StoredCell]]]:
        """The kept objects themselves, by worker."""
        return {wid: (self._metas.get(wid), self._cells.get(wid) or {}) for wid in self._workers}

    def sync(self, ticket: int) -> None:
        """Nothing is ever pending in memory."""

    def close(self) -> None:
        """Drop everything (the process is ending anyway)."""
        self._cells.clear()
        self._metas.clear()
        self._workers.clear()


#: Backends by name: ``Runtime``'s state backend option names one of these.
BACKENDS: dict[str, type[StateBackend]] = {MemoryBackend.name: MemoryBackend}


def check_backend(name: str) -> type[StateBackend]:
    """The backend class called ``name``.

    Raises:
        ValueError: no backend has that name.
    """
    cls = BACKENDS.get(name)
    if cls is None:
        known = ", ".join(repr(n) for n in BACKENDS)
        raise ValueError(f"unknown state backend {name!r}; choose one of {known}")
    return cls


def open_backend(name: str, **options: Any) -> StateBackend:
    """A new backend of the class called ``name``, made with ``options``."""
    return check_backend(name)(**options)
