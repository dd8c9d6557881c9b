"""Resumable runs: ``routilux-mp run --state DB [--resume [--retry-failed]]``.

The run journals every input line whose job ended (line number, job id,
``completed`` or ``failed``, the error) in FILE, the state file that also
holds the run's WorkerState, through the state server like every write to
it. ``--resume`` reads the journal back: lines that completed are skipped,
lines that never ended (running, queued or not read yet when the run
stopped) run again, and failed lines run again with ``--retry-failed``.
Job ids stay ``line-N``.

**Outputs exactly once.** The main thread, for every batch of finished jobs:

1. writes their outputs to ``--output`` (and failures to ``--failed-out``)
   and flushes them to the operating system;
2. then journals those lines, with the byte offset where each file now ends,
   in one transaction (which also drops the exactly-once records of the
   completed lines' jobs, see ``routilux_mp._state.replay``).

A run killed between 1 and 2 leaves bytes past the journaled offsets (a
torn last line, or whole lines of jobs not journaled): ``--resume``
truncates each file to its journaled offset, then appends, and runs those
lines again. So every completed line's outputs are in the file exactly once,
and in ``--order input`` the file is what an uninterrupted run writes (lines
that failed earlier and run again with ``--retry-failed`` come after the
ones written before).

**State effects exactly once.** A journaled run records each state write an
activation's logic makes (by job, routine, input and write number) with its
result, and replays it when that activation runs again, instead of applying
it twice; the records of a job go when its line is journaled completed. This
holds for logic that is deterministic: the same input items give the same
state calls in the same order (see the README for what that asks of logic).

**Same input, same run.** The journal holds the input's SHA-256, the flow,
the entry and the output files: ``--resume`` with anything else is refused
(exit 2) rather than mixing two runs in one output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ._cli_exit import EXIT_USAGE, CliError
from ._cli_input import InputSource
from ._cli_output import json_line
from ._state.protocol import Method
from ._state.statefile import read_journal
from .errors import StateFileError

__all__ = ["JOURNAL_FORMAT", "Journal", "ResumePlan", "check_usage", "plan_run"]

#: Version of the run description the journal keeps.
JOURNAL_FORMAT = 1


@dataclass
class ResumePlan:
    """What a run does about what the journal holds (empty for a new run)."""

    #: ``skip[n]`` is 1 for input line ``n`` that is not run again.
    skip: bytearray = field(default_factory=bytearray)
    #: Lines that completed in earlier runs.
    completed: int = 0
    #: Lines that failed in earlier runs and are not run again (no ``--retry-failed``).
    failed: int = 0
    #: Lines that failed in earlier runs and run again (``--retry-failed``).
    retried: int = 0
    #: ``{"output": bytes, "failed": bytes}``: where the output files end, as journaled.
    offsets: dict[str, int] = field(default_factory=dict)
    #: Whether the journal held a run (this is a resume).
    resuming: bool = False
    #: Lines that failed earlier and run again: journaled as not ended until they end anew.
    retry_lines: list[int] = field(default_factory=list)

    def skips(self, line: int) -> bool:
        """Whether input line ``line`` is not run again."""
        return line < len(self.skip) and self.skip[line] == 1


def check_usage(args: Any, source: InputSource) -> None:
    """Refuse (exit 2) options a resumable run cannot honour, before anything is written."""
    if args.state is None:
        if args.resume or args.retry_failed:
            option = "--resume" if args.resume else "--retry-failed"
            raise CliError(EXIT_USAGE, f"{option} needs --state DB: the state file the interrupted run journaled in")
        return
    if args.retry_failed and not args.resume:
        raise CliError(EXIT_USAGE, "--retry-failed goes with --resume: it re-runs the lines that failed in the "
                       "journaled run")
    if not source.seekable:
        raise CliError(EXIT_USAGE, f"--state needs an input file: {source.label} is a stream, which a resumed run "
                       "could not read again; save it to a file and pass --input FILE")
    if args.output in (None, "-"):
        raise CliError(EXIT_USAGE, "--state needs --output FILE: a resumed run appends to the output and drops a "
                       "torn last line, which it cannot do to stdout")


def describe(args: Any, source: InputSource, flow_name: str, entry: tuple[str, str], worker_id: str) -> dict:
    """The run as the journal keeps it: what ``--resume`` must find the same."""
    return {
        "format": JOURNAL_FORMAT,
        "input": source.label,
        "input_sha256": source.fingerprint(),
        "lines": source.total,
        "flow": flow_name,
        "entry": ".".join(entry),
        "worker_id": worker_id,
        "output": os.path.realpath(args.output),
        "failed_out": None if args.failed_out is None else os.path.realpath(args.failed_out),
        "order": args.order,
    }


def plan_run(args: Any, run: dict) -> ResumePlan:
    """Read the journal of ``args.state`` and decide what to run; refuse (exit 2) a resume that cannot be.

    Also truncates the output files to their journaled ends on a resume (a
    torn tail is dropped here), so they can be opened for appending.
    """
    try:
        journal = read_journal(args.state)
    except StateFileError as exc:
        raise CliError(EXIT_USAGE, str(exc)) from exc
    if journal is None:
        if args.resume:
            raise CliError(EXIT_USAGE, f"--resume: {args.state!r} holds no journaled run to resume; run without "
                           "--resume to start one")
        return ResumePlan()
    old, offsets, completed, failed = journal
    done = f"{len(completed)} of {old.get('lines')} lines completed, {len(failed)} failed"
    if not args.resume:
        raise CliError(EXIT_USAGE, f"{args.state!r} already journals a run of {old.get('input')!r} ({done}): add "
                       "--resume to continue it, or give --state a new file to start another run")
    _check_same_run(args, old, run)
    plan = ResumePlan(completed=len(completed), resuming=True, offsets=dict(offsets))
    lines = completed if args.retry_failed else completed + failed
    plan.skip = bytearray(max(lines, default=0) + 1)
    for line in lines:
        plan.skip[line] = 1
    plan.failed, plan.retried = (0, len(failed)) if args.retry_failed else (len(failed), 0)
    if args.retry_failed:
        plan.retry_lines = list(failed)
    _truncate(args.output, "--output", offsets.get("output", 0))
    if args.failed_out is not None:
        # --retry-failed runs every failed line again: their earlier records go, the new outcome is written.
        plan.offsets["failed"] = 0 if args.retry_failed else offsets.get("failed", 0)
        _truncate(args.failed_out, "--failed-out", plan.offsets["failed"])
    return plan


def _check_same_run(args: Any, old: dict, run: dict) -> None:
    """Refuse to resume with another input, flow, entry or output files than the journaled run's."""
    state = args.state
    if old.get("format") != JOURNAL_FORMAT:
        raise CliError(EXIT_USAGE, f"{state!r} journals a run in another format ({old.get('format')!r}); resume it "
                       "with the routilux-mp version that started it")
    if old.get("input_sha256") != run["input_sha256"]:
        raise CliError(EXIT_USAGE, f"--resume: {run['input']!r} is not the input of the run journaled in {state!r} "
                       f"(that was {old.get('input')!r}, and the SHA-256 of the bytes differs: the file changed or "
                       "is another one); restore that input, or give --state a new file to start a new run")
    for key, option in (("flow", "--flow"), ("entry", "--entry")):
        if old.get(key) != run[key]:
            raise CliError(EXIT_USAGE, f"--resume: the run journaled in {state!r} ran {key} {old.get(key)!r}, not "
                           f"{run[key]!r}; resume it with {option} {old.get(key)}")
    for key, option in (("output", "--output"), ("failed_out", "--failed-out")):
        if old.get(key) != run[key]:
            was = f"{option} {old.get(key)}" if old.get(key) else f"no {option}"
            raise CliError(EXIT_USAGE, f"--resume continues the output files of the run journaled in {state!r}, which "
                           f"had {was}: give the same")


