"""The ``routilux-mp`` command, driven in subprocesses: output, exit codes, signals, the terminal UI.

Every run goes through ``python -m routilux_mp`` from the repository root, with
a small flow file written into ``tmp_path``. Its logic leaves a marker file per
job it starts (so a test can prove that no job ran), counts the items it saw
in its WorkerState, and prints ``started N`` for items that ask for it (so a
test can wait for a run to be under way by reading stderr, never by
sleeping). Items can also ask it to truncate the input file, or to wait until
the CLI has written some output lines.
"""

from __future__ import annotations

import bz2
import fcntl
import gzip
import io
import json
import lzma
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time

import psutil
import pytest
from rich.console import Console

from routilux_mp import _cli_run as cli_run
from routilux_mp import _cli_ui
from routilux_mp import cli as cli_module
from routilux_mp._cli_exit import usable_cpus
from routilux_mp._cli_input import MAX_DEPTH, InputSource
from routilux_mp._cli_run import MAX_UNWRITTEN_JOBS
from routilux_mp._cli_ui import ETA_MIN_JOBS, ETA_MIN_SECONDS, Tally, bottleneck_hint

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


def write_jsonl(path, items) -> str:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


@pytest.fixture
def flow_file(tmp_path):
    """The flow file, with a 30-line sample whose first job is the slowest (output order is tested)."""
    write_jsonl(tmp_path / "sample.jsonl", [{"n": 0, "sleep": 0.5}] + [{"n": n} for n in range(1, 30)])
    path = tmp_path / "flow.py"
    path.write_text(FLOW_FILE)
    return str(path)


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


# ---------------------------------------------------------------------------- runs that finish


def test_run_writes_every_output_in_input_order(flow_file, tmp_path, python_env) -> None:
    result = cli("run", flow_file, "--processes", "2", env=python_env)  # input: the flow's SAMPLE_INPUT
    assert result.returncode == 0, result.stderr
    assert outputs(result.stdout) == [
        {"job_id": f"line-{n + 1}", "routine": "square", "event": "out", "data": {"n": n, "square": n * n}}
        for n in range(30)
    ]
    assert "30 completed, 0 failed, 0 cancelled" in result.stderr
    assert "loading the square flow" in result.stderr
    assert "bottleneck: " in result.stderr and "'square'" in result.stderr
    assert "\x1b[" not in result.stderr  # no terminal: plain lines, no escape codes


def test_failed_jobs_are_counted_logged_and_exit_1(flow_file, tmp_path, python_env) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"n": 1}, {"n": 2, "fail": True}, {"n": 3}])
    out = tmp_path / "out.jsonl"
    result = cli("run", flow_file, "--input", source, "--output", str(out), "--processes", "2", env=python_env)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert [o["job_id"] for o in outputs(out.read_text())] == ["line-1", "line-3"]
    assert "job line-2 failed in routine 'square': ValueError: cannot square 2" in result.stderr
    assert "2 completed, 1 failed, 0 cancelled" in result.stderr


def test_max_failures_cancels_the_rest(flow_file, tmp_path, python_env) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"n": n, "fail": True, "sleep": 0.1} for n in range(100)])
    result = cli("run", flow_file, "--input", source, "--max-failures", "2", "--processes", "2", env=python_env)
    assert result.returncode == 1, result.stderr
    assert "--max-failures 2" in result.stderr
    cancelled = int(re.search(r"(\d+) cancelled", result.stderr).group(1))
    assert cancelled > 50, result.stderr
    assert result.stdout == ""


BATCH_FLOW = """
from routilux_mp import Flow, FlowRegistry, Routine
from routilux_mp.activation_policies import batch_size_policy


class Collect(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("in", max_queue_length=100_000)
        self.add_event("out")
        self.set_activation_policy(batch_size_policy(50_000))

        def logic(slot_data, message, worker_state):
            for item in slot_data["in"]:
                self.emit("out", **item)

        self.set_logic(logic)


flow = Flow("collect")
flow.add_routine(Collect(), "collect")
FlowRegistry.get_instance().register_by_name("collect", flow)
"""


def test_a_batch_bigger_than_the_output_window_is_flushed_not_deadlocked(tmp_path, python_env) -> None:
    """Policies may hold more jobs than the CLI lets wait for output: it flushes them when it stalls."""
    (tmp_path / "batch.py").write_text(BATCH_FLOW)
    count = MAX_UNWRITTEN_JOBS + 500
    source = write_jsonl(tmp_path / "in.jsonl", [{"n": n} for n in range(count)])
    result = cli("run", str(tmp_path / "batch.py"), "--input", source, "--processes", "2", env=python_env)
    assert result.returncode == 0, result.stderr
    assert [o["data"]["n"] for o in outputs(result.stdout)] == list(range(count))


def nested(depth: int) -> bytes:
    """An input line whose arrays and objects nest ``depth`` levels deep (the line's object is level 1)."""
    return b'{"n": 3, "deep": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


