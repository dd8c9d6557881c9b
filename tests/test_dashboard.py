"""The dashboard's server without a browser: the token, the live feed, the final summary, a clean stop, off = nothing.

Browser tests of the page itself are in ``test_dashboard_browser.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
from cli_support import LINE_TIMEOUT, ROOT, RUN_TIMEOUT, read_until
from dashboard_support import ROUTINES, Feed, get, register_staged_flow, write_flow_file

from routilux_mp import DashboardError, Runtime
from routilux_mp.dashboard import DEFAULT_HOST

#: Seconds for the jobs a test posts to finish.
JOBS_TIMEOUT = 60.0


def dashboard_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("routilux-mp dashboard")]


@pytest.fixture
def staged(tmp_path) -> None:
    register_staged_flow(str(tmp_path))


@pytest.fixture
def dashboard_runtime(make_runtime, staged) -> Runtime:
    return make_runtime(dashboard=0)


# (path, token given, expected status): every route but the static assets wants the run's token.
ACCESS_CASES = [
    ("/", "right", 200),
    ("/", None, 403),
    ("/", "wrong", 403),
    ("/", "", 403),
    ("/events", "wrong", 403),
    ("/api/snapshot", None, 403),
    ("/api/snapshot", "wrong", 403),
    ("/api/snapshot", "right", 200),
    ("/api/states", "wrong", 403),
    ("/api/states", "right", 200),
    ("/app.js", None, 200),
    ("/app.css", None, 200),
    ("/nothing-here", "right", 404),
]


@pytest.mark.parametrize(("path", "token", "status"), ACCESS_CASES)
def test_the_token_guards_every_route_but_the_assets(dashboard_runtime, path, token, status):
    url = dashboard_runtime.dashboard_url
    real = url.rpartition("token=")[2]
    given = {"right": real, "wrong": real[:-1] + ("A" if real[-1] != "A" else "B")}.get(token, token)
    code, body = get(url, path, given)
    assert code == status, body
    if status == 403:
        assert b"token" in body and b"routilux" not in body.lower().replace(b"routilux-mp", b"")


def test_it_is_read_only(dashboard_runtime):
    host, port = "127.0.0.1", int(dashboard_runtime.dashboard_url.split(":")[2].split("/")[0])
    token = dashboard_runtime.dashboard_url.rpartition("token=")[2]
    import http.client

    for method in ("POST", "PUT", "DELETE"):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request(method, f"/api/states?token={token}", body=b"{}")
        assert conn.getresponse().status == 405
        conn.close()


def test_it_listens_on_loopback_only_by_default(make_runtime, staged, capsys):
    url = make_runtime(dashboard=0).dashboard_url
    assert url.startswith(f"http://{DEFAULT_HOST}:")
    token = url.rpartition("token=")[2]
    assert len(token) >= 32
    assert f"dashboard: {url}\n" in capsys.readouterr().err


def test_the_feed_is_live_and_ends_with_the_summary(dashboard_runtime):
    runtime = dashboard_runtime
    feed = Feed(runtime.dashboard_url)
    try:
        kind, _ = feed.next()
        assert kind == "history"
        jobs = [runtime.post("staged", "parse", "raw", {"n": n, "fail": n == 3})[1] for n in range(5)]
        assert runtime.wait_until_all_jobs_finished(JOBS_TIMEOUT)
        _, snap = feed.until(lambda k, d: d.get("done") == 5, "the 5 jobs done")
        assert snap["jobs"]["completed"] == 4 and snap["jobs"]["failed"] == 1
        assert {r["id"] for r in snap["flows"][0]["routines"]} == set(ROUTINES)
        assert set(snap["routines"]) == set(ROUTINES)
        failure = snap["failures"][0]
        assert failure["job_id"] == jobs[3].job_id
        assert failure["routine"] == "work" and failure["type"] == "ValueError"
        assert "bad item 3" in failure["traceback"]
        assert [p["pid"] for p in snap["processes"]] == [p["pid"] for p in runtime.stats()["processes"]]
        runtime.post("staged", "parse", "raw", {"n": 10})
        assert runtime.wait_until_all_jobs_finished(JOBS_TIMEOUT)
        feed.until(lambda k, d: d.get("done") == 6, "the counter moving to 6")
        runtime.shutdown()
        kind, final = feed.until(lambda k, d: k == "final", "the final snapshot")
        assert final["status"] == "finished"
        assert final["summary"]["completed"] == 5 and final["summary"]["failed"] == 1
        states = {w["worker_id"]: w for w in final["states"]["workers"]}
        collect = {r["routine"]: r for r in states["staged-1"]["routines"]}["collect"]
        assert '"seen": 5' in collect["json"] and collect["bytes"] == len('{"seen":5}')
        assert feed.response.readline() == b""  # the stream ends after the final event
    finally:
        feed.close()


def test_shutdown_stops_the_threads_and_closes_the_port(make_runtime, staged):
    runtime = make_runtime(dashboard=0)
    port = int(runtime.dashboard_url.split(":")[2].split("/")[0])
    assert sorted(dashboard_threads()) == ["routilux-mp dashboard collector", "routilux-mp dashboard server"]
    feed = Feed(runtime.dashboard_url)  # an open page must not keep the server up
    try:
        feed.next()
        runtime.shutdown()
    finally:
        feed.close()
    assert dashboard_threads() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_busy_port_is_refused_before_any_process_starts(make_runtime):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(DashboardError, match=rf"cannot listen on 127.0.0.1:{port}: .*pick another port, or 0"):
            make_runtime(dashboard=port)
    assert dashboard_threads() == []  # (and the fixture checks that no process was left)


@pytest.mark.parametrize("value", [-1, 65536, "8080", 1.5])
def test_a_bad_port_is_a_value_error(make_runtime, value):
    with pytest.raises(ValueError, match="dashboard must be True, False, None or a port number"):
        make_runtime(dashboard=value)


OFF_CHECK = """
import sys
from routilux_mp import Runtime
with Runtime(processes=1{args}) as runtime:
    url = runtime.dashboard_url
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("starlette", "uvicorn", "anyio", "selenium")
                or m.startswith("routilux_mp.dashboard._"))
