"""The benchmark harness runs end to end (a smoke run: no timing is asserted here).

Each scenario checks its own results (totals, lost updates) and records an
error instead of numbers when something is wrong, so a harness that rots shows
up here rather than the next time someone measures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = {"cpu", "tiny", "pipeline", "state", "durable", "startup", "memory"}


def test_bench_quick_run_measures_every_scenario(tmp_path, python_env) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--quick", "--rounds", "1", "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=300, env=python_env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {sc["name"] for sc in results["scenarios"]} == SCENARIOS
    for sc in results["scenarios"]:
        assert sc["error"] is None, f"{sc['name']}: {sc['error']}"
        assert sc["checks"], f"{sc['name']} computed no ratio"
        for check in sc["checks"]:
            assert check["value"] > 0, f"{sc['name']}: {check['label']} = {check['value']}"
    memory = next(sc for sc in results["scenarios"] if sc["name"] == "memory")
    peak = memory["quantities"]["supervisor_peak_mb"]["medians"]
    assert next(iter(peak.values())) < 200, "the supervisor's memory must stay bounded while streaming"
    assert "routilux-mp" in proc.stdout and "median" in proc.stdout