def _truncate(path: str, option: str, offset: int) -> None:
    """Cut ``path`` back to ``offset`` bytes: what a crash wrote past the journal goes (it runs again)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = -1
    if size < offset:
        raise CliError(EXIT_USAGE, f"--resume: {option} {path!r} holds {max(size, 0)} bytes, fewer than the "
                       f"{offset} the journal says were written: it was changed or replaced since, so it no longer "
                       "holds every completed line's outputs; restore it, or start a new run with a new --state file")
    if size > offset:
        try:
            os.truncate(path, offset)
        except OSError as exc:
            raise CliError(EXIT_USAGE, f"--resume: cannot truncate {option} {path!r}: {exc.strerror}") from exc


class Journal:
    """Records ended lines and output offsets through the runtime's state server."""

    def __init__(self, runtime: Any, offsets: dict[str, int]) -> None:
        self._runtime = runtime
        #: ``{"output": bytes, "failed": bytes}``: where the output files end now.
        self.offsets = {"output": offsets.get("output", 0), "failed": offsets.get("failed", 0)}

    def begin(self, run: dict, plan: ResumePlan) -> None:
        """Journal the run (a new one forgets an older one's lines); exactly-once records start.

        Lines run again by ``--retry-failed`` are journaled as not ended (their
        records left ``--failed-out``): an interruption before they end anew
        leaves them to the next ``--resume``, with or without ``--retry-failed``.
        """
        self._runtime._state_call(Method.JOURNAL_BEGIN, run, not plan.resuming)
        retried = [(line, f"line-{line}", "retrying", None) for line in plan.retry_lines]
        self._runtime._state_call(Method.JOURNAL_RECORD, retried, dict(self.offsets))

    def record(self, ended: list[tuple[int, str, str, dict | None]]) -> None:
        """Journal ``(line, job_id, status, error)`` of lines whose outputs were written, with the offsets."""
        lines = [(line, job_id, status, None if error is None else json_line(error).rstrip("\n"))
                 for line, job_id, status, error in ended]
        self._runtime._state_call(Method.JOURNAL_RECORD, lines, dict(self.offsets))
