"""Where the state server keeps what must outlive a call: the ``StateBackend`` seam, and ``MemoryBackend``.

The store (``store.StateStore``) owns the semantics: versions, lost-update
detection, the size and JSON rules, lock leases and their waiters, ``modify``
with its budget, replays of retried calls. A backend only keeps things, in
the shape of huey's ``BaseStorage``: whole operations, no partial reads or
writes. ``sqlite.SqliteBackend`` keeps them in a file; :class:`MemoryBackend`
in the server's memory. Backends are chosen by name (``backends.BACKENDS``).

What a backend keeps:

* **cells**: one routine state of one worker: its value (a JSON dict), its
  version (1 for the first write, +1 per write) and its size (bytes as
  compact JSON, kept exact so size checks never re-encode), loaded and saved
  whole;
* **worker meta**: a worker's flow id, status and job counters;
* **requests**: per client (one thread of one process), the last write call
  applied and its reply, so a call retried after a server restart is answered
  from it instead of being applied twice;
* **effects**: for exactly-once runs, the reply of each state write an
  activation made, by ``EffectKey``, so a re-run of that activation (a retry,
  or a resumed job) replays it instead of applying it again;
* **the journal** of a resumable CLI run: its description, one record per
  input line that ended, and where its output files end.

**Lock leases never persist**: they belong to live processes and stay in the
store, as do waiters and lost-update counters.

Calling rules (so backends need no locking of their own for their caches):

* The store calls every method with its condition held, one call at a time,
  except :meth:`StateBackend.sync`, the only method called without it.
* ``load*`` may return the backend's own objects (``MemoryBackend`` does: no
  copy per call). The store never mutates them, except that a backend with
  :attr:`~StateBackend.in_place` lets it build a new value in place from a
  loaded one (``increment``), which it then passes to ``save`` at once.
* ``save`` takes ownership of the value it is given: nobody changes it after.

Durability (:attr:`~StateBackend.durable` backends): write methods *stage*
a change: later loads see it at once. One store operation may stage several
changes (a cell, the request's reply, an effect): it ends with
:meth:`~StateBackend.seal`, which returns a *ticket* covering all of them,
and ``sync(ticket)`` returns once a commit that includes them finished, so a
sealed operation is committed whole or not at all: the reply of a request is
never durable without its write, nor the write without it. The store
acknowledges a write only after its ``sync``.

*When* it syncs depends on :attr:`~StateBackend.group_commit`. A commit that
waits for the disk (``fsync``) is synced after the store released its
condition: while one commit runs other threads go on staging, and the next
commit takes all of them (group commit). A commit that only hands its pages
to the operating system costs ~15 microseconds of CPU and no wait: then the
store syncs at once, condition held, which measured 1.5x faster from 2-4
threads than handing commits between threads (the GIL convoy costs more than
grouping saves), and a reader never sees a write that is not durable. In
group-commit mode, a store that reads waits for
:meth:`~StateBackend.read_ticket` first, for the same reason.
``MemoryBackend`` is not durable: the store never calls ``seal``/``sync``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

#: ``(job_id, routine_id, activation digest, write number)``: one state write of one activation.
EffectKey = tuple[str, str, bytes, int]


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


class JournalView(NamedTuple):
    """What a file's journal holds: the run's description, its output offsets, and the lines that ended."""

    #: The run's description as the CLI saved it (input fingerprint, flow, entry, files...).
    run: dict
    #: ``{name: bytes}``: where each output file of the run ends, as of the last record.
    offsets: dict[str, int]
    #: Input line numbers whose job completed, ascending.
    completed: list[int]
    #: Input line numbers whose job failed, ascending.
    failed: list[int]


class JournalLine(NamedTuple):
    """One input line that ended: its number, job id, ``completed``/``failed``, and the error as JSON text."""

    line: int
    job_id: str
    status: str
    error: str | None


class StateBackend:
    """Keeps cells, worker meta, requests, effects and the journal; see the module docstring for the rules."""

    #: The name this backend is chosen by (its key in ``backends.BACKENDS``).
    name: ClassVar[str] = ""
    #: Writes must be sealed and synced before they are acknowledged; False: the store skips both.
    durable: ClassVar[bool] = False
    #: The store may build a value in place from a loaded one (the backend never reads it unguarded).
    in_place: ClassVar[bool] = False
    #: A restarted server finds what this backend kept (so the supervisor may restart it).
    survives_restart: ClassVar[bool] = False
    #: ``sync`` waits for the disk (fsync): the store calls it without its condition so that commits group.
    #: False: a commit costs little CPU and no wait, and the store syncs right away, condition held.
    group_commit = False

    # -- cells -----------------------------------------------------------------

    def load(self, worker_id: str, routine_id: str) -> StoredCell | None:
        """The cell of ``routine_id`` of worker ``worker_id``, or ``None`` if it was never saved."""
        raise NotImplementedError

    def save(self, worker_id: str, routine_id: str, value: dict, version: int, size: int) -> None:
        """Stage a cell whole: value, version and size.

        The store has checked everything: ``value`` is a JSON dict of ``size``
        bytes as compact JSON, ``version`` is the previous version + 1.
        """
        raise NotImplementedError

    def load_worker(self, worker_id: str) -> dict[str, StoredCell]:
        """Every cell of worker ``worker_id`` by routine id (empty if none); read-only to the caller."""
        raise NotImplementedError

    # -- workers ---------------------------------------------------------------

    def load_meta(self, worker_id: str) -> WorkerMeta | None:
        """Worker ``worker_id``'s meta, or ``None`` if it was never saved."""
        raise NotImplementedError

    def save_meta(self, worker_id: str, meta: WorkerMeta) -> None:
        """Stage worker ``worker_id``'s meta whole."""
        raise NotImplementedError

    def add_job_counts(self, deltas: dict[str, tuple[int, int]]) -> None:
        """Add ``(processed, failed)`` to each worker's job counters (default meta for a worker without)."""
        raise NotImplementedError

    def list_workers(self) -> list[str]:
        """Ids of every worker with meta or at least one cell, in the order they were first saved."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, tuple[WorkerMeta | None, dict[str, StoredCell]]]:
        """Every worker's meta (``None`` if never saved) and cells, as one consistent view; read-only."""
        raise NotImplementedError

    # -- retried calls ---------------------------------------------------------

    def load_request(self, client: str) -> tuple[int, bytes] | None:
        """``(seq, pickled reply)`` of the last write call of ``client`` that was applied, or ``None``."""
        raise NotImplementedError

    def save_request(self, client: str, pid: int, seq: int, reply: bytes) -> None:
        """Stage the reply of write call ``seq`` of ``client`` (a thread of process ``pid``)."""
        raise NotImplementedError

    def drop_requests(self, pid: int) -> None:
        """Forget the requests of every client of process ``pid`` (it died: it will not retry)."""
        raise NotImplementedError

    # -- exactly-once effects --------------------------------------------------

    def load_effect(self, key: EffectKey) -> bytes | None:
        """The pickled reply of the state write ``key``, or ``None`` if it was never made."""
        raise NotImplementedError

    def save_effect(self, key: EffectKey, reply: bytes) -> None:
        """Stage the reply of the state write ``key``."""
        raise NotImplementedError

    def drop_effects(self, job_ids: list[str]) -> None:
        """Forget the effects of these jobs (they completed for good: they will never run again)."""
        raise NotImplementedError

    # -- the journal -----------------------------------------------------------

    def load_journal(self, lines: bool = True) -> JournalView | None:
        """The journal, staged records included, or ``None`` if no run was ever journaled here.

        With ``lines=False`` only the run and its offsets (the line lists are empty).
        """
        raise NotImplementedError

    def save_journal(self, run: dict | None, lines: list[JournalLine], offsets: dict[str, int] | None,
                     new_run: bool = False) -> None:
        """Stage journal records: the run's description (when given), ended lines, output offsets.

        ``new_run`` first forgets every line and offset of an earlier run.
        """
        raise NotImplementedError

    # -- durability ------------------------------------------------------------

    def seal(self) -> int:
        """End one store operation: return the ticket of everything it staged (durable backends only)."""
        raise NotImplementedError

    def read_ticket(self) -> int:
        """The ticket a reader must wait for: everything sealed so far (0: nothing is pending)."""
        raise NotImplementedError

    def sync(self, ticket: int) -> None:
        """Return once everything sealed up to ``ticket`` is durable (committed).

        The one method called *without* the store's condition, possibly from
        many threads at once: concurrent callers share one commit. Never
        called with ticket 0.

        Raises:
            BackendFailed: the commit failed; the backend is unusable (the server exits).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Make every staged write durable and release the backend's resources (the server is stopping)."""
        raise NotImplementedError


