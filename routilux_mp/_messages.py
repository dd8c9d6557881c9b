"""Wire messages between the supervisor and a worker process, and the one owner of "error as data".

Supervisor -> worker (command pipe): ``_WorkerConfig`` once, then ``_LoadFlow`` / ``_Activation`` /
``_Batch`` (activations in one frame, run in order) / ``STOP``. Worker -> supervisor (result pipe):
``_Ready`` once, then exactly one ``_Result`` per activation, each written as soon as it exists (one
held back would die with its process), and ``_Exiting`` before a clean exit (never taken for a crash).

Envelopes are pickled with the C pickler. User data (items, emits, policy messages) travels inside them
as blobs made once where the data is produced (cloudpickle unless plain: classes and closures defined in
``__main__`` arrive by value), so nothing is serialized twice. Failures travel as data (type names,
message, traceback text), never as exception objects: :class:`ErrorData`, made by :func:`error_data` /
:func:`describe_exception` (worker, supervisor, state server alike) and turned back into an exception
by :func:`exception_from`; how a process ended travels as :class:`ExitInfo` (execution backends).
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import traceback
from typing import Any, NamedTuple, TypedDict

from ._pickling import dumps_by_value
from .errors import RoutiluxError

PROTOCOL = 5


def dumps(message: Any) -> bytes:
    """Pickle a wire message (the C pickler, protocol 5)."""
    return pickle.dumps(message, PROTOCOL)


loads = pickle.loads

_PLAIN = frozenset({str, int, float, bool, type(None)})


def is_plain(data: Any) -> bool:
    """A dict of str keys and plain values, or dicts (str keys) or lists of them: its pickle unpickles anywhere."""
    if type(data) is not dict:
        return False
    plain = _PLAIN
    for key, value in data.items():
        kind = type(value)
        if type(key) is not str or kind not in plain and not (  # a reduce's counts: type by type, all at once
                kind is dict and set(map(type, value)) <= {str} and set(map(type, value.values())) <= plain
                or kind is list and set(map(type, value)) <= plain):
            return False
    return True


def encode(data: Any) -> bytes:
    """Pickle user data for another process.

    Plain data (:func:`is_plain`: the common case of items, emits, policy messages) goes through the C
    pickler; anything else through cloudpickle, so classes and functions defined in ``__main__`` arrive by value.
    """
    if is_plain(data):
        return pickle.dumps(data, PROTOCOL)
    return dumps_by_value(data)


# -- error as data ---------------------------------------------------------------

#: Longest error message / traceback text sent across a process boundary (characters).
MAX_ERROR_TEXT = 20_000

_PLAIN_ARG = (str, int, float, bool, type(None))


class ErrorData(TypedDict, total=False):
    """An exception as plain data: what crosses a process boundary instead of the exception object.

    ``type`` is the qualified class name (``"ZeroDivisionError"``,
    ``"routilux_mp.errors.StateTooLargeError"``), ``mro`` the qualified names
    of its classes (for ``ErrorHandler(retryable=...)``), ``traceback`` the
    text of the remote traceback. The rest is optional: ``routine`` (the
    routine that raised), ``args`` (the exception's arguments, when all are
    plain values: rebuilding then gives back an equal exception), ``frame``
    (where logic raised: the innermost frame outside this package, as
    ``file``, ``line``, ``function``, ``code``), and, for a dead worker, ``exitcode`` / ``signal`` / ``pid`` / ``process`` / ``crashed``.
    """

    type: str
    mro: list[str]
    message: str
    traceback: str
    routine: str | None
    args: list
    exitcode: int | None
    signal: str | None
    pid: int
    process: int
    crashed: bool
    frame: dict


def type_name(cls: type) -> str:
    """``cls``'s qualified name (builtins without their module): how error data names a class."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def error_data(error: BaseException | type[BaseException], message: str | None = None, *, keep_args: bool = False,
               **extra: Any) -> ErrorData:
    """An error as :class:`ErrorData`: ``type``, ``mro``, ``message``, ``traceback``, then ``extra``.

    ``error`` is an exception (its message and traceback are taken from it;
    this never raises, whatever its ``__str__`` does) or an exception class
    (for errors of ours: ``message`` says what happened, ``traceback`` is empty
    unless ``extra`` gives one). With ``keep_args``, an exception's ``args``
    are carried too when every one is a plain value, so :func:`exception_from`
    rebuilds an equal exception (``KeyError('k')``). Keys in ``extra`` are
    added as given (``routine=...``, ``exitcode=...``).
    """
    if isinstance(error, BaseException):
        cls: type[BaseException] = type(error)
        if message is None:
            try:
                message = str(error)
            except BaseException:  # noqa: BLE001 - a user's __str__ may raise anything
                message = f"<unprintable {cls.__qualname__}>"
        try:
            text = "".join(traceback.format_exception(cls, error, error.__traceback__))
        except BaseException:  # noqa: BLE001 - so may the objects in a user's traceback
            text = f"{type_name(cls)}: {message}\n(traceback could not be formatted)\n"
    else:
        cls, text = error, ""
    data: ErrorData = {
        "type": type_name(cls),
        "mro": [type_name(c) for c in cls.__mro__ if c is not object],
        "message": (message or "")[:MAX_ERROR_TEXT],
        "traceback": text[-MAX_ERROR_TEXT:],
    }
    args = getattr(error, "args", None)
    if keep_args and isinstance(args, tuple) and all(type(a) in _PLAIN_ARG for a in args) and (
            sum(len(a) for a in args if isinstance(a, str)) <= MAX_ERROR_TEXT):
        data["args"] = list(args)
    data.update(extra)  # type: ignore[typeddict-item]
    return data


