"""The ``routilux-mp`` command: run a flow over a JSONL file on worker processes, or list flows.

::

    routilux-mp run TARGET [--flow NAME] [--entry ROUTINE.SLOT] [--input FILE|-] [--output FILE|-]
                           [--processes N] [--max-failures K] [--no-progress] [--order input|completion]
                           [--state DB [--resume [--retry-failed]]] [--failed-out FILE] [--state-out FILE]
                           [--max-worker-rss SIZE] [--debug] [--dashboard [PORT] [--dashboard-host HOST]]
    routilux-mp flows TARGET

This module parses arguments and wires the parts together; each part lives in
a module of its own:

* :mod:`routilux_mp._cli_load`: import TARGET, pick the flow and entry slot;
* :mod:`routilux_mp._cli_input`: open, decompress and check the JSONL input;
* :mod:`routilux_mp._cli_output`: the files a run writes, and the checks that
  none of them is the input;
* :mod:`routilux_mp._cli_journal`: ``--state``/``--resume``: the journal of a
  resumable run, and what a resume runs again;
* :mod:`routilux_mp._cli_run`: the run loop (poster thread, output, signals);
* :mod:`routilux_mp._cli_ui`: progress, the process table and the summary.

Everything that can fail on usage is checked before a process starts and
before any file is opened for writing. ``python -m routilux_mp`` and
``scripts/supervise.py`` run the same :func:`main`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from typing import IO

from . import _cli_ui
from ._cli_exit import (
    EXIT_INTERRUPTED,
    EXIT_JOBS_FAILED,
    EXIT_LOAD_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    usable_cpus,
)
from ._cli_input import MAX_DEPTH, InputSource
from ._cli_journal import Journal, ResumePlan, check_usage, describe, plan_run
from ._cli_load import choose_entry, choose_flow, load_target, sample_input
from ._cli_output import check_files, open_output
from ._cli_run import BatchRun, RunSinks
from .dashboard import DEFAULT_HOST, DEFAULT_PORT
from .errors import DashboardError, RoutiluxError, StateFileError
from .monitoring.flow_registry import FlowRegistry
from .runtime import BACKEND_VARIABLE, MAX_PROCESSES_PER_CPU, Runtime

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_JOBS_FAILED",
    "EXIT_LOAD_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]

#: Finished jobs the runtime keeps for ``get_job()``. The CLI never looks them up: it keeps
#: fewer than the runtime's default (10,000, with their outputs) to keep memory low.
LEDGER_FINISHED_JOBS = 1000
#: The smallest ``--max-worker-rss``: an idle worker process alone takes about 16-20 MiB, so a
#: lower limit would recycle (or kill) every worker after every activation.
MIN_WORKER_RSS = 32 * 2**20
#: Units of ``--max-worker-rss`` (powers of 1024).
SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}

EPILOG = """\
examples:
  routilux-mp run workers/wordcount.py                 the bundled sample, live progress on a terminal
  routilux-mp run workers.wordcount --input docs.jsonl.gz --output out.jsonl --processes 8
  cat part-*.jsonl | routilux-mp run flows.py --flow clean --entry parse.raw --input - > out.jsonl
  routilux-mp run flows.py --input data.jsonl --failed-out failed.jsonl --max-failures 10 --no-progress 2> run.log
  routilux-mp run flows.py --input data.jsonl.xz --order completion --max-worker-rss 2G --state-out states.json
  routilux-mp run flows.py --input big.jsonl --output out.jsonl --state run.db           resumable: a journal in run.db
  routilux-mp run flows.py --input big.jsonl --output out.jsonl --state run.db --resume  ...continued after a crash
  routilux-mp run workers/wordcount.py --dashboard 0    a live web page of the run (its URL is printed on stderr)
  routilux-mp flows workers/wordcount.py               routines, slots, events, policies, connections (fused?)

exit codes:
  0 all jobs completed
  1 some jobs failed (or --max-failures was reached, or an output file could not be written)
  2 bad usage or input (a bad input line is named; the input changed while it was read)
  3 the flow could not be loaded
  130 interrupted (Ctrl-C or SIGTERM): running jobs finish, the rest is cancelled
"""


# ---------------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    """``routilux-mp run``: stdout carries only the JSONL, whatever the supervisor's own code prints."""
    stdout = sys.stdout
    # The target's import-time prints and a policy's prints go to stderr; the JSONL has its own writer.
    with contextlib.redirect_stdout(sys.stderr):
        return _run(args, stdout)


