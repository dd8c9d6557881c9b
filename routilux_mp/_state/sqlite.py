"""``SqliteBackend``: the state server's store kept in an SQLite file (WAL), with group commit.

Everything the file holds is also kept in memory (loaded when the server
starts): loads never touch the disk. Writes are *staged* (applied to the
memory copy, and queued) and committed by ``sync``: the first thread to call
it commits everything sealed so far in one transaction while the others wait
for that commit or the next, so N concurrent writers pay about one commit,
not N (group commit). The journal's lines are the exception: they are read
from the file when asked for (a run of millions of lines must not live in
the server's memory).

**What "committed" means here.** ``synchronous=NORMAL`` in WAL mode: a
commit has written its pages to the WAL file with ``write()`` before
``sync`` returns, so it is in the operating system's hands and survives the
SIGKILL of any or all of our processes (nothing is left to do in a process
that dies). It is not ``fsync``'d at each commit: after a power cut or a
kernel crash the file is intact but may lack the last commits. Pass
``synchronous="FULL"`` (``Runtime(state_sync="full")``) to fsync every
commit (group commit shares the fsync between concurrent writers).

A commit that fails (disk full, I/O error) leaves the memory copy ahead of
the file: the backend raises :class:`~.backend.BackendFailed` from then on
and the server exits, so the supervisor restarts it from what the file
holds; the writes of that commit were never acknowledged.
"""

from __future__ import annotations

import json
import pickle
import sqlite3
import threading

from .backend import BackendFailed, EffectKey, JournalLine, JournalView, MemoryBackend, StoredCell, WorkerMeta
from .statefile import connect

#: ``(flow_id, status, jobs_processed, jobs_failed)``: worker meta as staged (a snapshot, never mutated).
_MetaRow = tuple[str, str, int, int]

_INSERT_CELL = "INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, ?, ?)"

#: Compact JSON, as sizes are measured (non-ASCII escaped: a lone surrogate still encodes).
_encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
if json.encoder.c_make_encoder is not None:
    # The same encoder made once, not per call (a commit of a small state spends more on making it than on
    # encoding). No cycle check: a stored value is checked JSON already.
    _c_encoder = json.encoder.c_make_encoder(None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii,
                                             None, ":", ",", False, False, False)

    def _encode(value: dict) -> str:
        return "".join(_c_encoder(value, 0))

# Staged changes are tuples (cheap to make on the hot path), folded into one transaction by the committer:
_CELL, _WORKER, _REQUEST, _DROP_PID, _EFFECT, _DROP_JOBS, _JOURNAL = range(7)


class _Batch:
    """Staged changes folded for one commit: the latest of each cell, meta and request; the rest in order."""

    __slots__ = ("cells", "dropped_pids", "effect_ops", "journal_lines", "journal_run", "new_run", "offsets",
                 "requests", "workers")

    def __init__(self, ops: list[tuple]) -> None:
        """Fold ``ops`` (in the order they were staged)."""
        #: ``{(worker_id, routine_id): (value, version, size, requests of the clients that wrote it or None)}``
        self.cells: dict[tuple[str, str], tuple[dict, int, int, dict | None]] = {}
        #: ``{worker_id: (position, meta row or None)}``
        self.workers: dict[str, tuple[int, _MetaRow | None]] = {}
        #: ``{client: (pid, seq, reply)}``
        self.requests: dict[str, tuple[int, int, bytes]] = {}
        self.dropped_pids: list[int] = []
        #: ``(True, key, reply)`` to save, ``(False, job_ids)`` to drop, in order.
        self.effect_ops: list[tuple] = []
        self.new_run = False
        self.journal_run: dict | None = None
        self.journal_lines: dict[int, JournalLine] = {}
        self.offsets: dict[str, int] = {}
        for op in ops:
            kind = op[0]
            if kind == _CELL:
                self.cells[op[1]] = op[2]
            elif kind == _REQUEST:
                self.requests[op[1]] = op[2]
            elif kind == _WORKER:
                if op[2][1] is not None or op[1] not in self.workers:  # a bare row never hides staged meta
                    self.workers[op[1]] = op[2]
            elif kind == _DROP_PID:
                self.dropped_pids.append(op[1])
                for client in [c for c, staged in self.requests.items() if staged[0] == op[1]]:
                    del self.requests[client]
            elif kind == _EFFECT:
                self.effect_ops.append((True, op[1], op[2]))
            elif kind == _DROP_JOBS:
                self.effect_ops.append((False, op[1]))
            else:
                self._journal(*op[1:])

    @property
    def only_cells(self) -> bool:
        """Nothing but cells to write."""
        return not (self.workers or self.requests or self.dropped_pids or self.effect_ops or self.new_run
                    or self.journal_run is not None or self.journal_lines or self.offsets)

    def _journal(self, run: dict | None, lines: list[JournalLine], offsets: dict[str, int] | None,
                 new_run: bool) -> None:
        if new_run:
            self.new_run = True
            self.journal_run, self.journal_lines, self.offsets = None, {}, {}
        if run is not None:
            self.journal_run = run
        for rec in lines:
            self.journal_lines[rec.line] = rec
        if offsets:
            self.offsets.update(offsets)


