"""What the ``routilux-mp`` command shows: live progress, the process table, the summary, flow listings.

Two displays share one interface; :func:`make_display` picks one:

* :class:`LiveDisplay` (stderr is a terminal): a rich ``Live`` region with a
  progress bar (done / failed / rate / ETA) and a per-process table (pid, RSS,
  CPU%, activations, restarts), redrawn a few times a second. Messages and
  worker output scroll above it.
* :class:`PlainDisplay` (``--no-progress``, or stderr is not a terminal): one
  progress line every few seconds, fit for log files and CI.

Only the CLI's main thread calls ``start``/``update``/``stop``/``summary``;
``message`` and ``worker_output`` are also called from the runtime's dispatcher
thread, which is safe because rich's console serializes output under its lock.
"""

from __future__ import annotations

import io
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._fusion import fusion_plan
from .errors import RoutiluxError
from .flow import Flow

__all__ = [
    "AboveLiveDisplay",
    "Display",
    "DisplayLogHandler",
    "LiveDisplay",
    "PlainDisplay",
    "RateMeter",
    "Tally",
    "bottleneck_hint",
    "describe_flow",
    "make_display",
]

#: Seconds between redraws of the live progress bar.
LIVE_REFRESH = 0.25
#: Seconds between samples of ``runtime.stats()`` (it asks psutil about every process and the state server).
STATS_REFRESH = 0.5
#: Seconds between progress lines in plain mode.
PLAIN_INTERVAL = 2.0
#: A routine busy less than this share of its capacity did not bound the run.
SATURATED = 0.5
#: Seconds between samples of the job rate.
RATE_SAMPLE = 0.5
#: Time constant (seconds) of the smoothed job rate: how fast it follows a change of pace.
RATE_TIME_CONSTANT = 5.0
#: Finished jobs, and seconds since the first one finished, before an ETA is shown.
ETA_MIN_JOBS = 10
ETA_MIN_SECONDS = 3.0


class RateMeter:
    """Jobs per second, smoothed, and the ETA it gives.

    Measured from the first finished job (start-up is not throughput). The
    rate is a ratio of two exponentially decaying sums, jobs over seconds,
    with a :data:`RATE_TIME_CONSTANT` time constant, sampled every
    :data:`RATE_SAMPLE` seconds: early on it is the plain mean since the first
    job finished, later recent samples weigh most. Bursts (a batch policy
    releasing 50 jobs at once) and a slow first job move it little; a lasting
    change of pace moves it within seconds. Before :data:`ETA_MIN_JOBS` jobs
    and :data:`ETA_MIN_SECONDS` of measurement there is no ETA.
    """

    def __init__(self) -> None:
        self._first: float | None = None  # when the first job finished
        self._last: float | None = None  # time of the last sample
        self._last_count = 0  # jobs finished at the last sample
        self._jobs = 0.0  # decaying sum of jobs finished between samples
        self._seconds = 0.0  # decaying sum of the seconds they took

    def sample(self, processed: int, now: float) -> None:
        """Record that ``processed`` jobs have finished at ``now`` (cheap: samples are rate-limited)."""
        if self._last is None:
            if processed:
                self._first = self._last = now
                self._last_count = processed
            return
        span = now - self._last
        if span < RATE_SAMPLE:
            return
        decay = math.exp(-span / RATE_TIME_CONSTANT)
        self._jobs = self._jobs * decay + (processed - self._last_count)
        self._seconds = self._seconds * decay + span
        self._last, self._last_count = now, processed

    @property
    def rate(self) -> float:
        """The smoothed jobs per second (0.0 until measured)."""
        return self._jobs / self._seconds if self._seconds else 0.0

    def eta(self, remaining: int, processed: int, now: float) -> float | None:
        """Seconds until ``remaining`` more jobs are done at the smoothed rate, or ``None`` if not known yet."""
        rate = self.rate
        if self._first is None or rate <= 0 or processed < ETA_MIN_JOBS or now - self._first < ETA_MIN_SECONDS:
            return None
        return max(remaining, 0) / rate


