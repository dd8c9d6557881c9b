"""The dashboard page in a real browser: headless Chromium (the system's) driven by Selenium.

Each test starts its own browser and quits it (the leftover-process fixture
checks that chromium and chromedriver are gone). Every wait has a deadline
(:data:`browser.PAGE_TIMEOUT`). Screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from browser import PAGE_TIMEOUT, save_screenshot, start_browser
from cli_support import LINE_TIMEOUT, ROOT, RUN_TIMEOUT, read_until
from dashboard_support import ROUTINES, register_staged_flow, write_flow_file

#: Seconds for the jobs a test posts to finish.
JOBS_TIMEOUT = 60.0


@pytest.fixture
def chrome():
    browser = start_browser()
    yield browser
    browser.quit()


def wait_for(chrome, condition, what: str):
    """Wait until ``condition(driver)`` is truthy; fail with ``what`` after :data:`PAGE_TIMEOUT`."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(chrome, PAGE_TIMEOUT, poll_frequency=0.05).until(
        condition, message=f"the page did not show {what} within {PAGE_TIMEOUT} s")


def text(chrome, element_id: str) -> str:
    return chrome.find_element("id", element_id).text


def graph_routines(chrome) -> set[str]:
    return {node.get_attribute("data-routine") for node in chrome.find_elements("css selector", "#graph g.node")}


def test_the_page_shows_a_live_run(make_runtime, tmp_path, chrome):
    register_staged_flow(str(tmp_path))
    runtime = make_runtime(dashboard=0)
    chrome.get(runtime.dashboard_url)
    wait_for(chrome, lambda d: text(d, "status") == "live", "the live feed")
    jobs = [runtime.post("staged", "parse", "raw", {"n": n, "fail": n == 2})[1] for n in range(4)]
    assert runtime.wait_until_all_jobs_finished(JOBS_TIMEOUT)

    wait_for(chrome, lambda d: text(d, "done") == "4", "4 jobs done")
    assert text(chrome, "completed") == "3" and text(chrome, "failed") == "1"
    wait_for(chrome, lambda d: graph_routines(d) == set(ROUTINES), "every routine in the graph")
    failure = wait_for(chrome, lambda d: d.find_elements("css selector", f'.failure[data-job="{jobs[2].job_id}"]'),
                       "the failed job")[0]
    traceback = failure.find_element("css selector", "pre.traceback").text
    assert "ValueError: bad item 2" in traceback and "Traceback" in traceback
    pids = {str(p["pid"]) for p in runtime.stats()["processes"]}
    wait_for(chrome, lambda d: {row.get_attribute("data-pid") for row in d.find_elements("css selector",
                                                                                          "#procs tbody tr")} == pids,
             "every worker process in the table")

    runtime.post("staged", "parse", "raw", {"n": 7})  # the counters move
    assert runtime.wait_until_all_jobs_finished(JOBS_TIMEOUT)
    wait_for(chrome, lambda d: text(d, "done") == "5", "the done counter moving to 5")

    chrome.find_element("css selector", "#states > summary").click()  # the WorkerState explorer, read live
    wait_for(chrome, lambda d: '"seen": 4' in d.find_element("id", "states-body").get_attribute("textContent"),
             "collect's state in the explorer")
    save_screenshot(chrome, "dashboard-live.png")

    runtime.shutdown()
    wait_for(chrome, lambda d: text(d, "status") == "finished", "the run finished")
    assert "5 jobs in" in text(chrome, "summary-line") and "1 failed" in text(chrome, "summary-line")
    save_screenshot(chrome, "dashboard-final.png")


@pytest.mark.parametrize("token", ["", "not-the-token"])
def test_a_wrong_token_is_refused(make_runtime, tmp_path, chrome, token):
    register_staged_flow(str(tmp_path))
    runtime = make_runtime(dashboard=0)
    base = runtime.dashboard_url.partition("?")[0]
    chrome.get(f"{base}?token={token}")
    body = chrome.find_element("tag name", "body").text
    assert body.startswith("403: this dashboard needs the token")
    assert not chrome.find_elements("id", "graph")


def test_a_cli_run_is_shown_until_its_end(python_env, tmp_path, chrome):
    """``routilux-mp run ... --dashboard 0``: the URL line, the page during the run, then the final summary."""
    flow_file = write_flow_file(str(tmp_path))
    gate = tmp_path / "gate"
    data = tmp_path / "in.jsonl"
    lines = [f'{{"n": {n}}}' for n in range(1, 6)] + ['{"n": 6, "unparsable": true}', f'{{"n": 7, "gate": "{gate}"}}']
    data.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "routilux_mp", "run", flow_file, "--input", str(data),
                             "--dashboard", "0", "--processes", "3", "--no-progress", "--output", str(tmp_path / "out.jsonl")],
                            env=python_env, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        seen = read_until(proc.stderr.fileno(), r"dashboard: http://127\.0\.0\.1:\d+/\?token=\S+\n", LINE_TIMEOUT)
        chrome.get(seen.decode().split("dashboard: ")[1].split()[0])
        # Up to 6 of the 7 lines end before the gate opens (one sent ahead to the gated line's process waits).
        wait_for(chrome, lambda d: text(d, "done").isdigit() and int(text(d, "done")) >= 1, "lines done")
        assert text(chrome, "total") == "7"
        wait_for(chrome, lambda d: graph_routines(d) == set(ROUTINES), "every routine in the graph")
        failure = wait_for(chrome, lambda d: d.find_elements("css selector", '.failure[data-job="line-6"]'),
                           "line 6's failure")[0]
        assert "line 6" in failure.text
        assert "ValueError: bad item 6" in failure.find_element("css selector", "pre.traceback").text
        gate.touch()
        wait_for(chrome, lambda d: text(d, "status") == "finished", "the end of the run")
        assert proc.wait(RUN_TIMEOUT) == 1  # one line failed
        assert text(chrome, "done") == "7"  # the page keeps the final numbers after the process is gone
        assert "7 jobs in" in text(chrome, "summary-line")
        save_screenshot(chrome, "dashboard-cli-final.png")
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
