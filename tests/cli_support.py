"""What the CLI tests share: the flow files they run, and running the command in a subprocess.

Every run goes through ``python -m routilux_mp`` from the repository root, with
a small flow file written into ``tmp_path``. The square flow's logic leaves a
marker file per job it starts (so a test can prove that no job ran), counts
the items it saw in its WorkerState, and prints ``started N`` for items that
ask for it (so a test can wait for a run to be under way by reading stderr,
never by sleeping). Items can also ask it to truncate the input file, or to
wait until the CLI has written some output lines. The echo flow emits each
item as it is and keeps the last one in its state.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import textwrap
import time

import pytest

#: The repository root: runs start there, as a user's would.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Seconds any one CLI run may take (the machine may be loaded; a run here takes 1-5 s).
RUN_TIMEOUT = 60.0
#: Seconds to see a line on a child's stderr.
LINE_TIMEOUT = 30.0
#: Seconds for the processes of an interrupted run to disappear.
GONE_TIMEOUT = 15.0

FLOW_FILE = textwrap.dedent(
    """
    import os
    import time

    from routilux_mp import Flow, FlowRegistry, Routine

    HERE = os.path.dirname(os.path.abspath(__file__))
    SAMPLE_INPUT = "sample.jsonl"
    print("loading the square flow")  # must not end up in the JSONL on stdout


    def wait_for_lines(path, count, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            with open(path) as lines:
                if sum(1 for _ in lines) >= count:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not reach {count} lines within {timeout} s")
            time.sleep(0.01)


    class Square(Routine):
        def __init__(self):
            super().__init__()
            self.add_slot("in")
            self.add_event("out", ["n", "square"])

            def logic(slot_data, message, worker_state):
                for item in slot_data["in"]:
                    open(os.path.join(HERE, f"ran-{item['n']}"), "w").close()
                    worker_state.increment("square", "seen")
                    if item.get("truncate"):  # shrink the input file under the running CLI
                        os.truncate(item["truncate"], item["keep"])
                    if item.get("wait_for_lines"):  # hold until the CLI has written the others' outputs
                        wait_for_lines(item["output"], item["wait_for_lines"])
                    if item.get("announce"):
                        print("started", item["n"], flush=True)
                    time.sleep(item.get("sleep", 0))  # stands for work
                    if item.get("fail"):
                        raise ValueError(f"cannot square {item['n']}")
                    self.emit("out", n=item["n"], square=item["n"] ** 2)

            self.set_logic(logic)
            self.set_max_concurrency(None)


    flow = Flow("square")
    flow.add_routine(Square(), "square")
    FlowRegistry.get_instance().register_by_name("square", flow)
    """
)


ECHO_FLOW = """
from routilux_mp import Flow, FlowRegistry, Routine


class Echo(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("in")
        self.add_event("out")

        def logic(slot_data, message, worker_state):  # serial: one item after another, in input order
            for item in slot_data["in"]:
                worker_state.increment("echo", "seen")
                if item.get("fail"):
                    raise ValueError(f"refused line with n={item['n']}")
                worker_state.merge_routine_state("echo", {"last": item})
                self.emit("out", **item)

        self.set_logic(logic)


flow = Flow("echo")
flow.add_routine(Echo(), "echo")
FlowRegistry.get_instance().register_by_name("echo", flow)
"""


def write_jsonl(path, items) -> str:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def make_flow_file(tmp_path) -> str:
    """The square flow file, with a 30-line sample whose first job is the slowest (output order is tested)."""
    write_jsonl(tmp_path / "sample.jsonl", [{"n": 0, "sleep": 0.5}] + [{"n": n} for n in range(1, 30)])
    path = tmp_path / "flow.py"
    path.write_text(FLOW_FILE)
    return str(path)


def nested(depth: int) -> bytes:
    """An input line whose arrays and objects nest ``depth`` levels deep (the line's object is level 1)."""
    return b'{"n": 3, "deep": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def cli(*args: str, env, stdin: str | bytes | None = None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """Run the command to its end; stdout and stderr come back as text."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run([sys.executable, "-m", "routilux_mp", *args], input=data, stdout=stdout,
                          stderr=subprocess.PIPE, env=env, cwd=ROOT, timeout=RUN_TIMEOUT, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, (proc.stdout or b"").decode(), proc.stderr.decode())


def outputs(stdout: str) -> list[dict]:
    """Parse JSONL; fails the test on any line that is not a JSON object."""
    return [json.loads(line) for line in stdout.splitlines()]


def ran(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ran-"))


def read_until(fd: int, pattern: str, timeout: float) -> bytes:
    """Read ``fd`` until ``pattern`` shows up; fail past ``timeout``."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern.encode(), seen):
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([fd], [], [], max(remaining, 0))
        if not readable:
            pytest.fail(f"no {pattern!r} within {timeout}s; got {seen.decode(errors='replace')!r}")
        chunk = os.read(fd, 65536)
        if not chunk:
            pytest.fail(f"stream closed before {pattern!r}; got {seen.decode(errors='replace')!r}")
        seen += chunk
    return seen