BAD_INPUTS = [
    # (what, the third input line, message)
    ("malformed JSON", b'{"n": 3', r"line 3: not valid JSON \(Expecting ',' delimiter"),
    ("not an object", b"[3]", r"line 3: each line must be a JSON object, got list"),
    ("NaN is not JSON", b'{"n": NaN}', r"line 3: not valid JSON \(NaN is not JSON\)"),
    ("not UTF-8", b'{"n": "\xff"}', r"line 3: not UTF-8 text"),
    ("100,000 levels deep", nested(100_000), rf"line 3: nested more than {MAX_DEPTH} levels deep"),
    ("one level too deep", nested(MAX_DEPTH + 1), rf"line 3: nested more than {MAX_DEPTH} levels deep"),
    ("1e400 is no float", b'{"n": 1e400}', r"line 3: not valid JSON \(the number 1e400 is too large for a float\)"),
    ("-1e400 is no float", b'{"n": -1e400}', r"line 3: not valid JSON \(the number -1e400 is too large"),
]


@pytest.mark.parametrize("compress", [None, gzip.compress], ids=["plain", "gzip"])
@pytest.mark.parametrize(("what", "bad_line", "message"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_a_bad_input_file_starts_no_job(flow_file, tmp_path, python_env, what, bad_line, message, compress) -> None:
    text = b'{"n": 1}\n\n' + bad_line + b'\n{"n": 4}\n'  # line 2 is blank: line numbers still count it
    source = tmp_path / "in.jsonl"
    source.write_bytes(compress(text) if compress else text)
    result = cli("run", flow_file, "--input", str(source), env=python_env)
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert ran(tmp_path) == []  # validated before anything started
    assert result.stdout == ""


def test_a_bad_line_on_stdin_stops_reading_there(flow_file, tmp_path, python_env) -> None:
    stdin = '{"n": 1}\n{"n": 2}\nnot json\n{"n": 4}\n'
    result = cli("run", flow_file, "--input", "-", "--processes", "2", env=python_env, stdin=stdin)
    assert result.returncode == 2, result.stderr
    assert "<stdin> line 3: not valid JSON" in result.stderr
    assert [o["data"]["n"] for o in outputs(result.stdout)] == [1, 2]  # the jobs before it still finish
    assert ran(tmp_path) == ["ran-1", "ran-2"]


OTHER_FLOW = """
flow = Flow("cube")
flow.add_routine(Square(), "a")
flow.add_routine(Square(), "b")
FlowRegistry.get_instance().register_by_name("cube", flow)
"""

LOAD_FAILURES = [
    # (what, TARGET: a path or module, or the text of a file to write; extra arguments, exit code, message)
    ("missing file", "missing.py", [], 3, r"cannot load '.*missing\.py': no such file"),
    ("import error", "import not_a_module_anywhere\n", [], 3, r"No module named 'not_a_module_anywhere'"),
    ("no flow", "x = 1\n", [], 3, r"registered no flow"),
    ("unknown --flow", FLOW_FILE, ["--flow", "nope"], 3, r"registers no flow 'nope' \(flows: 'square'\)"),
    ("unknown module", "tests.not_a_module", [], 3, r"No module named 'tests\.not_a_module'"),
    ("several flows", FLOW_FILE + OTHER_FLOW, [], 2, r"registers 2 flows \('cube', 'square'\): pick one with --flow"),
    ("several entries", FLOW_FILE + OTHER_FLOW, ["--flow", "cube"], 2, r"2 entry slots \(a\.in, b\.in\)"),
    ("bad --entry", FLOW_FILE, ["--entry", "square.nope"], 2, r"has no slot 'nope' \(slots: 'in'\)"),
    ("no input", FLOW_FILE + "SAMPLE_INPUT = None\n", [], 2, r"defines no SAMPLE_INPUT"),
    ("missing input", FLOW_FILE, ["--input", "nowhere.jsonl"], 2, r"cannot read input 'nowhere\.jsonl'"),
]


@pytest.mark.parametrize(("what", "target", "extra", "code", "message"), LOAD_FAILURES,
                         ids=[case[0] for case in LOAD_FAILURES])
def test_what_cannot_run_exits_before_any_process(tmp_path, python_env, what, target, extra, code, message) -> None:
    if "\n" in target:
        path = tmp_path / "target.py"
        path.write_text(target)
        target = str(path)
    result = cli("run", target, *extra, env=python_env)
    assert result.returncode == code, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert ("Traceback" in result.stderr) == (what == "import error")  # the user's own error keeps its traceback
    assert ran(tmp_path) == []


# ---------------------------------------------------------------------------- files that must survive the run


def _same_path(tmp_path, source) -> str:
    return str(source)


def _another_spelling(tmp_path, source) -> str:
    (tmp_path / "sub").mkdir()
    return os.path.join(str(tmp_path), "sub", "..", source.name)


def _symlink(tmp_path, source) -> str:
    os.symlink(source, tmp_path / "link.jsonl")
    return str(tmp_path / "link.jsonl")


def _hard_link(tmp_path, source) -> str:
    os.link(source, tmp_path / "hard.jsonl")
    return str(tmp_path / "hard.jsonl")


SAME_FILE = [
    # (what, option, make the path that option names from tmp_path and the input, message)
    ("--output is the input", "--output", _same_path, r"--output '.*in\.jsonl' is the input file"),
    ("--output is the input spelled otherwise", "--output", _another_spelling, r"--output .* is the input file"),
    ("--output is a symlink to the input", "--output", _symlink, r"--output '.*link\.jsonl' is the input file"),
    ("--output is a hard link to the input", "--output", _hard_link, r"--output '.*hard\.jsonl' is the input file"),
    ("--failed-out is the input", "--failed-out", _symlink, r"--failed-out '.*link\.jsonl' is the input file"),
    ("--state-out is the input", "--state-out", _hard_link, r"--state-out '.*hard\.jsonl' is the input file"),
]


@pytest.mark.parametrize(("what", "option", "make_path", "message"), SAME_FILE, ids=[case[0] for case in SAME_FILE])
def test_an_output_that_is_the_input_is_refused_before_anything_is_written(flow_file, tmp_path, python_env, what,
                                                                           option, make_path, message) -> None:
    source = tmp_path / "in.jsonl"
    write_jsonl(source, [{"n": n} for n in range(5)])
    before = source.read_bytes()
    result = cli("run", flow_file, "--input", str(source), option, make_path(tmp_path, source), env=python_env)
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert source.read_bytes() == before  # not truncated
    assert ran(tmp_path) == []


def test_stdout_appended_onto_the_input_is_refused(flow_file, tmp_path, python_env) -> None:
    source = tmp_path / "in.jsonl"
    write_jsonl(source, [{"n": n} for n in range(5)])
    before = source.read_bytes()
    with open(source, "ab") as stdout:  # `routilux-mp run ... --input in.jsonl >> in.jsonl`
        result = cli("run", flow_file, "--input", str(source), env=python_env, stdout=stdout)
    assert result.returncode == 2, result.stderr
    assert "stdout is redirected onto the input file" in result.stderr
    assert source.read_bytes() == before
    assert ran(tmp_path) == []


def test_two_outputs_naming_one_file_are_refused(flow_file, tmp_path, python_env) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"n": 1}])
    out = str(tmp_path / "out.jsonl")
    result = cli("run", flow_file, "--input", source, "--output", out, "--failed-out", out, env=python_env)
    assert result.returncode == 2, result.stderr
    assert re.search(r"--output '.*out\.jsonl' and --failed-out '.*out\.jsonl' are the same file", result.stderr)
    assert not os.path.exists(out)