def describe_exception(exc: BaseException, routine_id: str | None) -> ErrorData:
    """What a worker reports for an exception raised while running ``routine_id`` (or loading a flow).

    With ``frame``: the innermost frame of the traceback outside this package
    (the user's line that raised, or the user's call into the library).
    """
    data = error_data(exc, routine=routine_id)
    frame = _user_frame(exc)
    if frame is not None:
        data["frame"] = frame
    return data


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_frame(exc: BaseException) -> dict | None:
    """The innermost traceback frame of ``exc`` whose file is not part of this package."""
    found = None
    try:
        for summary in traceback.extract_tb(exc.__traceback__):
            if not os.path.abspath(summary.filename).startswith(_PACKAGE_DIR):
                found = summary
    except BaseException:  # noqa: BLE001 - a user's traceback may hold anything
        return None
    if found is None:
        return None
    return {"file": found.filename, "line": found.lineno, "function": found.name, "code": found.line or ""}


def exception_from(data: ErrorData, where: str) -> BaseException:
    """The exception ``data`` describes, to raise on this side, with ``remote_traceback`` set.

    The class is looked up among builtins and modules this process has
    already imported (nothing is imported on the say-so of the other side);
    it is called with the carried ``args`` (else the message). When the class
    is unknown here or will not take those arguments, a :class:`RoutiluxError`
    saying ``"{where} raised {type}: {message}"`` stands in for it.
    """
    name = data.get("type", "")
    message = data.get("message", "")
    module, _, qualname = name.rpartition(".")
    found: Any = sys.modules.get(module or "builtins")
    for part in qualname.split(".") if found is not None else ():
        found = getattr(found, part, None)
    exc: BaseException | None = None
    if isinstance(found, type) and issubclass(found, BaseException):
        args = data.get("args")
        try:
            exc = found(*args) if args is not None else found(message)
        except Exception:  # noqa: BLE001 - a constructor with other needs: use the stand-in
            exc = None
    if exc is None:
        exc = RoutiluxError(f"{where} raised {name}: {message}")
    remote = data.get("traceback")
    if remote:
        try:
            exc.remote_traceback = remote  # type: ignore[attr-defined]
        except (AttributeError, TypeError):  # a class with __slots__ and no __dict__
            pass
    return exc


# -- frames ----------------------------------------------------------------------

#: Largest frame any reader here accepts. A header announcing more is not a frame
#: of ours (bytes written outside the protocol, or a corrupt stream): the reader
#: refuses it at once instead of waiting for (or allocating) gigabytes.
MAX_FRAME_BYTES = 1 << 30

#: Bytes asked of the kernel per read: a length in a header is never allocated up front.
READ_CHUNK = 1 << 16

_I = struct.Struct("!i")
_Q = struct.Struct("!Q")


