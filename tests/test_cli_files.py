"""The files of ``routilux-mp run``: what input it accepts and how, and what it writes where.

Bad input (named by line, no job started), outputs that would destroy the input,
an input that changes under the run, compressed and streamed input, the
``--order``, ``--failed-out`` and ``--state-out`` outputs and full disks. Every
run is a real subprocess (see ``cli_support``).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import subprocess
import sys

import pytest
from cli_support import (
    ECHO_FLOW,
    LINE_TIMEOUT,
    ROOT,
    RUN_TIMEOUT,
    cli,
    make_flow_file,
    nested,
    outputs,
    ran,
    read_until,
    write_jsonl,
)

from routilux_mp import _cli_run as cli_run
from routilux_mp._cli_input import MAX_DEPTH, InputSource
from routilux_mp._cli_run import MAX_UNWRITTEN_JOBS


@pytest.fixture
def flow_file(tmp_path) -> str:
    return make_flow_file(tmp_path)


# ---------------------------------------------------------------------------- bad input


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


def test_a_short_first_line_on_a_pipe_starts_its_job_at_once(tmp_path, python_env) -> None:
    """Sniffing for compression must not wait for more bytes than a slow producer has sent."""
    (tmp_path / "echo.py").write_text(ECHO_FLOW)
    proc = subprocess.Popen([sys.executable, "-m", "routilux_mp", "run", str(tmp_path / "echo.py"), "--input", "-",
                             "--processes", "1", "--no-progress"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=python_env, cwd=ROOT)
    try:
        proc.stdin.write(b"{}\n")  # 3 bytes, then the producer pauses
        proc.stdin.flush()
        first = read_until(proc.stdout.fileno(), r"\n", LINE_TIMEOUT)
        proc.stdin.close()
        proc.wait(timeout=RUN_TIMEOUT)  # the rest of stdout is tiny: it cannot fill the pipe
        rest = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0
    assert outputs((first + rest).decode()) == [{"job_id": "line-1", "routine": "echo", "event": "out", "data": {}}]


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


# ---------------------------------------------------------------------------- outputs: order, failures, final states


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
