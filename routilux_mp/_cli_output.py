"""What ``routilux-mp run`` writes: the JSONL outputs, the failed lines (``--failed-out``), the final states
(``--state-out``), and the checks that keep those files from overwriting the input or each other.

Every file is checked by :func:`check_files` before any of them is opened for
writing: an output that is the input (the same path, a symlink or a hard link
to it, or stdout redirected onto it) would be truncated before it is read.

JSON text is written with non-ASCII characters as they are, except a string
holding a lone UTF-16 surrogate (valid JSON input such as ``"\\ud800"``, or a
str built by logic), which UTF-8 cannot encode: that line is written with
``\\uXXXX`` escapes instead, which any JSON reader turns back into the same
string. No line is ever dropped for it.
"""

from __future__ import annotations

import json
import os
import stat
from typing import IO, Any

from ._cli_exit import EXIT_USAGE, CliError
from .errors import RoutiluxError

__all__ = ["SharedOutputs", "check_files", "encode_outputs", "failed_record", "json_line", "open_output", "worker_states"]


def json_line(value: Any, indent: int | None = None) -> str:
    """``value`` as JSON text ending in a newline (one line unless ``indent``), UTF-8-encodable whatever
    strings it holds.

    Raises ``ValueError``/``TypeError`` when ``value`` is not JSON (NaN, a set...).
    """
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, indent=indent)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escape it rather than lose the line
        text = json.dumps(value, ensure_ascii=True, allow_nan=False, indent=indent)
    return text + "\n"


class SharedOutputs:
    """Outputs that belong to several jobs (an emit naming no job in a batch): written once, with every id.

    Such an output is one dict in the outputs of each of its jobs, naming them
    in ``job_ids``; it is written with the first of its jobs to be written and
    skipped for the others. Each is remembered only until all its jobs were
    seen (the dict is held meanwhile, so its ``id`` is not reused).
    """

    def __init__(self) -> None:
        #: id of an output -> [the output, how many of its jobs are still to be seen].
        self._pending: dict[int, list] = {}

    def first(self, out: dict) -> bool:
        """Whether ``out``, met in one of its jobs, is met for the first time (then it is written)."""
        key = id(out)
        entry = self._pending.get(key)
        if entry is None:
            remaining = len(out["job_ids"]) - 1
            if remaining > 0:
                self._pending[key] = [out, remaining]
            return True
        entry[1] -= 1
        if entry[1] <= 0:
            del self._pending[key]
        return False

    def skip(self, job: Any) -> None:
        """A job whose outputs are not written (failed, cancelled): count it as seen for its shared outputs."""
        for out in job.outputs:
            if "job_ids" in out:
                self.first(out)


def encode_outputs(job: Any, shared: SharedOutputs | None = None) -> str:
    """The JSONL lines of a job's outputs. Raises ``ValueError``/``TypeError`` if one is not JSON.

    An output of several jobs is written as one line with ``"job_ids"`` (once,
    when ``shared`` is given: with the first of its jobs written).
    """
    lines = []
    for out in job.outputs:
        ids = out.get("job_ids")
        if ids is None:
            lines.append(json_line({"job_id": job.job_id, "routine": out["routine"], "event": out["event"],
                                    "data": out["data"]}))
        elif shared is None or shared.first(out):
            lines.append(json_line({"job_ids": ids, "routine": out["routine"], "event": out["event"],
                                    "data": out["data"]}))
    return "".join(lines)


def failed_record(line: int, job_id: str, data: dict | None, error: dict) -> str:
    """The ``--failed-out`` line of a failed job: where it came from, its input and its error."""
    record = {"line": line, "job_id": job_id, "input": data,
              "error": {key: value for key, value in error.items() if value is not None}}
    try:
        return json_line(record)
    except (TypeError, ValueError):  # an error detail that is not JSON: keep the line, stringify the detail
        record["error"] = {key: str(value) for key, value in record["error"].items()}
        return json_line(record)


def _regular(st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISREG(st.st_mode)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:  # does not exist (yet): it cannot be an existing file
        return None


def _same(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    """Whether two stats are one regular file (devices such as /dev/null may be shared freely)."""
    return _regular(a) and _regular(b) and os.path.samestat(a, b)  # type: ignore[arg-type]


def check_files(input_label: str, input_stat: os.stat_result | None, stdout: IO[str],
                writes: dict[str, str]) -> None:
    """Refuse (exit 2) any file to write that is the input or another file to write.

    Args:
        input_label: how messages name the input.
        input_stat: the input's stat if it is a regular file.
        stdout: where ``--output -`` goes (checked when ``writes`` has no ``--output``).
        writes: option name -> path, for every file the run will write.
    """
    targets = []
    for option, path in writes.items():
        targets.append((option, path, _stat(path), os.path.realpath(path)))
        if _same(input_stat, targets[-1][2]):
            raise CliError(EXIT_USAGE, f"{option} {path!r} is the input file {input_label!r} (the same file under "
                           "another name, a symlink or a hard link): writing it would destroy the input before it "
                           f"is read; give {option} another file")
    if "--output" not in writes:
        try:
            out_stat: os.stat_result | None = os.fstat(stdout.fileno())
        except (OSError, ValueError):  # stdout closed or not a real file: nothing to compare
            out_stat = None
        if _same(input_stat, out_stat):
            raise CliError(EXIT_USAGE, f"stdout is redirected onto the input file {input_label!r}: the run would "
                           "overwrite what it reads; redirect stdout to another file or use --output")
    for i, (option, path, st, real) in enumerate(targets):
        for other, other_path, other_st, other_real in targets[i + 1:]:
            if _same(st, other_st) or (st is None and other_st is None and real == other_real):
                raise CliError(EXIT_USAGE, f"{option} {path!r} and {other} {other_path!r} are the same file: "
                               "give each its own")


def open_output(path: str | None, stdout: IO[str], option: str = "--output",
                append: bool = False) -> tuple[IO[str], bool]:
    """The text sink for ``path`` (``None`` or ``-``: ``stdout``), and whether it is ``stdout``; ``append``: keep what it holds."""
    if path is None or path == "-":
        stdout.flush()
        return open(stdout.fileno(), "w", encoding="utf-8", newline="\n", closefd=False), True
    try:
        return open(path, "a" if append else "w", encoding="utf-8", newline="\n"), False
    except OSError as exc:
        raise CliError(EXIT_USAGE, f"cannot write {option} {path!r}: {exc.strerror}") from exc


def worker_states(runtime: Any) -> tuple[dict[str, dict], list[str]]:
    """Every worker's WorkerState as JSON-able dicts, and the problems met reading them.

    Called once the runtime has stopped: the states are its final snapshot.
    """
    states: dict[str, dict] = {}
    problems = []
    for worker_id in runtime.list_workers():
        ws = runtime.get_worker_state(worker_id)
        try:
            states[worker_id] = {
                "worker_id": ws.worker_id, "flow_id": ws.flow_id, "status": ws.status,
                "jobs_processed": ws.jobs_processed, "jobs_failed": ws.jobs_failed,
                "routine_states": ws.routine_states,
            }
        except RoutiluxError as exc:
            problems.append(f"worker {worker_id!r}: {type(exc).__name__}: {exc}")
            states[worker_id] = {"worker_id": worker_id, "flow_id": ws.flow_id,
                                 "error": f"{type(exc).__name__}: {exc}"}
    return states, problems
