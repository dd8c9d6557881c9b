"""What a worker's start-up imports, and the constants ``_process`` keeps so that it need not import more."""

from __future__ import annotations

import subprocess
import sys


def test_the_spawn_defaults_are_subprocess_s_own_constants() -> None:
    from routilux_mp import _process

    assert (_process.DEVNULL, _process.PIPE) == (subprocess.DEVNULL, subprocess.PIPE)


def test_a_worker_starts_without_importing_subprocess_shutil_or_hashlib() -> None:
    # A fresh interpreter, as a worker is: these modules cost start-up time and a worker seldom needs them.
    code = ("import sys, routilux_mp._exec._child; "
            "print(sorted(m for m in ('subprocess', 'shutil', 'hashlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stderr
