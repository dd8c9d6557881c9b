"""Increments of many keys: the client's checks of the amounts and the state server's pass over them.

Both sides have a fast path for plain numbers (a pass per step over all keys)
and the careful key-by-key way for everything else; these tests pin that the
two give the same totals, the same exact sizes and the same errors.
"""

from __future__ import annotations

import json

import pytest

from routilux_mp import _jsonvalue
from routilux_mp._messages import is_plain
from routilux_mp._state.backend import MemoryBackend
from routilux_mp._state.client import StoreClient
from routilux_mp._state.store import StateStore
from routilux_mp.errors import StateNotSerializableError
from routilux_mp.state import WorkerState, _check_amounts

#: id, increment amounts the client refuses before any call, the message
BAD_AMOUNTS = [
    ("bool-amount", {"a": 1, "b": True}, r"finite numbers, got True for key 'b'"),
    ("infinite-amount", {"a": 1, "b": float("inf")}, r"finite numbers, got inf for key 'b'"),
    ("nan-amount", {"b": float("nan")}, r"finite numbers, got nan for key 'b'"),
    ("str-amount", {"b": "1"}, r"finite numbers, got '1' for key 'b'"),
    ("int-key", {"a": 1, 2: 1}, r"keys must be str, got 2"),
    ("infinite-amount-beside-an-int-too-large-for-a-float", {"a": 10 ** 400, "b": float("-inf")},
     r"finite numbers, got -inf for key 'b'"),
]


@pytest.mark.parametrize(("amounts", "message"), [case[1:] for case in BAD_AMOUNTS],
                         ids=[case[0] for case in BAD_AMOUNTS])
def test_increment_amounts_are_checked_whatever_path_the_check_takes(amounts, message) -> None:
    with pytest.raises(TypeError, match=message):
        _check_amounts(amounts)
    _check_amounts({"a": 1, "b": -2.5, "c": 10 ** 40})  # plain numbers pass
    _check_amounts({"a": 1.5, "b": 10 ** 400})  # an int too large for a float is still a plain number


#: id, the state before, the amounts added
INCREMENTS = [
    ("new-keys-in-an-empty-state", {}, {"a": 1, "b": 2.5, "": 3}),
    ("existing-ints", {"a": 1, "b": -5}, {"a": 2, "b": 5}),
    ("digits-grow-and-shrink", {"a": 9, "b": 99, "c": -1, "d": 10, "e": 100}, {"a": 1, "b": 1, "c": 1, "d": -1,
                                                                                 "e": -91}),
    ("floats-and-ints-mixed", {"a": 1, "b": 0.1, "c": -0.0}, {"a": 0.5, "b": 0.2, "c": 0, "d": 1e300}),
    ("big-ints", {"a": 10 ** 30}, {"a": 10 ** 30, "b": -(10 ** 40)}),
    ("keys-json-escapes", {"x": 1}, {"quo\"te": 1, "back\\slash": 2, "ü": 3, "tab\t": 4, "del\x7f": 5, "x": 1}),
    ("some-new-some-old", {f"k{i}": i for i in range(50)}, {f"k{i}": 1 for i in range(25, 75)}),
]


@pytest.mark.parametrize(("before", "amounts"), [case[1:] for case in INCREMENTS], ids=[case[0] for case in INCREMENTS])
def test_bulk_increments_give_the_totals_and_exact_size_of_the_key_by_key_loop(monkeypatch, before, amounts) -> None:
    monkeypatch.setattr(_jsonvalue, "BULK_KEYS", 1)  # the bulk pass whatever the number of keys
    fast = _jsonvalue.add_numbers(dict(before), _json_size(before), amounts, "r")
    monkeypatch.setattr(_jsonvalue, "_add_plain_numbers", lambda *args: None)
    careful = _jsonvalue.add_numbers(dict(before), _json_size(before), amounts, "r")
    after = dict(before)
    after.update(zip(amounts, fast[0]))
    assert fast == careful
    assert [type(t) for t in fast[0]] == [type(t) for t in careful[0]], "ints stay ints, floats floats"
    assert fast[1] == _json_size(after), "the size is the new state's compact JSON length"


