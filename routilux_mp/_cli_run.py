"""The run loop of ``routilux-mp run``: post every input line as a job, write what the jobs give, stop cleanly.

::

    input ──> poster thread ──post()──> Runtime ──done callback──> done queue ──> main thread
    (JSONL,   blocks on back-pressure             (dispatcher        (SimpleQueue)   writes JSONL (input or
     streamed) and on the output window           thread)                           completion order), redraws
                                                                                    stderr, handles signals

* poster thread: reads one line at a time and posts it as a job; ``post()``
  blocks while the entry slot is full, and the poster also waits while
  :data:`MAX_UNWRITTEN_JOBS` jobs are posted but not yet written, so memory
  stays flat however large the input and however slow an early job.
* main thread: the only one writing output (``--output``, ``--failed-out``,
  ``--state-out``) and drawing; signal handlers only count signals, the main
  loop reacts (first: drain running jobs and cancel the rest; second: stop now).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any

from . import _cli_ui
from ._cli_exit import EXIT_INTERRUPTED, EXIT_JOBS_FAILED, EXIT_OK, EXIT_USAGE, CliError, usable_cpus
from ._cli_input import InputSource
from ._cli_journal import Journal, ResumePlan
from ._cli_output import SharedOutputs, encode_outputs, failed_record, json_line, worker_states
from .errors import RoutiluxError, RuntimeClosedError
from .runtime import Runtime

__all__ = ["MAX_UNWRITTEN_JOBS", "BatchRun", "RunSinks"]

#: Jobs posted but not yet written. Input-order output buffers finished jobs behind a slow
#: early one; this bound keeps that buffer (and the supervisor's memory) flat.
MAX_UNWRITTEN_JOBS = 2000
#: Seconds the poster waits on a full window before flushing what activation policies hold back.
STALL_FLUSH_AFTER = 1.0
#: Seconds the main loop waits for a finished job before redrawing and checking for signals.
TICK = 0.1
#: Seconds a first Ctrl-C/SIGTERM lets running jobs finish before their processes are stopped.
DRAIN_TIMEOUT = 30.0
#: Seconds to wait, once the runtime has stopped, for the last done-callbacks to arrive.
SETTLE_TIMEOUT = 5.0
#: Failures logged one line each; past this many they are only counted (``--failed-out`` lists them all).
MAX_LOGGED_FAILURES = 20


def _short_error(error: dict | None) -> dict:
    """What the journal keeps of a job's error: type, message, routine (the traceback goes to --failed-out)."""
    error = error or {}
    return {key: error[key] for key in ("type", "message", "routine") if error.get(key) is not None}


def _input_line(job: Any) -> dict:
    """What the dashboard shows with a failed job: its input line (job ids are ``line-N``)."""
    number = job.job_id.rpartition("-")[2]
    return {"line": int(number)} if job.job_id.startswith("line-") and number.isdigit() else {}


class _SignalCount:
    """SIGINT/SIGTERM received while :func:`_count_signals` is active."""

    count = 0


@contextlib.contextmanager
def _count_signals() -> Iterator[_SignalCount]:
    """Only count SIGINT and SIGTERM (the main loop reacts); restore the old handlers after."""
    received = _SignalCount()

    def handler(signum: int, frame: FrameType | None) -> None:
        received.count += 1

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


@dataclass
class RunSinks:
    """Where a run writes. The CLI opened every file (after checking none of them is the input)."""

    #: JSONL outputs of completed jobs.
    output: IO[str]
    #: Whether ``output`` is the process's stdout (a closed pipe then needs care at exit).
    output_is_stdout: bool
    #: ``--failed-out``: one JSONL record per failed job, or ``None``.
    failed: IO[str] | None = None
    #: The name of ``--failed-out`` for messages.
    failed_path: str | None = None
    #: ``--state-out``: every worker's final WorkerState as one JSON document, or ``None``.
    state: IO[str] | None = None
    #: The name of ``--state-out`` for messages.
    state_path: str | None = None