@dataclass
class Tally:
    """Where a run stands. ``total`` is ``None`` while unknown (input from a stream)."""

    total: int | None
    started: float
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    meter: RateMeter = field(default_factory=RateMeter)

    @property
    def done(self) -> int:
        """Jobs that reached a terminal status."""
        return self.completed + self.failed + self.cancelled

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def processed(self) -> int:
        """Jobs that ran to the end, well or not (cancelled ones did not)."""
        return self.completed + self.failed

    def sample(self, now: float | None = None) -> None:
        """Feed the rate meter (the displays call it on every update)."""
        self.meter.sample(self.processed, time.monotonic() if now is None else now)

    @property
    def rate(self) -> float:
        """Recent jobs per second, smoothed (see :class:`RateMeter`)."""
        return self.meter.rate

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left, or ``None`` when the total is unknown or too few jobs were measured."""
        if self.total is None:
            return None
        return self.meter.eta(self.total - self.done, self.processed, time.monotonic() if now is None else now)


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f} MiB"


def _clock(seconds: float) -> str:
    """``0:07``, ``12:30``, ``1:02:03``: an ETA as a clock reads."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _count(tally: Tally) -> str:
    return f"{tally.done}/{tally.total}" if tally.total is not None else str(tally.done)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _lanes(routine: dict, processes: int) -> int:
    """How many activations of a routine could run at once."""
    return max(1, min(routine["max_concurrency"], processes))


def _utilization(routine: dict, wall: float, processes: int) -> float:
    """Busy time of a routine over what it could have used: the wall time times its parallelism."""
    return routine["busy_seconds"] / (wall * _lanes(routine, processes)) if wall > 0 else 0.0


def bottleneck_hint(routines: dict[str, dict], wall: float, processes: int, cpus: int) -> str | None:
    """Name the routine that bounded the run, and what to do about it.

    Args:
        routines: ``runtime.stats()["routines"]``.
        wall: seconds the run took.
        processes: worker processes of the run.
        cpus: CPUs this machine lets us use.

    Returns:
        One sentence, or ``None`` when nothing ran.
    """
    ran = {rid: r for rid, r in routines.items() if r["activations"]}
    if not ran or wall <= 0:
        return None
    rid, routine = max(ran.items(), key=lambda item: _utilization(item[1], wall, processes))
    share = _utilization(routine, wall, processes)
    busy = f"{min(share, 1.0):.0%}"  # busy time is measured in the workers; clock skew may top 100%
    lanes = _lanes(routine, processes)
    if share < SATURATED:
        return (f"no routine was busy more than {busy} of its capacity (the busiest is {rid!r}): the run was bound "
                "by feeding and dispatching jobs, not by logic; give each job more work (bigger input lines, "
                "batch_size_policy(); in a batch, emit per item with emit(..., job=job_of(item)), as an emit "
                "naming no job belongs to the whole batch) or read the input faster")
    if routine["max_concurrency"] == 1:
        hint = (f"{rid!r} was busy {busy} of the run and is serial: set_max_concurrency() to spread it over "
                "processes (with worker_state's atomic operations for shared updates)")
        return hint + (", and run with more --processes" if processes == 1 else "")
    if lanes < processes:
        return (f"{rid!r} was busy {busy} of its {lanes} concurrent activations: raise set_max_concurrency() "
                f"(None uses all {processes} processes)")
    if processes < cpus:
        return (f"{rid!r} kept all {processes} processes busy {busy} of the run: run with more --processes "
                f"(this machine has {cpus} CPUs)")
    return (f"{rid!r} kept all {processes} processes busy {busy} of the run: if it waits on I/O, run with more "
            "--processes; if it computes, make its logic cheaper or run on more cores")


class Display:
    """The shared part: messages, worker output, and the final summary."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def start(self, tally: Tally, stats: Callable[[], dict]) -> None:
        """Begin showing progress; ``stats`` is ``runtime.stats``."""

    def update(self, tally: Tally) -> None:
        """Show the latest progress; cheap to call often (it rate-limits itself)."""

    def stop(self, tally: Tally) -> None:
        """Stop showing progress (before the summary)."""

    def message(self, text: str) -> None:
        """A line for the user (above the live region, if any)."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def print_lines(self, text: str) -> None:
        """Complete lines as they are (no markup, no wrapping), above the live region if any."""
        self.console.out(text.rstrip("\n"), highlight=False)

    def worker_output(self, stream: str, text: str) -> None:
        """Lines a worker printed: never to stdout, which carries the JSONL output."""
        self.print_lines(text)

    def summary(self, flow_name: str, tally: Tally, wall: float, stats: dict, processes: int, cpus: int,
                stopped: str | None = None) -> None:
        """Totals, throughput, per-routine busy time and latency, and the bottleneck hint.

        ``stopped`` says why the run ended early, if it did.
        """
        rate = tally.processed / wall if wall > 0 else 0.0
        self.message(
            f"routilux-mp: flow {flow_name!r}{f' (stopped: {stopped})' if stopped else ''}: {tally.done} jobs in "
            f"{wall:.2f} s, {rate:.1f} jobs/s on {processes} processes: {tally.completed} completed, "
            f"{tally.failed} failed, {tally.cancelled} cancelled"
        )
        routines = stats.get("routines", {})
        if not routines:
            return
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
        table.add_column("routine")
        for header in ("activations", "errors", "busy", "busy %", "lanes", "p50 latency", "p99 latency"):
            table.add_column(header, justify="right")
        for rid, r in routines.items():
            table.add_row(rid, str(r["activations"]), str(r["errors"]), f"{r['busy_seconds']:.2f} s",
                          f"{_utilization(r, wall, processes):.0%}", str(_lanes(r, processes)),
                          _duration(r["p50_latency"]), _duration(r["p99_latency"]))
        self.console.print(table)
        hint = bottleneck_hint(routines, wall, processes, cpus)
        if hint:
            self.message(f"bottleneck: {hint}")


