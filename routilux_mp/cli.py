"""The ``routilux-mp`` command: run a flow over a JSONL file on worker processes, or list flows.

::

    routilux-mp run TARGET [--flow NAME] [--entry ROUTINE.SLOT] [--input FILE|-] [--output FILE|-]
                           [--processes N] [--max-failures K] [--no-progress]
    routilux-mp flows TARGET

How ``run`` moves data::

    input ──> poster thread ──post()──> Runtime ──done callback──> done queue ──> main thread
    (JSONL,   blocks on back-pressure             (dispatcher        (SimpleQueue)   writes JSONL in input
     streamed) and on the reorder window           thread)                           order, redraws stderr,
                                                                                     handles Ctrl-C/SIGTERM

* poster thread: reads one line at a time and posts it as a job; ``post()``
  blocks while the entry slot is full, and the poster also waits while
  :data:`MAX_UNWRITTEN_JOBS` jobs are posted but not yet written, so memory
  stays flat however large the input and however slow an early job.
* main thread: the only one writing output and drawing; signal handlers only
  count signals, the main loop reacts (first: drain running jobs and cancel the
  rest; second: stop now).

``python -m routilux_mp`` and ``scripts/supervise.py`` run the same :func:`main`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from types import FrameType, ModuleType
from typing import IO, Any

import cloudpickle

from . import _cli_ui
from .errors import FlowError, RoutiluxError, RuntimeClosedError
from .flow import Flow
from .monitoring.flow_registry import FlowRegistry
from .runtime import Runtime

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_JOBS_FAILED",
    "EXIT_LOAD_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]

EXIT_OK = 0
EXIT_JOBS_FAILED = 1
EXIT_USAGE = 2
EXIT_LOAD_FAILED = 3
EXIT_INTERRUPTED = 130

#: Jobs posted but not yet written. Input-order output buffers finished jobs behind a slow
#: early one; this bound keeps that buffer (and the supervisor's memory) flat.
MAX_UNWRITTEN_JOBS = 2000
#: Seconds the poster waits on a full window before flushing what activation policies hold back.
STALL_FLUSH_AFTER = 1.0
#: Finished jobs the runtime keeps for ``get_job()``. The CLI never looks them up: it keeps
#: fewer than the runtime's default (10,000, with their outputs) to keep memory low.
LEDGER_FINISHED_JOBS = 1000
#: Seconds the main loop waits for a finished job before redrawing and checking for signals.
TICK = 0.1
#: Seconds a first Ctrl-C/SIGTERM lets running jobs finish before their processes are stopped.
DRAIN_TIMEOUT = 30.0
#: Seconds to wait, once the runtime has stopped, for the last done-callbacks to arrive.
SETTLE_TIMEOUT = 5.0
#: Failures logged one line each; past this many they are only counted (the summary has the total).
MAX_LOGGED_FAILURES = 20

EPILOG = """\
examples:
  routilux-mp run workers/wordcount.py                 the bundled sample, live progress on a terminal
  routilux-mp run workers.wordcount --input docs.jsonl --output out.jsonl --processes 8
  zcat big.jsonl.gz | routilux-mp run flows.py --flow clean --entry parse.raw --input - > out.jsonl
  routilux-mp run flows.py --input data.jsonl --max-failures 10 --no-progress 2> run.log
  routilux-mp flows workers/wordcount.py               routines, slots, events, policies, connections

exit codes:
  0 all jobs completed, 1 some jobs failed, 2 bad usage or input,
  3 the flow could not be loaded, 130 interrupted (Ctrl-C or SIGTERM)
"""


class CliError(Exception):
    """Raised to end the command with ``code`` after printing ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------- loading


def _describe(exc: BaseException) -> str:
    """The traceback of ``exc`` without importlib's and this module's frames: the user's code only."""
    machinery = os.path.dirname(importlib.__file__ or "")
    tbe = traceback.TracebackException.from_exception(exc)
    tbe.stack = traceback.StackSummary.from_list(
        [f for f in tbe.stack if not f.filename.startswith(("<frozen", machinery)) and f.filename != __file__]
    )
    return "".join(tbe.format()).rstrip()


