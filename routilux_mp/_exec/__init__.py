"""How activations reach the processes that run them: the execution backends.

``base`` owns the :class:`~routilux_mp._exec.base.WorkerBackend` protocol and
its events; ``local`` runs workers as subprocesses of this machine, fed
through pipes; ``stub`` runs them in the calling thread, for unit tests of the
dispatcher; ``_child`` is a local worker process's entry point. Nothing here
is imported by a worker process but ``_child``.
"""