def _run(args: argparse.Namespace, stdout: IO[str]) -> int:
    """Load, check the input and every file to write, open them, then start the processes and run."""
    module = load_target(args.target)
    flow_name, flow = choose_flow(args.target, args.flow)
    entry = choose_entry(flow_name, flow, args.entry)
    source = InputSource(args.input if args.input is not None else sample_input(args.target, module))
    stack = contextlib.ExitStack()  # closes every file opened below, whatever happens
    run = None
    try:
        writes = {option: path for option, path in (("--output", args.output), ("--failed-out", args.failed_out),
                                                    ("--state-out", args.state_out), ("--state", args.state))
                  if path not in (None, "-")}
        check_files(source.label, source.file_stat, stdout, writes)
        check_usage(args, source)
        source.validate()
        if args.debug and (args.processes is not None or args.max_worker_rss is not None):
            raise CliError(EXIT_USAGE, "--debug runs logic in this process, one activation at a time: drop "
                                       "--processes and --max-worker-rss (or drop --debug)")
        plan, description = ResumePlan(), None
        if args.state is not None:
            # A resume goes on with the worker the journal names (its WorkerState is in the file).
            description = describe(args, source, flow_name, entry, f"{flow_name}-1")
            plan = plan_run(args, description)
        live = sys.stderr.isatty() and not args.no_progress and not args.debug
        display = _cli_ui.make_display(live)
        sinks = _open_sinks(args, stdout, stack, append=plan.resuming)
        if live and sinks.output_is_stdout and _one_terminal(stdout):
            sinks.output = _cli_ui.AboveLiveDisplay(display)
        handler = _cli_ui.DisplayLogHandler(display)
        library_logger = logging.getLogger("routilux_mp")
        library_logger.addHandler(handler)
        stack.callback(library_logger.removeHandler, handler)
        stack.callback(_cli_ui.route_logging(display))
        try:
            runtime = Runtime(processes=0 if args.debug else args.processes, max_finished_jobs=LEDGER_FINISHED_JOBS,
                              max_worker_rss=args.max_worker_rss, worker_output=display.worker_output,
                              state_path=args.state, dashboard=args.dashboard, dashboard_host=args.dashboard_host,
                              backend=args.backend, address=args.address)
        except StateFileError as exc:
            raise CliError(EXIT_USAGE, f"--state: {exc}") from exc
        except DashboardError as exc:
            raise CliError(EXIT_USAGE, f"--dashboard: {exc}") from exc
        except RoutiluxError as exc:
            raise CliError(EXIT_JOBS_FAILED, f"cannot start the worker processes: {exc}") from exc
        journal = None
        if description is not None:
            journal = Journal(runtime, plan.offsets)
            try:
                journal.begin(description, plan)
                runtime.exec(flow_name, worker_id=description["worker_id"])
            except BaseException:
                runtime.shutdown(wait=False)
                raise
        run = BatchRun(runtime, flow_name, entry, source, sinks, display, max_failures=args.max_failures,
                       order=args.order, journal=journal, plan=plan)
        return run.execute()
    finally:
        stack.close()
        if run is None:  # else the run's poster thread closes it: it may still be blocked reading a pipe
            source.close()


def _open_sinks(args: argparse.Namespace, stdout: IO[str], stack: contextlib.ExitStack, append: bool) -> RunSinks:
    """Open every file the run writes (closed by ``stack``); a resume appends to the output files."""
    output, output_is_stdout = open_output(args.output, stdout, append=append)
    if not output_is_stdout:
        stack.callback(output.close)
    sinks = RunSinks(output, output_is_stdout, failed_path=args.failed_out, state_path=args.state_out)
    if args.failed_out is not None:
        sinks.failed = stack.enter_context(open_output(args.failed_out, stdout, "--failed-out", append=append)[0])
    if args.state_out is not None:
        sinks.state = stack.enter_context(open_output(args.state_out, stdout, "--state-out")[0])
    return sinks


def _one_terminal(stdout: IO[str]) -> bool:
    """Whether ``stdout`` and stderr are the same terminal."""
    try:
        return stdout.isatty() and os.path.samestat(os.fstat(stdout.fileno()), os.fstat(sys.stderr.fileno()))
    except (OSError, ValueError):  # closed or not a real file
        return False


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


# ---------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _process_count(text: str) -> int:
    value = _positive_int(text)
    cpus = usable_cpus()
    if value > MAX_PROCESSES_PER_CPU * cpus:
        raise argparse.ArgumentTypeError(
            f"{value} is more than {MAX_PROCESSES_PER_CPU} x the {cpus} CPUs this process may use "
            f"(at most {MAX_PROCESSES_PER_CPU * cpus}): that many processes would only compete for the same "
            "cores; use fewer"
        )
    return value


def _check_backend_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors that depend on ``--backend``: the per-CPU cap is this machine's; --address is Ray's."""
    if not hasattr(args, "backend"):
        return
    if args.backend is None:
        args.backend = os.environ.get(BACKEND_VARIABLE) or "local"
        if args.backend not in ("local", "ray"):
            parser.error(f"{BACKEND_VARIABLE}={args.backend!r}: must be 'local' or 'ray'")
    if args.backend == "local" and args.address is not None:
        parser.error("argument --address: only with --backend ray")
    if args.backend == "ray" and args.debug:
        parser.error("argument --debug: runs logic in this process; it does not go with --backend ray")
    if args.backend == "local" and args.processes is not None:
        try:
            _process_count(str(args.processes))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument --processes: {exc}")


def _size(text: str) -> int:
    """``500M``, ``2G``, ``1.5g``, ``512MiB``, ``100000000``: a number of bytes (units are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes or a number with K, M, G or T "
                                         "(powers of 1024), e.g. 500M or 2G")
    value = int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])
    if value < MIN_WORKER_RSS:
        raise argparse.ArgumentTypeError(f"{text} is below {MIN_WORKER_RSS // 2**20}M: an idle worker process "
                                         "alone uses about 16-20 MiB, so every activation would recycle it")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535; 0 picks a free port)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535; 0 picks a free port)")
    return value


