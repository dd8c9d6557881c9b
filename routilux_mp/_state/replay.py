"""Nothing applied twice: replies kept with the writes they answer, and replayed to retried calls.

A client names each write call (:func:`set_call`, set by the server thread
that serves it): its *request* ``(client, pid, seq)``, one number per write
of one client thread, and, for a write made by an activation's logic, its
*effect* (:data:`~.backend.EffectKey`: the activation's first job, routine,
input digest, and the write's number within the activation).

:class:`Replays` keeps the reply of each write with it, in the same sealed
operation of a durable backend (so both commit or neither does):

* a call retried after a state-server restart (its connection broke: was
  it applied before the crash?) finds its request and gets the kept reply;
* in an exactly-once run, a write of an activation that runs again (an
  error-handler retry, a crash retry, or the job of an input line re-run by
  ``--resume``) finds its effect and gets the kept reply: its write is
  applied once, whatever the attempt.

A backend that does not survive a restart (``MemoryBackend``) needs none of
it: then nothing is kept, and nothing is sealed or synced.

Effects are recorded while this runtime journals an exactly-once run: the
journal's run carries the *session* (a digest of the runtime's authkey,
the same for every server the runtime starts), so a server restarted by
the same runtime records them too, and a later runtime on the file does not
until it begins a run of its own. A job's effects are dropped once its line
is journaled completed: it will never run again.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any

from .._messages import dumps
from .backend import EffectKey, StateBackend

#: ``(client, pid, seq)``: a client's write call, numbered in its thread.
Request = tuple[str, int, int]

#: What :meth:`Replays.replayed` returns for a call that was not made before.
MISS = object()

_serving = threading.local()


def set_call(request: Request | None, effect: EffectKey | None) -> None:
    """Name the write call this thread serves now (``None, None``: it names none)."""
    _serving.call = (request, effect) if request is not None or effect is not None else None


def current_call() -> tuple[Request | None, EffectKey | None] | None:
    """``(request, effect)`` of the call this thread serves, or ``None``."""
    return getattr(_serving, "call", None)


class Replays:
    """Replays and records for the store (called with its condition held, except :meth:`sync`)."""

    def __init__(self, backend: StateBackend, session: str) -> None:
        """Replays over ``backend`` for the runtime called ``session`` (``""``: never record effects)."""
        self._backend = backend
        #: Writes are sealed and synced; reads wait for what is pending.
        self._durable = backend.durable
        #: Sync after the store released its condition (else at once, condition held: see ``backend``).
        self._group = backend.group_commit
        #: Calls are kept and replayed (a restarted server finds them).
        self._enabled = backend.survives_restart
        self.session = session
        run = backend.load_journal(lines=False) if self._enabled and session else None
        #: Effects of activations are recorded: this runtime journals an exactly-once run.
        self.effects = run is not None and run.run.get("session") == session

    def replayed(self) -> tuple[Any, int]:
        """``(kept reply, ticket to wait for)`` if this call was applied before, else ``(MISS, 0)``."""
        call = current_call() if self._enabled else None
        if call is None:
            return MISS, 0
        request, effect = call
        if request is not None:
            kept = self._backend.load_request(request[0])
            if kept is not None and kept[0] == request[2]:
                return pickle.loads(kept[1]), self.read_ticket()
        if effect is not None and self.effects:
            blob = self._backend.load_effect(effect)
            if blob is not None:
                if request is not None:
                    self._backend.save_request(*request, blob)
                    return pickle.loads(blob), self.done_staged()
                return pickle.loads(blob), self.read_ticket()
        return MISS, 0

    def done_staged(self) -> int:
        """Seal what was staged: the ticket to sync without the condition (0: synced already, or nothing)."""
        if not self._durable:
            return 0
        ticket = self._backend.seal()
        if self._group:
            return ticket
        self._backend.sync(ticket)
        return 0

    def done(self, reply: Any) -> int:
        """A write was staged: stage ``reply`` with its request and effect, seal; the ticket left to sync."""
        call = current_call() if self._enabled else None
        if call is not None:
            request, effect = call
            blob = dumps(reply)
            if request is not None:
                self._backend.save_request(*request, blob)
            if effect is not None and self.effects:
                self._backend.save_effect(effect, blob)
        return self.done_staged()

    def read_ticket(self) -> int:
        """What a read must wait for: writes it may have seen that are not durable yet (0: none)."""
        return self._backend.read_ticket() if self._group else 0

    def sync(self, ticket: int) -> None:
        """Wait until ``ticket`` is durable (without the store's condition)."""
        if ticket:
            self._backend.sync(ticket)