def load_target(target: str) -> ModuleType:
    """Import TARGET, a ``.py`` path or a dotted module, so that it registers its flows.

    A file is imported under a private module name and shipped to workers by
    value (they never import it, so it needs no package or main guard); its
    directory goes on ``sys.path`` for the modules it imports itself. A dotted
    module is imported from the current directory, as ``python -m`` would.
    """
    try:
        if target.endswith(".py") or os.sep in target:
            path = os.path.abspath(target)
            if not os.path.isfile(path):
                raise CliError(EXIT_LOAD_FAILED, f"cannot load {target!r}: no such file")
            sys.path.insert(0, os.path.dirname(path))
            name = "_routilux_mp_target_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # before running it: cloudpickle and dataclasses look it up there
            spec.loader.exec_module(module)
            cloudpickle.register_pickle_by_value(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # what `python -m` does; the console script's sys.path lacks it
            module = importlib.import_module(target)
    except CliError:
        raise
    except (Exception, SystemExit) as exc:  # SystemExit: a module that runs its own CLI at import
        raise CliError(EXIT_LOAD_FAILED, f"cannot load {target!r}:\n{_describe(exc)}") from exc
    return module


def choose_flow(target: str, name: str | None) -> tuple[str, Flow]:
    """The flow to run: ``--flow NAME``, or the only one TARGET registered."""
    registry = FlowRegistry.get_instance()
    names = registry.list_names()
    listed = ", ".join(repr(n) for n in names)
    if not names:
        raise CliError(EXIT_LOAD_FAILED, f"{target!r} registered no flow: call "
                       "FlowRegistry.get_instance().register_by_name(name, flow) when it is imported")
    if name is None:
        if len(names) > 1:
            raise CliError(EXIT_USAGE, f"{target!r} registers {len(names)} flows ({listed}): pick one with --flow")
        name = names[0]
    elif name not in names:
        raise CliError(EXIT_LOAD_FAILED, f"{target!r} registers no flow {name!r} (flows: {listed})")
    flow = registry.get(name)
    try:
        flow.validate()
    except FlowError as exc:
        raise CliError(EXIT_LOAD_FAILED, str(exc)) from exc
    return name, flow


def choose_entry(flow_name: str, flow: Flow, entry: str | None) -> tuple[str, str]:
    """``(routine_id, slot)`` to post to: ``--entry ROUTINE.SLOT``, or the flow's only entry slot."""
    if entry is None:
        slots = flow.entry_slots()
        if len(slots) == 1:
            return slots[0]
        listed = ", ".join(f"{rid}.{slot}" for rid, slot in slots) or "none: a connection feeds every slot"
        raise CliError(EXIT_USAGE, f"flow {flow_name!r} has {len(slots)} entry slots ({listed}): "
                       "name one with --entry ROUTINE.SLOT")
    rid, _, slot = entry.rpartition(".")
    if not rid or not slot:
        raise CliError(EXIT_USAGE, f"--entry must be ROUTINE.SLOT, got {entry!r}")
    try:
        flow.check_slot(rid, slot)
    except FlowError as exc:
        raise CliError(EXIT_USAGE, f"--entry {entry}: {exc}") from exc
    return rid, slot


# ---------------------------------------------------------------------------- input and output


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: Strict JSON: NaN and Infinity, which json.loads accepts, could not be written back as JSON.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def read_jsonl(stream: IO[bytes], label: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` per non-blank line; ``CliError`` (exit 2) at the first bad one."""
    for number, raw in enumerate(stream, 1):
        if not raw.strip():
            continue
        try:
            value = _DECODER.decode(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise CliError(EXIT_USAGE, f"{label} line {number}: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise CliError(EXIT_USAGE,
                           f"{label} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except ValueError as exc:  # NaN or Infinity
            raise CliError(EXIT_USAGE, f"{label} line {number}: not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise CliError(EXIT_USAGE, f"{label} line {number}: each line must be a JSON object, "
                           f"got {type(value).__name__}")
        yield number, value


class _Input:
    """Where the jobs come from: a regular file (validated, then read again) or a stream (read once)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.label = "<stdin>" if path == "-" else path
        self.total: int | None = None
        if path != "-" and not os.path.exists(path):
            raise CliError(EXIT_USAGE, f"cannot read input {path!r}: no such file")
        if os.path.isdir(path):
            raise CliError(EXIT_USAGE, f"cannot read input {path!r}: it is a directory")
        # A FIFO or device can be read only once: it is checked line by line as it is posted.
        self.seekable = path != "-" and os.path.isfile(path)

    def validate(self) -> None:
        """For a regular file, check every line before any job starts, and count the jobs."""
        if not self.seekable:
            return
        try:
            with open(self.path, "rb") as stream:
                self.total = sum(1 for _ in read_jsonl(stream, self.label))
        except OSError as exc:
            raise CliError(EXIT_USAGE, f"cannot read input {self.path!r}: {exc.strerror}") from exc

    def open(self) -> IO[bytes]:
        # stdin gets a reader of its own: our thread may be blocked in it at exit, and the
        # interpreter must not wait on sys.stdin's lock then.
        if self.path == "-":
            return open(sys.stdin.fileno(), "rb", closefd=False)
        return open(self.path, "rb")


def open_output(path: str | None, stdout: IO[str]) -> tuple[IO[str], bool]:
    """The JSONL sink and whether it is ``stdout``."""
    if path is None or path == "-":
        stdout.flush()
        return open(stdout.fileno(), "w", encoding="utf-8", newline="\n", closefd=False), True
    try:
        return open(path, "w", encoding="utf-8", newline="\n"), False
    except OSError as exc:
        raise CliError(EXIT_USAGE, f"cannot write output {path!r}: {exc.strerror}") from exc


def _one_terminal(stdout: IO[str]) -> bool:
    """Whether ``stdout`` and stderr are the same terminal."""
    try:
        return stdout.isatty() and os.path.samestat(os.fstat(stdout.fileno()), os.fstat(sys.stderr.fileno()))
    except (OSError, ValueError):  # closed or not a real file
        return False


def encode_outputs(job: Any) -> str:
    """The JSONL lines of a job's outputs. Raises ``ValueError``/``TypeError`` if one is not JSON."""
    return "".join(
        json.dumps({"job_id": job.job_id, "routine": out["routine"], "event": out["event"], "data": out["data"]},
                   ensure_ascii=False, allow_nan=False) + "\n"
        for out in job.outputs
    )


# ---------------------------------------------------------------------------- the run


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


class _Run:
    """One ``routilux-mp run``: the poster thread, the main loop, and how it ends."""

    def __init__(self, runtime: Runtime, flow_name: str, entry: tuple[str, str], source: _Input,
                 output: IO[str], output_is_stdout: bool, display: _cli_ui.Display, max_failures: int | None) -> None:
        self.runtime = runtime
        self.flow_name = flow_name
        self.entry = entry
        self.source = source
        self.output = output
        self.output_is_stdout = output_is_stdout
        self.display = display
        self.max_failures = max_failures
        self.tally = _cli_ui.Tally(total=source.total, started=time.monotonic())
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        # Jobs are numbered in posting (= input) order; ``ready`` holds finished ones
        # (their JSONL text, "" for failed or cancelled) until every earlier one is written.
        self.ready: dict[int, str] = {}
        self.next_seq = 0
        self.window = threading.Condition()  # guards posted, next_seq and stopping; wakes the poster
        self.posted = 0
        self.poster_done = False
        self.stopping = False
        self.stop_reason: str | None = None
        self.stopper: threading.Thread | None = None
        self.escalated = False
        self.input_error: CliError | None = None
        self.poster_error: BaseException | None = None
        self.output_broken = False

    # -- poster thread -------------------------------------------------------

    def post_all(self) -> None:
        """Post every input line as a job, then wait for the jobs (flushing held batches).

        Every number taken from ``posted`` reaches the done queue exactly once:
        with its job when that job ends, or with ``None`` if ``post()`` refused it.
        """
        try:
            rid, slot = self.entry
            with self.source.open() as stream:
                for number, data in read_jsonl(stream, self.source.label):
                    with self.window:
                        while self.posted - self.next_seq >= MAX_UNWRITTEN_JOBS and not self.stopping:
                            if not self.window.wait(STALL_FLUSH_AFTER):
                                # Nothing written for a while: a policy may be holding the very jobs
                                # the window waits for (a batch bigger than the window). Deliver what
                                # policies hold, as the end of the input would.
                                self.runtime.flush(self.flow_name)
                        if self.stopping:
                            return
                        seq = self.posted
                        self.posted += 1
                    try:
                        _, job = self.runtime.post(self.flow_name, rid, slot, data, job_id=f"line-{number}")
                    except BaseException:
                        self.done.put((seq, None))
                        raise
                    job.add_done_callback(lambda job, seq=seq: self.done.put((seq, job)))
        except CliError as exc:  # a bad line in a stream: finish what was posted, then exit 2
            self.input_error = exc
        except RuntimeClosedError:  # the main loop is stopping the run
            return
        except Exception as exc:  # noqa: BLE001 -- reported by the main loop, which stops the run
            self.poster_error = exc
            return
        finally:
            self.done.put(None)  # wakes the main loop; ``poster_done`` tells it why
        try:
            self.runtime.wait_until_all_jobs_finished()
        except RoutiluxError:  # stopped or broken meanwhile: the jobs end anyway
            pass

    # -- main thread ---------------------------------------------------------

    def execute(self) -> int:
        """Run to the end; return the exit code."""
        poster = threading.Thread(target=self.post_all, name="routilux-mp poster", daemon=True)
        self.display.start(self.tally, self.runtime.stats)
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
        self.display.summary(self.flow_name, self.tally, wall, stats, self.runtime.processes, _cpus(),
                             stopped=self.stop_reason)
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
                if self.next_seq == self.posted or time.monotonic() > settle_deadline:
                    return
            elif self.poster_done and self.next_seq == self.posted:
                return
            self.display.update(self.tally)

    def _collect(self) -> None:
        """Take finished jobs off the done queue (waiting up to :data:`TICK`), write what is in order."""
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
        text = ""
        if job is None:  # post() refused it: the run was stopping
            pass
        elif job.status == "completed":
            try:
                text = encode_outputs(job)
                self.tally.completed += 1
            except (TypeError, ValueError) as exc:
                self._failed(job, {"type": type(exc).__name__,
                                   "message": f"an output cannot be written as JSON: {exc}"})
        elif job.status == "failed":
            self._failed(job, job.error or {})
        else:
            self.tally.cancelled += 1
        self.ready[seq] = text

    def _failed(self, job: Any, error: dict) -> None:
        self.tally.failed += 1
        if self.tally.failed > MAX_LOGGED_FAILURES + 1:
            return
        if self.tally.failed == MAX_LOGGED_FAILURES + 1:
            self.display.message("routilux-mp: more jobs failed; they are counted but not logged")
            return
        where = f" in routine {error['routine']!r}" if error.get("routine") else ""
        message = f"routilux-mp: job {job.job_id} failed{where}: {error.get('type', 'Error')}: {error.get('message')}"
        if self.tally.failed == 1 and error.get("traceback"):  # the first one in full: usually the only one needed
            message += "\n" + error["traceback"].rstrip()
        self.display.message(message)

    def _write_ready(self) -> None:
        """Write finished jobs in input order, as far as no earlier job is still running."""
        seq = self.next_seq
        chunks = []
        while seq in self.ready:
            chunks.append(self.ready.pop(seq))
            seq += 1
        if seq == self.next_seq:
            return
        if not self.output_broken:
            try:
                self.output.write("".join(chunks))
                self.output.flush()
            except BrokenPipeError:  # e.g. piped into `head`: stop quietly, exit 1
                self.output_broken = True
                self._redirect_broken_stdout()
                self._begin_stop("the output was closed")
        with self.window:
            self.next_seq = seq
            self.window.notify()

    def _redirect_broken_stdout(self) -> None:
        # Python flushes stdout again at exit; point it at /dev/null so that does not fail too.
        if self.output_is_stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.output.fileno())
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
            self.display.message(f"routilux-mp: {self.input_error}; stopped reading, finishing the jobs started")
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

    def _exit_code(self) -> int:
        if self.stop_reason == "interrupted":
            return EXIT_INTERRUPTED
        if self.input_error is not None:
            return EXIT_USAGE
        if self.tally.failed or self.stop_reason is not None:
            return EXIT_JOBS_FAILED
        return EXIT_OK


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cmd_run(args: argparse.Namespace) -> int:
    """``routilux-mp run``: stdout carries only the JSONL, whatever the supervisor's own code prints."""
    stdout = sys.stdout
    # The target's import-time prints and a policy's prints go to stderr; the JSONL has its own writer.
    with contextlib.redirect_stdout(sys.stderr):
        return _run(args, stdout)


def _run(args: argparse.Namespace, stdout: IO[str]) -> int:
    """Everything that can fail on usage is checked before a process starts."""
    module = load_target(args.target)
    flow_name, flow = choose_flow(args.target, args.flow)
    entry = choose_entry(flow_name, flow, args.entry)
    path = args.input
    if path is None:
        sample = getattr(module, "SAMPLE_INPUT", None)
        if sample is None:
            raise CliError(EXIT_USAGE, f"{args.target!r} defines no SAMPLE_INPUT: give --input FILE (or - for stdin)")
        path = os.path.join(os.path.dirname(os.path.abspath(module.__file__ or "")), os.fspath(sample))
    source = _Input(path)
    source.validate()
    live = sys.stderr.isatty() and not args.no_progress
    display = _cli_ui.make_display(live)
    output, output_is_stdout = open_output(args.output, stdout)
    if live and output_is_stdout and _one_terminal(stdout):
        output = _cli_ui.AboveLiveDisplay(display)
    handler = _cli_ui.DisplayLogHandler(display)
    library_logger = logging.getLogger("routilux_mp")
    library_logger.addHandler(handler)
    try:
        try:
            runtime = Runtime(processes=args.processes, max_finished_jobs=LEDGER_FINISHED_JOBS,
                              worker_output=display.worker_output)
        except RoutiluxError as exc:
            raise CliError(EXIT_JOBS_FAILED, f"cannot start the worker processes: {exc}") from exc
        run = _Run(runtime, flow_name, entry, source, output, output_is_stdout, display, args.max_failures)
        return run.execute()
    finally:
        library_logger.removeHandler(handler)
        if not output_is_stdout:
            output.close()


# ---------------------------------------------------------------------------- flows


def cmd_flows(args: argparse.Namespace) -> int:
    """``routilux-mp flows``: list what TARGET registers."""
    load_target(args.target)
    registry = FlowRegistry.get_instance()
    names = registry.list_names()
    if not names:
        raise CliError(EXIT_LOAD_FAILED, f"{args.target!r} registered no flow")
    print("\n\n".join(_cli_ui.describe_flow(name, registry.get(name)) for name in names))
    return EXIT_OK


# ---------------------------------------------------------------------------- entry point


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="routilux-mp",
        description="Run routilux-mp flows over JSONL input on a pool of worker processes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run", help="run a flow: one job per JSONL input line, outputs as JSONL",
        description="Post each JSONL line of the input as a job; write job outputs as JSONL, in input order.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("target", metavar="TARGET", help="a .py file or dotted module that registers flows")
    run.add_argument("--flow", metavar="NAME", help="the flow to run, when TARGET registers several")
    run.add_argument("--entry", metavar="ROUTINE.SLOT", help="where jobs enter (default: the flow's only entry slot)")
    run.add_argument("--input", metavar="FILE|-", help="JSONL input, - for stdin (default: TARGET's SAMPLE_INPUT)")
    run.add_argument("--output", metavar="FILE|-", help="JSONL output (default: stdout)")
    run.add_argument("--processes", type=_positive_int, metavar="N", help="worker processes (default: CPUs)")
    run.add_argument("--max-failures", type=_positive_int, metavar="K",
                     help="stop after K failed jobs (cancel the rest, exit 1)")
    run.add_argument("--no-progress", action="store_true", help="plain log lines on stderr, even on a terminal")
    run.set_defaults(handler=cmd_run)
    flows = commands.add_parser("flows", help="list the flows of TARGET with their routines and connections",
                                description="List flows, routines, slots, events, policies, connections.")
    flows.add_argument("target", metavar="TARGET", help="a .py file or dotted module that registers flows")
    flows.set_defaults(handler=cmd_flows)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``routilux-mp`` command; return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse has printed why
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.handler(args)
    except CliError as exc:
        print(f"routilux-mp: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:  # Ctrl-C while loading or validating: no process was started yet
        print("routilux-mp: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