class FrameError(ValueError):
    """A frame header that no writer of ours produced (a size that is negative or over the limit)."""


def parse_header(buf: bytes | bytearray | memoryview, start: int, limit: int) -> tuple[int, int] | None:
    """``(body size, header size)`` of the frame at ``buf[start:]``, ``None`` if the header is incomplete.

    Raises:
        FrameError: the header announces a negative size or more than ``limit`` bytes.
    """
    available = len(buf) - start
    if available < 4:
        return None
    (size,) = _I.unpack_from(buf, start)
    head = 4
    if size == -1:  # the multiprocessing format: frames over 2 GiB carry an 8-byte length
        if available < 12:
            return None
        (size,) = _Q.unpack_from(buf, start + 4)
        head = 12
    if size < 0 or size > limit:
        raise FrameError(
            f"a frame header announces {size} bytes (the limit is {limit}): these bytes were not written "
            "by routilux-mp's protocol"
        )
    return size, head


class CorruptFrameError(FrameError):
    """Bytes on a result pipe that no worker loop wrote: a bad length, or a body that is not our pickle.

    ``frames`` holds the whole frames read before the corruption, in order.
    """

    def __init__(self, message: str, frames: list[bytes]) -> None:
        super().__init__(message)
        self.frames = frames


class FrameReader:
    """Reads ``multiprocessing.connection`` frames from a non-blocking pipe, many per call.

    Never blocks: a frame written in pieces (a large result) waits in the
    buffer until it is whole, so a slow writer cannot stall the reader. Bytes
    that cannot be one of our frames (logic wrote on the pipe) raise
    :class:`CorruptFrameError` as soon as the header is in (a size that is
    negative or over ``limit``) or two bytes of the body are (every body
    starts with the pickle header of ``dumps``): a garbage length is never
    waited for.
    """

    __slots__ = ("_buf", "eof", "fd", "limit")

    #: Bytes asked of the kernel per read.
    CHUNK = READ_CHUNK

    def __init__(self, fd: int, limit: int = MAX_FRAME_BYTES) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.limit = limit
        self._buf = bytearray()
        self.eof = False

    def read(self) -> list[bytes]:
        """The frames that are complete now (``eof`` is set once the writer is gone).

        Raises:
            FrameError: the stream holds a header no writer of ours produced;
                the stream is out of step for good.
        """
        buf = self._buf
        while True:
            try:
                chunk = os.read(self.fd, self.CHUNK)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.eof = True
                break
            buf += chunk
            if len(chunk) < self.CHUNK:
                break
        frames = []
        start = 0
        end = len(buf)
        while True:
            try:
                header = parse_header(buf, start, self.limit)
            except FrameError as exc:
                del buf[:]  # nothing after corruption can be trusted to start a frame
                raise CorruptFrameError(f"bytes that are not a frame ({exc})", frames) from exc
            if header is None:
                break
            size, head = header
            body = end - start - head
            if size < 2 and body >= size or (
                    body >= 2 and (buf[start + head] != 0x80 or buf[start + head + 1] != PROTOCOL)):
                del buf[:]
                raise CorruptFrameError(f"a frame announcing {size} bytes whose body is not a message", frames)
            if body < size:
                break
            frames.append(bytes(buf[start + head : start + head + size]))
            start += head + size
        if start:
            del buf[:start]
        return frames


def read_messages(reader: FrameReader) -> tuple[list[Any], str | None]:
    """The messages whole on ``reader`` now, in order, and what is wrong with the bytes after them, if anything.

    The second item is ``None``, or why the stream is out of step for good
    (bytes that are not a frame of ours, or a frame that is not our pickle):
    the messages before the bad bytes are returned all the same.
    """
    corrupt = None
    try:
        frames = reader.read()
    except CorruptFrameError as exc:
        frames, corrupt = exc.frames, str(exc)
    messages = []
    for blob in frames:
        try:
            messages.append(loads(blob))
        except Exception as exc:  # noqa: BLE001 - bytes a process wrote outside the protocol may fail in any way
            return messages, f"a message that cannot be unpickled ({type(exc).__name__}: {exc})"
    return messages, corrupt


def frame(data: bytes) -> bytes:
    """``data`` with its frame header, ready to write."""
    size = len(data)
    return (_I.pack(size) if size <= 0x7FFFFFFF else _I.pack(-1) + _Q.pack(size)) + data


