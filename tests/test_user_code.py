"""What points at the user's code: tracebacks and frames of logic shipped by value, and logging from logic."""

from __future__ import annotations

import inspect
import logging

import pytest
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


def _log(routine, slot_data, message, ws):
    import logging
    import warnings

    item = slot_data["in"][0]
    logging.getLogger("tests.logic").info("item %s", item["n"])
    logging.getLogger("tests.logic").debug("too fine for the parent's level")
    if item.get("warn"):
        warnings.warn(f"careful with item {item['n']}", stacklevel=1)
    if item.get("fail"):
        try:
            item["missing"]
        except KeyError:
            logging.getLogger("tests.logic").exception("lookup failed")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    """Records reaching the parent's loggers ``tests.logic`` (INFO) and ``py.warnings``, the parent's config."""
    handler = _Records()
    loggers = [logging.getLogger("tests.logic"), logging.getLogger("py.warnings")]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    yield handler.records
    for lg, level, propagate in saved:
        lg.removeHandler(handler)
        lg.setLevel(level)
        lg.propagate = propagate


def test_logging_from_logic_reaches_the_parents_handlers_with_worker_and_job(make_runtime, records) -> None:
    single_flow("logs", _log)
    runtime = make_runtime(processes=1)
    jobs = [runtime.post("logs", "r", "in", item, job_id=f"log-{item['n']}")[1]
            for item in ({"n": 1}, {"n": 2, "warn": True}, {"n": 3, "fail": True})]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert all(job.status == "completed" for job in jobs)
    pid = runtime.stats()["processes"][0]["pid"]
    seen = [(r.name, r.levelname, r.getMessage().splitlines()[0], r.job_id, r.routine, r.worker, r.pid, r.worker_id)
            for r in records]
    assert [s[:4] for s in seen] == [
        ("tests.logic", "INFO", "item 1", "log-1"),
        ("tests.logic", "INFO", "item 2", "log-2"),
        ("py.warnings", "WARNING", seen[2][2], "log-2"),
        ("tests.logic", "INFO", "item 3", "log-3"),
        ("tests.logic", "ERROR", "lookup failed", "log-3"),
    ], "DEBUG is below the parent's level: never sent"
    assert "UserWarning: careful with item 2" in seen[2][2] and __file__ in seen[2][2]
    assert {s[4:] for s in seen} == {("r", 0, pid, "logs-1")}
    assert "KeyError: 'missing'" in records[-1].exc_text and records[-1].exc_info is None
    assert logging.Formatter().format(records[-1]).endswith("KeyError: 'missing'")
