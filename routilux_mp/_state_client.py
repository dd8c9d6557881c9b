"""This process's link to the state server: a client with deadlines, and a fire-and-forget pusher.

``WorkerState`` (in ``state``) is the public handle; it calls the state server
through the ``_StoreClient`` of its process. The wire itself (framing,
keepalives, deadlines) is in ``_state_rpc``.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
from collections.abc import Callable
from typing import Any

from .errors import RoutiluxError, RuntimeClosedError, StateServerLostError

logger = logging.getLogger("routilux_mp.state")


class _Timeout(Exception):
    """The state server did not answer in time."""


class _Lost(Exception):
    """The connection to the state server broke."""


#: Errors that mean the connection to the state server could not be made.
_CONNECT_ERRORS = (EOFError, OSError)


class _Held:
    """A routine-state lock this thread holds, and the dict it writes back on release."""

    __slots__ = ("state", "token")

    def __init__(self, token: str, state: dict) -> None:
        self.token = token
        self.state = state


class _StoreClient:
    """This process's link to the state server.

    One connection per thread, opened on first use and kept open. Deadlines
    (see ``_state_rpc``): a call fails when the server is silent for
    ``timeout`` (state_timeout) seconds; a call that may wait for a lock or
    run a modify function gets that much ``patience`` on top, during which the
    server keeps telling it it is alive. After the server is lost every call
    fails fast with ``StateServerLostError`` (no retry loop, no log flood).
    """

    def __init__(self, address: str, authkey: bytes, timeout: float, lock_timeout: float) -> None:
        self.address = address
        self._authkey = authkey
        self.timeout = timeout
        self.lock_timeout = lock_timeout
        self.lost: str | None = None
        #: Called once when this client finds the server lost (the supervisor then stops taking work).
        self.on_lost: Callable[[], None] | None = None
        #: Set at shutdown (see :meth:`freeze`): reads are served from it afterwards.
        self.snapshot: dict[str, dict] | None = None
        #: In the supervisor: ``fn(worker_id) -> meta dict | None`` giving exact local counters.
        self.local_meta: Callable[[str], dict | None] | None = None
        self.local = threading.local()

    # -- per-thread bookkeeping for lost-update detection and lock ownership --

    def reads(self) -> dict[tuple[str, str], int]:
        reads = getattr(self.local, "reads", None)
        if reads is None:
            reads = self.local.reads = {}
        return reads

    def held(self) -> dict[tuple[str, str], _Held]:
        held = getattr(self.local, "held", None)
        if held is None:
            held = self.local.held = {}
        return held

    def begin_activation(self) -> None:
        """Forget what the previous activation read (workers call this)."""
        self.local.reads = {}

    # -- calls -----------------------------------------------------------------

    def _channel(self) -> Any:
        chan = getattr(self.local, "channel", None)
        if chan is None or chan.pid != os.getpid():
            # Imported here: multiprocess (and dill) cost a worker ~100 ms of start-up,
            # paid only by processes whose logic touches state.
            from ._state_rpc import CONNECT_TIMEOUT, Channel

            chan = self.local.channel = Channel(self.address, self._authkey, max(self.timeout, CONNECT_TIMEOUT))
        return chan

    def _drop_channel(self) -> None:
        """Close this thread's connection: after a timeout it is out of step for good."""
        chan, self.local.channel = getattr(self.local, "channel", None), None
        if chan is not None:
            chan.close()

    def mark_lost(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            if self.on_lost is not None:
                self.on_lost()

    def call(self, method: str, *args: Any, patience: float = 0.0) -> Any:
        """Call ``method(*args)`` in the state server; raise what it raised.

        Ends within ``state_timeout`` of the server's last sign of life, and
        within ``state_timeout + patience`` in all.
        """
        if self.lost is not None:
            raise StateServerLostError(self.lost)
        try:
            kind, result = self._channel().call(method, args, self.timeout, patience)
        except (_Timeout, _Lost) as exc:
            self._drop_channel()
            error: Exception = exc
        except _CONNECT_ERRORS as exc:
            error = _Lost(f"{type(exc).__name__}: {exc}")
        else:
            if kind == "#RETURN":
                return result
            raise result
        if isinstance(error, _Timeout):
            self.mark_lost(
                f"the state server gave no sign of life for {self.timeout:g}s (state_timeout) during "
                f"{method}(); it is hung or overloaded, so shared worker state is no longer available"
            )
        else:
            if self.snapshot is not None:
                raise RuntimeClosedError("the runtime was shut down; its worker state is read-only") from None
            self.mark_lost(
                f"the state server is gone ({error}); shared worker state was lost "
                "with it. Jobs in flight fail; start a new Runtime to go on"
            )
        raise StateServerLostError(self.lost) from error

    def freeze(self, metas: dict[str, dict], server_started: bool) -> None:
        """Serve reads from a final snapshot from now on (the runtime is shutting down).

        ``metas`` gives each known worker's final ``flow_id`` and ``status``.
        When the state server was lost there is no snapshot to take: reads
        keep raising ``StateServerLostError``, so lost state is never
        reported as empty.
        """
        snapshot: dict[str, dict] = {}
        if server_started:  # else nothing was ever stored: empty is the truth
            try:
                snapshot = pickle.loads(self.call("snapshot"))
            except StateServerLostError:
                return
            except RoutiluxError as exc:
                self.mark_lost(f"the state server could not take the final snapshot of worker state ({exc})")
                return
        for wid, meta in metas.items():
            entry = snapshot.setdefault(wid, {"meta": {"jobs_processed": 0, "jobs_failed": 0}, "states": {}})
            entry["meta"].update(meta)
        self.snapshot = snapshot


class StatePusher:
    """Sends fire-and-forget updates to the state server from its own thread.

    The supervisor's dispatcher must never wait on the state server (it may
    still be starting, or be slow): job counters, worker registrations and
    lock releases of dead processes go through here, in order.
    """

    def __init__(self, client: _StoreClient) -> None:
        self._client = client
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="routilux-mp state pusher", daemon=True)
        self._thread.start()

    def push(self, method: str, *args: Any) -> None:
        self._queue.put((method, args))

    def close(self, timeout: float) -> None:
        """Send what is queued (within ``timeout``), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._client.lost is not None:
                continue
            method, args = item
            try:
                self._client.call(method, *args)
            except StateServerLostError:
                pass  # the dispatcher notices (the server's pidfd) and reports it once
            except Exception:
                logger.exception("the state server refused %s()", method)
