"""Loading what ``routilux-mp`` runs: TARGET (a ``.py`` file or a dotted module), its flow and entry slot.

Everything here runs before any process starts, so a mistake costs nothing:
a file or module that cannot be imported, or registers no flow, exits 3
(:data:`~routilux_mp._cli_exit.EXIT_LOAD_FAILED`) with the user's own
traceback; an ambiguous choice exits 2 and lists what there is to choose from.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import traceback
from types import ModuleType

import cloudpickle

from ._cli_exit import EXIT_LOAD_FAILED, EXIT_USAGE, CliError
from .errors import FlowError
from .flow import Flow
from .monitoring.flow_registry import FlowRegistry

__all__ = ["choose_entry", "choose_flow", "load_target", "sample_input"]


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


def sample_input(target: str, module: ModuleType) -> str:
    """The path of TARGET's bundled ``SAMPLE_INPUT`` (relative to the module's file), for a run without --input."""
    sample = getattr(module, "SAMPLE_INPUT", None)
    if sample is None:
        raise CliError(EXIT_USAGE, f"{target!r} defines no SAMPLE_INPUT: give --input FILE (or - for stdin)")
    return os.path.join(os.path.dirname(os.path.abspath(module.__file__ or "")), os.fspath(sample))
