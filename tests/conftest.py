"""Session-scoped tiny fixtures, all built by committed code (nothing downloaded, no binary blobs).

- base_sp_model: a LLaMA-like English SentencePiece BPE model trained in-process
- base_tokenizer_dir: its HF tokenizer folder
- tiny_model_dir: a random tiny LlamaForCausalLM (hidden 64, 2 layers) with that tokenizer
- zh_corpus / zh_heldout / en_corpus / sft_qa / dpo_pairs: text assets shipped in zhtune/assets
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

from zhtune import tiny  # noqa: E402

BASE_VOCAB = 1000


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def assets() -> Path:
    return tiny.ASSETS


@pytest.fixture(scope="session")
def en_corpus() -> Path:
    return tiny.asset("en_corpus.txt")


@pytest.fixture(scope="session")
def zh_corpus() -> Path:
    return tiny.asset("zh_corpus.txt")


@pytest.fixture(scope="session")
def zh_heldout() -> Path:
    return tiny.asset("zh_heldout.txt")


@pytest.fixture(scope="session")
def sft_qa() -> Path:
    return tiny.asset("sft_qa.jsonl")


@pytest.fixture(scope="session")
def dpo_pairs() -> Path:
    return tiny.asset("dpo_pairs.jsonl")


@pytest.fixture(scope="session")
def base_sp_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base_sp") / "tokenizer.model"
    return tiny.train_base_sp(tiny.asset_lines("en_corpus.txt"), out, vocab_size=BASE_VOCAB)


@pytest.fixture(scope="session")
def base_tokenizer_dir(tmp_path_factory, base_sp_model) -> Path:
    from zhtune.vocab.hf import write_hf_tokenizer

    return write_hf_tokenizer(base_sp_model, tmp_path_factory.mktemp("base_tok") / "tokenizer")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, base_tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("tiny_model") / "model"
    return tiny.build_tiny_model(out, vocab_size=BASE_VOCAB, seed=0, tokenizer_dir=base_tokenizer_dir)


@pytest.fixture()
def copy_of(tmp_path):
    """copy_of(path) -> a private copy a test may modify."""

    def _copy(src: Path) -> Path:
        dst = tmp_path / Path(src).name
        if Path(src).is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst

    return _copy
