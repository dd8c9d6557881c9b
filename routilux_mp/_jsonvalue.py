"""JSON-only values: validation with the offending path, and normalization.

A value is accepted iff ``json.dumps(value, allow_nan=False)`` accepts it and
every dict key is a ``str``. The fast path lets the C encoder and decoder do
the work; only a refused value is walked in Python, to name where it went wrong.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import StateNotSerializableError

_encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
_decode = json.loads


def normalize(value: Any, root: str = "state") -> tuple[Any, int]:
    """Return ``(plain_json_copy, encoded_size)`` of ``value`` or raise with the path.

    Tuples become lists and ``str``/``int``/``float`` subclasses their base
    types: the copy is exactly what a JSON round trip gives back.

    Raises:
        StateNotSerializableError: naming the first offending path.
    """
    try:
        text = _encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        _raise_for(value, root, exc)
    copy = _decode(text)
    if copy != value:
        # int/bool/None keys encode silently as strings; find and refuse them.
        _raise_for(value, root, None)
    return copy, len(text)


def _describe(value: Any) -> str:
    kind = type(value).__name__
    if isinstance(value, float):
        return f"float {value!r} is not allowed in JSON (NaN and infinities are refused)"
    return f"{kind} is not JSON-serializable"


def _raise_for(value: Any, root: str, cause: BaseException | None) -> None:
    problem = _find_problem(value, root)
    if problem is None:
        if cause is None:
            return
        problem = f"{root}: could not be encoded as JSON ({type(cause).__name__}: {cause})"
    raise StateNotSerializableError(
        f"{problem}; only JSON values (dict with str keys, list, str, int, finite float, bool, None) "
        "can be stored; nothing was written"
    ) from None


def _find_problem(value: Any, root: str) -> str | None:
    """Walk ``value`` iteratively; return ``"path: what is wrong"`` or ``None``."""
    stack: list[tuple[Any, str, frozenset[int]]] = [(value, root, frozenset())]
    while stack:
        item, path, ancestors = stack.pop()
        if item is None or isinstance(item, (bool, int, str)):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return f"{path}: {_describe(item)}"
            continue
        if isinstance(item, (dict, list, tuple)):
            if id(item) in ancestors:
                return f"{path}: circular reference"
            inner = ancestors | {id(item)}
            if isinstance(item, dict):
                children = []
                for key, child in item.items():
                    if not isinstance(key, str):
                        return f"{path}: key {key!r} ({type(key).__name__}) is not a str; JSON object keys must be strings"
                    children.append((child, f"{path}[{key!r}]", inner))
            else:
                children = [(child, f"{path}[{i}]", inner) for i, child in enumerate(item)]
            stack.extend(reversed(children))
            continue
        return f"{path}: {_describe(item)}"
    return None
