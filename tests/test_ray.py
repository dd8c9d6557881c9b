"""The Ray backend: what is particular to it (the fault table, state and pipeline tests run on it too).

Every test here runs on the session's one-machine Ray cluster (``ray_support``);
the node-loss tests add a second node and remove it in the middle of a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import psutil
import pytest
from helpers import WAIT, by_value, pool_ready, single_flow, wait_until
from ray_support import HEAD_CPUS, is_ray_process, live_actors, ray_options, wait_no_live_actors

from routilux_mp import ClusterError, ErrorHandler, RoutiluxError, Runtime
from routilux_mp._exec._raychild import NODE_VARIABLE

by_value(__name__)


def _where(routine, slot_data, message, ws):
    print(f"line from {os.getpid()}", flush=True)
    print(f"error line from {os.getpid()}", file=sys.stderr, flush=True)
    routine.emit("out", pid=os.getpid(), node=os.environ.get(NODE_VARIABLE))


def test_output_of_logic_on_the_cluster_reaches_the_driver_and_stats_show_the_lanes(make_runtime, ray_cluster):
    lines: list[tuple[str, str]] = []
    single_flow("where", _where, concurrency=None)
    runtime = make_runtime(processes=2, worker_output=lambda stream, text: lines.append((stream, text)),
                           **ray_options(ray_cluster))
    jobs = [runtime.post("where", "r", "in", {})[1] for _ in range(6)]
    assert runtime.wait_until_all_jobs_finished(WAIT)
    assert [job.status for job in jobs] == ["completed"] * 6
    pids = {job.outputs[0]["data"]["pid"] for job in jobs}
    assert os.getpid() not in pids
    assert all(job.outputs[0]["data"]["node"] for job in jobs), "the worker knows its Ray node (its lock owner)"
    pool_ready(runtime)
    processes = runtime.stats()["processes"]
    assert len(processes) == 2 and all(p["alive"] and p["rss"] > 0 for p in processes)
    runtime.shutdown()  # the last lines arrive before shutdown returns
    # worker_output gets complete lines, several at once when they arrived together.
    seen = {(stream, line) for stream, text in lines for line in text.splitlines()}
    for pid in pids:
        assert ("stdout", f"line from {pid}") in seen
        assert ("stderr", f"error line from {pid}") in seen


def test_processes_defaults_to_the_clusters_cpus(make_runtime, ray_cluster):
    runtime = make_runtime(processes=None, **ray_options(ray_cluster))
    assert runtime.processes == HEAD_CPUS


def test_the_state_server_listens_on_the_cluster_address_with_the_key(make_runtime, ray_cluster):
    from multiprocess import connection

    runtime = make_runtime(processes=1, **ray_options(ray_cluster))
    address = runtime._testing.state_address
    assert isinstance(address, tuple) and address[0] not in ("0.0.0.0", ""), address
    with pytest.raises((connection.AuthenticationError, EOFError, ConnectionError)):
        connection.Client(address, authkey=b"not the key")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backend": "ray", "address": "ray://head:10001"}, r"Ray Client address.*ray job submit"),
        ({"backend": "ray", "address": ""}, r"address must be None, 'auto' or 'host:port'"),
        ({"backend": "ray", "address": "127.0.0.1:1"}, r"could not connect to the Ray cluster at '127.0.0.1:1'"),
    ],
    ids=["ray-client", "empty", "unreachable"],
)
def test_bad_addresses_are_refused_clearly(options, message, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
    monkeypatch.setattr(ray, "init", _refuse_init)
    with pytest.raises(ClusterError, match=message) as info:
        Runtime(processes=1, **options)
    assert isinstance(info.value, RoutiluxError)


def _refuse_init(**kwargs):
    raise ConnectionError(f"Could not find any running Ray instance at {kwargs.get('address')}")


def test_a_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ClusterError, match=r"pip install 'routilux-mp\[ray\]'"):
        Runtime(processes=1, backend="ray")


@pytest.mark.parametrize(("options", "message"), [
    ({"backend": "dask"}, r"backend must be 'local' or 'ray', got 'dask'"),
    ({"address": "auto"}, r"address='auto' is for backend='ray'"),
], ids=["unknown-backend", "address-without-ray"])
def test_bad_backend_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Runtime(processes=1, **options)


# -- node loss -----------------------------------------------------------------------------------------------


def _work(routine, slot_data, message, ws):
    item = slot_data["in"][0]
    ws.increment("progress", os.environ.get(NODE_VARIABLE) or "?")
    deadline = time.monotonic() + item["seconds"]
    while time.monotonic() < deadline:  # CPU-bound work
        pass
    routine.emit("out", i=item["i"], node=os.environ.get(NODE_VARIABLE))


@pytest.mark.parametrize("handler", [None, "retry"], ids=["fail", "retry"])
def test_losing_a_node_mid_run_ends_every_job_exactly_once(make_runtime, ray_cluster, extra_node, handler):
    lost = extra_node.node_id
    single_flow("work", _work, concurrency=None,
                handler=ErrorHandler("retry", max_retries=3, retry_delay=0.01) if handler else None)
    # One more lane than the head's CPUs: exactly one lane lands on the extra node.
    runtime = make_runtime(processes=HEAD_CPUS + 1, max_crash_retries=5, **ray_options(ray_cluster))
    ws = runtime.exec("work")
    jobs = [runtime.post("work", "r", "in", {"i": i, "seconds": 0.3})[1] for i in range(60)]
    wait_until(lambda: (ws.get_routine_state("progress") or {}).get(lost, 0) >= 2,
               "the lane on the extra node to run activations", job=jobs[-1])
    ray_cluster.remove_node(extra_node, allow_graceful=False)  # its raylet is SIGKILLed, as a machine lost
    assert runtime.wait_until_all_jobs_finished(WAIT), "every job ends (nothing hangs)"

    statuses = [job.status for job in jobs]
    assert set(statuses) <= {"completed", "failed"}, statuses
    for job in jobs:
        if job.status == "completed":
            assert len(job.outputs) == 1, "a job ends exactly once: one output, never a duplicate"
        else:
            assert job.error["type"] == "routilux_mp.errors.WorkerCrashedError", job.error
            assert "Ray actor" in job.error["message"] and "on node" in job.error["message"], job.error["message"]
    failed = statuses.count("failed")
    if handler == "retry":
        assert failed == 0, [job.error for job in jobs if job.error]
    else:
        assert 1 <= failed <= 2, "only the activation(s) held by the lost lane fail"
    assert runtime.stats()["jobs"] == {s: statuses.count(s) for s in set(statuses)}
    runtime.shutdown()


# -- the driver dies -----------------------------------------------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import json, os, sys, time
    from routilux_mp import Flow, FlowRegistry, Routine, Runtime

    class Spin(Routine):
        def __init__(self):
            super().__init__()
            self.add_slot("in")
            def logic(slot_data, message, worker_state):
                worker_state.increment("spin", "started")
                while True:
                    pass
            self.set_logic(logic)
            self.set_max_concurrency(None)

    flow = Flow("spin")
    flow.add_routine(Spin(), "spin")
    FlowRegistry.get_instance().register_by_name("spin", flow)
    runtime = Runtime(processes=2, backend="ray", address=sys.argv[1] or None)  # "": a private Ray instance
    assert runtime._testing.wait_pool_ready(60)  # else both activations may go to the first lane placed
    ws = runtime.exec("spin")
    for _ in range(2):
        runtime.post("spin", "spin", "in", {})
    deadline = time.monotonic() + 60
    while (ws.get_routine_state("spin") or {}).get("started") != 2:
        if time.monotonic() > deadline:
            sys.exit("the activations never started")
    pids = [p["pid"] for p in runtime.stats()["processes"]] + [runtime._testing.state_pid]
    print(json.dumps(pids), flush=True)
    time.sleep(600)
    """
)


