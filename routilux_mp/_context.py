"""The activation a worker process is running right now.

A worker runs one activation at a time in its main thread, so a module global
(not a thread-local) is the right scope: threads that logic starts may still
``emit`` and call ``get_current_job()`` while the activation runs.
"""

from __future__ import annotations

from typing import Any

_current: Any = None


def set_current(ctx: Any) -> None:
    global _current
    _current = ctx


def current() -> Any:
    return _current
