"""Benchmark routilux-mp side by side with what users would use instead, in the same run.

Scenarios (``--only NAME``, comma-separated for several):

* ``cpu``: ~30 ms pure-Python items through a parallel routine on N processes
  vs a serial loop, ``ProcessPoolExecutor(N)`` and routilux 1.1.0's thread
  runtime (when installed).
* ``tiny``: trivial activations per second, one at a time (post, wait) vs
  ``submit().result()``, and all at once vs ``map(chunksize=1)`` and joblib
  ``Parallel`` (automatic batching, and ``batch_size=1``).
* ``pipeline``: parse -> parallel 1 ms transform -> stateful collect, end to
  end, vs the same around ``ProcessPoolExecutor.map`` and joblib.
* ``state``: WorkerState get/update/increment per second from 1 and from N
  processes vs raw ``multiprocess`` Manager dict proxy calls.
* ``durable``: increments, updates and the 3-stage pipeline with WorkerState
  in a state file (``state_path``; ``state_sync`` normal and full) vs in
  memory.
* ``text``: a reduce-heavy text job on ``workers/data/`` (parse -> n-gram
  analysis -> ``increment_many`` of ~1,000 terms per document) vs parse +
  ``map`` + a ``Counter`` in the main process (``ProcessPoolExecutor``, joblib).
* ``startup``: ``Runtime(...)`` to first completed activation vs
  ``ProcessPoolExecutor`` (fork and spawn) to first result.
* ``lifecycle``: an idle runtime's ``shutdown()``, and a killed worker's
  replacement ready.
* ``memory``: idle worker RSS; supervisor RSS while streaming
  ``--stream-items`` tiny items through bounded queues.

Every scenario alternates its systems round by round (rotating the order) and
reports the median of the rounds, the spread, and ratios routilux-mp /
baseline of the medians, each with its direction ("higher is better" or "lower
is better") and, where the issue sets one, its target. Pools and runtimes are
started and warmed up before the timer in every round; start-up is measured
on its own. Numbers on a shared 2-core machine are noisy: read the per-round
range next to each ratio.

Examples::

    python scripts/bench.py                          # everything, table on stdout
    python scripts/bench.py --quick                  # smoke run (seconds, few items)
    python scripts/bench.py --only tiny,state --rounds 7 --json out.json
    python scripts/bench.py --plot bench.png         # also a chart (needs matplotlib)
    python scripts/bench.py --only tiny --systems routilux-mp   # only one side (for profiling)
    python scripts/bench.py --profile                # supervisor CPU per tiny activation, and where it goes
    python scripts/bench.py --profile pipeline       # the same per item of the 3-stage pipeline
    python scripts/bench.py --backend ray            # on Ray: vs the local backend, Ray tasks and actors
    python scripts/bench.py --backend ray --address auto   # ... on a running cluster

With ``--backend ray`` the scenarios are ``cpu`` and ``tiny`` of
``_bench_ray`` (routilux-mp on Ray vs the local backend vs Ray tasks and
actors, on the same cores); they need ``pip install -e '.[ray]'``.

Install the optional dependencies (joblib, routilux 1.1.0, matplotlib) with
``pip install -e '.[bench]'``; a baseline that is not installed is skipped with a note.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

#: Exit codes.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Seconds our leftover child processes get after SIGTERM at exit, before SIGKILL.
LEFTOVER_GRACE = 3.0
#: Items streamed by the memory scenario in --quick mode.
QUICK_STREAM_ITEMS = 20_000


def machine() -> dict[str, Any]:
    """CPU model, cores, Python, OS, date, load, and the versions under test."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    from _bench_scenarios import routilux_version

    import routilux_mp

    package = os.path.dirname(os.path.dirname(os.path.abspath(routilux_mp.__file__)))
    try:  # which code is measured: a checkout (commit, dirty or not) or a copy
        commit = subprocess.run(["git", "-C", package, "describe", "--always", "--dirty"], check=False,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": platform.platform(),
        "loadavg_start": _loadavg(),
        "routilux_mp": f"{routilux_mp.__version__} from {package}" + (f" (git {commit})" if commit else ""),
        "routilux": routilux_version(),
    }