class SqliteBackend(MemoryBackend):
    """Routine states, worker meta, requests, effects and a run journal in an SQLite file; see the module doc.

    What the file holds is mirrored in a :class:`MemoryBackend` (this class
    extends it): loads are answered from memory, writes change the mirror
    and stage the same change for the file.
    """

    name = "sqlite"
    durable = True
    in_place = False  # a saved value may be encoded by a commit outside the store's condition (group commit)
    survives_restart = True

    def __init__(self, path: str, synchronous: str = "NORMAL") -> None:
        """Open (or create) the state file ``path`` and load what it holds.

        Raises:
            StateFileError: the file cannot be used (see ``statefile.connect``).
        """
        super().__init__()
        self.path = path
        self._conn = connect(path, synchronous.upper(), exclusive=True)
        # Only a commit that waits for fsync is worth grouping (see ``backend``).
        self.group_commit = synchronous.upper() in ("FULL", "EXTRA")
        #: ``{worker_id: position}``: every worker's row, by first save
        self._positions: dict[str, int] = {}
        #: ``{(worker_id, routine_id): {client: (pid, seq, reply)}}``: the clients that wrote each cell last
        self._cell_requests: dict[tuple[str, str], dict[str, tuple[int, int, bytes]]] = {}
        #: Processes that died: their requests are dropped from a cell's record when it is next written.
        self._dead_pids: set[int] = set()
        #: The cell the store operation running now wrote (its request is kept in that row), and its staged op.
        self._written: tuple[str, str] | None = None
        self._written_at = 0
        #: Changes staged by the store operation running now (sealed at its end).
        self._open: list[tuple] = []
        self._load()
        #: Sealed changes waiting for a commit, in order.
        self._pending: list[tuple] = []
        self._sealed = 0  # the last ticket handed out
        self._durable = 0  # every ticket up to this one is committed
        self._stage_lock = threading.Lock()  # guards _pending and _sealed (the committer swaps them)
        self._commit_lock = threading.Lock()  # one commit at a time
        self._failed: str | None = None

    def _load(self) -> None:
        """Fill the mirror from the file."""
        conn = self._conn
        for wid, position, flow_id, status, processed, failed, has_meta in conn.execute(
                "SELECT worker_id, position, flow_id, status, jobs_processed, jobs_failed, has_meta "
                "FROM workers ORDER BY position"):
            self._positions[wid] = position
            self._workers[wid] = None
            if has_meta:
                self._metas[wid] = WorkerMeta(flow_id, status, processed, failed)
        for wid, rid, text, version, size, requests in conn.execute(
                "SELECT worker_id, routine_id, value, version, size, requests FROM cells"):
            self._cells.setdefault(wid, {})[rid] = StoredCell(json.loads(text), version, size)
            self._add_worker(wid)
            if requests is not None:
                kept = self._cell_requests[(wid, rid)] = pickle.loads(requests)
                for client, request in kept.items():
                    self._keep_latest(client, request)
        for client, pid, seq, reply in conn.execute("SELECT client, pid, seq, reply FROM requests"):
            self._keep_latest(client, (pid, seq, bytes(reply)))
        for job_id, rid, activation, op, reply in conn.execute(
                "SELECT job_id, routine_id, activation, op, reply FROM effects"):
            self._effects.setdefault(job_id, {})[(rid, bytes(activation), op)] = bytes(reply)
        self._open.clear()  # what was loaded is in the file already

    def _keep_latest(self, client: str, request: tuple[int, int, bytes]) -> None:
        """A client's last write is its highest numbered one (older ones may linger in other cells' rows)."""
        known = self._requests.get(client)
        if known is None or known[1] < request[1]:
            self._requests[client] = request

    # -- writes: the mirror's, staged for the file as well ---------------------

    def _add_worker(self, worker_id: str) -> None:
        if worker_id not in self._positions:
            position = self._positions[worker_id] = len(self._positions)
            self._workers[worker_id] = None
            self._open.append((_WORKER, worker_id, (position, None)))

    def _stage_meta(self, worker_id: str, meta: WorkerMeta) -> None:
        row = (meta.flow_id, meta.status, meta.jobs_processed, meta.jobs_failed)
        self._open.append((_WORKER, worker_id, (self._positions[worker_id], row)))

    def save(self, worker_id: str, routine_id: str, value: dict, version: int, size: int) -> None:
        """Keep the cell in memory and stage it."""
        self._add_worker(worker_id)
        super().save(worker_id, routine_id, value, version, size)
        key = self._written = (worker_id, routine_id)
        self._written_at = len(self._open)
        self._open.append((_CELL, key, (value, version, size, None)))

    def save_meta(self, worker_id: str, meta: WorkerMeta) -> None:
        """Keep ``meta`` and stage a snapshot of it."""
        self._add_worker(worker_id)
        super().save_meta(worker_id, meta)
        self._stage_meta(worker_id, meta)

    def add_job_counts(self, deltas: dict[str, tuple[int, int]]) -> None:
        """Add to the counters in memory and stage them."""
        for worker_id in deltas:
            self._add_worker(worker_id)
        super().add_job_counts(deltas)
        for worker_id in deltas:
            self._stage_meta(worker_id, self._metas[worker_id])

    def save_request(self, client: str, pid: int, seq: int, reply: bytes) -> None:
        """Keep it and stage it: in the row of the cell this operation wrote, else in the ``requests`` table."""
        staged = self._requests[client] = (pid, seq, reply)
        key = self._written
        if key is None:
            self._open.append((_REQUEST, client, staged))
            return
        kept = self._cell_requests.get(key)
        if kept is None:
            kept = self._cell_requests[key] = {}
        elif self._dead_pids:
            for gone in [c for c, request in kept.items() if request[0] in self._dead_pids]:
                del kept[gone]
        kept[client] = staged
        value, version, size, _ = self._open[self._written_at][2]  # the row carries a copy of the record
        self._open[self._written_at] = (_CELL, key, (value, version, size, dict(kept)))

    def drop_requests(self, pid: int) -> None:
        """Forget them in memory, and stage their deletion."""
        super().drop_requests(pid)
        self._dead_pids.add(pid)  # dropped from the cells' records as they are written
        self._open.append((_DROP_PID, pid))

    def save_effect(self, key: EffectKey, reply: bytes) -> None:
        """Keep it and stage it."""
        super().save_effect(key, reply)
        self._open.append((_EFFECT, key, reply))

    def drop_effects(self, job_ids: list[str]) -> None:
        """Forget them in memory, and stage their deletion."""
        dropped = [job_id for job_id in job_ids if job_id in self._effects]
        super().drop_effects(dropped)
        if dropped:
            self._open.append((_DROP_JOBS, dropped))

    # -- the journal -----------------------------------------------------------

    def load_journal(self, lines: bool = True) -> JournalView | None:
        """Commit what is staged, then read the journal from the file."""
        ticket = self.read_ticket()
        if ticket:
            self.sync(ticket)
        with self._commit_lock:
            conn = self._conn
            rows = dict(conn.execute("SELECT key, value FROM journal"))
            if "run" not in rows:
                return None
            offsets = {key[len("offset:"):]: int(value) for key, value in rows.items() if key.startswith("offset:")}
            if not lines:
                return JournalView(json.loads(rows["run"]), offsets, [], [])
            completed = [n for (n,) in conn.execute(
                "SELECT line FROM journal_lines WHERE status = 'completed' ORDER BY line")]
            failed = [n for (n,) in conn.execute("SELECT line FROM journal_lines WHERE status = 'failed' ORDER BY line")]
            return JournalView(json.loads(rows["run"]), offsets, completed, failed)

    def save_journal(self, run: dict | None, lines: list[JournalLine], offsets: dict[str, int] | None,
                     new_run: bool = False) -> None:
        """Stage the records."""
        self._open.append((_JOURNAL, None if run is None else dict(run), list(lines), dict(offsets or {}), new_run))

    # -- durability ------------------------------------------------------------

    def seal(self) -> int:
        """Queue what this operation staged for the next commit; its ticket (the last one if it staged nothing).

        Without group commit, the common operation (one cell, its request
        record in the row) is committed right here, as one statement.
        """
        self._written = None
        ops = self._open
        if not ops:
            return self._sealed
        self._open = []
        if not self.group_commit and len(ops) == 1 and ops[0][0] == _CELL:
            return self._commit_cell(ops[0])
        with self._stage_lock:
            self._pending += ops
            self._sealed += 1
            return self._sealed

    def _commit_cell(self, op: tuple) -> int:
        """Commit one staged cell now (nothing else may be pending: the store syncs every operation at once)."""
        with self._commit_lock:
            if self._failed is not None:
                raise BackendFailed(self._failed)
            with self._stage_lock:
                if self._pending:  # not expected without group commit; keep the order all the same
                    self._pending.append(op)
                    self._sealed += 1
                    return self._sealed
                self._sealed += 1
                ticket = self._sealed
            (wid, rid), (value, version, size, requests) = op[1], op[2]
            try:
                self._conn.execute(_INSERT_CELL, (wid, rid, _encode(value), version, size,
                                                  None if requests is None else pickle.dumps(requests)))
            except Exception as exc:
                self._failed = f"the state file {self.path!r} could not be written ({type(exc).__name__}: {exc})"
                raise BackendFailed(self._failed) from exc
            self._durable = ticket
            return ticket

    def read_ticket(self) -> int:
        """The last ticket handed out, or 0 when everything is committed."""
        sealed = self._sealed
        return 0 if sealed <= self._durable else sealed

    def sync(self, ticket: int) -> None:
        """Commit (or wait for a commit of) everything sealed up to ``ticket``."""
        if self._durable >= ticket:
            return
        with self._commit_lock:
            if self._failed is not None:
                raise BackendFailed(self._failed)
            if self._durable >= ticket:
                return  # a commit that finished while we waited took it
            with self._stage_lock:
                ops, self._pending = self._pending, []
                upto = self._sealed
            try:
                self._write(_Batch(ops))
            except Exception as exc:
                self._failed = f"the state file {self.path!r} could not be written ({type(exc).__name__}: {exc})"
                raise BackendFailed(self._failed) from exc
            self._durable = upto

    def _write(self, batch: _Batch) -> None:
        """Write one batch in one transaction."""
        conn = self._conn
        cells = [(wid, rid, _encode(value), version, size, None if requests is None else pickle.dumps(requests))
                 for (wid, rid), (value, version, size, requests) in batch.cells.items()]
        if len(cells) == 1 and batch.only_cells:
            # The common write: one row, its request record in it, as one statement in its own transaction
            # (one call into SQLite: each call hands the GIL over twice).
            conn.execute(_INSERT_CELL, cells[0])
            return
        conn.execute("BEGIN")
        try:
            if batch.workers:
                _write_workers(conn, batch.workers)
            if cells:
                conn.executemany(_INSERT_CELL, cells)
            if batch.dropped_pids:
                conn.executemany("DELETE FROM requests WHERE pid = ?", [(pid,) for pid in batch.dropped_pids])
            if batch.requests:
                conn.executemany("INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?)",
                                 [(client, *staged) for client, staged in batch.requests.items()])
            for op in batch.effect_ops:
                if op[0]:
                    conn.execute("INSERT OR REPLACE INTO effects VALUES (?, ?, ?, ?, ?)", (*op[1], op[2]))
                else:
                    conn.executemany("DELETE FROM effects WHERE job_id = ?", [(job_id,) for job_id in op[1]])
            if batch.new_run or batch.journal_run is not None or batch.journal_lines or batch.offsets:
                _write_journal(conn, batch)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Commit what is staged, then close the file."""
        try:
            if self._failed is None:
                ticket = self.seal()
                if ticket:
                    self.sync(ticket)
        finally:
            self._conn.close()


def _write_workers(conn: sqlite3.Connection, workers: dict[str, tuple[int, _MetaRow | None]]) -> None:
    bare = [(wid, position) for wid, (position, meta) in workers.items() if meta is None]
    if bare:
        conn.executemany("INSERT OR IGNORE INTO workers (worker_id, position) VALUES (?, ?)", bare)
    full = [(wid, position, *meta) for wid, (position, meta) in workers.items() if meta is not None]
    if full:
        conn.executemany(
            "INSERT OR REPLACE INTO workers (worker_id, position, flow_id, status, jobs_processed, jobs_failed, "
            "has_meta) VALUES (?, ?, ?, ?, ?, ?, 1)", full)


def _write_journal(conn: sqlite3.Connection, batch: _Batch) -> None:
    if batch.new_run:
        conn.execute("DELETE FROM journal")
        conn.execute("DELETE FROM journal_lines")
    rows = [(f"offset:{name}", str(offset)) for name, offset in batch.offsets.items()]
    if batch.journal_run is not None:
        rows.append(("run", json.dumps(batch.journal_run, allow_nan=False)))
    if rows:
        conn.executemany("INSERT OR REPLACE INTO journal VALUES (?, ?)", rows)
    if batch.journal_lines:
        conn.executemany("INSERT OR REPLACE INTO journal_lines VALUES (?, ?, ?, ?)",
                         [tuple(rec) for rec in batch.journal_lines.values()])