class BackendFailed(Exception):
    """A durable backend could not commit: what it holds in memory may differ from its file from now on."""


class MemoryBackend(StateBackend):
    """Dicts in the state server's memory: fast, and gone with the process (nothing to sync)."""

    name = "memory"
    in_place = True

    def __init__(self) -> None:
        """An empty store."""
        #: ``{worker_id: {routine_id: StoredCell}}``
        self._cells: dict[str, dict[str, StoredCell]] = {}
        #: ``{worker_id: WorkerMeta}``
        self._metas: dict[str, WorkerMeta] = {}
        #: Every worker id ever saved, in first-saved order (a dict as an ordered set).
        self._workers: dict[str, None] = {}
        #: ``{client: (pid, seq, reply)}``
        self._requests: dict[str, tuple[int, int, bytes]] = {}
        #: ``{job_id: {(routine_id, activation, op): reply}}``
        self._effects: dict[str, dict[tuple[str, bytes, int], bytes]] = {}
        #: The journal: ``None`` until a run is journaled, then ``[run, offsets, {line: JournalLine}]``.
        self._journal: list | None = None

    def load(self, worker_id: str, routine_id: str) -> StoredCell | None:
        """The kept cell itself (no copy)."""
        cells = self._cells.get(worker_id)
        return None if cells is None else cells.get(routine_id)

    def save(self, worker_id: str, routine_id: str, value: dict, version: int, size: int) -> None:
        """Update the kept cell in place, or add it (``value`` itself, no copy)."""
        cells = self._cells.get(worker_id)
        if cells is None:
            cells = self._cells[worker_id] = {}
            self._workers[worker_id] = None
        cell = cells.get(routine_id)
        if cell is None:
            cells[routine_id] = StoredCell(value, version, size)
        else:
            cell.value, cell.version, cell.size = value, version, size

    def load_worker(self, worker_id: str) -> dict[str, StoredCell]:
        """The kept cells themselves (no copy)."""
        return self._cells.get(worker_id) or {}

    def load_meta(self, worker_id: str) -> WorkerMeta | None:
        """The kept meta itself (no copy)."""
        return self._metas.get(worker_id)

    def save_meta(self, worker_id: str, meta: WorkerMeta) -> None:
        """Keep ``meta``."""
        self._metas[worker_id] = meta
        self._workers[worker_id] = None

    def add_job_counts(self, deltas: dict[str, tuple[int, int]]) -> None:
        """Add to the kept counters in place."""
        for worker_id, (processed, failed) in deltas.items():
            meta = self._metas.get(worker_id)
            if meta is None:
                meta = self._metas[worker_id] = WorkerMeta()
                self._workers[worker_id] = None
            meta.jobs_processed += processed
            meta.jobs_failed += failed

    def list_workers(self) -> list[str]:
        """Every worker id saved so far."""
        return list(self._workers)

    def snapshot(self) -> dict[str, tuple[WorkerMeta | None, dict[str, StoredCell]]]:
        """The kept objects themselves, by worker."""
        return {wid: (self._metas.get(wid), self._cells.get(wid) or {}) for wid in self._workers}

    def load_request(self, client: str) -> tuple[int, bytes] | None:
        """The kept reply of ``client``'s last write."""
        kept = self._requests.get(client)
        return None if kept is None else kept[1:]

    def save_request(self, client: str, pid: int, seq: int, reply: bytes) -> None:
        """Keep it (replacing the client's previous one)."""
        self._requests[client] = (pid, seq, reply)

    def drop_requests(self, pid: int) -> None:
        """Forget ``pid``'s clients."""
        for client in [c for c, kept in self._requests.items() if kept[0] == pid]:
            del self._requests[client]

    def load_effect(self, key: EffectKey) -> bytes | None:
        """The kept reply of ``key``."""
        effects = self._effects.get(key[0])
        return None if effects is None else effects.get(key[1:])

    def save_effect(self, key: EffectKey, reply: bytes) -> None:
        """Keep it."""
        self._effects.setdefault(key[0], {})[key[1:]] = reply

    def drop_effects(self, job_ids: list[str]) -> None:
        """Forget those jobs' effects."""
        for job_id in job_ids:
            self._effects.pop(job_id, None)

    def load_journal(self, lines: bool = True) -> JournalView | None:
        """The kept journal."""
        if self._journal is None:
            return None
        run, offsets, records = self._journal
        if not lines:
            records = {}
        return JournalView(dict(run), dict(offsets),
                           sorted(n for n, rec in records.items() if rec.status == "completed"),
                           sorted(n for n, rec in records.items() if rec.status == "failed"))

    def save_journal(self, run: dict | None, lines: list[JournalLine], offsets: dict[str, int] | None,
                     new_run: bool = False) -> None:
        """Keep the records."""
        if self._journal is None or new_run:
            self._journal = [{}, {}, {}]
        if run is not None:
            self._journal[0] = dict(run)
        if offsets:
            self._journal[1].update(offsets)
        for rec in lines:
            self._journal[2][rec.line] = rec

    def seal(self) -> int:
        """Nothing to make durable."""
        return 0

    def read_ticket(self) -> int:
        """Nothing is ever pending in memory."""
        return 0

    def sync(self, ticket: int) -> None:
        """Nothing is ever pending in memory."""

    def close(self) -> None:
        """Drop everything (the process is ending anyway)."""
        self._cells.clear()
        self._metas.clear()
        self._workers.clear()
        self._requests.clear()
        self._effects.clear()
        self._journal = None
