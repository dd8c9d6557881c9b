"""Rebuild workers/data/corpus.jsonl: the wordcount pipeline's bundled sample.

The text is the Python language reference as shipped with CPython
(``pydoc_data.topics``, PSF License), cut into documents of about
``--words`` words on paragraph boundaries. The output is deterministic for a
given Python version; the committed file was made with CPython 3.11.7.

Usage: python scripts/make_corpus.py [--words 400] [--out workers/data/corpus.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc_data.topics


def documents(words_per_doc: int):
    for topic in sorted(pydoc_data.topics.topics):
        paragraphs = [p.strip() for p in pydoc_data.topics.topics[topic].split("\n\n") if p.strip()]
        chunk: list[str] = []
        count = 0
        part = 1
        for paragraph in paragraphs:
            chunk.append(paragraph)
            count += len(paragraph.split())
            if count >= words_per_doc:
                yield f"{topic}#{part}", "\n\n".join(chunk)
                chunk, count, part = [], 0, part + 1
        if chunk:
            yield f"{topic}#{part}", "\n\n".join(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=400)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "..", "workers", "data", "corpus.jsonl"))
    args = parser.parse_args()
    with open(args.out, "w", encoding="utf-8") as out:
        for n, (doc_id, text) in enumerate(documents(args.words)):
            out.write(json.dumps({"doc_id": doc_id, "text": text}) + "\n")
    print(f"wrote {n + 1} documents to {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
