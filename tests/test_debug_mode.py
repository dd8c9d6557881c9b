"""``Runtime(processes=0)`` and ``routilux-mp run --debug``: logic in the caller's process, for debuggers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading

import pytest
from cli_support import ROOT, RUN_TIMEOUT, cli, outputs, write_jsonl
from helpers import WAIT, by_value, single_flow

from routilux_mp import Runtime

by_value(__name__)


def _where(routine, slot_data, message, ws):
    import threading

    item = slot_data["in"][0]
    ws.increment("where", "seen")
    if item.get("fail"):
        raise ValueError(f"bad item {item['n']}")
    routine.emit("out", pid=os.getpid(), thread=threading.current_thread().name, n=item["n"])


def test_processes_0_runs_logic_in_this_process_with_the_same_state_api(make_runtime) -> None:
    single_flow("here", _where)
    runtime = make_runtime(processes=0)
    assert runtime.processes == 0
    jobs = [runtime.post("here", "r", "in", {"n": n})[1] for n in range(5)]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert [job.outputs[0]["data"]["n"] for job in jobs] == list(range(5))
    assert {job.outputs[0]["data"]["pid"] for job in jobs} == {os.getpid()}
    assert threading.current_thread().name not in {job.outputs[0]["data"]["thread"] for job in jobs}
    assert runtime.get_worker_state("here-1").get_routine_state("where") == {"seen": 5}
    assert [p["pid"] for p in runtime.stats()["processes"]] == [os.getpid()]


def test_a_failed_job_keeps_its_input_and_can_be_posted_again(make_runtime) -> None:
    single_flow("again", _where)
    runtime = make_runtime(processes=0)
    _, job = runtime.post("again", "r", "in", {"n": 7, "fail": True})
    assert job.wait(WAIT) and job.status == "failed"
    assert job.input == {"n": 7, "fail": True}
    job.input["n"] = 8  # a copy each time
    _, retry = runtime.post("again", "r", "in", dict(job.input, fail=False))
    assert retry.wait(WAIT) and retry.status == "completed" and retry.outputs[0]["data"]["n"] == 7


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"processes": -1}, r"processes must be a positive int \(or 0: run logic in this process, to debug it\)"),
    ({"processes": 0, "max_worker_rss": 2**30},
     r"processes=0 runs logic in this process, which cannot be recycled: drop max_worker_rss"),
])
def test_misuse_of_the_debug_mode_says_what_to_do(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Runtime(**kwargs)


STEP_INTO = textwrap.dedent(
    """
    from routilux_mp import Flow, FlowRegistry, Routine, Runtime


    class Square(Routine):
        def __init__(self):
            super().__init__()
            self.add_slot("in")
            self.add_event("out")

            def logic(slot_data, message, worker_state):
                item = slot_data["in"][0]
                breakpoint()
                self.emit("out", square=item["x"] ** 2)

            self.set_logic(logic)


    flow = Flow("debug")
    flow.add_routine(Square(), "square")
    FlowRegistry.get_instance().register_by_name("debug", flow)
    with Runtime(processes=0) as runtime:
        _, job = runtime.post("debug", "square", "in", {"x": 12})
        job.wait(60)
        print("result", job.status, job.outputs[0]["data"])
    """
)


def test_breakpoint_in_logic_stops_in_pdb_in_this_process(tmp_path, python_env) -> None:
    script = tmp_path / "step.py"
    script.write_text(STEP_INTO)
    env = dict(python_env, PYTHONBREAKPOINT="pdb.set_trace")
    proc = subprocess.run([sys.executable, str(script)], input="p item['x'] * 10\nn\nc\n", capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=RUN_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr
    line = STEP_INTO.splitlines().index('            breakpoint()') + 2  # pdb stops on the line after it
    assert f"> {script}({line})logic()" in proc.stdout, proc.stdout
    assert "(Pdb) 120" in proc.stdout, "pdb evaluated in the logic's frame, in this process"
    assert "result completed {'square': 144}" in proc.stdout


DEBUG_FLOW = """
import os

from routilux_mp import Flow, FlowRegistry, Routine


class Pid(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("in")
        self.add_event("out")
        self.set_logic(lambda slot_data, message, ws: self.emit("out", n=slot_data["in"][0]["n"], pid=os.getpid()))


print("loaded in", os.getpid())
flow = Flow("pid")
flow.add_routine(Pid(), "pid")
FlowRegistry.get_instance().register_by_name("pid", flow)
"""


def test_cli_debug_runs_logic_in_the_cli_process(tmp_path, python_env) -> None:
    (tmp_path / "pid.py").write_text(DEBUG_FLOW)
    source = write_jsonl(tmp_path / "in.jsonl", [{"n": n} for n in range(3)])
    result = cli("run", str(tmp_path / "pid.py"), "--input", source, "--debug", env=python_env)
    assert result.returncode == 0, result.stderr
    written = outputs(result.stdout)
    assert [o["data"]["n"] for o in written] == [0, 1, 2]
    loaded_in = int(re.search(r"loaded in (\d+)", result.stderr).group(1))
    assert {o["data"]["pid"] for o in written} == {loaded_in}, "logic ran in the CLI's own process"
    refused = cli("run", str(tmp_path / "pid.py"), "--input", source, "--debug", "--processes", "2", env=python_env)
    assert refused.returncode == 2 and "--debug runs logic in this process" in refused.stderr
