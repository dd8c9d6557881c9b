"""Scenario ``text`` of ``scripts/bench.py``: a reduce-heavy text job on the bundled corpus.

parse (a JSON line -> a document) -> analyze (~17 ms of pure Python per document:
tokens, a MinHash signature and the counts of word 1-, 2- and 3-grams, about a
thousand distinct terms per document) -> reduce (stateful, one at a time: adds the
document's term counts to WorkerState with one ``increment_many``). The
baselines parse in the main process, ``map`` the analysis on a pool and add the
counts to a ``collections.Counter`` in the main process.

The documents are ``workers/data/corpus.jsonl`` (the wordcount example's corpus);
the analysis reuses its tokenizer and MinHash.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import cloudpickle
from _bench_scenarios import (
    JOBLIB_MISSING,
    RMP,
    BenchError,
    Check,
    Config,
    Scenario,
    SystemFn,
    _ppe_warm,
    _rmp_warm,
    _wait_all,
    joblib_module,
    joblib_pool,
    run_rounds,
)

from routilux_mp import Flow, FlowRegistry, Routine, Runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from workers import wordcount  # (needs the repository root on sys.path, set just above)

# Shipped to workers by value, like a user's script (worker processes do not have the repository on sys.path).
cloudpickle.register_pickle_by_value(wordcount)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: Documents per round (the corpus has 200).
TEXT_DOCS, QUICK_TEXT_DOCS = 80, 24
#: Word n-grams counted per document: 1 to this.
NGRAMS = 3


def analyze(doc: dict) -> tuple[dict[str, int], int]:
    """One document's term counts (word 1- to ``NGRAMS``-grams) and its word count; computes its MinHash too."""
    tokens = wordcount.tokenize(doc["text"])
    wordcount.minhash(tokens)  # the CPU-heavy part of the analysis; the signature is not reduced here
    counts: dict[str, int] = {}
    for k in range(1, NGRAMS + 1):
        for i in range(len(tokens) - k + 1):
            term = " ".join(tokens[i : i + k])
            counts[term] = counts.get(term, 0) + 1
    return counts, len(tokens)


class ParseDoc(Routine):
    """Stage 1 (one at a time): JSON text -> document."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("line")
        self.add_event("doc", ["doc"])

        def logic(slot_data, policy_message, worker_state):
            for item in slot_data["line"]:
                self.emit("doc", doc=json.loads(item["line"]))

        self.set_logic(logic)


class Analyze(Routine):
    """Stage 2 (parallel): a document's term counts."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("doc")
        self.add_event("counted", ["counts", "words"])

        def logic(slot_data, policy_message, worker_state):
            for item in slot_data["doc"]:
                counts, words = analyze(item["doc"])
                self.emit("counted", counts=counts, words=words)

        self.set_logic(logic)
        self.set_max_concurrency(None)


