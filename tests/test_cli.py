"""The ``routilux-mp`` command, driven in subprocesses: output, exit codes, signals, the terminal UI.

Every run goes through ``python -m routilux_mp`` from the repository root, with
a small flow file written into ``tmp_path``. Its logic leaves a marker file per
job it starts (so a test can prove that no job ran) and prints ``started N``
for items that ask for it (so a test can wait for a run to be under way by
reading stderr, never by sleeping).
"""

from __future__ import annotations

import fcntl
import json
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

from routilux_mp._cli_run import MAX_UNWRITTEN_JOBS
from routilux_mp._cli_ui import bottleneck_hint

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


    class Square(Routine):
        def __init__(self):
            super().__init__()
            self.add_slot("in")
            self.add_event("out", ["n", "square"])

            def logic(slot_data, message, worker_state):
                for item in slot_data["in"]:
                    open(os.path.join(HERE, f"ran-{item['n']}"), "w").close()
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


def cli(*args: str, env, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routilux_mp", *args], input=stdin, capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=RUN_TIMEOUT, check=False)


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


BAD_INPUTS = [
    # (what, the third input line, message)
    ("malformed JSON", '{"n": 3', r"line 3: not valid JSON \(Expecting ',' delimiter"),
    ("not an object", "[3]", r"line 3: each line must be a JSON object, got list"),
    ("NaN is not JSON", '{"n": NaN}', r"line 3: not valid JSON \(NaN is not JSON\)"),
]


@pytest.mark.parametrize(("what", "bad_line", "message"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_a_bad_input_file_starts_no_job(flow_file, tmp_path, python_env, what, bad_line, message) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"n": 1}\n\n' + bad_line + '\n{"n": 4}\n')  # line 2 is blank: line numbers still count it
    result = cli("run", flow_file, "--input", str(source), env=python_env)
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stderr), result.stderr
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


# ---------------------------------------------------------------------------- interrupting a run


def start_run(flow_file, source, python_env, *extra: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "routilux_mp", "run", flow_file, "--input", source,
                             "--processes", "2", "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=stderr, env=python_env, cwd=ROOT)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_drains_running_jobs_writes_valid_output_and_leaves_no_process(flow_file, tmp_path, python_env,
                                                                                sig) -> None:
    items = [{"n": n, "sleep": 0.05, "announce": n == 0} for n in range(400)]
    proc = start_run(flow_file, write_jsonl(tmp_path / "in.jsonl", items), python_env)
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


def test_a_second_signal_stops_without_waiting_for_running_jobs(flow_file, tmp_path, python_env) -> None:
    items = [{"n": n, "sleep": 600, "announce": True} for n in range(10)]  # would drain for DRAIN_TIMEOUT
    proc = start_run(flow_file, write_jsonl(tmp_path / "in.jsonl", items), python_env)
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
