"""The FAISS index of `zhtune rag`: build, reuse, rebuild on change, bad indexes, retrieval quality."""

from __future__ import annotations

import json

import pytest

from zhtune import tiny
from zhtune.errors import ZhtuneError
from zhtune.rag.index import MANIFEST, Bm25, lexical_terms, load_embeddings, open_index


def test_build_reuse_rebuild(embeddings, tmp_path, capsys):
    docs_copy = tmp_path / "docs"
    (docs_copy / "sub").mkdir(parents=True)
    text = tiny.asset("rag_docs/xingfan_x3_manual.txt").read_text(encoding="utf-8")
    (docs_copy / "xingfan_x3_manual.txt").write_text(text[:1500], encoding="utf-8")
    (docs_copy / "sub" / "note.md").write_text("云溪镇的望云桥建于明朝。开茶节在三月初三。", encoding="utf-8")
    folder = tmp_path / "idx"
    first = open_index([docs_copy], embeddings, folder, 200, 30)
    assert not first.reused and (folder / "index.faiss").is_file()
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["chunks"] == len(first.chunks) == first.faiss_index.ntotal
    assert len(manifest["files"]) == 2 and manifest["dim"] == embeddings.dim
    stamp = (folder / "index.faiss").stat().st_mtime_ns

    again = open_index([docs_copy], embeddings, folder, 200, 30)
    assert again.reused and (folder / "index.faiss").stat().st_mtime_ns == stamp
    assert [c.page_content for c in again.chunks] == [c.page_content for c in first.chunks]
    assert again.chunks[0].metadata == first.chunks[0].metadata
    capsys.readouterr()

    manual = docs_copy / "xingfan_x3_manual.txt"
    manual.write_text(manual.read_text(encoding="utf-8") + "\n新增一条：星帆X3 的尘盒每周清理一次。\n",
                      encoding="utf-8")
    changed = open_index([docs_copy], embeddings, folder, 200, 30)
    err = capsys.readouterr().err
    assert not changed.reused and "1 modified" in err
    assert any("尘盒每周清理" in c.page_content for c in changed.chunks)
    # only the chunks whose text changed are embedded again; the same text gets the same vector
    assert f"reused {len(changed.chunks) - 1}" in err or f"reused {len(changed.chunks) - 2}" in err
    import numpy as np
    hit = changed.search("星帆X3的尘盒多久清理一次？", 1, "dense")[0][0]
    assert "尘盒每周清理" in hit.page_content
    old = first.faiss_index.reconstruct(0)
    assert np.allclose(changed.faiss_index.reconstruct(0), old, atol=1e-6)

    (docs_copy / "new.md").write_text("新文档：云溪镇的邮编是 123456。", encoding="utf-8")
    added = open_index([docs_copy], embeddings, folder, 200, 30)
    assert not added.reused and "1 added" in capsys.readouterr().err
    assert len(added.chunks) > len(changed.chunks)

    rechunked = open_index([docs_copy], embeddings, folder, 300, 30)
    assert not rechunked.reused and "chunk_size changed" in capsys.readouterr().err

    reopened = open_index(None, embeddings, folder)  # no --docs: the saved index as it is
    assert reopened.reused and len(reopened.chunks) == len(rechunked.chunks)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_bad_indexes(embeddings, tmp_path):
    import faiss

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ZhtuneError, match="no index"):
        open_index(None, embeddings, empty_dir)
    with pytest.raises(ZhtuneError, match="no documents and no index"):
        open_index(None, embeddings, None)

    hollow = tmp_path / "hollow"  # a well-formed index with nothing in it
    hollow.mkdir()
    faiss.write_index(faiss.IndexFlatIP(embeddings.dim), str(hollow / "index.faiss"))
    (hollow / "chunks.jsonl").write_text("", encoding="utf-8")
    (hollow / MANIFEST).write_text(json.dumps({"version": 1, "embedding": embeddings.path, "files": {}}))
    with pytest.raises(ZhtuneError) as info:
        open_index(None, embeddings, hollow)
    assert "empty" in info.value.what and info.value.where == str(hollow)

    other = tmp_path / "other"  # someone's folder: never overwritten
    other.mkdir()
    (other / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ZhtuneError, match="not a zhtune index"):
        open_index([tiny.asset("rag_docs")], embeddings, other, 300, 30)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]

    foreign = tmp_path / "foreign"
    open_index([tiny.asset("rag_docs/yunxi_town.md")], embeddings, foreign, 1000, 0)
    manifest = json.loads((foreign / MANIFEST).read_text())
    manifest["embedding"] = "/somewhere/else"
    (foreign / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ZhtuneError, match="another embedding model"):
        open_index(None, embeddings, foreign)


def test_embedding_errors(tmp_path):
    with pytest.raises(ZhtuneError) as info:
        load_embeddings(tmp_path / "no-such-model")
    assert info.value.where == "--embedding" and "bge-small-zh" in info.value.hint
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{}")
    with pytest.raises(ZhtuneError) as info:
        load_embeddings(tmp_path / "junk")
    assert "junk" in info.value.where


def test_bm25_terms():
    assert lexical_terms("星帆X3扫地机器人 Hello, 1583年") == \
        ["星帆", "x3", "扫地", "地机", "机器", "器人", "hello", "1583", "年"]
    bm = Bm25(["望云桥建于明朝。", "开茶节在三月。", "扫地机器人工作一百五十分钟。"])
    scores = bm.scores("望云桥是哪一年建的？")
    assert scores[0] > 0 and scores[1] == scores[2] == 0


def _gold(chunks, answer: str) -> set[int]:
    """Chunks holding the answer: those sharing (nearly) the most character bigrams with it."""
    grams = {answer[i:i + 2] for i in range(len(answer) - 1)}
    overlap = [len(grams & {c.page_content[i:i + 2] for i in range(len(c.page_content) - 1)}) for c in chunks]
    best = max(overlap)
    return {i for i, o in enumerate(overlap) if o >= 0.8 * best}


def test_retrieval_hit_rate(asset_index, rag_questions, capsys):
    """top-4 hit rate over zhtune/assets/rag_docs with MiniLM (English-centric). Measured 2026-11:
    dense 0.33, bm25 1.00, hybrid 0.67 (31 chunks, so chance is ~0.13). The floors are below that."""
    index = asset_index[0]
    position = {id(c): i for i, c in enumerate(index.chunks)}
    rates = {}
    for mode in ("dense", "bm25", "hybrid"):
        hits = 0
        for q in rag_questions:
            found = {position[id(d)] for d, _ in index.search(q["question"], 4, mode)}
            hits += bool(found & _gold(index.chunks, q["answer"]))
        rates[mode] = hits / len(rag_questions)
    with capsys.disabled():
        print(f"\nrag top-4 hit rate over {len(rag_questions)} questions, {len(index.chunks)} chunks: {rates}")
    assert rates["bm25"] >= 0.8
    assert rates["hybrid"] >= 0.5
    assert rates["dense"] >= 1 / 6   # chance is 4/31: MiniLM knows a little Chinese, not much
