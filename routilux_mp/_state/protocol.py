"""The state server's wire: framed pickles over a private unix socket, every wait with a deadline.

One connection per client thread::

    connect -> authkey handshake (both ways) -> "accept_connection" -> ("#RETURN", limits)
    then per call:   request  (method name, args, alive_every, request id, effect key)
                     replies  ("#ALIVE", None)* then ("#RETURN", result) or ("#ERROR", ErrorData)

* A write names itself so that it is never applied twice (see ``replay``):
  its *request id* ``(client, pid, seq)`` when the server's ``limits`` say
  ``retries`` (its backend survives a restart: a client retries a call whose
  connection broke), and its *effect key* when logic makes it in an
  activation. Reads name nothing (``None, None``).

* Only the methods of :class:`Method` are served (``EXPOSED``); anything else
  is answered with error data.
* The server never sends an exception object: a failure is
  :class:`~routilux_mp._messages.ErrorData` (type, message, traceback text,
  plain args), which the client turns back into an exception
  (:func:`~routilux_mp._messages.exception_from`).
* While a call may take long (waiting for a routine state's lock, running a
  ``modify`` function) the server sends ``"#ALIVE"`` every ``alive_every``
  seconds, so a client tells "busy" from "hung" (see ``client``).
* A frame is a 4-byte big-endian length (12 bytes over 2 GiB) and a pickle
  (``_messages.frame``). A request header over the server's limit
  (:func:`request_limit`) closes that connection before anything is allocated.

The handshake uses ``multiprocess.connection``'s challenge: the server checks
the key before it reads a single pickle.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, NamedTuple

from .._messages import READ_CHUNK, dumps, frame, parse_header

#: Serializer name under which our pickle-based connections are registered with ``multiprocess``.
SERIALIZER = "routilux-mp"

#: Seconds allowed to connect and authenticate (at least): the server may still be starting.
CONNECT_TIMEOUT = 10.0

#: Largest message accepted before a connection is authenticated and serving (handshake, first request).
HANDSHAKE_LIMIT = 1 << 16

#: Requests may exceed the state they carry (pickle vs JSON, a modify function's closure) by this much.
REQUEST_SLACK = 64 << 20

#: Largest reply a client accepts (a snapshot of every worker's state, at worst).
REPLY_LIMIT = 1 << 40

#: Keepalives are sent at most this often, and at least this often while a call waits.
KEEPALIVE_MIN, KEEPALIVE_MAX = 0.02, 0.5

#: Bytes asked of the kernel per read of a large frame.
BIG_READ = 1 << 20

#: Reply tags: the result, error data, or "still working on it".
RETURN, ERROR, ALIVE = "#RETURN", "#ERROR", "#ALIVE"


class Method(str, enum.Enum):
    """The state server's methods: the only names a request may carry (value = ``StateStore`` method)."""

    REGISTER_WORKER = "register_worker"
    META = "meta"
    ADD_JOB_COUNTS = "add_job_counts"
    GET = "get"
    GET_ALL = "get_all"
    REPLACE = "replace"
    MERGE = "merge"
    INCREMENT = "increment"
    MODIFY = "modify"
    ACQUIRE = "acquire"
    RELEASE = "release"
    RELEASE_PID = "release_pid"
    LOST_UPDATES = "lost_updates"
    SNAPSHOT = "snapshot"
    JOURNAL_BEGIN = "journal_begin"
    JOURNAL_READ = "journal_read"
    JOURNAL_RECORD = "journal_record"


#: The methods that write: a client numbers their calls (request ids) so a retry is replayed, never reapplied.
WRITES = frozenset({
    Method.REGISTER_WORKER, Method.ADD_JOB_COUNTS, Method.REPLACE, Method.MERGE, Method.INCREMENT, Method.MODIFY,
    Method.RELEASE, Method.JOURNAL_BEGIN, Method.JOURNAL_RECORD,
})

#: The writes logic makes as effects of an activation (exactly-once runs replay them when it runs again).
EFFECTS = frozenset({Method.REPLACE, Method.MERGE, Method.INCREMENT, Method.MODIFY, Method.RELEASE})


#: The method names a request may carry: everything else is refused.
EXPOSED: tuple[str, ...] = tuple(method.value for method in Method)


def request_limit(max_state_bytes: int) -> int:
    """Largest request frame the server reads: a state's pickle is at most ~2.5x its JSON."""
    return 3 * max_state_bytes + REQUEST_SLACK


def encode_request(method: Method, args: tuple, alive_every: float, request: tuple | None = None,
                   effect: tuple | None = None) -> bytes:
    """The body of a request frame (unframed, so its size can be checked before sending)."""
    # _value_: a plain attribute, 3x quicker than .value
    return dumps((method._value_, args, alive_every, request, effect))


def encode_reply(kind: str, payload: Any) -> bytes:
    """A whole reply frame: ``kind`` is ``RETURN`` (the result), ``ERROR`` (error data) or ``ALIVE``."""
    return frame(dumps((kind, payload)))


def take_frame(buf: bytearray, limit: int) -> tuple[bytes | None, int]:
    """Remove and return the first whole frame's body from ``buf``, else ``(None, bytes to ask for next)``.

    Raises:
        FrameError: the header announces a negative size or more than ``limit`` bytes.
    """
    header = parse_header(buf, 0, limit)
    if header is None:
        return None, READ_CHUNK
    size, head = header
    end = head + size
    if len(buf) < end:
        # Ask for what is missing (a large frame in large reads), never for what a header merely claims.
        return None, min(max(end - len(buf), READ_CHUNK), BIG_READ)
    body = bytes(buf[head:end])
    del buf[:end]
    return body, 0


def io_timeouts(sock: Any, seconds: float) -> None:
    """Bound every blocking read and write on ``sock`` (0: no bound)."""
    import socket  # only processes that connect pay for the module

    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class ServerConfig(NamedTuple):
    """What the state server needs, sent on its stdin by the launcher (the authkey must not show in ``ps``).

    ``address`` is the unix socket path clients connect to (or ``(host, port)`` on a cluster); the server adopts
    the socket the launcher already bound (``listen_fd``). ``backend`` names
    the store's backend in ``backends.BACKENDS``, made with ``backend_options``
    (the state file's path and ``synchronous`` for ``sqlite``); the file's lock
    is an inherited descriptor the server keeps open until it exits.
    """

    address: str | tuple[str, int]
    listen_fd: int
    authkey: bytes
    parent_pid: int
    sys_path: list[str]
    max_state_bytes: int
    strict: bool
    lock_timeout: float
    backend: str
    backend_options: dict
    #: The runtime's private directory: a guard removes it if the supervisor dies (see ``_process.start_dir_guard``).
    cleanup_dir: str | None = None

    def __repr__(self) -> str:
        """Never the authkey."""
        return f"ServerConfig(address={self.address!r}, backend={self.backend!r})"
