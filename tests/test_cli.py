"""The ``routilux-mp`` command, driven in subprocesses: runs, exit codes, signals, processes, the terminal UI.

Every run goes through ``python -m routilux_mp`` (see ``cli_support``). The
files a run reads and writes are tested in ``test_cli_files.py``.
"""

from __future__ import annotations

import fcntl
import io
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
import time

import psutil
import pytest
from cli_support import (
    FLOW_FILE,
    GONE_TIMEOUT,
    LINE_TIMEOUT,
    ROOT,
    RUN_TIMEOUT,
    cli,
    make_flow_file,
    outputs,
    ran,
    read_until,
    write_jsonl,
)
from rich.console import Console

from routilux_mp import _cli_ui
from routilux_mp import cli as cli_module
from routilux_mp._cli_exit import usable_cpus
from routilux_mp._cli_run import MAX_UNWRITTEN_JOBS
from routilux_mp._cli_ui import ETA_MIN_JOBS, ETA_MIN_SECONDS, Tally, bottleneck_hint
from routilux_mp.runtime import MAX_PROCESSES_PER_CPU


@pytest.fixture
def flow_file(tmp_path) -> str:
    return make_flow_file(tmp_path)


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


PER_ITEM_BATCH_FLOW = """
from routilux_mp import Flow, FlowRegistry, Routine, job_of
from routilux_mp.activation_policies import batch_size_policy


class Reduce(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("in")
        self.add_event("out")
        self.add_event("batch")
        self.set_activation_policy(batch_size_policy(25))

        def logic(slot_data, message, worker_state):
            for item in slot_data["in"]:
                self.emit("out", job=job_of(item), n=item["n"], square=item["n"] ** 2)
            self.emit("batch", total=sum(item["n"] for item in slot_data["in"]))  # the whole batch's

        self.set_logic(logic)


flow = Flow("reduce")
flow.add_routine(Reduce(), "reduce")
FlowRegistry.get_instance().register_by_name("reduce", flow)
"""


@pytest.mark.parametrize("order", ["input", "completion"])
def test_a_batch_writes_each_line_under_its_own_job_id_and_a_batch_output_once_with_all(tmp_path, python_env,
                                                                                          order) -> None:
    (tmp_path / "reduce.py").write_text(PER_ITEM_BATCH_FLOW)
    source = write_jsonl(tmp_path / "in.jsonl", [{"n": n} for n in range(200)])
    result = cli("run", str(tmp_path / "reduce.py"), "--input", source, "--processes", "2", "--order", order,
                 env=python_env)
    assert result.returncode == 0, result.stderr
    written = outputs(result.stdout)
    per_line = sorted((o["job_id"], o["data"]["n"]) for o in written if o["event"] == "out")
    assert per_line == sorted((f"line-{n + 1}", n) for n in range(200)), "each line's output under its own id"
    batches = [o for o in written if o["event"] == "batch"]
    assert len(batches) == 8, "a batch's output is written once"
    assert sorted((tuple(b["job_ids"]) for b in batches), key=lambda ids: int(ids[0][5:])) == [
        tuple(f"line-{n + 1}" for n in range(start, start + 25)) for start in range(0, 200, 25)]
    assert all("job_id" not in b and b["data"]["total"] == sum(int(j[5:]) - 1 for j in b["job_ids"])
               for b in batches)
    assert "200 completed, 0 failed, 0 cancelled" in result.stderr


LOGGING_FLOW = """
import logging
{config}
from routilux_mp import Flow, FlowRegistry, Routine


class Logs(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("in")
        self.add_event("out")

        def logic(slot_data, message, worker_state):
            item = slot_data["in"][0]
            logging.getLogger("docs").info("parsed doc %s", item["n"])
            if item.get("odd"):
                logging.getLogger("docs").warning("odd doc %s", item["n"])
            self.emit("out", **item)

        self.set_logic(logic)


flow = Flow("logs")
flow.add_routine(Logs(), "logs")
FlowRegistry.get_instance().register_by_name("logs", flow)
"""

LOGGING_CASES = [
    # (the flow module's logging configuration, patterns stderr must show, text it must not)
    ('logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s [%(job_id)s]: %(message)s")',
     [r"INFO docs \[line-1\]: parsed doc 1", r"INFO docs \[line-2\]: parsed doc 2",
      r"WARNING docs \[line-2\]: odd doc 2"],
     []),
    ("", [r"worker 0 \(pid \d+\), job line-2, routine 'logs': WARNING docs: odd doc 2"], ["parsed doc"]),
]


@pytest.mark.parametrize(("config", "shown", "hidden"), LOGGING_CASES, ids=["basicConfig-INFO", "no-config"])
def test_logging_from_logic_is_shown_on_stderr_as_the_flow_module_configured_it(tmp_path, python_env, config, shown,
                                                                               hidden) -> None:
    (tmp_path / "logs.py").write_text(LOGGING_FLOW.format(config=config))
    source = write_jsonl(tmp_path / "in.jsonl", [{"n": 1}, {"n": 2, "odd": True}])
    result = cli("run", str(tmp_path / "logs.py"), "--input", source, "--processes", "1", env=python_env)
    assert result.returncode == 0, result.stderr
    for line in shown:
        assert re.search(line, result.stderr), result.stderr
    for text in hidden:
        assert text not in result.stderr
    assert [o["data"]["n"] for o in outputs(result.stdout)] == [1, 2], "log lines never reach the JSONL"


# ---------------------------------------------------------------------------- what cannot run


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


# ---------------------------------------------------------------------------- processes and memory


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


