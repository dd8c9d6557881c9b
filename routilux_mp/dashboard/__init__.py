"""The live web dashboard of a runtime: ``Runtime(dashboard=True | PORT)``, ``routilux-mp run --dashboard [PORT]``.

::

    supervisor process
      ├── collector thread: every second reads stats(), the job ledger and the flows
      │   (routilux_mp.dashboard._collect), keeps the chart history, hands the
      │   snapshot (as JSON text, encoded once) to the server's event loop
      └── server thread: uvicorn + Starlette (routilux_mp.dashboard._server), on
          127.0.0.1 by default: the page and its assets, a Server-Sent Events
          feed of the snapshots, WorkerState read on demand; GET only, every
          request but the static assets must carry the run's random token

Nothing here is imported unless a dashboard is asked for: the ``[dashboard]``
extra (Starlette, uvicorn) is needed only then. At shutdown the page gets a
final snapshot with the run's summary, then both threads stop and the port
is closed.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from ..errors import DashboardError

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "bind", "check_port", "is_loopback"]

#: Where the dashboard listens unless told otherwise: this machine only (reach it from elsewhere with an SSH tunnel).
DEFAULT_HOST = "127.0.0.1"
#: The port of ``--dashboard`` without a number and of ``Runtime(dashboard=True)`` (0 picks a free one).
DEFAULT_PORT = 8789


def check_port(dashboard: Any) -> int | None:
    """The port asked for by ``Runtime(dashboard=...)``: ``None`` (off), or 0-65535. Bad values raise ``ValueError``."""
    if dashboard is None or dashboard is False:
        return None
    if dashboard is True:
        return DEFAULT_PORT
    if not isinstance(dashboard, int) or not 0 <= dashboard <= 65535:
        raise ValueError(f"dashboard must be True, False, None or a port number 0-65535 (0: a free port), "
                         f"got {dashboard!r}")
    return dashboard


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> Any:
    """Check that the extra is installed and bind the listening socket: a ``Dashboard`` not started yet.

    Done before any process starts, so a missing extra or a busy port fails
    the runtime's start at once, with nothing to clean up.
    """
    try:
        from ._server import Dashboard
    except ImportError as exc:
        raise DashboardError(
            f"the dashboard needs the [dashboard] extra ({exc.name or exc} is not installed): "
            "pip install 'routilux-mp[dashboard]'"
        ) from exc
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise DashboardError(f"cannot listen on {host!r}: {exc.strerror}; give an address of this machine, "
                             f"e.g. {DEFAULT_HOST} (the default) or 0.0.0.0 (every interface)") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        hint = ("another program (another dashboard?) uses it: pick another port, or 0 for a free one"
                if exc.errno == 98 else "give another address or port (0 picks a free port)")
        raise DashboardError(f"cannot listen on {host}:{port}: {exc.strerror}; {hint}") from exc
    sock.set_inheritable(False)
    return Dashboard(sock, host)