class PlainDisplay(Display):
    """A progress line on stderr every :data:`PLAIN_INTERVAL` seconds."""

    def start(self, tally: Tally, stats: Callable[[], dict]) -> None:
        self._stats = stats
        self._last = time.monotonic()
        stats()  # starts psutil's CPU accounting, so the first line shows a real CPU%

    def update(self, tally: Tally) -> None:
        now = time.monotonic()
        tally.sample(now)
        if now - self._last < PLAIN_INTERVAL:
            return
        self._last = now
        of = f"/{tally.total}" if tally.total is not None else ""
        line = f"routilux-mp: {tally.done}{of} jobs done ({tally.failed} failed), {tally.rate:.1f} jobs/s"
        eta = tally.eta(now)
        if eta is not None:
            line += f", ETA {_clock(eta)}"
        try:
            procs = [p for p in self._stats()["processes"] if p["alive"]]
        except RoutiluxError:  # stopping or broken: the counts above still hold
            procs = []
        if procs:
            rss = sum(p["rss"] or 0 for p in procs)
            cpu = sum(p["cpu_percent"] or 0.0 for p in procs)
            line += f"; {len(procs)} processes, {_mib(rss)} RSS, {cpu:.0f}% CPU"
        self.message(line)


class LiveDisplay(Display):
    """A rich ``Live`` region: the progress bar and the per-process table."""

    def start(self, tally: Tally, stats: Callable[[], dict]) -> None:
        self._stats = stats
        self._processes: list[dict] = []
        self._last_draw = self._last_stats = float("-inf")
        self._progress = Progress(
            TextColumn("jobs"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TextColumn("{task.fields[failed]} failed"),
            TextColumn("{task.fields[rate]:.1f} jobs/s"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
            auto_refresh=False,
        )
        # Without a total (input from a pipe) the bar pulses and the count stands alone: no fake total.
        self._task = self._progress.add_task("jobs", total=tally.total, count=_count(tally), failed=0, rate=0.0,
                                             eta="-")
        # The main loop drives redraws: no refresh thread racing it for the stats.
        self._live = Live(self._render(), console=self.console, auto_refresh=False,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start(refresh=True)

    def update(self, tally: Tally, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < LIVE_REFRESH:
            return
        self._last_draw = now
        tally.sample(now)
        if force or now - self._last_stats >= STATS_REFRESH:
            self._last_stats = now
            try:
                self._processes = self._stats()["processes"]
            except RoutiluxError:  # stopping or broken: keep the last table
                pass
        eta = tally.eta(now)
        self._progress.update(self._task, completed=tally.done, count=_count(tally), failed=tally.failed,
                              rate=tally.rate, eta="-" if eta is None else _clock(eta))
        self._live.update(self._render(), refresh=True)

    def stop(self, tally: Tally) -> None:
        self.update(tally, force=True)
        self._live.stop()

    def _render(self) -> RenderableType:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for header in ("process", "pid", "RSS", "CPU%", "activations", "restarts"):
            table.add_column(header, justify="right")
        for p in self._processes:
            cpu = "-" if p["cpu_percent"] is None else f"{p['cpu_percent']:.0f}"
            pid = str(p["pid"]) if p["alive"] else "(restarting)"
            table.add_row(str(p["index"]), pid, _mib(p["rss"]), cpu, str(p["activations"]), str(p["restarts"]))
        return Group(self._progress, table)


def describe_flow(name: str, flow: Flow) -> str:
    """A readable listing of one flow: routines, slots, events, policies, connections, entry slots."""
    fed: dict[tuple[str, str], list[str]] = {}
    for conn in flow.connections:
        fed.setdefault((conn.source_id, conn.event), []).append(f"{conn.target_id}.{conn.slot}")
    entries = flow.entry_slots()
    lines = [f"flow {name!r}" + (f" (flow_id {flow.flow_id!r})" if flow.flow_id != name else "")]
    for rid, routine in flow.routines.items():
        lines.append(f"  routine {rid!r} ({type(routine).__name__})")
        for slot in routine.slots.values():
            mark = "  <- entry" if (rid, slot.name) in entries else ""
            lines.append(f"    slot  {slot.name} (max_queue_length {slot.max_queue_length}){mark}")
        for event in routine.events.values():
            targets = ", ".join(fed.get((rid, event.name), [])) or "job output"
            lines.append(f"    event {event.name}({', '.join(event.params)}) -> {targets}")
        policy = repr(routine.activation_policy) if routine.activation_policy else "immediate_policy() (default)"
        concurrency = routine.max_concurrency
        lanes = "one per process" if concurrency is None else ("serial" if concurrency == 1 else "parallel")
        lines.append(f"    policy {policy}; max_concurrency {concurrency} ({lanes})")
        if routine.timeout is not None:
            lines.append(f"    timeout {routine.timeout} s")
        if routine.error_handler is not None:
            lines.append(f"    error handler {routine.error_handler!r}")
        if not routine.fusion:
            lines.append("    fusion off (set_fusion(False))")
    lines.append("  connections (fused: the target runs in the worker that emitted, in the same activation):")
    plan = fusion_plan(flow)
    for conn in flow.connections:
        why = plan[(conn.source_id, conn.event, conn.target_id, conn.slot)]
        lines.append(f"    {conn!r}  " + ("[fused]" if why is None else f"[not fused: {why}]"))
    if not flow.connections:
        lines.append("    none")
    lines.append("  entry slots: " + (", ".join(f"{rid}.{slot}" for rid, slot in entries) or "none"))
    return "\n".join(lines)


class AboveLiveDisplay(io.TextIOBase):
    """Stdout when it is the terminal the live display draws on: lines go above the live region.

    Written straight to the terminal they would land inside the region and garble both.
    """

    def __init__(self, display: Display) -> None:
        super().__init__()
        self.display = display

    def write(self, text: str) -> int:
        self.display.print_lines(text)
        return len(text)


class DisplayLogHandler(logging.Handler):
    """Library warnings (lost updates, restarts) go through the display, above the live region."""

    def __init__(self, display: Display) -> None:
        super().__init__(logging.WARNING)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.display.message(f"routilux-mp: {record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # noqa: BLE001 -- logging's own convention
            self.handleError(record)


class LogRecordsHandler(logging.Handler):
    """Log records (workers' included, with where they come from) above the live region, when the flow's
    module configured no logging: WARNING and up, as Python's own last-resort handler would show them."""

    def __init__(self, display: Display) -> None:
        super().__init__(logging.WARNING)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("routilux_mp"):  # the library's own: DisplayLogHandler shows them
            return
        try:
            where = ""
            if getattr(record, "worker", None) is not None:
                job = getattr(record, "job_id", None)
                routine = getattr(record, "routine", None)
                where = (f"worker {record.worker} (pid {getattr(record, 'pid', '?')})"
                         + (f", job {job}" if job else "") + (f", routine {routine!r}" if routine else "") + ": ")
            text = f"{where}{record.levelname} {record.name}: {record.getMessage()}"
            if record.exc_text:
                text += "\n" + record.exc_text
            self.display.message(text)
        except Exception:  # noqa: BLE001 -- logging's own convention
            self.handleError(record)


def route_logging(display: Display) -> Callable[[], None]:
    """Show log records (workers' are replayed in this process) above the live region; return the undo.

    Handlers the flow's module set up on the root logger that write to stderr
    (``logging.basicConfig()``) keep their level and format and write through
    the display; without any, :class:`LogRecordsHandler` shows WARNING and up.
    """
    root = logging.getLogger()
    undo: list[Callable[[], Any]] = []
    stderr = {id(sys.stderr), id(sys.__stderr__)}
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and id(handler.stream) in stderr:
            old = handler.setStream(AboveLiveDisplay(display))
            undo.append(lambda handler=handler, old=old: handler.setStream(old))
    if not root.handlers:
        handler = LogRecordsHandler(display)
        root.addHandler(handler)
        undo.append(lambda: root.removeHandler(handler))

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore


def make_display(live: bool) -> Display:
    """A :class:`LiveDisplay` when ``live`` (stderr is a terminal), else a :class:`PlainDisplay`."""
    console = Console(stderr=True, highlight=False)
    return LiveDisplay(console) if live else PlainDisplay(console)