def test_devices_may_take_several_outputs(flow_file, tmp_path, python_env) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"n": 1}, {"n": 2, "fail": True}])
    result = cli("run", flow_file, "--input", source, "--output", os.devnull, "--failed-out", os.devnull,
                 "--processes", "1", env=python_env)
    assert result.returncode == 1, result.stderr  # ran: line 2 failed
    assert "1 completed, 1 failed" in result.stderr


def test_an_input_that_shrinks_during_the_run_does_not_exit_0(flow_file, tmp_path, python_env) -> None:
    """The first job cuts the input at a line boundary the reader has not reached: the rest reads cleanly.

    The reader cannot be past line 2,000 (+ one 8 KiB buffer) while job 1 runs: until job 1 is
    written, at most MAX_UNWRITTEN_JOBS lines are posted. Cut at line 3,000, it reads 3,000 of 6,000.
    """
    assert MAX_UNWRITTEN_JOBS * 32 + 8192 < 2999 * 32
    lines = []
    for n in range(1, 6000):
        line = json.dumps({"n": n, "p": ""})
        lines.append(json.dumps({"n": n, "p": "x" * (31 - len(line))}) + "\n")  # 32 bytes each
    source = tmp_path / "in.jsonl"
    keep = 0
    while True:  # the first line holds its own length: settle it (two rounds at most)
        first = json.dumps({"n": 0, "truncate": str(source), "keep": keep}) + "\n"
        if keep == len(first) + 2999 * 32:
            break
        keep = len(first) + 2999 * 32
    source.write_text(first + "".join(lines))
    result = cli("run", flow_file, "--input", str(source), "--processes", "2", env=python_env)
    assert result.returncode == 2, result.stderr
    assert "in.jsonl changed while it was read: 6000 lines were checked before the run but 3000 were read back" \
        in result.stderr, result.stderr
    assert [o["data"]["n"] for o in outputs(result.stdout)] == list(range(3000))  # what was read back ran, in order


# ---------------------------------------------------------------------------- input formats


COMPRESSORS = [
    # (what, compress bytes)
    ("gzip", gzip.compress),
    ("bzip2", bz2.compress),
    ("xz", lzma.compress),
]


