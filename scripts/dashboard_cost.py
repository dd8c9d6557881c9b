"""What the dashboard costs the supervisor: its threads' CPU time against the whole supervisor process's.

    python scripts/dashboard_cost.py [--rounds N] [--no-page]

Runs the word-count flow (``workers/wordcount.py``) over its bundled corpus
``--rounds`` times on 2 processes with ``Runtime(dashboard=0)`` and, unless
``--no-page``, a headless Chromium showing the page the whole time (the
system's ``chromium``/``chromedriver``, as in the tests). Then it reads, with
psutil, the CPU time (user + system) of the dashboard's threads (named
``routilux-mp dashboard ...``: the collector, the server, the WorkerState
reader) and of the supervisor process as a whole, over the same span, and
prints both and their ratio. The page shows the same ratio in its footer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "workers")]

from routilux_mp import Runtime
from routilux_mp.dashboard._collect import THREAD_PREFIX


def dashboard_cpu(me: psutil.Process) -> float:
    own = {t.native_id for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)}
    return sum(t.user_time + t.system_time for t in me.threads() if t.id in own)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="passes over the corpus (200 documents each)")
    parser.add_argument("--no-page", action="store_true", help="measure with no page open")
    args = parser.parse_args()
    import wordcount

    with open(wordcount.SAMPLE_INPUT) as corpus:
        docs = [json.loads(line) for line in corpus]
    me = psutil.Process()
    chrome = None
    with Runtime(processes=2, dashboard=0) as runtime:
        if not args.no_page:
            from browser import start_browser

            chrome = start_browser()
            chrome.get(runtime.dashboard_url)
        start_cpu, start_dash, start = sum(me.cpu_times()[:2]), dashboard_cpu(me), time.monotonic()
        for _ in range(args.rounds):
            for doc in docs:
                runtime.post("wordcount", "tokenize", "doc", doc)
        runtime.wait_until_all_jobs_finished()
        wall = time.monotonic() - start
        process = sum(me.cpu_times()[:2]) - start_cpu
        dash = dashboard_cpu(me) - start_dash
    if chrome is not None:
        chrome.quit()
    print(f"{args.rounds * len(docs)} jobs in {wall:.1f} s, page {'closed' if args.no_page else 'open'}: "
          f"supervisor process {process:.2f} s CPU, dashboard threads {dash:.3f} s CPU "
          f"= {100 * dash / process:.2f}% of the supervisor's CPU ({100 * dash / wall:.2f}% of one core)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
