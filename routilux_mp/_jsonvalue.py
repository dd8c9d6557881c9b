"""JSON-only values: validation with the offending path, normalization, sizes.

A value is accepted iff ``json.dumps(value, allow_nan=False)`` accepts it and
every dict key is a ``str``. That refuses, besides non-JSON types, integers
longer than Python's int-to-str limit (4,300 digits by default) and nesting
deeper than the JSON encoder's recursion limit (about 1,000 levels).

The size of a value is the length of its compact JSON text
(``separators=(",", ":")``, non-ASCII characters escaped as ``\\uXXXX``), so
it is a byte count and every operation measures it the same way.

The fast path lets the C encoder and decoder do the work; only a refused value
is walked in Python, iteratively and in linear time (a 100,000-level nesting
is refused in a fraction of a second, never with a ``RecursionError``).
"""

from __future__ import annotations

import json
import math
import sys
from itertools import filterfalse, repeat
from operator import add
from typing import Any

from .errors import StateNotSerializableError

_encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
_decode = json.loads

#: Errors the C encoder and decoder raise for values JSON cannot hold here.
_ENCODE_ERRORS = (TypeError, ValueError, RecursionError)

#: Path components shown at each end of a path too long to print whole.
_PATH_ENDS = 6

_RULE = (
    "only JSON values (dict with str keys, list, str, int, finite float, bool, None) can be stored; "
    "nothing was written"
)


def normalize(value: Any, root: str = "state") -> tuple[Any, int]:
    """Return ``(plain_json_copy, encoded_size)`` of ``value`` or raise with the path.

    Tuples become lists and ``str``/``int``/``float`` subclasses their base
    types: the copy is exactly what a JSON round trip gives back.

    Raises:
        StateNotSerializableError: naming the first offending path.
    """
    try:
        text = _encode(value)
        copy = _decode(text)
        same = copy == value
    except _ENCODE_ERRORS as exc:
        _raise_for(value, root, exc)
    if not same:
        # int/bool/None keys encode silently as strings; find and refuse them.
        _raise_for(value, root, None)
    return copy, len(text)


def encoded_size(value: Any, root: str = "state") -> int:
    """The size of ``value`` (already plain JSON) as compact JSON text."""
    try:
        return len(_encode(value))
    except _ENCODE_ERRORS as exc:
        _raise_for(value, root, exc)


def sum_text(current: Any, amount: Any) -> tuple[int | float, str] | None:
    """``(current + amount, its JSON text)`` for plain finite ints and floats, else ``None``.

    The fast path of an increment (thousands of keys per call): exact types
    only, the text as the JSON encoder writes it (``int.__repr__`` and
    ``float.__repr__``), without building an encoder per number. ``None``
    leaves every other case, errors included, to :func:`add_number`.
    """
    kind = type(current)
    if (kind is not int and kind is not float) or (type(amount) is not int and type(amount) is not float):
        return None
    try:
        total = current + amount
        if type(total) is int:
            return total, int.__repr__(total)  # (ValueError past the int-to-str digit limit)
    except (OverflowError, ValueError):
        return None
    if total - total != 0.0:  # inf or nan: JSON refuses them
        return None
    return total, float.__repr__(total)


def number_text(value: Any) -> str | None:
    """The JSON text of a plain finite int or float (as the encoder writes it), else ``None``."""
    kind = type(value)
    try:
        if kind is int:
            return int.__repr__(value)
    except ValueError:  # past the int-to-str digit limit
        return None
    if kind is float and value - value == 0.0:
        return float.__repr__(value)
    return None


def key_size(key: str) -> int:
    """The size of a dict key (a ``str``) as JSON text, quotes included."""
    if key.isascii() and key.isprintable() and '"' not in key and "\\" not in key:
        return len(key) + 2  # printable ASCII other than quote and backslash is written as it is
    return len(_encode(key))