@pytest.mark.parametrize(("what", "compress"), COMPRESSORS, ids=[case[0] for case in COMPRESSORS])
def test_compressed_input_is_read_transparently(flow_file, tmp_path, python_env, what, compress) -> None:
    text = "".join(json.dumps({"n": n}) + "\n" for n in range(20)).encode()
    source = tmp_path / "in.data"  # recognised by its magic bytes, not its name
    source.write_bytes(compress(text))
    from_file = cli("run", flow_file, "--input", str(source), "--processes", "2", env=python_env)
    from_pipe = cli("run", flow_file, "--input", "-", "--processes", "2", env=python_env, stdin=compress(text))
    for result in (from_file, from_pipe):
        assert result.returncode == 0, result.stderr
        assert [o["data"]["n"] for o in outputs(result.stdout)] == list(range(20))


CORRUPT = [
    # (what, compressed bytes: a good first line, then damage)
    ("truncated gzip", gzip.compress(b'{"n": 1}\n' * 5000)[:-100], r"the gzip data is corrupt or truncated after line"),
    ("truncated xz", lzma.compress(b'{"n": 1}\n' * 5000)[:-100], r"the xz data is corrupt or truncated after line"),
    ("garbage bzip2", b"BZh9" + b"\x00" * 64, r"the bzip2 data is corrupt or truncated after line 0"),
]


@pytest.mark.parametrize(("what", "data", "message"), CORRUPT, ids=[case[0] for case in CORRUPT])
def test_corrupt_compressed_input_starts_no_job(flow_file, tmp_path, python_env, what, data, message) -> None:
    source = tmp_path / "in.jsonl.gz"
    source.write_bytes(data)
    result = cli("run", flow_file, "--input", str(source), env=python_env)
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert ran(tmp_path) == []


def input_total(path: str, monkeypatch, stdin=None) -> int | None:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)
    source = InputSource(path)
    try:
        source.validate()
        return source.total
    finally:
        source.close()


def test_a_file_has_a_total_compressed_or_not_and_a_pipe_has_none(tmp_path, monkeypatch) -> None:
    lines = b'{"n": 1}\n\n{"n": 2}\n{"n": 3}\n'  # blank lines are not jobs
    (tmp_path / "plain").write_bytes(lines)
    (tmp_path / "packed").write_bytes(lzma.compress(lines))
    assert input_total(str(tmp_path / "plain"), monkeypatch) == 3
    assert input_total(str(tmp_path / "packed"), monkeypatch) == 3
    with open(tmp_path / "packed", "rb") as redirected:  # `routilux-mp run ... --input - < packed`
        assert input_total("-", monkeypatch, stdin=redirected) == 3
    read_end, write_end = os.pipe()
    os.write(write_end, gzip.compress(lines))
    os.close(write_end)
    with open(read_end, "rb") as pipe:
        monkeypatch.setattr(sys, "stdin", pipe)
        source = InputSource("-")
        source.validate()  # a pipe can be read only once: it is checked as it is posted
        assert source.total is None  # so there is no total, and no fake ETA
        assert source.compression == "gzip"
        assert [n for n, _ in source.records()] == [1, 3, 4]


def test_accepted_edge_cases_run_end_to_end(tmp_path, python_env) -> None:
    """A BOM, CRLF line ends, the deepest nesting allowed and a lone surrogate all go through and back."""
    (tmp_path / "echo.py").write_text(ECHO_FLOW)
    deepest = json.loads(nested(MAX_DEPTH))
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'\xef\xbb\xbf{"n": 1}\r\n' + nested(MAX_DEPTH) + b'\n{"n": 4, "s": "\\ud800 ok"}\n')
    state_out = tmp_path / "state.json"
    result = cli("run", str(tmp_path / "echo.py"), "--input", str(source), "--state-out", str(state_out),
                 env=python_env)
    assert result.returncode == 0, result.stderr
    assert [o["data"] for o in outputs(result.stdout)] == [{"n": 1}, deepest, {"n": 4, "s": "\ud800 ok"}]
    assert "\\ud800 ok" in result.stdout  # escaped: UTF-8 cannot carry a lone surrogate
    state = json.loads(state_out.read_text())
    assert state["echo-1"]["routine_states"]["echo"] == {"seen": 3, "last": {"n": 4, "s": "\ud800 ok"}}


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


# ---------------------------------------------------------------------------- run options


def test_order_completion_writes_a_job_as_soon_as_it_is_done(flow_file, tmp_path, python_env) -> None:
    """Line 1 finishes only once the CLI has written the 9 others: possible only in completion order."""
    out = tmp_path / "out.jsonl"
    items = [{"n": 0, "wait_for_lines": 9, "output": str(out)}] + [{"n": n} for n in range(1, 10)]
    source = write_jsonl(tmp_path / "in.jsonl", items)
    result = cli("run", flow_file, "--input", source, "--output", str(out), "--order", "completion",
                 "--processes", "2", env=python_env)
    assert result.returncode == 0, result.stderr
    numbers = [o["data"]["n"] for o in outputs(out.read_text())]
    assert sorted(numbers[:9]) == list(range(1, 10))
    assert numbers[9] == 0