def _file_name(text: str) -> str:
    if text == "-":
        raise argparse.ArgumentTypeError("needs a file name (stdout carries the JSONL output)")
    return text


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
        description="Post each JSONL line of the input as a job; write job outputs as JSONL.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cpus = usable_cpus()
    run.add_argument("target", metavar="TARGET", help="a .py file or dotted module that registers flows")
    run.add_argument("--flow", metavar="NAME", help="the flow to run, when TARGET registers several")
    run.add_argument("--entry", metavar="ROUTINE.SLOT", help="where jobs enter (default: the flow's only entry slot)")
    run.add_argument("--input", metavar="FILE|-",
                     help="JSONL input, - for stdin; gzip, bzip2 and xz are read transparently; one JSON object "
                          f"per line, nested at most {MAX_DEPTH} levels (default: TARGET's SAMPLE_INPUT)")
    run.add_argument("--output", metavar="FILE|-", help="JSONL output (default: stdout); must not be the input")
    run.add_argument("--order", choices=("input", "completion"), default="input",
                     help="write outputs in input order (default) or as jobs complete")
    run.add_argument("--failed-out", type=_file_name, metavar="FILE",
                     help="write every failed line as JSONL: line, job_id, input, error (type, message, traceback)")
    run.add_argument("--state-out", type=_file_name, metavar="FILE",
                     help="write every worker's final WorkerState as JSON (also when interrupted)")
    run.add_argument("--state", type=_file_name, metavar="DB",
                     help="keep WorkerState in this SQLite file and journal every input line's job in it, so an "
                          "interrupted run can be resumed (needs --output FILE and an input file)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run journaled in --state: skip completed lines, run unfinished ones again; "
                          "the output is appended, each completed line's outputs exactly once")
    run.add_argument("--retry-failed", action="store_true",
                     help="with --resume: run the lines that failed again too")
    run.add_argument("--processes", type=_positive_int, metavar="N",
                     help=f"worker processes (default: the {cpus} CPUs, or the Ray cluster's; at most "
                          f"{MAX_PROCESSES_PER_CPU} per CPU, {MAX_PROCESSES_PER_CPU * cpus} here)")
    run.add_argument("--backend", choices=("local", "ray"), default=None,
                     help="where workers run: this machine (default: ROUTILUX_MP_BACKEND, else local), or a Ray "
                          "cluster (pip install "
                          "'routilux-mp[ray]'; see the README's \"Run on a cluster\")")
    run.add_argument("--address", metavar="ADDR",
                     help="with --backend ray: 'auto' or HOST:PORT of a running cluster (default: RAY_ADDRESS, "
                          "else a private Ray instance on this machine)")
    run.add_argument("--max-worker-rss", type=_size, metavar="SIZE",
                     help="recycle a worker between activations past this RSS, kill it mid-activation past 1.5x "
                          f"(e.g. 500M, 2G; K/M/G/T are powers of 1024; at least {MIN_WORKER_RSS // 2**20}M)")
    run.add_argument("--max-failures", type=_positive_int, metavar="K",
                     help="stop after K failed jobs (cancel the rest, exit 1)")
    run.add_argument("--no-progress", action="store_true", help="plain log lines on stderr, even on a terminal")
    run.add_argument("--debug", action="store_true",
                     help="run logic in this process, one activation at a time (processes=0), so breakpoint() "
                          "in logic stops in pdb here; implies --no-progress")
    run.add_argument("--dashboard", type=_port, nargs="?", const=DEFAULT_PORT, metavar="PORT",
                     help=f"serve a live web page of the run on PORT (default {DEFAULT_PORT}; 0 picks a free one); "
                          "its URL, with a random token, is printed on stderr (needs the [dashboard] extra)")
    run.add_argument("--dashboard-host", metavar="HOST", default=DEFAULT_HOST,
                     help=f"the address the dashboard listens on (default {DEFAULT_HOST}: this machine only; use an "
                          "SSH tunnel to see it from elsewhere; another address is warned about)")
    run.set_defaults(handler=cmd_run)
    flows = commands.add_parser("flows", help="list the flows of TARGET with their routines and connections",
                                description="List flows, routines, slots, events, policies, connections (and which are fused).")
    flows.add_argument("target", metavar="TARGET", help="a .py file or dotted module that registers flows")
    flows.set_defaults(handler=cmd_flows)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``routilux-mp`` command; return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_backend_options(parser, args)
        if getattr(args, "dashboard_host", DEFAULT_HOST) != DEFAULT_HOST and args.dashboard is None:
            parser.error("--dashboard-host needs --dashboard")
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