@contextlib.contextmanager
def bytecode_as_installed() -> Iterator[str | None]:
    """Measure routilux-mp as installed: with its bytecode. Yields a note for the report, or None.

    With bytecode writing off (``PYTHONDONTWRITEBYTECODE``, ``-B``) a checkout
    without ``__pycache__`` makes every process of the run (each worker, the
    state server, a spawned baseline child importing these scripts) compile
    its modules from source: ~5,000 lines, 50-90 ms of CPU each, which an
    installed package (pip compiles on install) never pays. So they are
    compiled once, in place, and the ``__pycache__`` folders made for it are
    removed after the run. (Not into a private ``PYTHONPYCACHEPREFIX``: the
    children would then find no bytecode for the standard library either.)
    """
    import importlib.util

    spec = importlib.util.find_spec("routilux_mp.routine")
    if not sys.dont_write_bytecode or spec is None or spec.cached is None or os.path.exists(spec.cached):
        yield None
        return
    import routilux_mp

    package = os.path.dirname(os.path.abspath(routilux_mp.__file__))
    made = []
    compiled = True
    try:
        for folder in (package, HERE, os.path.join(os.path.dirname(HERE), "workers")):
            for path, dirs, files in os.walk(folder):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                if any(f.endswith(".py") for f in files) and not os.path.isdir(os.path.join(path, "__pycache__")):
                    made.append(os.path.join(path, "__pycache__"))
            compiled = compileall.compile_dir(folder, quiet=2) and compiled
        yield ("bytecode: writing it is off here and routilux-mp had none, so it was compiled once for this run "
               "(as pip does on install; removed afterwards)" if compiled else
               "bytecode: writing it is off here, routilux-mp has none and it could not be compiled (a read-only "
               "checkout?): every process of ours compiles its modules from source, inside the figures")
    finally:
        for cache in made:
            shutil.rmtree(cache, ignore_errors=True)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------- evaluation


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def evaluate(sc: Any, check: Any) -> dict[str, Any]:
    """Value, per-round range, direction, target and verdict of one check."""
    q = sc.quantities[check.quantity]
    mine = q.samples.get(check.system)
    out: dict[str, Any] = {"label": check.label, "quantity": check.quantity, "system": check.system,
                           "baseline": check.baseline, "higher_is_better": q.higher_is_better,
                           "target": check.target, "note": check.note, "value": None, "range": None, "best": None,
                           "met": None}
    if not mine:
        return out
    if check.baseline is None:
        out["value"] = q.median(check.system)
        out["range"] = [min(mine), max(mine)]
    else:
        theirs = q.samples.get(check.baseline)
        if not theirs:
            return out
        out["value"] = q.median(check.system) / q.median(check.baseline)
        paired = [a / b for a, b in zip(mine, theirs)]  # the same round: both ran minutes apart at most
        out["range"] = [min(paired), max(paired)]
        # Interference only ever slows a round down: the best rounds are the least disturbed.
        best = max if q.higher_is_better else min
        out["best"] = best(mine) / best(theirs)
    if check.target is not None:
        if q.higher_is_better:
            out["met"] = out["value"] >= check.target
        else:
            out["met"] = out["value"] <= check.target if check.baseline is not None else out["value"] < check.target
    return out