def test_failed_out_lists_every_failure_while_the_log_stays_capped(tmp_path, python_env) -> None:
    (tmp_path / "echo.py").write_text(ECHO_FLOW)
    items = [{"n": n, "fail": n % 5 != 0, "s": "\ud800"} for n in range(40)]  # 32 failures, lone surrogates too
    source = write_jsonl(tmp_path / "in.jsonl", items)
    failed_out = tmp_path / "failed.jsonl"
    capped = cli("run", str(tmp_path / "echo.py"), "--input", source, env=python_env)
    listed = cli("run", str(tmp_path / "echo.py"), "--input", source, "--failed-out", str(failed_out),
                 env=python_env)
    assert capped.returncode == listed.returncode == 1
    assert "more jobs failed; they are counted but not logged (--failed-out FILE lists every failure" in capped.stderr
    assert f"every failure is in {failed_out}" in listed.stderr
    assert len(re.findall(r"job line-\d+ failed", listed.stderr)) == cli_run.MAX_LOGGED_FAILURES
    records = outputs(failed_out.read_text())
    assert [r["line"] for r in records] == [n + 1 for n in range(40) if n % 5]  # in input order
    for record, n in zip(records, [n for n in range(40) if n % 5]):
        assert record["job_id"] == f"line-{n + 1}"
        assert record["input"] == {"n": n, "fail": True, "s": "\ud800"}
        assert record["error"]["type"] == "ValueError"
        assert record["error"]["message"] == f"refused line with n={n}"
        assert "Traceback (most recent call last)" in record["error"]["traceback"]
    assert [o["data"]["n"] for o in outputs(listed.stdout)] == list(range(0, 40, 5))


def test_state_out_holds_every_worker_state_at_the_end(tmp_path, python_env) -> None:
    (tmp_path / "echo.py").write_text(ECHO_FLOW)
    source = write_jsonl(tmp_path / "in.jsonl", [{"n": n, "fail": n == 3} for n in range(6)])
    state_out = tmp_path / "state.json"
    result = cli("run", str(tmp_path / "echo.py"), "--input", source, "--state-out", str(state_out), env=python_env)
    assert result.returncode == 1, result.stderr
    assert json.loads(state_out.read_text()) == {"echo-1": {
        "worker_id": "echo-1", "flow_id": "echo", "status": "stopped", "jobs_processed": 6, "jobs_failed": 1,
        "routine_states": {"echo": {"seen": 6, "last": {"n": 5, "fail": False}}},
    }}
    assert f"final worker states: {state_out}" in result.stderr


SINK_FAILURES = [
    # (option that names /dev/full, whether a line fails, message); the run must exit 1 either way
    ("--output", False, r"cannot write the output: No space left on device"),
    ("--failed-out", True, r"cannot write --failed-out /dev/full: No space left on device"),
    ("--state-out", False, r"cannot write --state-out /dev/full: No space left on device"),
]


@pytest.mark.parametrize(("option", "failing", "message"), SINK_FAILURES, ids=[case[0] for case in SINK_FAILURES])
def test_a_full_disk_is_reported_not_a_traceback(tmp_path, python_env, option, failing, message) -> None:
    (tmp_path / "echo.py").write_text(ECHO_FLOW)
    source = write_jsonl(tmp_path / "in.jsonl", [{"n": n, "fail": failing and n == 1} for n in range(3)])
    result = cli("run", str(tmp_path / "echo.py"), "--input", source, option, "/dev/full", env=python_env)
    assert re.search(message, result.stderr), result.stderr
    assert result.returncode == 1
    assert not re.search(r'File ".*routilux_mp/_?cli', result.stderr)  # no traceback from the CLI itself


MEMORY_FLOW = """
import os

from routilux_mp import Flow, FlowRegistry, Routine

KEEP = []  # what the logic allocated stays: the worker's RSS only grows


class Grow(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("in")
        self.add_event("out")

        def logic(slot_data, message, worker_state):
            for item in slot_data["in"]:
                KEEP.append(b"\\x01" * (item["mib"] * 2**20))
                self.emit("out", pid=os.getpid())

        self.set_logic(logic)


flow = Flow("grow")
flow.add_routine(Grow(), "grow")
FlowRegistry.get_instance().register_by_name("grow", flow)
"""


def test_max_worker_rss_recycles_a_worker_that_grows_past_it(tmp_path, python_env) -> None:
    """60 MiB kept per job: past a 64M limit after each job (recycled), below the 96M kill limit."""
    (tmp_path / "grow.py").write_text(MEMORY_FLOW)
    source = write_jsonl(tmp_path / "in.jsonl", [{"mib": 60}] * 3)
    result = cli("run", str(tmp_path / "grow.py"), "--input", source, "--processes", "1", "--max-worker-rss", "64M",
                 env=python_env)
    assert result.returncode == 0, result.stderr
    pids = [o["data"]["pid"] for o in outputs(result.stdout)]
    assert len(set(pids)) == 3, pids  # one fresh process per job (without the option: the same one)