def write_frame(fd: int, data: bytes) -> None:
    """Write one frame (the ``multiprocessing.connection`` format) to a blocking pipe."""
    view = memoryview(frame(data))
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, size: int) -> bytes:
    """Read exactly ``size`` bytes from a blocking pipe; ``EOFError`` if it ends first."""
    parts = []
    while size:
        # Never os.read(fd, size) at once: that allocates ``size`` bytes before any arrive.
        chunk = os.read(fd, min(size, READ_CHUNK))
        if not chunk:
            raise EOFError("the other end of the pipe is gone")
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def read_frame(fd: int, limit: int = MAX_FRAME_BYTES) -> bytes:
    """Read one frame from a blocking pipe; ``EOFError`` when the writer is gone.

    Raises:
        FrameError: the header announces a negative size or more than ``limit`` bytes.
    """
    header = _read_exactly(fd, 4)
    if header == b"\xff\xff\xff\xff":
        header += _read_exactly(fd, 8)
    parsed = parse_header(header, 0, limit)
    assert parsed is not None
    return _read_exactly(fd, parsed[0])


class _WorkerConfig:
    __slots__ = (
        "authkey",
        "index",
        "lock_timeout",
        "log_levels",
        "max_activations",
        "max_rss",
        "parent_pid",
        "state_address",
        "state_timeout",
        "sys_path",
    )

    def __init__(self, index: int, parent_pid: int, sys_path: list[str], state_address: str,
                 authkey: bytes, state_timeout: float, lock_timeout: float,
                 max_rss: int | None, max_activations: int | None, log_levels: tuple = ()) -> None:
        self.index = index
        #: The supervisor's logging levels (``_logs.parent_levels``).
        self.log_levels = log_levels
        self.parent_pid = parent_pid
        self.sys_path = sys_path
        self.state_address = state_address
        self.authkey = authkey
        self.state_timeout = state_timeout
        self.lock_timeout = lock_timeout
        self.max_rss = max_rss
        self.max_activations = max_activations

    def __repr__(self) -> str:
        return f"_WorkerConfig(index={self.index}, state_address={self.state_address!r})"


# The messages are NamedTuples: they pickle about three times faster than
# __slots__ classes, which matters at one envelope each way per activation.


class _LoadFlow(NamedTuple):
    """A flow, pickled by value, sent once to each process before its first activation."""

    flow_key: int
    blob: bytes

    def __repr__(self) -> str:
        return f"_LoadFlow(flow_key={self.flow_key}, {len(self.blob)} bytes)"


class _Activation(NamedTuple):
    """Run ``routine_id`` of flow ``flow_key`` for worker ``worker_id`` on these items."""

    act_id: int
    flow_key: int
    worker_id: str
    flow_id: str
    routine_id: str
    slots: dict[str, list[bytes]]
    message: bytes
    job_id: str | None
    job_metadata: dict | None  # (None: empty; the supervisor makes them only when used)
    job_data: dict | None
    attempt: int
    #: An activation of several jobs (a batch, a join): each job as ``(job_id, metadata, data)``, the one
    #: above at index ``lead``; per slot, per item, the indices of the item's jobs (``None``: all of them).
    #: ``None`` for an activation of one job.
    jobs: tuple | None = None
    lead: int = 0
    item_jobs: dict | None = None
    #: The fused connections of the worker's flow (``_fusion.fused_targets``): routine id -> event ->
    #: (target routine id, slot); ``None`` when this routine starts none.
    fuse: dict | None = None

    def __repr__(self) -> str:
        counts = {name: len(items) for name, items in self.slots.items()}
        return f"_Activation(#{self.act_id} {self.worker_id}/{self.routine_id} items={counts} attempt={self.attempt})"


class _Batch(NamedTuple):
    """Several activations in one frame, run one after another in this order (one ``_Result`` each)."""

    acts: tuple[_Activation, ...]

    def __repr__(self) -> str:
        return f"_Batch({len(self.acts)} activations, #{self.acts[0].act_id}..#{self.acts[-1].act_id})"


