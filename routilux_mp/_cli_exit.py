"""Exit codes of the ``routilux-mp`` command and the error that ends it with one.

Every CLI module raises :class:`CliError`; :func:`routilux_mp.cli.main` prints
its message and returns its code. The codes are re-exported by
:mod:`routilux_mp.cli`, where users look for them.
"""

from __future__ import annotations

import os

#: Every job completed.
EXIT_OK = 0
#: Some jobs failed (or ``--max-failures`` stopped the run, or an output could not be written).
EXIT_JOBS_FAILED = 1
#: Bad usage or bad input (the input line is named); also input that changed while it was read.
EXIT_USAGE = 2
#: TARGET or its flow could not be loaded.
EXIT_LOAD_FAILED = 3
#: Ctrl-C or SIGTERM.
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """Raised to end the command with ``code`` after printing ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