print(url, loaded)
"""


@pytest.mark.parametrize("args", ["", ", dashboard=False", ", dashboard=None"])
def test_off_nothing_is_imported_or_started(python_env, args):
    proc = subprocess.run([sys.executable, "-c", OFF_CHECK.format(args=args)], env=python_env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None []"
    assert "dashboard:" not in proc.stderr


MISSING_EXTRA = """
import sys
sys.modules["starlette"] = None  # as if the [dashboard] extra were not installed
from routilux_mp import DashboardError, Runtime
try:
    Runtime(processes=1, dashboard=0)
except DashboardError as exc:
    print(exc)
"""


def test_without_the_extra_it_says_what_to_install(python_env):
    proc = subprocess.run([sys.executable, "-c", MISSING_EXTRA], env=python_env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "the dashboard needs the [dashboard] extra" in proc.stdout
    assert "pip install 'routilux-mp[dashboard]'" in proc.stdout


# ---------------------------------------------------------------------------- the CLI


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routilux_mp", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, check=False)


@pytest.mark.parametrize(("args", "message"), [
    (["--dashboard-host", "0.0.0.0"], "--dashboard-host needs --dashboard"),
    (["--dashboard", "http"], "'http' is not a port number"),
    (["--dashboard", "70000"], "70000 is not a port number"),
])
def test_cli_usage_errors(python_env, tmp_path, args, message):
    proc = run_cli("run", write_flow_file(str(tmp_path)), "--input", os.devnull, *args, env=python_env)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_cli_prints_the_url_line_and_serves_the_run(python_env, tmp_path):
    flow_file = write_flow_file(str(tmp_path))
    gate = tmp_path / "gate"
    data = tmp_path / "in.jsonl"
    # (One of lines 1 and 3 may wait for the gated line 4, when it was sent ahead to the same process.)
    data.write_text('{"n": 1}\n{"n": 2, "unparsable": true}\n{"n": 3}\n' + f'{{"n": 4, "gate": "{gate}"}}\n')
    proc = subprocess.Popen([sys.executable, "-m", "routilux_mp", "run", flow_file, "--input", str(data),
                             "--dashboard", "0", "--processes", "3", "--output", str(tmp_path / "out.jsonl")],
                            env=python_env, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        seen = read_until(proc.stderr.fileno(), r"dashboard: http://127\.0\.0\.1:\d+/\?token=\S+\n", LINE_TIMEOUT)
        url = seen.decode().split("dashboard: ")[1].split()[0]
        feed = Feed(url)
        try:
            shown: dict = {}  # what a page shows: snapshots carry the failures only when they change

            def failed_and_done(kind: str, data: dict) -> bool:
                if "failures" in data:
                    shown["failures"] = data["failures"]
                return data.get("done", 0) >= 1 and bool(shown.get("failures"))

            _, snap = feed.until(lambda k, d: failed_and_done(k, d.get("snapshot", d)), "line 2 failed")
            assert snap.get("snapshot", snap)["total"] == 4
            failure = shown["failures"][0]
            assert failure["line"] == 2 and "bad item 2" in failure["traceback"]
            gate.touch()
            _, final = feed.until(lambda k, d: k == "final", "the final snapshot")
            assert final["summary"]["done"] == 4 and final["summary"]["failed"] == 1
        finally:
            feed.close()
        assert proc.wait(RUN_TIMEOUT) == 1  # one line failed
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def test_cli_warns_about_another_host(python_env, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"n": 1}\n')
    proc = run_cli("run", write_flow_file(str(tmp_path)), "--input", str(data), "--dashboard", "0",
                   "--dashboard-host", "0.0.0.0", "--output", str(tmp_path / "out.jsonl"), env=python_env)
    assert proc.returncode == 0, proc.stderr
    assert "warning: the dashboard listens on 0.0.0.0, not only this machine" in proc.stderr
    assert f"dashboard: http://{socket.gethostname()}:" in proc.stderr
