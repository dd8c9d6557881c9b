"""Pickling code by value with its real file name, so tracebacks and ``pdb`` show the user's file and line."""

from __future__ import annotations

import io
import os
import types
from collections import ChainMap
from typing import Any, ClassVar

import cloudpickle

__all__ = ["dumps_by_value"]

#: Pickle protocol of everything shipped to workers (as ``_messages.PROTOCOL``).
PROTOCOL = 5
#: cloudpickle's reducer of code objects (private: when a version lacks it, names stay ``<dynamic-code>``).
_cloudpickle_code_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)


class _KeepFilePickler(cloudpickle.Pickler):
    """cloudpickle that keeps the file name of code it ships by value.

    cloudpickle writes ``<dynamic-code>`` as the ``co_filename`` of every code
    object it pickles by value (the logic of a script or notebook), so
    tracebacks and ``pdb`` in another process could not show the user's file
    and line. The real name (made absolute, as workers may resolve it from
    elsewhere) goes instead: ``linecache`` reads the lines from it wherever the
    file exists.
    """

    dispatch_table: ClassVar[ChainMap] = ChainMap({types.CodeType: lambda code: _code_reduce(code)},
                                                  cloudpickle.Pickler.dispatch_table)


def _code_reduce(code: types.CodeType) -> tuple:
    """cloudpickle's reduction of ``code``, with its real file name."""
    ctor, args = _cloudpickle_code_reduce(code)
    name = code.co_filename
    if name and not name.startswith("<"):
        name = os.path.abspath(name)
    return ctor, tuple(name if type(arg) is str and arg == "<dynamic-code>" else arg for arg in args)


def dumps_by_value(obj: Any, protocol: int = PROTOCOL) -> bytes:
    """``cloudpickle.dumps(obj)``, keeping the real file names of code shipped by value (tracebacks, pdb)."""
    if _cloudpickle_code_reduce is None:  # a cloudpickle without that hook: file names stay <dynamic-code>
        return cloudpickle.dumps(obj, protocol)
    buffer = io.BytesIO()
    _KeepFilePickler(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()

