"""This process's link to a Ray cluster, for :class:`~routilux_mp._exec.ray.RayBackend`.

* Ray is imported only here, on first use, with an install hint when missing.
* Which cluster (``Runtime(backend="ray", address=...)``):

  - Ray already initialized in this process (``ray.init`` by the caller, or
    ``ray job submit``): that connection is used, and never shut down here;
  - ``None``: ``RAY_ADDRESS`` if set (a script started by
    ``ray job submit``), else a private Ray instance on this machine with
    ``processes`` CPUs, shut down with the runtime;
  - ``"auto"`` or ``"host:port"``: connect to that running cluster.

  ``ray://`` (Ray Client) is refused: the driver then runs outside the
  cluster, and workers must connect back to it (see the README).
* A private instance gets a reaper: a process in a session of its own
  that holds a pipe from this one and, when it ends (this process died,
  even by SIGKILL), kills the Ray processes this process started. Without
  it Ray's agents outlive a killed driver by about a minute.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

from ..errors import ClusterError

logger = logging.getLogger("routilux_mp.runtime")

INSTALL_HINT = "install it with: pip install 'routilux-mp[ray]'"

_REAPER = r"""
import json, sys
import psutil
procs = json.loads(sys.stdin.readline())
sys.stdin.read()  # returns when the driver's end closes: it stopped, or died
for pid, created in procs:
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - created) < 0.01:  # never a reused pid
            proc.kill()
    except psutil.Error:
        pass
"""


def import_ray() -> Any:
    """The ``ray`` module; :class:`ClusterError` with the install hint when it is not installed."""
    try:
        import ray
    except ImportError as exc:
        raise ClusterError(f"backend='ray' needs Ray, which is not installed ({exc}); {INSTALL_HINT}") from exc
    return ray


def check_address(address: str | None) -> None:
    """Refuse addresses the Ray backend does not support (before anything starts)."""
    if address is None:
        return
    if not isinstance(address, str) or not address:
        raise ClusterError(f"address must be None, 'auto' or 'host:port' of a Ray cluster, got {address!r}")
    if address.startswith("ray://"):
        raise ClusterError(
            f"address={address!r} is a Ray Client address, which the Ray backend does not support: its workers "
            "connect back to the driver, which must therefore run on the cluster. Run the script on the head "
            "node with address='auto', or submit it with: ray job submit --address http://HEAD:8265 "
            "--working-dir . -- routilux-mp run ... --backend ray"
        )


class RaySession:
    """This process's connection to a Ray cluster (see the module docstring); ``close`` undoes what ``open`` did."""

    def __init__(self, address: str | None) -> None:
        check_address(address)
        self.address = address
        #: Whether this session started Ray (then it shuts it down, and a reaper covers its death).
        self.owns_ray = False
        self._reaper: subprocess.Popen | None = None
        self.ray: Any = None

    def open(self, cpus: int | None) -> None:
        """Connect (or start a private instance with ``cpus`` CPUs); :class:`ClusterError` if that fails."""
        ray = self.ray = import_ray()
        if ray.is_initialized():
            return
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict[str, Any] = {"configure_logging": False, "include_dashboard": False}
        if address is None:
            kwargs.update(address="local", num_cpus=cpus or os.cpu_count() or 1)
        else:
            kwargs.update(address=address)
        try:
            ray.init(**kwargs)
        except Exception as exc:  # Ray raises many types for an unreachable cluster
            where = "a private Ray instance could not be started" if address is None else \
                f"could not connect to the Ray cluster at {address!r}"
            raise ClusterError(f"{where}: {type(exc).__name__}: {exc}. Check that the cluster runs "
                               "(ray status) and that this machine can reach it") from exc
        self.owns_ray = True
        if address is None:
            self._start_reaper()

    def cluster_cpus(self) -> int:
        """The cluster's CPUs (at least 1): the default number of lanes."""
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def node_ip(self) -> str:
        """This machine's address on the cluster (where workers connect back to)."""
        return self.ray.util.get_node_ip_address()

    def _start_reaper(self) -> None:
        """Start the reaper of the Ray processes this process just started (see the module docstring)."""
        import psutil

        procs = []
        for proc in psutil.Process().children(recursive=True):
            try:
                procs.append((proc.pid, proc.create_time()))
            except psutil.Error:
                continue
        self._reaper = subprocess.Popen([sys.executable, "-c", _REAPER], stdin=subprocess.PIPE,
                                        start_new_session=True)  # Ctrl-C in the terminal must not reach it
        assert self._reaper.stdin is not None
        self._reaper.stdin.write(json.dumps(procs).encode() + b"\n")
        self._reaper.stdin.flush()

    def close(self) -> None:
        """Shut Ray down if this session started it, then let the reaper take any straggler."""
        if self.owns_ray and self.ray is not None:
            try:
                self.ray.shutdown()
            except Exception:  # shutting down; the reaper kills what is left
                logger.exception("ray.shutdown() failed")
            self.owns_ray = False
        if self._reaper is not None:
            assert self._reaper.stdin is not None
            self._reaper.stdin.close()
            try:
                self._reaper.wait(30)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
            self._reaper = None
