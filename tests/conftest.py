"""Shared fixtures: every test is checked for leftover processes; runtimes always stop."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import psutil
import pytest
from ray_support import extra_node, is_ray_process, ray_cluster, ray_options, wait_no_live_actors  # noqa: F401

from routilux_mp import FlowRegistry, Runtime

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: Seconds a test's child processes get to disappear before the test fails.
LEAK_DEADLINE = 10.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With pytest-xdist (``-n 2``), every test that uses Ray runs in one worker: one Ray cluster per run."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        uses_ray = item.path.name == "test_ray.py" or (callspec is not None and callspec.params.get("backend") == "ray")
        if uses_ray:
            item.add_marker(pytest.mark.xdist_group("ray"))


def _descendants() -> dict[int, str]:
    me = psutil.Process()
    found = {}
    for child in me.children(recursive=True):
        try:  # (it may exit between the listing and these reads: then it is not left behind)
            cmdline = child.cmdline()
            if not is_ray_process(cmdline):  # Ray's come and go on their own; its actors are checked apart
                found[child.pid] = " ".join(cmdline) or child.name()
        except psutil.Error:
            continue
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail any test that leaves a child process of ours behind (and kill it)."""
    before = set(_descendants())
    yield
    deadline = time.monotonic() + LEAK_DEADLINE
    leaked: dict[int, str] = {}
    while True:
        leaked = {pid: cmd for pid, cmd in _descendants().items() if pid not in before}
        leaked = {pid: cmd for pid, cmd in leaked.items() if _alive(pid)}
        if not leaked or time.monotonic() > deadline:
            break
        psutil.wait_procs([psutil.Process(pid) for pid in leaked if _alive(pid)], timeout=0.2)
    if leaked:
        for pid in leaked:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        pytest.fail(f"the test left child processes behind: {leaked}")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(autouse=True)
def no_leftover_actors() -> Iterator[None]:
    """Fail any test that leaves a Ray actor alive (the Ray analogue of the leftover-process check)."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        left = wait_no_live_actors()
        if left:
            pytest.fail(f"the test left Ray actors alive: {[(a['ActorClassName'], a['State']) for a in left]}")


@pytest.fixture(params=["local", "ray"])
def backend(request: pytest.FixtureRequest) -> dict:
    """Runtime options of each execution backend (``ray``: on the session's one-machine cluster)."""
    if request.param == "local":
        return {}
    return ray_options(request.getfixturevalue("ray_cluster"))


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[FlowRegistry]:
    registry = FlowRegistry.get_instance()
    registry.clear()
    yield registry
    registry.clear()


@pytest.fixture
def make_runtime() -> Iterator[Callable[..., Runtime]]:
    """Build runtimes that are always shut down at the end of the test."""
    made: list[Runtime] = []

    def make(**kwargs: object) -> Runtime:
        kwargs.setdefault("processes", 2)
        runtime = Runtime(**kwargs)  # type: ignore[arg-type]
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.shutdown(wait=False)


@pytest.fixture
def python_env() -> dict[str, str]:
    """Environment for child Python processes that must import this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONUNBUFFERED", None)
    return env