def render(info: dict[str, Any], cfg: Any, scenarios: list[Any], elapsed: float) -> str:
    """The plain-text report."""
    lines = [
        f"routilux-mp benchmark, {info['date']}",
        f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), {info['os']}",
        f"python:  {info['python']}; routilux-mp {info['routilux_mp']}; routilux {info['routilux'] or 'not installed'}",
        (f"run:     N={cfg.processes} processes, {cfg.rounds} rounds, {'quick' if cfg.quick else 'full'} mode, "
         f"{elapsed:.0f}s; load average {info['loadavg_start']} at start, {info.get('loadavg_end')} at end"),
    ]
    if info.get("bytecode"):
        lines += _wrap(info["bytecode"], 110, "")
    lines += _wrap(
        "checks: 'medians' = routilux-mp / baseline of the medians of the rounds (the verdict); 'per-round range' = "
        "that ratio round by round; 'bests' = of the best rounds (the least disturbed). 'other load' = cores that "
        "processes not ours kept busy meanwhile (about 0 on a quiet machine).", 110, "")
    for sc in scenarios:
        load = f", other load {sc.foreign_cores:.2f} cores" if sc.foreign_cores is not None else ""
        lines += ["", f"== {sc.name}: {sc.title} ({sc.seconds:.0f}s{load}) =="]
        lines += _wrap(sc.description, 110, "   ")
        if sc.error:
            lines.append(f"   FAILED: {sc.error}")
        for q in sc.quantities.values():
            if not q.samples:
                continue
            better = "higher is better" if q.higher_is_better else "lower is better"
            lines.append(f"  {q.label} [{q.unit}], {better}")
            lines.append(f"    {'system':<52} {'median':>10} {'min':>10} {'max':>10} {'rounds':>6}")
            for system, values in q.samples.items():
                lines.append(f"    {system:<52} {_fmt(q.median(system)):>10} {_fmt(min(values)):>10} "
                             f"{_fmt(max(values)):>10} {len(values):>6}")
        rows = [evaluate(sc, c) for c in sc.checks]
        if rows:
            lines.append(f"  {'check: routilux-mp / baseline (or absolute)':<60} {'better':>6} {'medians':>9} "
                         f"{'per-round range':>17} {'bests':>7} {'target':>9} {'met':>4}")
            for row in rows:
                absolute = row["baseline"] is None
                unit = "" if absolute else "x"
                value = f"{_fmt(row['value'])}{unit}" if row["value"] is not None else "n/a"
                spread = f"{_fmt(row['range'][0])}-{_fmt(row['range'][1])}{unit}" if row["range"] else ""
                target = ""
                if row["target"] is not None:
                    op = ">=" if row["higher_is_better"] else ("<" if absolute else "<=")
                    target = f"{op} {_fmt(row['target'])}{unit}"
                met = {True: "yes", False: "NO", None: "-" if row["target"] is None else "n/a"}[row["met"]]
                better = "higher" if row["higher_is_better"] else "lower"
                best = f"{_fmt(row['best'])}x" if row["best"] is not None else ""
                lines.append(f"    {row['label']:<58} {better:>6} {value:>9} {spread:>17} {best:>7} {target:>9} {met:>4}")
                if row["note"]:
                    lines.append(f"      ({row['note']})")
        for note in sc.notes:
            lines += _wrap("note: " + note, 110, "   ")
    return "\n".join(lines)


def _wrap(text: str, width: int, indent: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "  ") if text else []


def to_json(info: dict[str, Any], cfg: Any, scenarios: list[Any]) -> dict[str, Any]:
    """Raw results: every sample of every system, and every check."""
    return {
        "machine": info,
        "config": {"processes": cfg.processes, "rounds": cfg.rounds, "quick": cfg.quick,
                   "stream_items": cfg.stream_items, "timeout": cfg.timeout, "systems": cfg.systems},
        "scenarios": [
            {
                "name": sc.name, "title": sc.title, "description": sc.description, "seconds": round(sc.seconds, 2),
                "error": sc.error, "notes": sc.notes, "foreign_cores": sc.foreign_cores,
                "round_foreign_cores": sc.round_foreign_cores,
                "quantities": {key: {"label": q.label, "unit": q.unit, "higher_is_better": q.higher_is_better,
                                     "samples": q.samples,
                                     "medians": {s: q.median(s) for s in q.samples}}
                               for key, q in sc.quantities.items()},
                "checks": [evaluate(sc, c) for c in sc.checks],
            }
            for sc in scenarios
        ],
    }