#: id, the state before, the amounts, the error and its message (the careful loop's, whatever path is tried first)
REFUSED = [
    ("adds-to-a-string", {"s": "x", "n": 1}, {"n": 1, "s": 1}, TypeError,
     r"state\['s'\] of routine 'r' is str, not a number"),
    ("adds-to-a-bool", {"b": True}, {"b": 1}, TypeError, r"state\['b'\] of routine 'r' is bool, not a number"),
    ("adds-to-none", {"z": None}, {"z": 1}, TypeError, r"state\['z'\] of routine 'r' is NoneType, not a number"),
    ("float-sum-overflows", {"f": 1.5e308}, {"f": 1.5e308}, StateNotSerializableError,
     r"state\['f'\] of routine 'r' would become inf, which JSON refuses"),
    ("int-past-the-digit-limit", {"i": 10 ** 4299}, {"i": 9 * 10 ** 4299}, StateNotSerializableError,
     r"state\['i'\] of routine 'r' would become an int of about 4301 digits"),
]


@pytest.mark.parametrize(("before", "amounts", "error", "message"), [case[1:] for case in REFUSED],
                         ids=[case[0] for case in REFUSED])
def test_a_refused_increment_raises_the_careful_error_and_writes_nothing(monkeypatch, before, amounts, error,
                                                                        message) -> None:
    monkeypatch.setattr(_jsonvalue, "BULK_KEYS", 1)  # the bulk pass is tried first, whatever the number of keys
    backend = MemoryBackend()
    backend.save("w", "r", dict(before), 1, 1)
    store = StateStore(backend, 1 << 20, False, 1.0)
    with pytest.raises(error, match=message):
        store.increment("w", "r", amounts)
    cell = backend.load("w", "r")
    assert (cell.value, cell.version) == (before, 1), "all or nothing"


#: id, emitted data, whether it is plain (C pickler, no trial unpickle in the worker)
PLAIN = [
    ("flat", {"a": 1, "b": "x", "c": None, "d": 2.5, "e": True}, True),
    ("counts-and-a-number", {"counts": {"the": 3, "a b": 1}, "words": 7}, True),
    ("a-list-of-plain-values", {"tokens": ["a", 1, None]}, True),
    ("empty-containers", {"d": {}, "l": []}, True),
    ("an-object-in-a-dict", {"d": {"x": object()}}, False),
    ("an-int-key-in-a-dict", {"d": {1: 2}}, False),
    ("two-levels-of-dicts", {"d": {"x": {"y": 1}}}, False),
    ("a-list-of-lists", {"l": [[1]]}, False),
    ("a-tuple", {"t": (1, 2)}, False),
    ("not-a-dict", [1, 2], False),
    ("an-int-key", {1: "x"}, False),
]


@pytest.mark.parametrize(("data", "plain"), [case[1:] for case in PLAIN], ids=[case[0] for case in PLAIN])
def test_plain_data_is_builtin_values_at_most_one_container_deep(data, plain) -> None:
    assert is_plain(data) is plain


class _Answers(StoreClient):
    """A client whose every call gets ``reply`` (no server)."""

    def __init__(self, reply: tuple) -> None:
        super().__init__("/nonexistent/socket", b"key", 1.0, 1.0)
        self.reply = reply

    def call(self, method, *args, patience=0.0):
        return self.reply


#: id, what the server answered to an increment of {"a": 1, "b": 0.5}: ``(new values, version)``
REPLIES = [
    ("a-list-in-the-order-of-the-keys", ([3, 4.5], 7)),
    ("a-dict-kept-in-a-state-file-by-an-earlier-version-and-replayed", ({"a": 3, "b": 4.5}, 7)),
]


@pytest.mark.parametrize("reply", [row[1] for row in REPLIES], ids=[row[0] for row in REPLIES])
def test_increment_many_returns_the_new_value_of_each_key_sent_whatever_the_reply(reply) -> None:
    totals = WorkerState("w", "f", _Answers(reply)).increment_many("r", {"a": 1, "b": 0.5})
    assert totals == {"a": 3, "b": 4.5} and list(totals) == ["a", "b"]


def _json_size(value: dict) -> int:
    return len(json.dumps(value, separators=(",", ":"), allow_nan=False))