def add_number(current: Any, amount: float, path: str) -> tuple[int | float, str]:
    """``current + amount`` and its JSON text, or a clear error (nothing is written then).

    Raises:
        TypeError: ``current`` is not a number (bools are not numbers here).
        StateNotSerializableError: the sum is not a finite float, or an int JSON cannot encode.
    """
    if isinstance(current, bool) or not isinstance(current, (int, float)):
        raise TypeError(
            f"{path} is {type(current).__name__}, not a number; increment() only adds to numbers (or missing keys)"
        )
    try:
        total = current + amount
    except OverflowError:
        raise StateNotSerializableError(
            f"{path}: {current!r} + {amount!r} overflows a float; {_RULE}"
        ) from None
    if isinstance(total, float) and not math.isfinite(total):
        raise StateNotSerializableError(f"{path} would become {total!r}, which JSON refuses; {_RULE}")
    try:
        text = _encode(total)
    except ValueError:
        raise StateNotSerializableError(f"{path} would become {_describe(total)}; {_RULE}") from None
    return total, text


#: From this many keys on, :func:`add_numbers` tries :func:`_add_plain_numbers` (below, its fixed cost is
#: not repaid).
BULK_KEYS = 6
_PLAIN_NUMBERS = frozenset({int, float})
#: Marks a key missing from a state (``None`` is a value a key may hold).
_ABSENT = object()


def add_numbers(old: dict, size: int, amounts: dict[str, int | float], rid: str) -> tuple[list, int]:
    """``([old total + amount of each key, in the order of amounts], new size)``: routine ``rid``'s state
    ``old`` (``size`` bytes as JSON) after an increment; nothing is changed yet.

    The size is computed exactly from what changes (each key's JSON text,
    escapes included), so the size bound holds without re-encoding the state.

    Raises:
        TypeError, StateNotSerializableError: as :func:`add_number`, for the first key in error.
    """
    if len(amounts) >= BULK_KEYS:
        fast = _add_plain_numbers(old, size, amounts)
        if fast is not None:
            return fast
    result = []
    count = len(old)
    get = old.get
    for key, amount in amounts.items():
        current = get(key, _ABSENT)
        absent = current is _ABSENT
        done = sum_text(0 if absent else current, amount)  # the common case: plain numbers, no encoder
        if done is None:  # anything else (and every error) the careful way, with the key's path
            done = add_number(0 if absent else current, amount, f"state[{key!r}] of routine {rid!r}")
        total, text = done
        if absent:
            size += key_size(key) + 1 + len(text) + (1 if count else 0)  # "key":text,
            count += 1
        else:
            was = number_text(current)
            size += len(text) - (len(was) if was is not None else encoded_size(current))
        result.append(total)
    return result, size


def _add_plain_numbers(old: dict, size: int, amounts: dict) -> tuple[list, int] | None:
    """:func:`add_numbers` for plain ints and finite floats, a pass per step rather than per key; else ``None``.

    A reduce adds thousands of keys per call: here each step (look up, add,
    measure) is one ``map`` over all keys. Anything unusual (a stored value
    that is not a plain number, a sum JSON refuses, a key that JSON escapes)
    returns ``None`` or takes the per-key way, so errors and sizes stay those
    of the careful loop.
    """
    keys = amounts.keys()
    currents = list(map(old.get, keys, repeat(0)))  # a missing key counts as 0
    kinds = set(map(type, currents))
    kinds.update(map(type, amounts.values()))
    if not kinds <= _PLAIN_NUMBERS:
        return None
    totals = list(map(add, currents, amounts.values()))
    try:
        if float in kinds and not all(map(math.isfinite, totals)):
            return None
        # repr() is the JSON text of a plain int or float (ValueError past the int-to-str digit limit); both
        # lists have as many ", " between their items.
        grown = len(repr(totals)) - len(repr(currents))
    except (ValueError, OverflowError):
        return None
    added = list(filterfalse(old.__contains__, keys))  # (a set difference would walk the whole state)
    if added:
        joined = "".join(added)
        if joined.isascii() and joined.isprintable() and '"' not in joined and "\\" not in joined:
            key_text = len(joined) + 2 * len(added)  # written as they are, in quotes
        else:
            key_text = sum(map(key_size, added))
        # Each new key adds "key":text, (its text is in ``totals``; the "0" it was counted as above comes back),
        # with no comma before the first key of an empty state.
        grown += key_text + 3 * len(added) - (1 if not old else 0)
    return totals, size + grown