def test_processes_beyond_the_cap_per_cpu_are_a_usage_error(flow_file, python_env) -> None:
    cpus = usable_cpus()
    parser = cli_module.build_parser()
    assert parser.parse_args(["run", "x.py", "--processes", str(MAX_PROCESSES_PER_CPU * cpus)]).processes == MAX_PROCESSES_PER_CPU * cpus
    result = cli("run", flow_file, "--processes", str(MAX_PROCESSES_PER_CPU * cpus + 1), env=python_env)
    assert result.returncode == 2
    assert f"more than {MAX_PROCESSES_PER_CPU} x the {cpus} CPUs this process may use (at most {MAX_PROCESSES_PER_CPU * cpus})" in result.stderr
    assert "Traceback" not in result.stderr
    huge = cli("run", flow_file, "--processes", "10000", env=python_env)
    assert huge.returncode == 2 and f"more than {MAX_PROCESSES_PER_CPU} x" in huge.stderr


def test_help_shows_the_options_and_their_bounds(python_env) -> None:
    result = cli("run", "--help", env=python_env)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for expected in ("--failed-out FILE", "--state-out FILE", "--order {input,completion}", "--max-worker-rss SIZE",
                     f"at most {MAX_PROCESSES_PER_CPU} per CPU", "gzip, bzip2 and xz", "examples:", "exit codes:",
                     "--state DB", "--resume", "--retry-failed", "--debug", "--backend {local,ray}", "--address ADDR"):
        assert expected in text, text


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


PIPELINE_FLOW = """
import time

from routilux_mp import Flow, FlowRegistry, Routine


class Stage(Routine):
    def __init__(self, work):
        super().__init__()
        self.add_slot("in")
        self.add_event("out")
        self.set_max_concurrency(None)

        def logic(slot_data, message, worker_state):
            for item in slot_data["in"]:
                if work and item.get("announce"):
                    print("started", item["n"], flush=True)
                time.sleep(item.get("sleep", 0.02) if work else 0)  # stands for work
                self.emit("out", **item)

        self.set_logic(logic)


flow = Flow("pipeline")
flow.add_routine(Stage(False), "parse")
work = Stage(True)
# Not fused: parse must run ahead of work, queueing work in the supervisor (fused, each item's work would
# run right after its parse, in the same worker).
work.set_fusion(False)
flow.add_routine(work, "work")
flow.connect("parse", "out", "work", "in")
FlowRegistry.get_instance().register_by_name("pipeline", flow)
"""


def test_a_signal_with_thousands_queued_starts_nothing_new_and_exits_soon_after_running_work(tmp_path,
                                                                                           python_env) -> None:
    """When the signal comes, ~1,000 jobs are past their first stage: their downstream work is cancelled too."""
    (tmp_path / "pipeline.py").write_text(PIPELINE_FLOW)
    longest, mark = 1.0, 1500
    items = [{"n": n, "sleep": 0.005, **({"announce": True, "sleep": longest} if n == mark else {})}
             for n in range(4000)]
    proc = start_run(str(tmp_path / "pipeline.py"), write_jsonl(tmp_path / "in.jsonl", items), python_env)
    try:
        read_until(proc.stderr.fileno(), rf"started {mark}", RUN_TIMEOUT)
        ours = psutil.Process(proc.pid).children(recursive=True)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
        elapsed = time.monotonic() - signalled
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()
    assert elapsed < longest + 2.0, f"exited {elapsed:.1f}s after the signal"
    numbers = [o["data"]["n"] for o in outputs(out.decode())]
    # Whole lines in input order, the running job's included; jobs cancelled before it have none.
    assert numbers == sorted(set(numbers)) and mark in numbers, numbers
    completed, cancelled = (int(x) for x in re.search(rb"(\d+) completed, 0 failed, (\d+) cancelled", err).groups())
    assert completed == len(numbers) and cancelled > 1000, err.decode()
    parsed, worked = (int(re.search(rf"^{name}\s+(\d+)".encode(), err, re.MULTILINE).group(1)) for name in ("parse", "work"))
    # The other worker went on while the marked item slept, until the signal came: a few dozen items at most.
    assert worked < mark + 100, f"downstream work started after the signal: {worked} activations"
    assert parsed > worked + 500, f"the test needs queued downstream work when the signal comes: {err.decode()}"
    _, alive = psutil.wait_procs(ours, timeout=GONE_TIMEOUT)
    assert alive == []


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


def test_a_signal_stops_a_run_waiting_on_an_idle_pipe(flow_file, python_env) -> None:
    """stdin stays open and silent: the run must not wait for it to end (the reader is never closed under it)."""
    proc = subprocess.Popen([sys.executable, "-m", "routilux_mp", "run", flow_file, "--input", "-", "--processes", "1",
                             "--no-progress"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=python_env, cwd=ROOT)
    try:
        proc.stdin.write(b'{"n": 0, "announce": true}\n')
        proc.stdin.flush()
        read_until(proc.stderr.fileno(), r"started 0", LINE_TIMEOUT)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=GONE_TIMEOUT)
        out = proc.stdout.read()
    finally:
        proc.kill()
        proc.stdin.close()
        proc.wait(timeout=GONE_TIMEOUT)
    assert proc.returncode == 130
    assert [o["data"]["n"] for o in outputs(out.decode())] == [0]


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
                     "max_concurrency 1 (serial)", "entry slots: tokenize.doc",
                     "tokenize.counted -> count.counted  [not fused: 'count' runs at most 1 at a time]"):
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