class Reduce(Routine):
    """Stage 3 (stateful, one at a time): add the counts to the worker's totals, atomically."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("counted")

        def logic(slot_data, policy_message, worker_state):
            for item in slot_data["counted"]:
                worker_state.increment_many("terms", item["counts"])
                worker_state.increment_many("totals", {"documents": 1, "words": item["words"]})

        self.set_logic(logic)


def register_text_flow() -> None:
    """Register ``bench-text``: parse -> analyze -> reduce."""
    flow = Flow("bench-text")
    flow.add_routine(ParseDoc(), "parse")
    flow.add_routine(Analyze(), "analyze")
    flow.add_routine(Reduce(), "reduce")
    flow.connect("parse", "doc", "analyze", "doc")
    flow.connect("analyze", "counted", "reduce", "counted")
    FlowRegistry.get_instance().register_by_name("bench-text", flow)


def scenario_text(cfg: Config) -> Scenario:
    """The reduce-heavy text job vs parse + ``map(analyze)`` + a ``Counter`` in the main process."""
    n = cfg.processes
    with open(wordcount.SAMPLE_INPUT, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][: QUICK_TEXT_DOCS if cfg.quick else TEXT_DOCS]
    expected: Counter = Counter()
    words = distinct = 0
    for line in lines:
        counts, w = analyze(json.loads(line))
        expected.update(counts)
        words += w
        distinct += len(counts)
    sc = Scenario("text", "Reduce-heavy text job, documents per second")
    sc.description = (
        f"{len(lines)} documents of workers/data/corpus.jsonl: parse -> analyze (tokens, MinHash, word 1-{NGRAMS}"
        f"-gram counts: {distinct // len(lines)} distinct terms per document on average, {len(expected):,} in all; "
        "parallel) -> reduce (one increment_many of the counts per document into "
        f"WorkerState). Baselines: parse and reduce (Counter.update) in the main process around "
        f"ProcessPoolExecutor({n}).map(analyze) and joblib Parallel({n}) (automatic batching)."
    )
    sc.quantity("docs_per_s", "documents per second, end to end", "docs/s", True)
    rmp, ppe, jl = f"{RMP} Runtime({n})", f"ProcessPoolExecutor({n}) + Counter", f"joblib Parallel({n}) + Counter"

    def reduce_locally(results: Any) -> Counter:
        totals: Counter = Counter()
        for counts, _words in results:
            totals.update(counts)
        return totals

    def run_ppe(_r: int) -> dict:
        with ProcessPoolExecutor(n) as pool:
            _ppe_warm(pool, n, cfg.timeout)
            start = time.perf_counter()
            docs = [json.loads(line) for line in lines]
            totals = reduce_locally(pool.map(analyze, docs, timeout=cfg.timeout))
            elapsed = time.perf_counter() - start
        _same_counts(totals, expected, ppe)
        return {ppe: {"docs_per_s": len(lines) / elapsed}}

    def run_joblib(_r: int) -> dict:
        joblib = joblib_module()
        with joblib_pool(n) as pool:
            start = time.perf_counter()
            docs = [json.loads(line) for line in lines]
            totals = reduce_locally(pool(joblib.delayed(analyze)(doc) for doc in docs))
            elapsed = time.perf_counter() - start
        _same_counts(totals, expected, jl)
        return {jl: {"docs_per_s": len(lines) / elapsed}}

    def run_rmp(_r: int) -> dict:
        with Runtime(processes=n) as runtime:
            ws = runtime.exec("bench-text")
            _rmp_warm(runtime, "bench-text", "parse", "line", {"line": json.dumps({"text": "warm up"})}, 2 * n,
                      cfg.timeout)
            ws.update_routine_state("terms", {})
            ws.update_routine_state("totals", {})
            start = time.perf_counter()
            for line in lines:
                runtime.post("bench-text", "parse", "line", {"line": line}, timeout=cfg.timeout)
            _wait_all(runtime, cfg.timeout, rmp)
            elapsed = time.perf_counter() - start
            _same_counts(Counter(ws.get_routine_state("terms")), expected, rmp)
            if ws.get_routine_state("totals") != {"documents": len(lines), "words": words}:
                raise BenchError(f"{rmp}: wrong totals {ws.get_routine_state('totals')}")
        return {rmp: {"docs_per_s": len(lines) / elapsed}}

    register_text_flow()
    systems: dict[str, SystemFn] = {ppe: run_ppe, rmp: run_rmp}
    if joblib_module():
        systems[jl] = run_joblib
    else:
        sc.notes.append(JOBLIB_MISSING)
    run_rounds(sc, cfg, systems)
    sc.checks.append(Check(f"vs {ppe}", "docs_per_s", rmp, ppe, 1.0))
    if jl in sc.quantities["docs_per_s"].samples:
        sc.checks.append(Check(f"vs {jl}", "docs_per_s", rmp, jl))
    return sc


def _same_counts(totals: Counter, expected: Counter, who: str) -> None:
    if totals != expected:
        raise BenchError(f"{who}: the term counts differ from a serial run's")
