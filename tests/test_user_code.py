"""What points at the user's code: tracebacks and frames of logic shipped by value, and logging from logic."""

from __future__ import annotations

import inspect

from helpers import WAIT, by_value, single_flow

by_value(__name__)


def _divide(routine, slot_data, message, ws):
    item = slot_data["in"][0]
    return item["x"] / item["y"]  # the line that raises


def test_a_failing_logic_traceback_names_the_users_file_and_line(make_runtime) -> None:
    single_flow("divide", _divide)
    runtime = make_runtime(processes=1)
    _, job = runtime.post("divide", "r", "in", {"x": 1, "y": 0})
    assert job.wait(WAIT) and job.status == "failed"
    lines, first = inspect.getsourcelines(_divide)
    line = first + next(i for i, text in enumerate(lines) if "the line that raises" in text)
    assert f'File "{__file__}", line {line}, in _divide' in job.error["traceback"], job.error["traceback"]
    assert 'return item["x"] / item["y"]' in job.error["traceback"]
    assert "<dynamic-code>" not in job.error["traceback"]
    assert job.error["frame"] == {"file": __file__, "line": line, "function": "_divide",
                                  "code": 'return item["x"] / item["y"]  # the line that raises'}
