"""The dashboard's HTTP side: a Starlette app served by uvicorn in a thread of the supervisor.

Routes (GET only; every one but the static assets wants ``?token=`` and refuses
anything else with 403):

* ``/`` the page; ``/app.js``, ``/app.css`` its assets, shipped in the package;
* ``/events`` Server-Sent Events: ``history`` first (the graph and the chart
  points so far), then a ``snapshot`` about every second, and ``final`` with
  the run's summary once the runtime has shut down (then the stream ends);
* ``/api/snapshot`` the last snapshot as JSON; ``/api/states`` every
  WorkerState, read when asked (the page asks only while its explorer is open).

The collector thread encodes each snapshot once, whatever the number of pages
open; when none is open it still samples (the charts cover the whole run) but
encodes nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..monitoring.flow_registry import FlowRegistry
from . import DEFAULT_HOST, is_loopback
from ._collect import Collector

logger = logging.getLogger("routilux_mp.dashboard")

#: Seconds between snapshots while a page is open: the page is at most about this far behind.
INTERVAL = 1.0
#: Seconds between snapshots while no page is open (the charts still cover the whole run, more coarsely).
IDLE_INTERVAL = 5.0
#: Seconds the final snapshot gets to reach the open pages before the server stops.
FINAL_FLUSH_TIMEOUT = 2.0
#: Seconds to wait for the server thread to stop (uvicorn closes its port, then its connections).
SERVER_JOIN_TIMEOUT = 5.0
#: Seconds uvicorn waits for open requests at shutdown before cancelling them.
GRACEFUL_SHUTDOWN = 1.0
#: Snapshots between two sends of the parts that rarely change (the graph, the failures) to every page.
RESEND_EVERY = 10
#: Snapshots queued per page; a page that reads slower than that skips to the newest.
PAGE_BACKLOG = 4

#: Headers on every response: nothing cached, no token leaked in a Referer, only our own scripts run.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'",
}
#: The files of the page, read once from the package.
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}


class _Server(uvicorn.Server):
    """uvicorn's server, waiting for its stop instead of waking ten times a second.

    uvicorn's own main loop polls ``should_exit`` every 0.1 s (and refreshes
    the Date header), which costs a few milliseconds of CPU a second in an
    otherwise idle thread; here the loop sleeps until :meth:`exit` is called.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.exit_event: asyncio.Event | None = None  # made on the server's loop; set by exit()

    async def main_loop(self) -> None:
        self.exit_event = asyncio.Event()
        if not self.should_exit:
            await self.exit_event.wait()

    def exit(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Stop serving (from any thread)."""
        self.should_exit = True
        if loop is not None and self.exit_event is not None:
            try:
                loop.call_soon_threadsafe(self.exit_event.set)
            except RuntimeError:  # the loop has closed already
                pass


def _event(kind: str, data: str) -> str:
    return f"event: {kind}\ndata: {data}\n\n"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str, allow_nan=False)


class _Hub:
    """The open pages' queues, on the server's event loop (only that loop touches them)."""

    def __init__(self) -> None:
        self.pages: set[asyncio.Queue] = set()  # one queue per open /events stream
        self.final: str | None = None  # the final event, once the runtime has shut down
        self.drained = threading.Event()  # set when the final event has been handed to every page

    def publish(self, message: str, final: bool = False) -> None:
        if final:
            self.final = message
        for page in self.pages:
            if page.full():  # a slow page skips to the newest snapshot (the final one is never skipped)
                page.get_nowait()
            page.put_nowait(message)
        if final and not self.pages:
            self.drained.set()

    def leave(self, page: asyncio.Queue) -> None:
        self.pages.discard(page)
        if self.final is not None and not self.pages:
            self.drained.set()


class Dashboard:
    """A dashboard bound to its socket; :meth:`start` serves ``runtime``, :meth:`stop` ends it (idempotent)."""

    def __init__(self, sock: socket.socket, host: str) -> None:
        self.sock = sock  # the listening socket (bound before any process started)
        self.host = host  # as given (the URL shows this machine's name for a wildcard address)
        self.port = sock.getsockname()[1]  # the real port (0 asked for a free one)
        self.token = secrets.token_urlsafe(24)  # every request but the assets must carry it
        self.collector: Collector | None = None  # reads the runtime (set by start)
        self.hub = _Hub()  # the open pages
        self.loop: asyncio.AbstractEventLoop | None = None  # the server thread's loop, once serving
        self.server: _Server | None = None  # uvicorn, run by ``thread``
        self.thread: threading.Thread | None = None  # the server thread
        self.sampler: threading.Thread | None = None  # the collector thread
        self.stopping = False  # stop() was called: the collector thread ends
        self.wakeup = threading.Event()  # wakes the collector thread: to stop, or because a page opened
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="routilux-mp dashboard read")  # WorkerState reads
        self.sent = 0  # snapshots sent to the pages
        self.sent_key: tuple = ()  # what identifies the graph and failures last sent (see _lighter)
        self.stopped = False
        self.assets = {path: (resources.files(__package__).joinpath("static", name).read_bytes(), kind)
                       for path, (name, kind) in ASSETS.items()}

    @property
    def url(self) -> str:
        """The page's address, with its token."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/?token={self.token}"

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self, runtime: Any) -> None:
        """Serve ``runtime``: start the server thread (and wait until it serves), then the collector thread."""
        self.collector = Collector(runtime, FlowRegistry.get_instance())
        config = uvicorn.Config(self._app(), log_level="warning", access_log=False, lifespan="off", ws="none",
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN, date_header=False, server_header=False)
        self.server = _Server(config)
        self.thread = threading.Thread(target=self._serve, name="routilux-mp dashboard server", daemon=True)
        # The socket listens already: a page that connects before uvicorn runs waits in its backlog.
        self.thread.start()
        self.sampler = threading.Thread(target=self._sample, name="routilux-mp dashboard collector", daemon=True)
        self.sampler.start()
        if not is_loopback(self.host):
            print(f"routilux-mp: warning: the dashboard listens on {self.host}, not only this machine: anyone who "
                  "reaches this port and has the URL's token sees the run (flows, failed inputs, WorkerState); "
                  f"prefer the default {DEFAULT_HOST} and an SSH tunnel", file=sys.stderr)
        print(f"dashboard: {self.url}", file=sys.stderr, flush=True)

    def _serve(self) -> None:
        assert self.server is not None
        try:
            asyncio.run(self._serve_async())
        except BaseException:  # a dead dashboard must never take the run with it
            logger.exception("the dashboard's server stopped")

    async def _serve_async(self) -> None:
        assert self.server is not None
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.sock])

    def stop(self) -> None:
        """Send the open pages the final summary, then stop both threads and close the port."""
        if self.stopped:
            return
        self.stopped = True
        self.stopping = True
        self.wakeup.set()
        if self.sampler is not None:
            self.sampler.join()
        loop = self.loop
        if self.collector is not None and loop is not None and self.thread is not None and self.thread.is_alive():
            try:
                final = self.collector.snapshot(final=True)
                final["points"] = self.collector.points  # a page that opens now still gets the whole run
                final["states"] = self.collector.worker_states()  # the explorer keeps working after the end
                message = _event("final", _dumps(final))
                loop.call_soon_threadsafe(self.hub.publish, message, True)
                self.hub.drained.wait(FINAL_FLUSH_TIMEOUT)
            except Exception:  # stopping must go on whatever the last read does
                logger.exception("the dashboard's final snapshot failed")
        if self.server is not None:
            self.server.exit(loop)
        if self.thread is not None and self.thread.is_alive():
            self.thread.join(SERVER_JOIN_TIMEOUT)
            if self.thread.is_alive():
                logger.warning("the dashboard's server did not stop within %.0f s", SERVER_JOIN_TIMEOUT)
        self.executor.shutdown(wait=True)
        self.sock.close()

    def expect(self, total: int | None, describe_job: Any = None) -> None:
        """How many jobs the run will post (for the progress bar and the ETA), and ``fn(job) -> dict`` of
        what to show with a failed job besides its error (the CLI gives its input line)."""
        if self.collector is not None:
            self.collector.total = total
            self.collector.describe_job = describe_job

    # -- the collector thread ------------------------------------------------------------------------

    def _sample(self) -> None:
        """Every :data:`INTERVAL` (:data:`IDLE_INTERVAL` with no page open): snapshot the runtime, hand it on."""
        assert self.collector is not None
        while True:
            self.wakeup.wait(INTERVAL if self.hub.pages else IDLE_INTERVAL)
            self.wakeup.clear()
            if self.stopping:
                return
            try:
                snap = self.collector.snapshot()
            except Exception:  # keep sampling: a failed read is logged, the next may work
                logger.exception("the dashboard could not read the runtime")
                continue
            loop = self.loop
            if loop is None or not self.hub.pages:
                continue  # nobody is looking: sample (for the charts), encode nothing
            message = _event("snapshot", _dumps(self._lighter(snap)))
            try:
                loop.call_soon_threadsafe(self.hub.publish, message)
            except RuntimeError:  # the loop closed under us: we are stopping
                return

    def _lighter(self, snap: dict) -> dict:
        """``snap`` without the parts the pages already have: the graph and the failures (with their
        tracebacks) are sent when they change, and every :data:`RESEND_EVERY` snapshots in case a page
        skipped the one that changed them."""
        self.sent += 1
        key = (len(snap["flows"]), id(snap["flows"]), tuple(f["job_id"] for f in snap["failures"][:1]),
               len(snap["failures"]))
        if key != self.sent_key or self.sent % RESEND_EVERY == 0:
            self.sent_key = key
            return snap
        return {k: v for k, v in snap.items() if k not in ("flows", "failures")}

    def _history(self) -> str:
        """The ``history`` event: the last snapshot and every chart point so far."""
        collector = self.collector
        assert collector is not None
        last = collector.last or collector.snapshot()
        return _event("history", _dumps({"snapshot": last, "points": list(collector.points)}))

    # -- the app -------------------------------------------------------------------------------------

    def _allowed(self, request: Request) -> bool:
        given = request.query_params.get("token", "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _app(self) -> Starlette:
        refused = PlainTextResponse("403: this dashboard needs the token printed with its URL "
                                    "(dashboard: http://...?token=...)", status_code=403, headers=SECURITY_HEADERS)

        async def asset(request: Request) -> Response:
            if request.url.path == "/" and not self._allowed(request):
                return refused
            body, kind = self.assets[request.url.path]
            return Response(body, media_type=kind, headers=SECURITY_HEADERS)

        async def events(request: Request) -> Response:
            if not self._allowed(request):
                return refused
            page: asyncio.Queue = asyncio.Queue(PAGE_BACKLOG)
            first = self.hub.final if self.hub.final is not None else await self._read(self._history)
            self.hub.pages.add(page)
            self.wakeup.set()  # from now on, a snapshot a second
            async def stream() -> Any:
                try:
                    yield "retry: 1000\n\n" + first
                    if self.hub.final is not None:
                        return
                    while True:
                        message = await page.get()
                        yield message
                        if message.startswith("event: final"):
                            return
                finally:
                    self.hub.leave(page)

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={**SECURITY_HEADERS, "X-Accel-Buffering": "no"})

        async def snapshot(request: Request) -> Response:
            if not self._allowed(request):
                return refused
            collector = self.collector
            assert collector is not None
            last = collector.last or await self._read(collector.snapshot)
            return JSONResponse(last, headers=SECURITY_HEADERS)

        async def states(request: Request) -> Response:
            if not self._allowed(request):
                return refused
            collector = self.collector
            assert collector is not None
            try:
                body = await self._read(lambda: _dumps(collector.worker_states()))
            except Exception as exc:  # noqa: BLE001 -- shown on the page instead of the states
                body = _dumps({"workers": [], "error": f"{type(exc).__name__}: {exc}"})
            return Response(body, media_type="application/json", headers=SECURITY_HEADERS)

        routes = [Route(path, asset) for path in ASSETS]
        routes += [Route("/events", events), Route("/api/snapshot", snapshot), Route("/api/states", states)]
        return Starlette(routes=routes)

    async def _read(self, fn: Any) -> Any:
        """Run a blocking read of the runtime off the event loop (one at a time, in our own thread)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