class _Result(NamedTuple):
    """The outcome of one activation: emits (in order), job changes, and an error as data.

    Each emit is ``(event, data pickle, job indices)``, the indices (in the
    activation's ``jobs``) of the jobs logic named for it, or ``None``: all of
    them. The job changes are the current job's; ``others`` holds those of the
    other jobs of a multi-job activation, as ``(index, data_set, data_deleted,
    traces)``.

    Fused stages (``_fusion``): ``fused`` is the index of the emit the worker
    runs itself next, as an activation of the connection's target (the
    supervisor books it on this lane before that one runs); its result comes
    next, with ``act_id`` of the activation the supervisor sent and ``chain``
    counting the fused runs since (0: the result of that activation itself).
    """

    act_id: int
    error: dict | None
    emits: list[tuple[str, bytes, tuple[int, ...] | None]]
    data_set: dict | None
    data_deleted: list[str] | None
    traces: list | None
    seconds: float
    others: list | None = None
    fused: int | None = None
    chain: int = 0

    def __repr__(self) -> str:
        status = "ok" if self.error is None else f"error={self.error.get('type')}"
        run = f".{self.chain}" if self.chain else ""
        then = "" if self.fused is None else f" then runs emit {self.fused}"
        return f"_Result(#{self.act_id}{run} {status} emits={len(self.emits)}{then} {self.seconds:.4f}s)"


class _Ready(NamedTuple):
    """The worker started and serves."""

    pid: int


class _Exiting(NamedTuple):
    """The worker is about to exit on purpose (stop request, recycling)."""

    reason: str


class _Stop:
    """Finish what was sent before this, then exit."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "STOP"


STOP = _Stop()


# -- how a process ended ---------------------------------------------------------

#: What a worker's death by each signal most likely means, for the error message.
LIKELY_CAUSES = {
    "SIGKILL": "possibly the out-of-memory killer (see `dmesg`), or a `kill -9` from outside",
    "SIGSEGV": "a segmentation fault: C code (an extension module or ctypes) crashed",
    "SIGBUS": "a bus error: C code crashed, or a memory-mapped file was truncated",
    "SIGABRT": "abort(): a C library or extension hit a fatal error",
    "SIGFPE": "a floating-point exception in C code",
    "SIGILL": "an illegal instruction in C code",
    "SIGTERM": "a SIGTERM from outside routilux-mp",
}


class ExitInfo(NamedTuple):
    """How a worker process ended: exit code or signal, the likely cause, its last error output."""

    #: The process id, when the backend knew it.
    pid: int | None
    #: The exit status (negative: the signal number), ``None`` when unknown.
    exitcode: int | None
    #: The name of the signal that killed it (``"SIGKILL"``), ``None`` if it exited.
    signal: str | None
    #: What most likely ended it, in words (see ``LIKELY_CAUSES``).
    cause: str
    #: Its last lines of error output (each clipped), for the error message.
    stderr_tail: str = ""
    #: Who its state locks belong to, when not its ``pid`` (a worker on another node: ``(node, pid)``).
    owner: Any = None

    @classmethod
    def from_returncode(cls, pid: int | None, returncode: int | None, stderr_tail: str = "") -> ExitInfo:
        """The exit of a child process whose ``Popen.returncode`` is ``returncode``."""
        exitcode, signame = describe_exit(returncode)
        return cls(pid, exitcode, signame, likely_cause(exitcode, signame), stderr_tail)

    def how(self) -> str:
        """``"was killed by SIGKILL"``, ``"exited with code 3"``, or (no status known) that it stopped answering."""
        if self.signal:
            return f"was killed by {self.signal}"
        if self.exitcode is None:
            return "closed its output and stopped answering"
        return f"exited with code {self.exitcode}"


def describe_exit(returncode: int | None) -> tuple[int | None, str | None]:
    """``(exitcode, signal_name)`` of a finished child (``Popen.returncode``)."""
    if returncode is None:
        return None, None
    if returncode < 0:
        try:
            return returncode, signal.Signals(-returncode).name
        except ValueError:
            return returncode, f"signal {-returncode}"
    return returncode, None


def likely_cause(exitcode: int | None, signame: str | None) -> str:
    """What a worker's exit most likely means, for the message of the activation it was running."""
    if signame:
        return LIKELY_CAUSES.get(signame, "a signal from outside")
    return "the logic (or a library it called) ended the process, e.g. with os._exit()"