def _int_limit() -> int:
    getter = getattr(sys, "get_int_max_str_digits", None)
    return getter() if getter is not None else 0


def _describe(value: Any) -> str:
    if isinstance(value, float):
        return f"float {value!r} is not allowed in JSON (NaN and infinities are refused)"
    if isinstance(value, int):
        return (
            f"an int of about {int(value.bit_length() * math.log10(2)) + 1} digits, over Python's limit of "
            f"{_int_limit()} digits for converting an int to text, so JSON cannot encode it"
        )
    return f"{type(value).__name__} is not JSON-serializable"


def _raise_for(value: Any, root: str, cause: BaseException | None) -> None:
    problem = _find_problem(value, root, cause)
    if problem is None:
        if cause is None:
            return
        problem = f"{root}: could not be encoded as JSON ({type(cause).__name__}: {cause})"
    raise StateNotSerializableError(f"{problem}; {_RULE}") from None


class _Node:
    """One step of a path, linked to its parent: paths cost O(1) per level, built only to report."""

    __slots__ = ("depth", "label", "parent")

    def __init__(self, parent: _Node | None, label: str) -> None:
        self.parent = parent
        self.label = label
        self.depth = 0 if parent is None else parent.depth + 1


def _path(node: _Node) -> str:
    labels = []
    while node is not None:
        labels.append(node.label)
        node = node.parent
    labels.reverse()
    root, steps = labels[0], labels[1:]
    if len(steps) > 2 * _PATH_ENDS:
        hidden = len(steps) - 2 * _PATH_ENDS
        steps = [*steps[:_PATH_ENDS], f"...{hidden} levels...", *steps[-_PATH_ENDS:]]
    return root + "".join(steps)


def _int_too_long(value: int) -> bool:
    try:
        int.__repr__(value)
    except ValueError:
        return True
    return False


_EXIT = object()


def _find_problem(value: Any, root: str, cause: BaseException | None) -> str | None:
    """Walk ``value`` iteratively in linear time; return ``"path: what is wrong"`` or ``None``.

    When nothing is wrong with any single item but the encoder gave up on
    recursion, the problem is the nesting itself: report the deepest path.
    """
    on_path: set[int] = set()  # ids of the containers from the root to here: a cycle revisits one
    deepest = top = _Node(None, root)
    stack: list[tuple[Any, Any]] = [(value, top)]  # (item, its _Node), or (_EXIT, id of a container left)
    while stack:
        item, node = stack.pop()
        if item is _EXIT:
            on_path.discard(node)
            continue
        if node.depth > deepest.depth:
            deepest = node
        if item is None or isinstance(item, (bool, str)):
            continue
        if isinstance(item, int):
            if _int_too_long(item):
                return f"{_path(node)}: {_describe(item)}"
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return f"{_path(node)}: {_describe(item)}"
            continue
        if not isinstance(item, (dict, list, tuple)):
            return f"{_path(node)}: {_describe(item)}"
        if id(item) in on_path:
            return f"{_path(node)}: circular reference"
        on_path.add(id(item))
        stack.append((_EXIT, id(item)))
        if isinstance(item, dict):
            children = []
            for key, child in item.items():
                if not isinstance(key, str):
                    return (f"{_path(node)}: key {key!r} ({type(key).__name__}) is not a str; "
                            "JSON object keys must be strings")
                children.append((child, _Node(node, f"[{key!r}]")))
        else:
            children = [(child, _Node(node, f"[{i}]")) for i, child in enumerate(item)]
        stack.extend(reversed(children))
    if isinstance(cause, RecursionError):
        return (f"{_path(deepest)}: nested {deepest.depth} levels deep, deeper than Python's JSON encoder "
                "accepts (about 1,000 levels); flatten the state")
    return None
