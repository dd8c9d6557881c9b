"""The client's checks of ``increment``/``increment_many`` amounts (a fast path for plain numbers; the same errors)."""

from __future__ import annotations

import pytest

from routilux_mp.state import _check_amounts

#: id, increment amounts the client refuses before any call, the message
BAD_AMOUNTS = [
    ("bool-amount", {"a": 1, "b": True}, r"finite numbers, got True for key 'b'"),
    ("infinite-amount", {"a": 1, "b": float("inf")}, r"finite numbers, got inf for key 'b'"),
    ("nan-amount", {"b": float("nan")}, r"finite numbers, got nan for key 'b'"),
    ("str-amount", {"b": "1"}, r"finite numbers, got '1' for key 'b'"),
    ("int-key", {"a": 1, 2: 1}, r"keys must be str, got 2"),
]


@pytest.mark.parametrize(("amounts", "message"), [case[1:] for case in BAD_AMOUNTS],
                         ids=[case[0] for case in BAD_AMOUNTS])
def test_increment_amounts_are_checked_whatever_path_the_check_takes(amounts, message) -> None:
    with pytest.raises(TypeError, match=message):
        _check_amounts(amounts)
    _check_amounts({"a": 1, "b": -2.5, "c": 10 ** 40})  # plain numbers pass