class BatchRun:
    """One ``routilux-mp run``: the poster thread, the main loop, and how it ends."""

    def __init__(self, runtime: Runtime, flow_name: str, entry: tuple[str, str], source: InputSource,
                 sinks: RunSinks, display: _cli_ui.Display, *, max_failures: int | None = None,
                 order: str = "input", journal: Journal | None = None, plan: ResumePlan | None = None) -> None:
        self.runtime = runtime  # runs the jobs; shut down by execute()
        self.flow_name = flow_name  # the flow every job is posted to
        self.entry = entry  # (routine_id, slot) every job enters at
        self.source = source  # the validated input (its total is known for a regular file); the poster closes it
        self.sinks = sinks  # where outputs, failures and final states go
        self.display = display  # progress, messages, the summary
        self.max_failures = max_failures  # stop after this many failed jobs (None: never)
        self.in_order = order == "input"  # write outputs in input order (else as jobs finish)
        self.journal = journal  # --state: where ended lines are journaled, after their outputs are written
        self.plan = plan or ResumePlan()  # --resume: the lines not run again
        skipped = self.plan.completed + self.plan.failed
        self.tally = _cli_ui.Tally(total=None if source.total is None else source.total - skipped,
                                   started=time.monotonic())
        self.done: queue.SimpleQueue = queue.SimpleQueue()  # (seq, job or None), or None when the poster ends
        # Jobs are numbered in posting (= input) order; ``ready`` holds finished ones (their JSONL
        # text, --failed-out record, "" for none, and journal record) until they may be written.
        self.ready: dict[int, tuple[str, str, tuple | None]] = {}
        self.shared = SharedOutputs()  # outputs of several jobs (a batch's): written once, with all their ids
        self.inputs: dict[int, tuple[int, dict]] = {}  # seq -> (line, data) of unfinished jobs, for --failed-out
        self.lines: dict[int, int] = {}  # seq -> input line of unfinished jobs, for the journal
        self.next_seq = 0  # input order: the first job not written yet
        self.window = threading.Condition()  # guards posted, written and stopping; wakes the poster
        self.posted = 0  # numbers handed out to jobs (each reaches the done queue exactly once)
        self.skipped = 0  # input lines read but not posted: done in an earlier run (--resume)
        self.written = 0  # jobs whose outputs were written (or that had none to write)
        self.poster_done = False  # the poster will put nothing more on the done queue
        self.stopping = False  # post nothing more
        self.stop_reason: str | None = None  # why the run stopped early, for the summary
        self.stopper: threading.Thread | None = None  # the thread draining the runtime
        self.escalated = False  # a second signal stopped everything at once
        self.input_error: CliError | None = None  # a bad line in a stream, or input that changed
        self.poster_error: BaseException | None = None  # post() failed unexpectedly
        self.output_broken = False  # the output cannot be written any more
        self.sink_errors: list[str] = []  # --failed-out/--state-out problems (they make the run fail)

    # -- poster thread -------------------------------------------------------

    def post_all(self) -> None:
        """Post every input line as a job, then wait for the jobs (flushing held batches).

        Every number taken from ``posted`` reaches the done queue exactly once:
        with its job when that job ends, or with ``None`` if ``post()`` refused it.
        """
        try:
            rid, slot = self.entry
            for number, data in self.source.records():
                if self.plan.skips(number):
                    self.skipped += 1  # journaled as done by an earlier run
                    continue
                with self.window:
                    while self.posted - self.written >= MAX_UNWRITTEN_JOBS and not self.stopping:
                        if not self.window.wait(STALL_FLUSH_AFTER):
                            # Nothing written for a while: a policy may be holding the very jobs
                            # the window waits for (a batch bigger than the window). Deliver what
                            # policies hold, as the end of the input would.
                            self.runtime.flush(self.flow_name)
                    if self.stopping:
                        return
                    seq = self.posted
                    self.posted += 1
                if self.sinks.failed is not None:
                    self.inputs[seq] = (number, data)
                if self.journal is not None:
                    self.lines[seq] = number
                try:
                    _, job = self.runtime.post(self.flow_name, rid, slot, data, job_id=f"line-{number}")
                except BaseException:
                    self.done.put((seq, None))
                    raise
                job.add_done_callback(lambda job, seq=seq: self.done.put((seq, job)))
            self._check_everything_read()
        except CliError as exc:  # a bad line in a stream: finish what was posted, then exit 2
            self.input_error = exc
        except RuntimeClosedError:  # the main loop is stopping the run
            return
        except Exception as exc:  # noqa: BLE001 -- reported by the main loop, which stops the run
            self.poster_error = exc
            return
        finally:
            # Closed here, not by the main thread: closing a reader blocks while another thread
            # reads it, and this thread may be blocked on an idle pipe when the run is stopped.
            self.source.close()
            self.done.put(None)  # wakes the main loop; ``poster_done`` tells it why
        try:
            self.runtime.wait_until_all_jobs_finished()
        except RoutiluxError:  # stopped or broken meanwhile: the jobs end anyway
            pass

    def _check_everything_read(self) -> None:
        """A file read back shorter (or longer) than it was checked changed under us: never a clean exit."""
        total = self.source.total
        if total is not None and self.posted + self.skipped != total:
            raise CliError(EXIT_USAGE, f"{self.source.label} changed while it was read: {total} lines were "
                           f"checked before the run but {self.posted + self.skipped} were read back, so the output "
                           "holds the results of those only; do not modify or truncate the input during a run "
                           "(is --output, or a program, writing to it?)")

    # -- main thread ---------------------------------------------------------

    def execute(self) -> int:
        """Run to the end; return the exit code."""
        poster = threading.Thread(target=self.post_all, name="routilux-mp poster", daemon=True)
        plan = self.plan
        if plan.resuming:
            failed = (f"; {plan.failed} failed (not run again: --retry-failed does)" if plan.failed else
                      f"; {plan.retried} failed, run again" if plan.retried else "")
            self.display.message(f"routilux-mp: resuming: {plan.completed} lines completed earlier{failed}; "
                                 f"running the others")
        self.display.start(self.tally, self.runtime.stats)
        self.runtime._dashboard_expect(self.tally.total, _input_line)
        try:
            with _count_signals() as signals:
                poster.start()
                self._loop(signals)
                wall = self.tally.elapsed
                stats = self._final_stats()
        finally:
            self.display.stop(self.tally)
            # Every job has ended by now, unless this run itself failed: then do not wait for them.
            self.runtime.shutdown(wait=False)
            self._write_states()
            self._close_sinks()
        self.display.summary(self.flow_name, self.tally, wall, stats, self.runtime.processes, usable_cpus(),
                             stopped=self.stop_reason)
        self._report_sinks()
        return self._exit_code()

    def _loop(self, signals: _SignalCount) -> None:
        """Write outputs and redraw until every posted job was written (or the run was stopped)."""
        settle_deadline = None
        while True:
            self._collect()
            self._react(signals)
            if self.stopper is not None and not self.stopper.is_alive():
                # The runtime has stopped, so every job has ended; the last callbacks may be on their way.
                settle_deadline = settle_deadline or time.monotonic() + SETTLE_TIMEOUT
                if self.written == self.posted or time.monotonic() > settle_deadline:
                    return
            elif self.poster_done and self.written == self.posted:
                return
            self.display.update(self.tally)

    def _collect(self) -> None:
        """Take finished jobs off the done queue (waiting up to :data:`TICK`), write what may be written."""
        try:
            item = self.done.get(timeout=TICK)
        except queue.Empty:
            return
        while True:
            if item is None:
                self.poster_done = True
            else:
                self._settle(*item)
            try:
                item = self.done.get_nowait()
            except queue.Empty:
                break
        self._write_ready()

    def _settle(self, seq: int, job: Any) -> None:
        text = failure = ""
        line, data = self.inputs.pop(seq, (0, None))
        line = self.lines.pop(seq, line)
        ended = None  # the journal's record: (line, job id, status, error); None: the line did not end
        if job is None:  # post() refused it: the run was stopping
            pass
        elif job.status == "completed":
            try:
                text = encode_outputs(job, self.shared)
                self.tally.completed += 1
                ended = (line, job.job_id, "completed", None)
            except (TypeError, ValueError) as exc:
                error = {"type": type(exc).__name__, "message": f"an output cannot be written as JSON: {exc}"}
                failure = self._failed(job, line, data, error)
                ended = (line, job.job_id, "failed", error)
        elif job.status == "failed":
            self.shared.skip(job)
            failure = self._failed(job, line, data, job.error or {})
            ended = (line, job.job_id, "failed", _short_error(job.error))
        else:
            self.shared.skip(job)
            self.tally.cancelled += 1
        self.ready[seq] = (text, failure, ended)

    def _failed(self, job: Any, line: int, data: dict | None, error: dict) -> str:
        """Count and log a failed job; return its ``--failed-out`` record ("" without that option)."""
        self.tally.failed += 1
        record = failed_record(line, job.job_id, data, error) if self.sinks.failed is not None else ""
        if self.tally.failed > MAX_LOGGED_FAILURES + 1:
            return record
        if self.tally.failed == MAX_LOGGED_FAILURES + 1:
            where = (f"every failure is in {self.sinks.failed_path}" if self.sinks.failed is not None
                     else "--failed-out FILE lists every failure with its input and traceback")
            self.display.message(f"routilux-mp: more jobs failed; they are counted but not logged ({where})")
            return record
        where = f" in routine {error['routine']!r}" if error.get("routine") else ""
        message = f"routilux-mp: job {job.job_id} failed{where}: {error.get('type', 'Error')}: {error.get('message')}"
        if self.tally.failed == 1 and error.get("traceback"):  # the first one in full: usually the only one needed
            message += "\n" + error["traceback"].rstrip()
        self.display.message(message)
        return record

    def _write_ready(self) -> None:
        """Write finished jobs: in input order as far as no earlier job is still running, or all of them."""
        if self.in_order:
            seq = self.next_seq
            chunks = []
            while seq in self.ready:
                chunks.append(self.ready.pop(seq))
                seq += 1
            self.next_seq = seq
        else:
            chunks = list(self.ready.values())
            self.ready.clear()
        if not chunks:
            return
        written = not self.output_broken
        if written:
            text = "".join(text for text, _, _ in chunks)
            try:
                self.sinks.output.write(text)
                self.sinks.output.flush()
            except OSError as exc:  # BrokenPipeError: e.g. piped into `head`; or a full disk
                written = False
                self._output_failed(exc)
        failures = "".join(failure for _, failure, _ in chunks)
        if failures and self.sinks.failed is not None:
            problems = len(self.sink_errors)
            self._write_sink(self.sinks.failed, f"--failed-out {self.sinks.failed_path}", failures)
            written = written and len(self.sink_errors) == problems
        if self.journal is not None and written:
            # Written first, journaled second: a crash in between leaves bytes past the journaled
            # offsets, which a resume truncates (and runs those lines again). Never the other way round.
            self.journal.offsets["output"] += len(text.encode("utf-8"))
            self.journal.offsets["failed"] += len(failures.encode("utf-8"))
            self._journal([ended for _, _, ended in chunks if ended is not None])
        with self.window:
            self.written += len(chunks)
            self.window.notify()

    def _journal(self, ended: list[tuple]) -> None:
        """Journal lines whose outputs were written; if that fails, stop (what is not journaled runs again)."""
        assert self.journal is not None
        try:
            self.journal.record(ended)
        except RuntimeClosedError:
            if not self.stopping:
                raise
            # Our own stop shut the runtime down before these were journaled: a resume runs them again
            # (their outputs past the journaled offset are dropped then, their state writes replayed).
        except RoutiluxError as exc:
            problem = f"cannot journal the run in --state: {type(exc).__name__}: {exc}"
            if problem not in self.sink_errors:
                self.sink_errors.append(problem)
                self.display.message(f"routilux-mp: {problem}")
                self._begin_stop("the journal cannot be written")

    def _output_failed(self, exc: OSError) -> None:
        self.output_broken = True
        if isinstance(exc, BrokenPipeError):
            self._redirect_broken_stdout()
            self._begin_stop("the output was closed")
        else:
            self.display.message(f"routilux-mp: cannot write the output: {exc.strerror or exc}")
            self._begin_stop("the output cannot be written")

    def _write_sink(self, sink: IO[str], what: str, text: str) -> None:
        """Write to ``--failed-out``/``--state-out``; a failure is reported once and fails the run."""
        try:
            sink.write(text)
            sink.flush()
        except OSError as exc:
            problem = f"cannot write {what}: {exc.strerror or exc}"
            if problem not in self.sink_errors:
                self.sink_errors.append(problem)
                self.display.message(f"routilux-mp: {problem}")

    def _close_sinks(self) -> None:
        """Close every file written (stdout's descriptor stays open); a last flush may fail like a write."""
        files = [("the output", self.sinks.output, self.output_broken),
                 (f"--failed-out {self.sinks.failed_path}", self.sinks.failed, False),
                 (f"--state-out {self.sinks.state_path}", self.sinks.state, False)]
        for what, sink, reported in files:
            if sink is None:
                continue
            try:
                sink.close()
            except OSError as exc:
                problem = f"cannot write {what}: {exc.strerror or exc}"
                if not reported and not any(p.startswith(f"cannot write {what}:") for p in self.sink_errors):
                    self.sink_errors.append(problem)
                    self.display.message(f"routilux-mp: {problem}")

    def _redirect_broken_stdout(self) -> None:
        # Python flushes stdout again at exit; point it at /dev/null so that does not fail too.
        if self.sinks.output_is_stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.sinks.output.fileno())
            os.close(devnull)

    def _react(self, signals: _SignalCount) -> None:
        """Turn signals, the failure limit and poster errors into stopping the run."""
        if signals.count and self.stop_reason != "interrupted":
            self._begin_stop("interrupted")
        if signals.count >= 2 and not self.escalated:
            self.escalated = True
            self.display.message("routilux-mp: stopping now: running jobs are cancelled")
            self.runtime.shutdown(wait=False)  # ends the drain: running activations get a short grace
        if self.max_failures is not None and self.tally.failed >= self.max_failures:
            self._begin_stop(f"{self.tally.failed} jobs failed (--max-failures {self.max_failures})")
        if self.poster_error is not None:
            error, self.poster_error = self.poster_error, None
            self.display.message(f"routilux-mp: posting jobs failed: {type(error).__name__}: {error}")
            self._begin_stop("posting failed")
        if self.input_error is not None and self.poster_done and self.stop_reason is None:
            self.display.message(f"routilux-mp: {self.input_error}; finishing the jobs already posted")
            self.stop_reason = "bad input"  # no drain: the jobs already posted run to the end

    def _begin_stop(self, reason: str) -> None:
        """Stop posting, cancel jobs not started, let running ones finish (in a thread: we keep writing)."""
        if self.stopping:
            if reason == "interrupted":
                self.stop_reason = reason  # Ctrl-C during another stop still means exit 130
            return
        self.stop_reason = reason
        with self.window:
            self.stopping = True
            self.window.notify_all()
        if reason == "interrupted":
            self.display.message(f"routilux-mp: interrupted: finishing running jobs (at most {DRAIN_TIMEOUT:.0f} s), "
                                 "cancelling the rest; interrupt again to stop now")
        else:
            self.display.message(f"routilux-mp: stopping: {reason}; finishing running jobs, cancelling the rest")
        self.stopper = threading.Thread(target=self._drain, name="routilux-mp drain", daemon=True)
        self.stopper.start()

    def _drain(self) -> None:
        try:
            self.runtime.shutdown(wait=True, timeout=DRAIN_TIMEOUT, cancel_pending=True)
        except Exception as exc:  # noqa: BLE001 -- a failing shutdown must not hide the run's results
            self.display.message(f"routilux-mp: stopping the runtime failed: {type(exc).__name__}: {exc}")

    def _final_stats(self) -> dict:
        try:
            return self.runtime.stats()
        except RoutiluxError:
            return {}

    def _write_states(self) -> None:
        """``--state-out``: the final WorkerState of every worker (the runtime has stopped: a snapshot)."""
        if self.sinks.state is None:
            return
        states, problems = worker_states(self.runtime)
        for problem in problems:
            self.sink_errors.append(f"--state-out: cannot read the state of {problem}")
            self.display.message(f"routilux-mp: {self.sink_errors[-1]}")
        self._write_sink(self.sinks.state, f"--state-out {self.sinks.state_path}", json_line(states, indent=2))

    def _report_sinks(self) -> None:
        """After the summary: where the full list of failures and the states are, and how to resume."""
        if self.plan.failed:
            self.display.message(f"routilux-mp: {self.plan.failed} lines failed in an earlier run (--resume "
                                 "--retry-failed runs them again)")
        if self.journal is not None and self.stop_reason is not None:
            self.display.message("routilux-mp: the run is journaled in its --state file: run the same command with "
                                 "--resume to finish it")
        if self.sinks.failed is not None and self.tally.failed:
            self.display.message(f"routilux-mp: {self.tally.failed} failed lines with their errors: "
                                 f"{self.sinks.failed_path}")
        if self.sinks.state is not None and not self.sink_errors:
            self.display.message(f"routilux-mp: final worker states: {self.sinks.state_path}")

    def _exit_code(self) -> int:
        if self.stop_reason == "interrupted":
            return EXIT_INTERRUPTED
        if self.input_error is not None:
            return EXIT_USAGE
        if self.tally.failed or self.plan.failed or self.stop_reason is not None or self.sink_errors:
            return EXIT_JOBS_FAILED
        return EXIT_OK