@contextlib.contextmanager
def _driver(tmp_path, address: str, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """Run DRIVER (``address``: its Ray cluster, "" for a private instance) in a session of its own."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_a_sigkilled_driver_leaves_no_actor_and_no_worker_behind(tmp_path, python_env, ray_cluster):
    with _driver(tmp_path, ray_cluster.address, python_env) as proc:
        line = proc.stdout.readline()
        assert line, (proc.stderr.read(), [(a["ActorClassName"], a["State"]) for a in live_actors()])
        pids = json.loads(line)
        assert len(live_actors()) == 2, "one nanny actor per lane"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(WAIT)
        procs = [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]
        _gone, alive = psutil.wait_procs(procs, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "workers and state server are gone"
        assert wait_no_live_actors() == [], "Ray ended the dead driver's actors"


def test_a_sigkilled_driver_of_a_private_ray_instance_leaves_no_ray_process(tmp_path, python_env, ray_cluster):
    env = {k: v for k, v in python_env.items() if k != "RAY_ADDRESS"}
    with _driver(tmp_path, "", env) as proc:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert any(is_ray_process(p.cmdline()) for p in tree), "the driver started its own Ray instance"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(WAIT)
        _gone, alive = psutil.wait_procs(tree, timeout=30)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"outlived the driver by 30s: {[' '.join(p.cmdline())[:80] for p in alive]}"


# -- the command line ----------------------------------------------------------------------------------------


def test_the_cli_runs_a_flow_on_the_cluster(ray_cluster, tmp_path, python_env) -> None:
    from cli_support import cli, make_flow_file, outputs

    flow_file = make_flow_file(tmp_path)
    result = cli("run", flow_file, "--processes", "2", "--backend", "ray", "--address", ray_cluster.address,
                 env=python_env)
    assert result.returncode == 0, result.stderr
    assert [o["data"] for o in outputs(result.stdout)] == [{"n": n, "square": n * n} for n in range(30)]
    assert "30 completed, 0 failed, 0 cancelled" in result.stderr


def test_the_cli_refuses_address_without_ray(tmp_path, python_env) -> None:
    from cli_support import cli, make_flow_file

    result = cli("run", make_flow_file(tmp_path), "--address", "auto", env=python_env)
    assert result.returncode == 2 and "argument --address: only with --backend ray" in result.stderr


# -- the seed page, unchanged, on the cluster ----------------------------------------------------------------


def _seed_examples_with_a_runtime() -> list[int]:
    from test_seed import BLOCKS, prepared

    return [i for i, block in enumerate(BLOCKS) if "Runtime(" in prepared(block)]


@pytest.mark.parametrize("index", _seed_examples_with_a_runtime())
def test_every_seed_example_with_a_runtime_runs_unchanged_on_the_cluster(index, ray_cluster, tmp_path,
                                                                         python_env) -> None:
    import ray
    from test_seed import BLOCKS, prepared, run

    env = dict(python_env, ROUTILUX_MP_BACKEND="ray", RAY_ADDRESS=ray_cluster.address)
    drivers = len(ray._private.state.jobs())  # (no public API lists a cluster's jobs)
    proc = run(prepared(BLOCKS[index]), tmp_path, env)
    assert proc.returncode == 0, f"example {index} failed:\n{BLOCKS[index]}\n--- stderr ---\n{proc.stderr}"
    assert len(ray._private.state.jobs()) > drivers, "the example ran as a driver of the cluster"