def plot(path: str, info: dict[str, Any], scenarios: list[Any]) -> None:
    """A bar per check: routilux-mp relative to its baseline (> 1 = routilux-mp better), target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors, targets = [], [], [], []
    for sc in scenarios:
        for check in sc.checks:
            row = evaluate(sc, check)
            if row["value"] is None or row["value"] <= 0:
                continue
            # Normalize so that > 1 always means routilux-mp is better.
            if row["baseline"] is None:  # an absolute limit: headroom = limit / value
                if row["target"] is None:
                    continue
                rel, goal = row["target"] / row["value"], 1.0
                text = f"{sc.name}: {row['label']} (limit {_fmt(row['target'])})"
            elif row["higher_is_better"]:
                rel, goal = row["value"], row["target"]
                text = f"{sc.name}: {row['label']}"
            else:
                rel, goal = 1 / row["value"], (1 / row["target"] if row["target"] else None)
                text = f"{sc.name}: {row['label']} (inverted: lower is better)"
            labels.append(text)
            values.append(rel)
            targets.append(goal)
            colors.append("#999999" if row["met"] is None else ("#2a9d4b" if row["met"] else "#d1495b"))
    height = max(3.0, 0.38 * len(labels) + 1.5)
    fig, ax = plt.subplots(figsize=(11, height))
    y = list(range(len(labels)))[::-1]
    ax.barh(y, values, color=colors)
    for yi, goal in zip(y, targets):
        if goal:
            ax.plot([goal, goal], [yi - 0.4, yi + 0.4], color="black", linewidth=2)
    ax.axvline(1.0, color="#555555", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("routilux-mp relative to baseline (> 1 = routilux-mp better; black tick = target; log scale)")
    ax.set_title(f"routilux-mp {info['routilux_mp']}\n{info['cpu']}, {info['usable_cores']} cores, "
                 f"{info['python']}, {info['date'][:16]}", fontsize=9)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.2f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- processes


def leftover_children() -> list[Any]:
    import psutil

    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            # A spawn pool's resource tracker lives until we exit, by design (it exits when we do).
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                alive.append(child)
        except psutil.Error:
            continue
    return alive


def reap_leftovers() -> list[str]:
    """Stop child processes still alive at exit (there should be none); describe them."""
    import psutil

    found = leftover_children()
    if not found:
        return []
    _, alive = psutil.wait_procs(found, timeout=LEFTOVER_GRACE)  # a pool's processes may still be exiting
    described = []
    for proc in alive:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
            proc.terminate()
        except psutil.Error:
            continue
    _, still = psutil.wait_procs(alive, timeout=LEFTOVER_GRACE)
    for proc in still:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return described


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark routilux-mp against a serial loop, ProcessPoolExecutor, Manager proxies and "
        "routilux 1.1.0, side by side in one run.",
        epilog=__doc__.split("Examples::", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--processes", type=int, default=None, help="worker processes N (default: usable CPUs)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per scenario (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke mode: fewer rounds and items (for tests and CI)")
    parser.add_argument("--only", default=None,
                        help="comma-separated scenarios: cpu,tiny,pipeline,state,durable,text,startup,lifecycle,memory")
    parser.add_argument("--systems", default=None,
                        help="comma-separated substrings: run only systems whose label contains one (e.g. routilux-mp)")
    parser.add_argument("--stream-items", type=int, default=None,
                        help=f"items streamed by 'memory' (default 1,000,000; {QUICK_STREAM_ITEMS:,} with --quick)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="ray: the Ray scenarios (routilux-mp on Ray vs local vs Ray tasks and actors)")
    parser.add_argument("--address", default=None,
                        help="with --backend ray: a running cluster ('auto', HOST:PORT; default: a private instance)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds any single wait may take (default 120)")
    parser.add_argument("--json", metavar="FILE", help="save raw results (every sample) as JSON")
    parser.add_argument("--profile", nargs="?", const="tiny", choices=["tiny", "pipeline"],
                        help="instead of the scenarios: profile the supervisor on tiny activations (default) or "
                        "on the pipeline's flow (CPU per item, then the functions with the most own time, every "
                        "thread)")
    parser.add_argument("--profile-items", type=int, default=5000, help="items of the --profile run (default 5000)")
    parser.add_argument("--plot", metavar="FILE", nargs="?", const="bench.png",
                        help="write a PNG chart of the ratios (default file: bench.png; needs matplotlib)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import _bench_scenarios as bs

    scenarios = bs.SCENARIOS
    if args.backend == "ray":
        try:
            import _bench_ray
            import ray  # noqa: F401 - only to say early that it is missing
        except ImportError as exc:
            print(f"bench.py: --backend ray needs Ray ({exc}): pip install -e '.[ray]'", file=sys.stderr)
            return EXIT_USAGE
        scenarios = _bench_ray.SCENARIOS
    elif args.address is not None:
        print("bench.py: --address is for --backend ray", file=sys.stderr)
        return EXIT_USAGE
    names = list(scenarios) if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in names if s not in scenarios]
    if unknown or not names:
        print(f"bench.py: unknown scenario(s) {unknown}; choose from {', '.join(scenarios)}", file=sys.stderr)
        return EXIT_USAGE
    if args.processes is not None and args.processes < 1 or args.rounds is not None and args.rounds < 1:
        print("bench.py: --processes and --rounds must be positive", file=sys.stderr)
        return EXIT_USAGE
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("bench.py: --plot needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
            return EXIT_USAGE
    from routilux_mp.runtime import _cpu_count

    cfg = bs.Config(
        processes=args.processes or _cpu_count(),
        rounds=args.rounds or (2 if args.quick else 5),
        quick=args.quick,
        stream_items=args.stream_items or (QUICK_STREAM_ITEMS if args.quick else 1_000_000),
        timeout=args.timeout,
        systems=[s.strip() for s in args.systems.split(",")] if args.systems else None,
    )
    # Ctrl-C and SIGTERM end the run through KeyboardInterrupt, so every `with Runtime` block shuts down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with bytecode_as_installed() as bytecode:
        return run(args, cfg, scenarios, names, bytecode)


def run(args: argparse.Namespace, cfg: Any, scenarios: dict[str, Any], names: list[str], bytecode: str | None) -> int:
    """Run the scenarios ``names`` (or the profile) and print the report; the exit code."""
    import _bench_scenarios as bs

    info = machine()
    info["bytecode"] = bytecode
    bs.register_rmp_flows()
    if args.profile:
        from _bench_profile import profile

        print(profile(cfg.processes, args.profile_items, cfg.timeout, args.profile))
        return EXIT_FAILED if reap_leftovers() else EXIT_OK
    if args.backend == "ray":
        import _bench_ray

        _bench_ray.open_ray(cfg, args.address)
        info["ray"] = __import__("ray").__version__
    started = time.perf_counter()
    results = []
    failed = False
    try:
        for name in names:
            bs.log(f"scenario {name} ...")
            t0 = time.perf_counter()
            meter = bs.CpuMeter()
            try:
                sc = scenarios[name](cfg)
            except Exception as exc:  # noqa: BLE001 - a failed scenario is reported; the others still run
                failed = True
                sc = bs.Scenario(name, "(failed)")
                sc.error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc(file=sys.stderr)
            sc.seconds = time.perf_counter() - t0
            sc.foreign_cores = meter.foreign_cores()
            results.append(sc)
    except KeyboardInterrupt:
        print("bench.py: interrupted; reporting what finished", file=sys.stderr)
        failed = True
    finally:
        if args.backend == "ray":
            import _bench_ray

            _bench_ray.close_ray()
    elapsed = time.perf_counter() - started
    info["loadavg_end"] = _loadavg()
    print(render(info, cfg, results, elapsed))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(to_json(info, cfg, results), f, indent=1)
        bs.log(f"raw results written to {args.json}")
    if args.plot:
        plot(args.plot, info, results)
        bs.log(f"chart written to {args.plot}")
    leftovers = reap_leftovers()
    if leftovers:
        print(f"bench.py: child processes were left behind and have been stopped: {leftovers}", file=sys.stderr)
        failed = True
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
