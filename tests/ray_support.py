"""A real Ray cluster for the tests of the Ray backend: one per session, on this machine.

Starting a head node costs seconds, so every test that needs Ray shares one
(``ray_cluster``); the pytest process is its driver. A node-loss test adds a
node of its own (``extra_node``). Ray's files go to a short private temporary
directory (unix socket paths are limited to 107 characters, and nothing of
ours may touch another user's ``/tmp/ray``), and its auth token to a private
0600 file there. Tests always pass ``cluster.address``: ``"auto"`` would
scan the machine for any running cluster.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

#: Logical CPUs of the head node: room for 4 one-CPU lanes on a 2-core machine (the 4-process state test).
HEAD_CPUS = 4
#: Seconds Ray gets to report every actor of a test dead once the test ended.
ACTOR_DEADLINE = 15.0


def is_ray_process(cmdline: list[str]) -> bool:
    """Ray's own processes (GCS, raylet, agents, idle workers, actors): what the leftover check leaves to Ray."""
    if not cmdline:
        return False
    first = cmdline[0]
    if first.startswith("ray::") or os.path.basename(first) in ("gcs_server", "raylet"):
        return True
    return any("/ray/_private/" in arg or "/ray/dashboard/" in arg or "/ray/autoscaler/" in arg for arg in cmdline)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A one-machine Ray cluster (a head with ``HEAD_CPUS`` logical CPUs), this process its driver."""
    tmp = tempfile.mkdtemp(prefix="rmpray-")  # short: Ray's socket paths live under it
    token = os.path.join(tmp, "token")
    with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    os.makedirs(os.path.join(tmp, "ray"))  # where Ray writes its cluster's address file
    os.environ["RAY_TMPDIR"] = tmp
    os.environ["RAY_AUTH_TOKEN_PATH"] = token
    os.environ["RAY_DEDUP_LOGS"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": HEAD_CPUS, "object_store_memory": 100 * 2**20, "include_dashboard": False})
    ray.init(address=cluster.address, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def extra_node(ray_cluster: Any) -> Iterator[Any]:
    """A second node (1 CPU) for one test; removed afterwards if the test did not remove it."""
    node = ray_cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    ray_cluster.wait_for_nodes()
    yield node
    if node in ray_cluster.worker_nodes:
        ray_cluster.remove_node(node)


def live_actors() -> list[dict]:
    """Every actor the cluster does not report dead."""
    import ray

    return [a for a in ray._private.state.actors().values() if a["State"] != "DEAD"]  # (no public API lists them)


def wait_no_live_actors(deadline: float = ACTOR_DEADLINE) -> list[dict]:
    """Wait until no actor is alive; those still alive at ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        left = live_actors()
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.05)  # polling the GCS table: Ray offers no event to wait on


def ray_options(cluster: Any) -> dict[str, Any]:
    """Runtime options that run on ``cluster``."""
    return {"backend": "ray", "address": cluster.address}
