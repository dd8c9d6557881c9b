"""A state file (``Runtime(state_path=...)``): its format, and the lock that keeps it to one runtime.

The file is an SQLite database in WAL mode. Its tables::

    routilux_mp    (key, value)                  format name and version: what tells our files apart
    workers        (worker_id, position, flow_id, status, jobs_processed, jobs_failed, has_meta)
    cells          (worker_id, routine_id, value JSON, version, size, requests)
    requests       (client, pid, seq, reply)     the last write of each client, for retried calls
    effects        (job_id, routine_id, activation, op, reply)   writes of exactly-once activations
    journal        (key, value)                  a CLI run's description and output offsets
    journal_lines  (line, job_id, status, error) the input lines of that run that ended

A write's request record (see ``replay``) is kept in the ``requests`` column
of the cell it wrote (a pickled ``{client: (pid, seq, reply)}`` of the
clients that wrote that cell last), so the common write changes one row of
one table; writes of no cell (worker meta, the journal) use the ``requests``
table. Nothing of live processes is kept (lock leases, waiters): a new
server starts with every routine state unlocked.

**Versions.** ``routilux_mp.version`` is :data:`SCHEMA_VERSION`. A file of an
older version is migrated in one transaction by :data:`MIGRATIONS`, if one
exists for it; any other version (or a database of another program, or a
file that is not SQLite) is refused with :class:`~routilux_mp.errors.StateFileError`.

**One runtime per file.** :class:`StateFile` takes an exclusive ``flock`` on
the file for its runtime. The supervisor holds it and passes the very
descriptor to each state server it starts, so the lock lives as long as
either process does (``flock`` locks belong to the open file, not to a
process) and is released by the kernel when both are gone, however they
died: a SIGKILLed run never blocks the next one. SQLite's own locks are
``fcntl`` locks, independent of ``flock``.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable

from ..errors import StateFileError

#: The format of the files this version writes.
SCHEMA_VERSION = 1
#: What ``routilux_mp.format`` says in every state file.
FORMAT_NAME = "routilux-mp state"
#: Seconds an SQLite statement waits for another connection's lock (the CLI reads while the server writes).
BUSY_TIMEOUT = 30.0
#: Seconds to wait for a lock held only by processes of a runtime that died (its state server exiting).
DEAD_HOLDER_WAIT = 15.0
#: Pause between two tries of such a lock.
LOCK_RETRY = 0.05
#: WAL pages between two checkpoints (4 KiB each). A checkpoint of a ``synchronous=NORMAL`` file costs two
#: fsyncs: every 10,000 pages rather than SQLite's default 1,000 keeps them off most commits (measured:
#: +10-15 microseconds per small commit at 1,000), for a WAL file of up to ~40 MiB.
WAL_AUTOCHECKPOINT = 10_000
#: Bytes the WAL file is truncated to after a checkpoint.
WAL_SIZE_LIMIT = 64 << 20

SCHEMA = """
CREATE TABLE routilux_mp (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE workers (worker_id TEXT PRIMARY KEY, position INTEGER NOT NULL, flow_id TEXT NOT NULL DEFAULT '',
                      status TEXT NOT NULL DEFAULT 'running', jobs_processed INTEGER NOT NULL DEFAULT 0,
                      jobs_failed INTEGER NOT NULL DEFAULT 0, has_meta INTEGER NOT NULL DEFAULT 0);
CREATE TABLE cells (worker_id TEXT NOT NULL, routine_id TEXT NOT NULL, value TEXT NOT NULL,
                    version INTEGER NOT NULL, size INTEGER NOT NULL, requests BLOB,
                    PRIMARY KEY (worker_id, routine_id)) WITHOUT ROWID;
CREATE TABLE requests (client TEXT PRIMARY KEY, pid INTEGER NOT NULL, seq INTEGER NOT NULL,
                       reply BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE effects (job_id TEXT NOT NULL, routine_id TEXT NOT NULL, activation BLOB NOT NULL,
                      op INTEGER NOT NULL, reply BLOB NOT NULL,
                      PRIMARY KEY (job_id, routine_id, activation, op)) WITHOUT ROWID;
CREATE TABLE journal (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE journal_lines (line INTEGER PRIMARY KEY, job_id TEXT NOT NULL, status TEXT NOT NULL, error TEXT);
"""

#: ``{version: fn(connection)}``: brings a file of ``version`` to ``version + 1`` (inside one transaction).
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {}


def connect(path: str, synchronous: str = "NORMAL", exclusive: bool = False) -> sqlite3.Connection:
    """An autocommit connection to the state file ``path`` in WAL mode, its format checked (created if empty).

    ``exclusive``: hold SQLite's lock on the file for as long as the
    connection is open (the state server's: no other connection reads the
    file meanwhile, and each commit skips taking and releasing file locks
    and the shared-memory index, about a third of a small commit's cost).

    Raises:
        StateFileError: the file cannot be opened or written, is not a state
            file of ours, or has a format version this code cannot read.
    """
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT)
    except sqlite3.Error as exc:
        raise StateFileError(f"cannot open the state file {path!r}: {exc}; check that its directory exists and "
                             "is writable") from exc
    try:
        if exclusive:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        _prepare(conn, path, synchronous)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StateFileError(_explain(path, exc)) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _explain(path: str, exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return (f"{path!r} is not a routilux-mp state file (SQLite says: {text}); give state_path a new file "
                "name, or the file an earlier run wrote")
    if "readonly" in text or "unable to open" in text:
        return f"cannot write the state file {path!r} ({text}): check the permissions of the file and its directory"
    return f"the state file {path!r} cannot be used: {text}"


def _prepare(conn: sqlite3.Connection, path: str, synchronous: str) -> None:
    # Look before touching: switching to WAL rewrites the header of someone else's database too.
    tables = _tables(conn)
    if tables:
        _check_format(conn, path, tables, migrate=False)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StateFileError(
            f"the state file {path!r} cannot use SQLite's WAL mode (it stays in {mode!r} mode), which durable "
            "state needs; put it on a local file system (not a network share)"
        )
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
    conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    conn.execute("BEGIN IMMEDIATE")  # the check and the creation are one step, whoever else opens the file
    try:
        tables = _tables(conn)
        if not tables:
            # One statement at a time: executescript() would commit the open transaction first.
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.executemany("INSERT INTO routilux_mp VALUES (?, ?)",
                             [("format", FORMAT_NAME), ("version", str(SCHEMA_VERSION))])
        else:
            _check_format(conn, path, tables, migrate=True)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _check_format(conn: sqlite3.Connection, path: str, tables: set[str], migrate: bool) -> None:
    """Refuse a database of another program or of an unknown version; migrate an older one (``migrate``)."""
    meta = dict(conn.execute("SELECT key, value FROM routilux_mp")) if "routilux_mp" in tables else {}
    if meta.get("format") != FORMAT_NAME:
        shown = ", ".join(sorted(tables)[:6])
        raise StateFileError(
            f"{path!r} is an SQLite database of another program (its tables: {shown}); routilux-mp does not "
            "write into it: give state_path a new file name"
        )
    try:
        version = int(meta.get("version", ""))
    except ValueError:
        version = -1
    if version > SCHEMA_VERSION:
        raise StateFileError(
            f"{path!r} was written by a newer routilux-mp (state format {version}; this version reads format "
            f"{SCHEMA_VERSION}): upgrade routilux-mp to use it"
        )
    while version < SCHEMA_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise StateFileError(
                f"{path!r} has state format {version}, which this routilux-mp cannot read or migrate (it reads "
                f"format {SCHEMA_VERSION}); open it with the routilux-mp version that wrote it"
            )
        if not migrate:
            return  # checked only: it is migrated inside the transaction
        step(conn)
        version += 1
        conn.execute("UPDATE routilux_mp SET value = ? WHERE key = 'version'", (str(version),))


class StateFile:
    """A state file held by this runtime: the lock, and what the file held when the runtime started.

    Attributes:
        path: the file's absolute path.
        fd: the locked descriptor; give it to each state server (``pass_fds``) so the lock outlives us
            while it runs.
        workers: ``{worker_id: flow_id}`` of every worker the file held at the start.
        counts: ``{worker_id: (jobs_processed, jobs_failed)}`` of those workers then.
    """

    def __init__(self, path: str, forget_requests: bool = True) -> None:
        """Lock ``path`` (created if missing) and check its format; forget requests of dead clients.

        ``forget_requests=False``: only look (the file is not written).

        Raises:
            StateFileError: another live runtime holds it, or it cannot be used (see :func:`connect`).
        """
        self.path = os.path.abspath(path)
        if os.path.isdir(self.path):
            raise StateFileError(f"state_path {path!r} is a directory; give a file name such as {path}/state.db")
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateFileError(f"cannot open the state file {path!r}: {exc.strerror}; check that its directory "
                                 "exists and is writable") from exc
        try:
            _lock(self.fd, self.path)
            conn = connect(self.path)
            try:
                if forget_requests:  # every client of an earlier runtime is gone: none will retry a call
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("DELETE FROM requests")
                    conn.execute("UPDATE cells SET requests = NULL WHERE requests IS NOT NULL")
                    conn.execute("COMMIT")
                rows = conn.execute("SELECT worker_id, flow_id, jobs_processed, jobs_failed FROM workers "
                                    "ORDER BY position").fetchall()
            finally:
                conn.close()
        except BaseException:
            os.close(self.fd)
            raise
        self.workers: dict[str, str] = {wid: flow_id for wid, flow_id, _, _ in rows}
        self.counts: dict[str, tuple[int, int]] = {wid: (done, failed) for wid, _, done, failed in rows}

    def close(self) -> None:
        """Release our part of the lock (a state server still running keeps it until it exits)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _lock(fd: int, path: str) -> None:
    """Take the exclusive lock, waiting a little only for the processes of a runtime that died."""
    deadline = time.monotonic() + DEAD_HOLDER_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = lock_holder(fd)
        if holder is not None and _alive(holder) or time.monotonic() > deadline:
            who = _describe(holder) if holder is not None and _alive(holder) else (
                "a process that inherited it (a state server of a runtime that stopped, still exiting?)")
            raise StateFileError(
                f"the state file {path!r} is in use by another live runtime ({who}); a state file serves one "
                "runtime at a time: stop that one first, or give this runtime another state_path"
            )
        time.sleep(LOCK_RETRY)  # the lock's taker died: its state server exits within seconds


def read_journal(path: str) -> tuple[dict, dict[str, int], list[int], list[int]] | None:
    """``(run, offsets, completed lines, failed lines)`` of the run journaled in ``path``, or ``None``.

    Read before a runtime holds the file, under its lock (so a file in use
    by a live runtime is refused as :class:`StateFile` refuses it). A
    missing file, or one that journals no run, gives ``None``.

    Raises:
        StateFileError: the file is in use, or cannot be used (see :func:`connect`).
    """
    if not os.path.exists(path):
        return None
    held = StateFile(path, forget_requests=False)
    try:
        conn = connect(held.path)
        try:
            rows = dict(conn.execute("SELECT key, value FROM journal"))
            if "run" not in rows:
                return None
            offsets = {key[len("offset:"):]: int(value) for key, value in rows.items()
                       if key.startswith("offset:")}
            completed = [n for (n,) in conn.execute(
                "SELECT line FROM journal_lines WHERE status = 'completed' ORDER BY line")]
            failed = [n for (n,) in conn.execute(
                "SELECT line FROM journal_lines WHERE status = 'failed' ORDER BY line")]
            return json.loads(rows["run"]), offsets, completed, failed
        finally:
            conn.close()
    finally:
        held.close()


def lock_holder(fd: int) -> int | None:
    """The pid that took the ``flock`` on the file of ``fd`` (``/proc/locks``), or ``None`` if unknown."""
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    return f"process {pid}" + (f": {command[:120]}" if command else "")
