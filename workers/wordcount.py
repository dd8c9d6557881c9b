"""Word frequencies and near-duplicate signatures over a text corpus (map/reduce).

The README's main job. Each input line is a document ``{"doc_id", "text"}``.

* ``tokenize`` (parallel, CPU-heavy): normalizes and tokenizes one document,
  counts its words, and computes a MinHash signature of its word 3-grams
  (the classic near-duplicate detector), all in pure Python. Stateless, so it
  runs with ``set_max_concurrency(None)``: one activation per process at once.
* ``count`` (stateful, one activation at a time): adds the document's word
  counts to the worker's running totals with one atomic ``increment_many``
  and emits a per-document summary, the job's output.

Run it::

    routilux-mp run workers/wordcount.py            # bundled corpus, progress UI
    python workers/wordcount.py [--processes N]     # prints the top words

The bundled corpus (``workers/data/corpus.jsonl``) is the Python language
reference shipped with CPython (``pydoc_data``, PSF License), cut into 200
documents by ``scripts/make_corpus.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time

from routilux_mp import Flow, FlowRegistry, Routine, Runtime

#: The file ``routilux-mp run workers/wordcount.py`` reads when no ``--input`` is given.
SAMPLE_INPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "corpus.jsonl")

#: Hash functions in the MinHash signature (more = finer similarity, more CPU).
NUM_PERM = 256
_MERSENNE = (1 << 61) - 1
_WORD = re.compile(r"[a-z][a-z0-9_']+")
_SUFFIXES = ("ingly", "edly", "ing", "ed", "ly", "es", "s")
_STOP = frozenset(
    ["a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "in", "is", "it", "its", "of", "on", "or", "that", "the", "this", "to", "was", "were", "will", "with", "if", "not", "no", "can", "may", "be", "which", "when", "than", "then", "there", "these", "those", "do", "does"]
)


def _permutations(n: int) -> list[tuple[int, int]]:
    """Deterministic (a, b) pairs for the hash family (a*x + b) mod 2^61-1."""
    pairs = []
    for i in range(n):
        digest = hashlib.blake2b(f"perm-{i}".encode(), digest_size=16).digest()
        pairs.append((int.from_bytes(digest[:8], "big") % _MERSENNE or 1, int.from_bytes(digest[8:], "big") % _MERSENNE))
    return pairs


_PERMS = _permutations(NUM_PERM)


def stem(word: str) -> str:
    """A deliberately simple suffix stripper (enough to fold plurals and tenses)."""
    if word.endswith(("ss", "us", "is")):
        return word
    for suffix in _SUFFIXES:
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def tokenize(text: str) -> list[str]:
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP]


def minhash(tokens: list[str], k: int = 3) -> list[int]:
    """MinHash signature of the word k-grams of ``tokens``."""
    signature = [_MERSENNE] * NUM_PERM
    shingles = {" ".join(tokens[i : i + k]) for i in range(max(1, len(tokens) - k + 1))}
    for shingle in shingles:
        x = int.from_bytes(hashlib.blake2b(shingle.encode(), digest_size=8).digest(), "big")
        for i, (a, b) in enumerate(_PERMS):
            h = (a * x + b) % _MERSENNE
            if h < signature[i]:  # noqa: PLR1730 - hot loop: a compare is cheaper than min()
                signature[i] = h
    return signature


class Tokenize(Routine):
    """Map: one document -> its word counts and MinHash signature."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("doc")
        self.add_event("counted", ["doc_id", "counts", "words", "signature"])

        def logic(slot_data, policy_message, worker_state):
            for doc in slot_data["doc"]:
                tokens = tokenize(doc["text"])
                counts: dict[str, int] = {}
                for token in tokens:
                    counts[token] = counts.get(token, 0) + 1
                signature = minhash(tokens)
                digest = hashlib.blake2b(repr(signature).encode(), digest_size=8).hexdigest()
                self.emit("counted", doc_id=doc["doc_id"], counts=counts, words=len(tokens), signature=digest)

        self.set_logic(logic)
        self.set_max_concurrency(None)  # stateless: spread it over every process


class Count(Routine):
    """Reduce: add each document's counts to the worker's totals, atomically."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("counted")
        self.add_event("summary", ["doc_id", "words", "distinct", "top", "signature"])

        def logic(slot_data, policy_message, worker_state):
            for item in slot_data["counted"]:
                worker_state.increment_many("count", item["counts"])
                worker_state.increment_many("totals", {"documents": 1, "words": item["words"]})
                top = sorted(item["counts"].items(), key=lambda kv: (-kv[1], kv[0]))[:5]
                self.emit("summary", doc_id=item["doc_id"], words=item["words"], distinct=len(item["counts"]),
                          top=top, signature=item["signature"])

        self.set_logic(logic)


def build_flow() -> Flow:
    flow = Flow("wordcount")
    flow.add_routine(Tokenize(), "tokenize")
    flow.add_routine(Count(), "count")
    flow.connect("tokenize", "counted", "count", "counted")
    return flow


FlowRegistry.get_instance().register_by_name("wordcount", build_flow())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Word frequencies over a JSONL corpus on worker processes.")
    parser.add_argument("--input", default=SAMPLE_INPUT, help="JSONL file of {doc_id, text} (default: bundled corpus)")
    parser.add_argument("--processes", type=int, default=None, help="worker processes (default: CPU count)")
    parser.add_argument("--top", type=int, default=15, help="how many words to print")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with Runtime(processes=args.processes) as runtime:
        ws = runtime.exec("wordcount")
        with open(args.input, encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    runtime.post("wordcount", "tokenize", "doc", json.loads(line))
        runtime.wait_until_all_jobs_finished()
        counts = ws.get_routine_state("count") or {}
        totals = ws.get_routine_state("totals") or {}
        stats = runtime.stats()
    elapsed = time.perf_counter() - started
    print(f"{totals.get('documents', 0)} documents, {totals.get('words', 0)} words, {len(counts)} distinct "
          f"in {elapsed:.2f}s on {runtime.processes} processes")
    for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: args.top]:
        print(f"{n:8d}  {word}")
    busy = {rid: r["busy_seconds"] for rid, r in stats["routines"].items()}
    print("busy seconds per routine:", ", ".join(f"{rid} {s:.2f}" for rid, s in busy.items()))
    return 0 if stats["jobs"].get("failed", 0) == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
