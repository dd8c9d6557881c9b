"""Resumable runs of ``routilux-mp run --state DB [--resume [--retry-failed]]``, as real subprocesses.

The README's main job is SIGKILLed at five random moments (a seeded RNG picks
them as progress through the output, never as times) and resumed each time:
its output file and its aggregated WorkerState end exactly as an
uninterrupted run's. Then: a torn last line, failed lines run again, and
every resume that would mix two runs refused before anything is written.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from cli_support import ECHO_FLOW, ROOT, RUN_TIMEOUT, cli, make_flow_file, write_jsonl

#: Documents of the bundled corpus the main job runs on here (all 200 take a few seconds per run on 2 cores).
DOCUMENTS = 96
#: Every this many documents, the longest of the corpus again.
LONG_EVERY = 8
#: Seconds to see a run reach a number of output lines.
PROGRESS_TIMEOUT = 60.0
WORDCOUNT = os.path.join(ROOT, "workers", "wordcount.py")


def _lines(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _run_until(args: list[str], env, output, lines: int) -> int | None:
    """Start a run; SIGKILL it once ``output`` holds ``lines`` lines. Its exit code if it ended first, else None."""
    proc = subprocess.Popen([sys.executable, "-m", "routilux_mp", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + PROGRESS_TIMEOUT
    try:
        while _lines(output) < lines:
            if proc.poll() is not None:
                return proc.returncode
            if time.monotonic() > deadline:
                pytest.fail(f"the run did not reach {lines} output lines within {PROGRESS_TIMEOUT}s")
            time.sleep(0.005)  # a short pause between polls of the output, not a synchronization
        proc.send_signal(signal.SIGKILL)
        return None
    finally:
        proc.kill()
        proc.wait(RUN_TIMEOUT)


def _states(path) -> dict:
    return {wid: {key: worker[key] for key in ("flow_id", "routine_states")}
            for wid, worker in json.loads(path.read_text()).items()}


@pytest.fixture
def documents(tmp_path) -> str:
    """The first documents of the bundled corpus, the longest one again every ``LONG_EVERY`` lines.

    In input order, the documents behind a long one finish (their counts are
    added to WorkerState) before they may be written and journaled: a kill
    then catches state effects of jobs that will run again.
    """
    with open(os.path.join(ROOT, "workers", "data", "corpus.jsonl"), encoding="utf-8") as corpus:
        docs = [json.loads(line) for line in corpus]
    longest = max(docs, key=lambda doc: len(doc["text"]))
    lines = [dict(longest, doc_id=f"{longest['doc_id']}-{n}") if n % LONG_EVERY == 0 else docs[n]
             for n in range(DOCUMENTS)]
    return write_jsonl(tmp_path / "docs.jsonl", lines)


def test_the_main_job_sigkilled_at_five_moments_and_resumed_ends_as_an_uninterrupted_run(tmp_path, python_env,
                                                                                         documents) -> None:
    common = ["run", WORDCOUNT, "--input", documents, "--no-progress", "--processes", "2"]
    reference = cli(*common, "--output", str(tmp_path / "ref.jsonl"), "--state-out", str(tmp_path / "ref.json"),
                    env=python_env)
    assert reference.returncode == 0, reference.stderr
    output, state = tmp_path / "out.jsonl", tmp_path / "run.db"
    args = [*common, "--output", str(output), "--state", str(state), "--state-out", str(tmp_path / "out.json")]
    rng = random.Random(11)
    kills = 0
    for attempt in range(5):
        # Killed when the output reaches a long document: while it runs, the ones after it finish unwritten.
        block = _lines(output) // LONG_EVERY + 1
        target = LONG_EVERY * rng.randint(block, min(block + 1, DOCUMENTS // LONG_EVERY - 1))
        code = _run_until(args + (["--resume"] if attempt else []), python_env, output, target)
        assert code in (None, 0), f"run {attempt} exited {code}"
        kills += code is None
    assert kills >= 4, "most runs were killed mid-way"
    final = cli(*args, "--resume", env=python_env)
    assert final.returncode == 0, final.stderr
    assert "resuming:" in final.stderr
    assert output.read_bytes() == (tmp_path / "ref.jsonl").read_bytes(), "each line's outputs once, in input order"
    assert _states(tmp_path / "out.json") == _states(tmp_path / "ref.json"), "every count added exactly once"


#: id, --order, the flow's items: a run SIGKILLed once is resumed (the square flow; one item sleeps, holding
#: back input order)
ORDERS = [("completion-order", "completion"), ("input-order", "input")]


@pytest.mark.parametrize("order", [row[1] for row in ORDERS], ids=[row[0] for row in ORDERS])
def test_a_resumed_run_writes_each_completed_lines_outputs_once_in_either_order(tmp_path, python_env,
                                                                               order) -> None:
    flow = make_flow_file(tmp_path)
    items = [{"n": n, "sleep": 0.01} for n in range(60)]
    source = write_jsonl(tmp_path / "in.jsonl", items)
    output = tmp_path / "out.jsonl"
    args = ["run", flow, "--input", source, "--output", str(output), "--state", str(tmp_path / "run.db"),
            "--order", order, "--no-progress", "--processes", "2", "--state-out", str(tmp_path / "state.json")]
    assert _run_until(args, python_env, output, 20) is None
    final = cli(*args, "--resume", env=python_env)
    assert final.returncode == 0, final.stderr
    lines = output.read_text().splitlines()
    assert len(lines) == len(set(lines)) == 60
    assert sorted(json.loads(line)["data"]["n"] for line in lines) == list(range(60))
    if order == "input":
        assert [json.loads(line)["data"]["n"] for line in lines] == list(range(60))
    seen = json.loads((tmp_path / "state.json").read_text())["square-1"]["routine_states"]["square"]["seen"]
    assert seen == 60, "every item counted once, the ones that ran when the run was killed included"


def test_a_torn_last_line_is_dropped_and_only_lines_not_journaled_run_again(tmp_path, python_env) -> None:
    flow = make_flow_file(tmp_path)
    source = write_jsonl(tmp_path / "in.jsonl", [{"n": n} for n in range(10)])
    output = tmp_path / "out.jsonl"
    args = ["run", flow, "--input", source, "--output", str(output), "--state", str(tmp_path / "run.db"),
            "--no-progress"]
    assert cli(*args, env=python_env).returncode == 0
    whole = output.read_bytes()
    with open(output, "ab") as f:
        f.write(b'{"job_id": "line-11", "routine": "squ')  # what a crash mid-write leaves
    for name in os.listdir(tmp_path):
        if name.startswith("ran-"):
            os.unlink(tmp_path / name)
    resumed = cli(*args, "--resume", env=python_env)
    assert resumed.returncode == 0, resumed.stderr
    assert output.read_bytes() == whole
    assert not [name for name in os.listdir(tmp_path) if name.startswith("ran-")], "no completed line ran again"


RETRY_FLOW = ECHO_FLOW.replace(
    "if item.get(\"fail\"):",
    "if item.get(\"fail\") and not __import__('os').path.exists(item[\"fixed\"]):",
)


def test_failed_lines_are_kept_failed_on_resume_and_run_again_with_retry_failed(tmp_path, python_env) -> None:
    flow = tmp_path / "echo.py"
    flow.write_text(RETRY_FLOW)
    fixed = tmp_path / "fixed"
    items = [{"n": n, "fail": n in (2, 5), "fixed": str(fixed)} for n in range(8)]
    source = write_jsonl(tmp_path / "in.jsonl", items)
    output, failed = tmp_path / "out.jsonl", tmp_path / "failed.jsonl"
    args = ["run", str(flow), "--input", source, "--output", str(output), "--failed-out", str(failed),
            "--state", str(tmp_path / "run.db"), "--no-progress"]
    first = cli(*args, env=python_env)
    assert first.returncode == 1
    assert [json.loads(line)["line"] for line in failed.read_text().splitlines()] == [3, 6]
    again = cli(*args, "--resume", env=python_env)
    assert again.returncode == 1, "the run still has failed lines"
    assert "2 lines failed in an earlier run (--resume --retry-failed runs them again)" in again.stderr
    assert len(failed.read_text().splitlines()) == 2 and len(output.read_text().splitlines()) == 6
    fixed.touch()
    retried = cli(*args, "--resume", "--retry-failed", env=python_env)
    assert retried.returncode == 0, retried.stderr
    assert failed.read_text() == "", "their earlier failures are gone with them"
    assert [json.loads(line)["data"]["n"] for line in output.read_text().splitlines()] == [0, 1, 3, 4, 6, 7, 2, 5]


# -- refusals: nothing is written, no process starts ------------------------------------------------------


#: id, options ({out}: an output file, {db}: a state file), what the refusal says (exit 2)
REFUSALS = [
    ("resume-without-state", ["--output", "{out}", "--resume"], r"--resume needs --state DB"),
    ("retry-without-resume", ["--output", "{out}", "--state", "{db}", "--retry-failed"],
     r"--retry-failed goes with --resume"),
    ("state-to-stdout", ["--state", "{db}"], r"--state needs --output FILE: a resumed run appends"),
    ("state-is-the-output", ["--output", "{out}", "--state", "{out}"], r"--output .* and --state .* are the same file"),
    ("nothing-to-resume", ["--output", "{out}", "--state", "{db}", "--resume"], r"holds no journaled run to resume"),
]


@pytest.mark.parametrize(("options", "message"), [row[1:] for row in REFUSALS], ids=[row[0] for row in REFUSALS])
def test_options_a_resumable_run_cannot_honour_are_refused_before_anything_is_written(tmp_path, python_env,
                                                                                      options, message) -> None:
    flow = make_flow_file(tmp_path)
    paths = {"out": str(tmp_path / "out.jsonl"), "db": str(tmp_path / "run.db")}
    result = cli("run", flow, "--input", write_jsonl(tmp_path / "in.jsonl", [{"n": 1}]),
                 *[option.format(**paths) for option in options], env=python_env)
    assert result.returncode == 2
    assert re.search(message, result.stderr), result.stderr
    assert not [name for name in os.listdir(tmp_path) if name.startswith("ran-")], "no job started"
    assert not os.path.exists(paths["out"]), "nothing was written"


def test_a_stream_input_is_refused_with_state(tmp_path, python_env) -> None:
    flow = make_flow_file(tmp_path)
    result = cli("run", flow, "--input", "-", "--output", str(tmp_path / "out.jsonl"), "--state",
                 str(tmp_path / "run.db"), env=python_env, stdin='{"n": 1}\n')
    assert result.returncode == 2 and "--state needs an input file: <stdin> is a stream" in result.stderr


def _changed_input(args: dict, tmp_path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"n": n} for n in range(5, 0, -1)])


def _other_output(args: dict, tmp_path) -> None:
    args["--output"] = str(tmp_path / "elsewhere.jsonl")


def _truncated_output(args: dict, tmp_path) -> None:
    os.truncate(args["--output"], 3)


def _no_resume(args: dict, tmp_path) -> None:
    args.pop("--resume")


#: id, what changes before the resume, what the refusal says
MISMATCHES = [
    ("another-input", _changed_input, (r"in\.jsonl' is not the input of the run journaled in .*the SHA-256 of the "
                                      r"bytes differs")),
    ("another-output", _other_output, (r"--resume continues the output files of the run journaled in .* which had "
                                      r"--output .*out\.jsonl: give the same")),
    ("output-cut-short", _truncated_output, r"--output .* holds 3 bytes, fewer than the \d+ the journal says"),
    ("a-new-run-on-a-journal", _no_resume, (r"already journals a run of .* \(5 of 5 lines completed, 0 failed\): "
                                           r"add --resume")),
]


@pytest.mark.parametrize(("change", "message"), [row[1:] for row in MISMATCHES], ids=[row[0] for row in MISMATCHES])
def test_a_resume_that_would_mix_two_runs_is_refused_and_writes_nothing(tmp_path, python_env, change,
                                                                        message) -> None:
    flow = make_flow_file(tmp_path)
    source = write_jsonl(tmp_path / "in.jsonl", [{"n": n} for n in range(5)])
    args = {"--input": source, "--output": str(tmp_path / "out.jsonl"), "--state": str(tmp_path / "run.db"),
            "--no-progress": None, "--resume": None}
    first = cli("run", flow, *[part for key, value in args.items() if key != "--resume"
                               for part in (key, value) if part is not None], env=python_env)
    assert first.returncode == 0, first.stderr
    change(args, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("out.jsonl", "run.db")}
    result = cli("run", flow, *[part for key, value in args.items() for part in (key, value) if part is not None],
                 env=python_env)
    assert result.returncode == 2
    assert re.search(message, result.stderr), result.stderr
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