SIZES = [
    # (argument, bytes or the error message)
    ("500M", 500 * 2**20),
    ("2G", 2 * 2**30),
    ("1.5g", int(1.5 * 2**30)),
    ("512MiB", 512 * 2**20),
    ("64mb", 64 * 2**20),
    ("100000000", 100_000_000),
    ("lots", r"'lots' is not a size: give bytes or a number with K, M, G or T"),
    ("-5M", r"'-5M' is not a size"),
    ("10M", r"10M is below 32M: an idle worker process alone uses"),
]


@pytest.mark.parametrize(("text", "expected"), SIZES, ids=[case[0] for case in SIZES])
def test_max_worker_rss_sizes(text, expected, capsys) -> None:
    parser = cli_module.build_parser()
    if isinstance(expected, int):
        assert parser.parse_args(["run", "x.py", f"--max-worker-rss={text}"]).max_worker_rss == expected
    else:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["run", "x.py", f"--max-worker-rss={text}"])
        assert exit_info.value.code == 2
        assert re.search(expected, capsys.readouterr().err)


def test_processes_beyond_64_per_cpu_are_a_usage_error(flow_file, python_env) -> None:
    cpus = usable_cpus()
    parser = cli_module.build_parser()
    assert parser.parse_args(["run", "x.py", "--processes", str(64 * cpus)]).processes == 64 * cpus
    result = cli("run", flow_file, "--processes", str(64 * cpus + 1), env=python_env)
    assert result.returncode == 2
    assert f"more than 64 x the {cpus} CPUs this process may use (at most {64 * cpus})" in result.stderr
    assert "Traceback" not in result.stderr
    huge = cli("run", flow_file, "--processes", "10000", env=python_env)
    assert huge.returncode == 2 and "more than 64 x" in huge.stderr


def test_help_shows_the_options_and_their_bounds(python_env) -> None:
    result = cli("run", "--help", env=python_env)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for expected in ("--failed-out FILE", "--state-out FILE", "--order {input,completion}", "--max-worker-rss SIZE",
                     "at most 64 per CPU", "gzip, bzip2 and xz", "examples:", "exit codes:"):
        assert expected in text, text
    for absent in ("--resume", "--retry-failed", "--backend", "--address", "--debug", "--state DB"):
        assert absent not in text


# ---------------------------------------------------------------------------- interrupting a run


def start_run(flow_file, source, python_env, *extra: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "routilux_mp", "run", flow_file, "--input", source,
                             "--processes", "2", "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=stderr, env=python_env, cwd=ROOT)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_drains_running_jobs_writes_valid_output_and_leaves_no_process(flow_file, tmp_path, python_env,
                                                                                sig) -> None:
    items = [{"n": n, "sleep": 0.05, "announce": n == 0} for n in range(400)]
    state_out = tmp_path / "state.json"
    proc = start_run(flow_file, write_jsonl(tmp_path / "in.jsonl", items), python_env, "--state-out", str(state_out))
    try:
        err = read_until(proc.stderr.fileno(), r"started 0", LINE_TIMEOUT)
        ours = psutil.Process(proc.pid).children(recursive=True)
        assert len(ours) >= 3  # two workers and the state server
        proc.send_signal(sig)
        out, rest = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        proc.kill()
    err += rest
    assert proc.returncode == 130, err.decode()
    done = outputs(out.decode())
    assert done, "the job running at the signal should have been drained and written"
    numbers = [o["data"]["n"] for o in done]
    assert numbers == list(range(len(numbers)))  # a prefix, in input order
    assert re.search(rb"\d+ completed, 0 failed, [1-9]\d* cancelled", err), err.decode()
    _, alive = psutil.wait_procs(ours, timeout=GONE_TIMEOUT)
    assert alive == []
    assert_final_state(state_out, seen=len(ran(tmp_path)))  # every item that started was counted, and written


def assert_final_state(path, seen: int) -> None:
    """``--state-out`` holds the square flow's one worker, stopped, with the items its logic counted."""
    state = json.loads(path.read_text())
    assert list(state) == ["square-1"]
    assert state["square-1"]["status"] == "stopped"
    assert state["square-1"]["routine_states"] == {"square": {"seen": seen}}


def test_a_second_signal_stops_without_waiting_for_running_jobs(flow_file, tmp_path, python_env) -> None:
    items = [{"n": n, "sleep": 600, "announce": True} for n in range(10)]  # would drain for DRAIN_TIMEOUT
    state_out = tmp_path / "state.json"
    proc = start_run(flow_file, write_jsonl(tmp_path / "in.jsonl", items), python_env, "--state-out", str(state_out))
    try:
        read_until(proc.stderr.fileno(), r"started", LINE_TIMEOUT)
        ours = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        read_until(proc.stderr.fileno(), r"interrupt again to stop now", LINE_TIMEOUT)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert out == b""
    _, alive = psutil.wait_procs(ours, timeout=GONE_TIMEOUT)
    assert alive == []
    # Written on a hard stop too. An item killed between its marker and its count may be missing.
    seen = json.loads(state_out.read_text())["square-1"]["routine_states"]["square"]["seen"]
    assert 1 <= seen <= len(ran(tmp_path))


