"""The state backends by name: ``Runtime``'s state options choose one of :data:`BACKENDS`."""

from __future__ import annotations

from typing import Any

from .backend import MemoryBackend, StateBackend
from .sqlite import SqliteBackend

#: Backends by name.
BACKENDS: dict[str, type[StateBackend]] = {MemoryBackend.name: MemoryBackend, SqliteBackend.name: SqliteBackend}


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
