"""What the dashboard tests share: a three-stage flow with a failing item, and an SSE reader.

The flow ``staged``: ``parse`` (entry slot ``raw``) -> ``work`` -> ``collect``.
``work`` raises ``ValueError("bad item N")`` for an item with ``"fail": true``,
and ``parse`` does for one with ``"unparsable": true``; ``collect`` counts what
it saw in its WorkerState. An item may name a ``gate`` file: ``work`` waits (up
to a minute) until it exists, so a test can hold a run open while it looks at
the page and release it when it is done.

A test that waits for a failure while a gated item holds its process makes
the failing line ``unparsable``, and puts it before the gated line: one
activation may be sent ahead to the gated process and wait behind it (see
``_batching.lane_for``), but never one of an earlier line's first stage.
"""

from __future__ import annotations

import http.client
import json
import os
import textwrap
import time
import urllib.parse

from routilux_mp import Flow, FlowRegistry
from routilux_mp._cli_load import load_target

#: Seconds to wait for an event on the feed (snapshots come every second; the machine may be loaded).
FEED_TIMEOUT = 30.0
#: Seconds ``work`` waits for a gate file before failing its item.
GATE_TIMEOUT = 60.0

FLOW_SOURCE = textwrap.dedent(
    '''
    import os
    import time

    from routilux_mp import Flow, FlowRegistry, Routine

    SAMPLE_INPUT = None


    class Parse(Routine):
        def __init__(self):
            super().__init__()
            self.add_slot("raw")
            self.add_event("parsed")

            def logic(slot_data, message, ws):
                for item in slot_data["raw"]:
                    if item.get("unparsable"):
                        raise ValueError(f"bad item {item['n']}")
                    self.emit("parsed", **item)

            self.set_logic(logic)
            self.set_max_concurrency(None)


    class Work(Routine):
        def __init__(self):
            super().__init__()
            self.add_slot("parsed")
            self.add_event("worked")

            def logic(slot_data, message, ws):
                for item in slot_data["parsed"]:
                    if item.get("gate"):
                        deadline = time.monotonic() + GATE_TIMEOUT
                        while not os.path.exists(item["gate"]):  # the test opens the gate when it has looked
                            if time.monotonic() > deadline:
                                raise TimeoutError("the gate was never opened")
                            time.sleep(0.01)
                    if item.get("fail"):
                        raise ValueError(f"bad item {item['n']}")
                    self.emit("worked", n=item["n"])

            self.set_logic(logic)
            self.set_max_concurrency(None)


    class Collect(Routine):
        def __init__(self):
            super().__init__()
            self.add_slot("worked")
            self.add_event("done")

            def logic(slot_data, message, ws):
                for item in slot_data["worked"]:
                    ws.increment("collect", "seen")
                    self.emit("done", n=item["n"])

            self.set_logic(logic)


    flow = Flow("staged")
    flow.add_routine(Parse(), "parse")
    flow.add_routine(Work(), "work")
    flow.add_routine(Collect(), "collect")
    flow.connect("parse", "parsed", "work", "parsed")
    flow.connect("work", "worked", "collect", "worked")
    FlowRegistry.get_instance().register_by_name("staged", flow)
    '''
).replace("GATE_TIMEOUT", repr(GATE_TIMEOUT))

#: The routines of the flow, as the graph must show them.
ROUTINES = ("parse", "work", "collect")


def register_staged_flow(directory: str) -> Flow:
    """Register the flow in this process, loaded from its file as the CLI loads it."""
    load_target(write_flow_file(directory))
    return FlowRegistry.get_instance().get("staged")


def write_flow_file(directory: str) -> str:
    path = os.path.join(directory, "staged.py")
    with open(path, "w") as out:
        out.write(FLOW_SOURCE)
    return path


def split_url(url: str) -> tuple[str, int, str]:
    """``(host, port, token)`` of a dashboard URL."""
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "", parts.port or 80, urllib.parse.parse_qs(parts.query)["token"][0]


def get(url: str, path: str, token: str | None) -> tuple[int, bytes]:
    """GET ``path`` on the dashboard at ``url`` with ``token`` (``None``: no token at all)."""
    host, port, _ = split_url(url)
    conn = http.client.HTTPConnection(host, port, timeout=FEED_TIMEOUT)
    try:
        query = "" if token is None else "?token=" + urllib.parse.quote(token)
        conn.request("GET", path + query)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Feed:
    """The dashboard's Server-Sent Events, read as ``(event, data)`` pairs with a deadline on each."""

    def __init__(self, url: str) -> None:
        host, port, token = split_url(url)
        self.conn = http.client.HTTPConnection(host, port, timeout=FEED_TIMEOUT)
        self.conn.request("GET", "/events?token=" + urllib.parse.quote(token))
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.read()
        assert self.response.getheader("Content-Type", "").startswith("text/event-stream")

    def next(self) -> tuple[str, dict]:
        """The next event (fails after :data:`FEED_TIMEOUT`: the socket times out)."""
        kind, data = "message", []
        while True:
            line = self.response.readline()
            if not line:
                raise AssertionError("the dashboard closed its event stream")
            line = line.decode().rstrip("\n")
            if not line:
                if data:
                    return kind, json.loads("\n".join(data))
                continue
            field, _, value = line.partition(": ")
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)

    def until(self, predicate, what: str, timeout: float = FEED_TIMEOUT) -> tuple[str, dict]:
        """Read events until ``predicate(kind, data)`` holds; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kind, data = self.next()
            if predicate(kind, data):
                return kind, data
        raise AssertionError(f"the dashboard did not show {what} within {timeout} s")

    def close(self) -> None:
        self.conn.close()
