"""Bulk increments (``increment_many`` of many keys: a reduce) with real processes: atomic, exact, durable.

The state server adds many keys in one pass and answers the new totals as a
list in the order of the keys, which the client turns back into a dict; these
tests pin what a user sees: every call's answer names its keys with totals
that include its own increment, concurrent writers lose nothing, and a
state server SIGKILLed in the middle of the writes (state in a file) neither
loses nor repeats an acknowledged one.
"""

from __future__ import annotations

import os
import signal

import pytest
from helpers import WAIT, by_value, pool_ready, single_flow, wait_until

by_value(__name__)

#: Keys per call: past the server's bulk threshold (``_jsonvalue.BULK_KEYS``), one of them JSON-escaped.
KEYS = [f"term {i}" for i in range(24)] + ['quo"te']


def _reduce(routine, slot_data, message, ws):
    """``n`` calls adding 1 to every key of ``KEYS`` and 0.5 to ``half``, each answer checked against the last."""
    amounts = dict.fromkeys(KEYS, 1)
    amounts["half"] = 0.5
    last = dict.fromkeys(amounts, 0)
    for _ in range(slot_data["in"][0]["n"]):
        totals = ws.increment_many("terms", amounts)
        assert list(totals) == list(amounts), f"the answer names the keys sent, in order: {list(totals)}"
        grew = [key for key in amounts if totals[key] >= last[key] + amounts[key]]
        assert len(grew) == len(amounts), f"a total without this call's increment: {totals} after {last}"
        assert type(totals["half"]) is float and type(totals[KEYS[0]]) is int, totals
        last = totals
    routine.emit("out", pid=os.getpid())


def _expected(calls: int) -> dict:
    return {**dict.fromkeys(KEYS, calls), "half": calls * 0.5}


#: id, Runtime options besides the processes (a state file: the sqlite backend, replies recorded for retries)
STORES = [("memory", False), ("state-file", True)]


@pytest.mark.parametrize("in_file", [row[1] for row in STORES], ids=[row[0] for row in STORES])
def test_bulk_increments_from_four_processes_lose_nothing_and_answer_every_key(make_runtime, tmp_path,
                                                                               in_file) -> None:
    single_flow("reduce", _reduce, concurrency=None)
    runtime = make_runtime(processes=4, **({"state_path": tmp_path / "run.db"} if in_file else {}))
    pool_ready(runtime)
    ws = runtime.exec("reduce")
    jobs = [runtime.post("reduce", "r", "in", {"n": 300})[1] for _ in range(4)]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert [job.status for job in jobs] == ["completed"] * 4, [job.error for job in jobs]
    assert len({job.outputs[0]["data"]["pid"] for job in jobs}) == 4, "four processes at once"
    assert ws.get_routine_state("terms") == _expected(1200)
    assert ws.increment_many("terms", {"half": 1, "new": 2}) == {"half": 601.0, "new": 2}, "from the supervisor too"


def test_bulk_increments_end_exactly_right_across_a_sigkill_of_the_state_server(make_runtime, tmp_path) -> None:
    single_flow("reduce", _reduce, concurrency=None)
    runtime = make_runtime(processes=2, state_path=tmp_path / "run.db")
    ws = runtime.exec("reduce")
    jobs = [runtime.post("reduce", "r", "in", {"n": 500})[1] for _ in range(2)]

    def done() -> int:
        return (ws.get_routine_state("terms") or {}).get(KEYS[0], 0)

    wait_until(lambda: done() >= 300, "a third of the writes", job=jobs[0])
    pid = runtime._testing.state_pid
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: runtime._testing.state_pid not in (None, pid) and runtime._testing.state_watched,
               "the supervisor to restart the state server")
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert [job.status for job in jobs] == ["completed"] * 2, [job.error for job in jobs]
    assert ws.get_routine_state("terms") == _expected(1000), "no acknowledged write lost, none applied twice"