# ---------------------------------------------------------------------------- the bundled pipeline and the UI


def test_wordcount_runs_on_its_bundled_sample_and_names_a_bottleneck(python_env) -> None:
    result = cli("run", "workers/wordcount.py", "--processes", "2", env=python_env)
    assert result.returncode == 0, result.stderr
    lines = outputs(result.stdout)
    assert len(lines) == 200
    assert {line["event"] for line in lines} == {"summary"}
    assert re.search(r"bottleneck: .*'(tokenize|count)'", result.stderr), result.stderr


@pytest.mark.parametrize("stdout", ["pipe", "terminal"])
def test_progress_ui_on_a_terminal(flow_file, tmp_path, python_env, stdout) -> None:
    """stderr on a pty draws the live UI; JSONL on the same terminal scrolls above it, whole."""
    items = [{"n": n, "sleep": 0.02} for n in range(60)]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**python_env, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    source = write_jsonl(tmp_path / "in.jsonl", items)
    proc = subprocess.Popen([sys.executable, "-m", "routilux_mp", "run", flow_file, "--input", source,
                             "--processes", "2"], stdout=subprocess.PIPE if stdout == "pipe" else slave,
                            stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while True:
            readable, _, _ = select.select([master], [], [], max(deadline - time.monotonic(), 0))
            assert readable, f"the run did not end within {RUN_TIMEOUT}s"
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal has closed it
                break
            if not chunk:
                break
            screen += chunk
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        proc.kill()
        os.close(master)
    assert proc.returncode == 0
    raw = screen.decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert "\x1b[" in raw  # it drew in place
    for expected in ("jobs", "60/60", "jobs/s", "ETA", "pid", "RSS", "CPU%", "activations", "restarts",
                     "bottleneck:"):
        assert expected in text, text
    if stdout == "pipe":
        assert len(outputs(out.decode())) == 60  # stdout stays clean JSONL
    else:
        lines = [line for line in text.replace("\r", "\n").splitlines() if line.startswith('{"job_id"')]
        assert [json.loads(line)["data"]["n"] for line in lines] == list(range(60))


def test_flows_lists_routines_slots_events_policies_and_connections(python_env) -> None:
    result = cli("flows", "workers/wordcount.py", env=python_env)
    assert result.returncode == 0, result.stderr
    for expected in ("flow 'wordcount'", "routine 'tokenize' (Tokenize)", "slot  doc (max_queue_length 1000)  <- entry",
                     "event counted(doc_id, counts, words, signature) -> count.counted",
                     "event summary(doc_id, words, distinct, top, signature) -> job output",
                     "policy immediate_policy() (default); max_concurrency None (one per process)",
                     "max_concurrency 1 (serial)", "tokenize.counted -> count.counted", "entry slots: tokenize.doc"):
        assert expected in result.stdout, result.stdout


def test_the_script_and_the_module_are_the_same_program(python_env) -> None:
    via_module = cli("--help", env=python_env)
    via_script = subprocess.run([sys.executable, "scripts/supervise.py", "--help"], capture_output=True, text=True,
                                env=python_env, cwd=ROOT, timeout=RUN_TIMEOUT, check=False)
    assert via_module.returncode == via_script.returncode == 0
    assert via_module.stdout == via_script.stdout
    assert "examples:" in via_module.stdout and "exit codes:" in via_module.stdout


# ---------------------------------------------------------------------------- the bottleneck hint


def routine(activations=100, busy=0.0, concurrency=1) -> dict:
    return {"activations": activations, "busy_seconds": busy, "max_concurrency": concurrency}


HINTS = [
    # (what, routines, processes, cpus, expected hint regex)
    ("serial stage", {"parse": routine(busy=1.0, concurrency=4), "score": routine(busy=9.8)}, 4, 4,
     r"^'score' was busy 98% of the run and is serial: set_max_concurrency\(\)"),
    ("serial on one process", {"score": routine(busy=9.0)}, 1, 4, r"is serial: .*and run with more --processes$"),
    ("capped concurrency", {"score": routine(busy=19.0, concurrency=2)}, 4, 4,
     r"^'score' was busy 95% of its 2 concurrent activations: raise set_max_concurrency\(\)"),
    ("all processes, spare CPUs", {"tok": routine(busy=38.0, concurrency=4)}, 4, 8,
     r"^'tok' kept all 4 processes busy 95% of the run: run with more --processes \(this machine has 8 CPUs\)"),
    ("all processes, all CPUs", {"tok": routine(busy=38.0, concurrency=4)}, 4, 4,
     r"^'tok' kept all 4 processes busy 95% .*cheaper or run on more cores"),
    ("nothing saturated", {"a": routine(busy=1.0), "b": routine(busy=2.0)}, 2, 2,
     r"^no routine was busy more than 20% of its capacity \(the busiest is 'b'\)"),
]


@pytest.mark.parametrize(("what", "routines", "processes", "cpus", "expected"), HINTS, ids=[h[0] for h in HINTS])
def test_bottleneck_hint(what, routines, processes, cpus, expected) -> None:
    assert re.search(expected, bottleneck_hint(routines, 10.0, processes, cpus))


def test_no_hint_when_nothing_ran() -> None:
    assert bottleneck_hint({"a": routine(activations=0)}, 10.0, 2, 2) is None


# ---------------------------------------------------------------------------- the ETA


def simulate(finished_by, total: int, until: float, tick: float = 0.1) -> list[tuple[float, float | None]]:
    """Drive a Tally as the main loop would: ``(t, eta)`` at every tick.

    ``finished_by(t)`` is how many jobs have finished at ``t`` seconds into the run.
    """
    tally = Tally(total=total, started=0.0)
    seen = []
    for step in range(1, int(until / tick) + 1):
        now = step * tick
        tally.completed = finished_by(now)
        tally.sample(now)
        seen.append((now, tally.eta(now)))
    return seen


def truth_steady(start: float, rate: float, total: int):
    """Seconds left at ``t`` for a run finishing ``rate`` jobs a second from ``start``."""
    return lambda t: (total - min(total, int(max(0.0, t - start) * rate))) / rate


def test_eta_ignores_a_slow_start() -> None:
    """Start-up took 5 s, then 100 jobs/s: the ETA is right at once (an average since start would say 2x)."""
    total = 3000
    finished = lambda t: min(total, int(max(0.0, t - 5.0) * 100))
    truth = truth_steady(5.0, 100, total)
    for now, eta in simulate(finished, total, until=25.0):
        if eta is not None:
            assert now >= 5.0 + ETA_MIN_SECONDS
            assert eta == pytest.approx(truth(now), rel=0.1, abs=0.5), now
    assert simulate(finished, total, until=9.0)[-1][1] is not None  # shown from 3 s of measurement


def test_eta_stays_steady_when_jobs_finish_in_bursts() -> None:
    """A batch policy releases 50 jobs every second: 50 jobs/s, and the ETA must not swing with each burst."""
    total = 2000
    finished = lambda t: min(total, 50 * int(t))
    etas = [(now, eta) for now, eta in simulate(finished, total, until=30.0) if now >= 6.0]
    for now, eta in etas:
        assert eta is not None
        assert eta == pytest.approx((total - finished(now)) / 50, rel=0.15, abs=1.0), now


def test_eta_follows_a_lasting_change_of_pace() -> None:
    """100 jobs/s for 20 s, then 25 jobs/s: within 20 s of the change the ETA reflects the new pace."""
    total = 4000
    finished = lambda t: int(t * 100) if t <= 20 else 2000 + int((t - 20) * 25)
    last = simulate(finished, total, until=40.0)[-1]
    assert last[1] == pytest.approx((total - finished(40.0)) / 25, rel=0.2)


def test_no_eta_without_a_total_or_before_enough_jobs() -> None:
    unknown = Tally(total=None, started=0.0)
    few = Tally(total=1000, started=0.0)
    for step in range(1, 101):  # 10 s
        unknown.completed = step * 10
        unknown.sample(step / 10)
        few.completed = min(step, ETA_MIN_JOBS - 1)
        few.sample(step / 10)
    assert unknown.eta(10.0) is None and unknown.rate == pytest.approx(100, rel=0.05)
    assert few.eta(10.0) is None


def test_plain_progress_from_a_pipe_shows_a_count_but_no_total_and_no_eta(monkeypatch) -> None:
    monkeypatch.setattr(_cli_ui, "PLAIN_INTERVAL", 0.0)
    stream = io.StringIO()
    display = _cli_ui.PlainDisplay(Console(file=stream, width=200))
    tally = Tally(total=None, started=time.monotonic())
    display.start(tally, lambda: {"processes": []})
    tally.completed = 42
    display.update(tally)
    line = stream.getvalue().strip()
    assert line.startswith("routilux-mp: 42 jobs done (0 failed)"), line
    assert "/" not in line.split("jobs/s")[0] and "ETA" not in line


# ---------------------------------------------------------------------------- packaging


def test_the_package_ships_py_typed() -> None:
    """mypy reads the annotations only from a package marked with py.typed, installed as package data."""
    package = os.path.join(ROOT, "routilux_mp")
    assert os.path.isfile(os.path.join(package, "py.typed"))
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as file:
        pyproject = file.read()
    section = re.search(r"^\[tool\.setuptools\.package-data\]\n((?:[^\[\n].*\n)*)", pyproject, re.MULTILINE)
    assert section is not None, "pyproject.toml has no [tool.setuptools.package-data]"
    assert re.search(r'^routilux_mp = \[.*"py\.typed".*\]$', section.group(1), re.MULTILINE), section.group(1)
