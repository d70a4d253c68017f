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


@pytest.fixture(scope="session", autouse=True)
def data_cache_dir(tmp_path_factory) -> Path:
    """`zhtune train`'s tokenised-data cache (default ~/.cache/zhtune/data) goes to a session temp folder."""
    if not os.environ.get("ZHTUNE_DATA_CACHE"):
        os.environ["ZHTUNE_DATA_CACHE"] = str(tmp_path_factory.mktemp("data_cache"))
    return Path(os.environ["ZHTUNE_DATA_CACHE"])


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


@pytest.fixture(scope="session")
def grown_tokenizer_dir(tmp_path_factory, base_sp_model) -> Path:
    """The base tokenizer with ~300 Chinese pieces appended after every base piece (what `vocab merge`
    produces), built directly on the SentencePiece protobuf; the base model is kept beside it as
    base_tokenizer.model, where `vocab merge` records it."""
    import collections

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    from zhtune.vocab.hf import write_hf_tokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(base_sp_model).read_bytes())
    have = {p.piece for p in proto.pieces}
    text = "".join(tiny.asset_lines("zh_corpus.txt"))
    cjk = [c for c in text if "\u4e00" <= c <= "\u9fff"]
    bigrams = collections.Counter(a + b for a, b in zip(cjk, cjk[1:]))
    pieces = [c for c, _ in collections.Counter(cjk).most_common(200)] + [b for b, _ in bigrams.most_common(80)]
    pieces += ["\u2581" + c for c, _ in collections.Counter(cjk).most_common(20)]
    score = min(p.score for p in proto.pieces) - 1.0
    for piece in dict.fromkeys(pieces):
        if piece not in have:
            proto.pieces.add(piece=piece, score=score, type=sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL)
            score -= 0.01  # each after the last: English is tokenised exactly as before
    root = tmp_path_factory.mktemp("grown_tok")
    (root / "merged.model").write_bytes(proto.SerializeToString())
    spm.SentencePieceProcessor(model_file=str(root / "merged.model"))  # it loads
    out = write_hf_tokenizer(root / "merged.model", root / "tokenizer")
    shutil.copyfile(base_sp_model, out / "base_tokenizer.model")
    return out


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory, tiny_model_dir):
    """The tiny model exported to an f16 GGUF by `zhtune export gguf`'s function."""
    pytest.importorskip("llama_cpp")
    from zhtune.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "tiny.f16.gguf"
    return export_gguf(tiny_model_dir, out, quant="f16", modelfile=False, log=lambda *a: None)


# --- byte-level BPE bases (LLaMA-3, GPT-2, Qwen2, SmolLM, Mistral-Nemo style), built on first use -----------------
BYTELEVEL_FAMILIES = ("llama3", "gpt2", "qwen2", "smollm", "tekken")
BL_ZH_VOCAB = 4000  # Chinese byte-level BPE trained on zh_corpus by `vocab train --base`


def _cached(tmp_path_factory, build):
    cache: dict = {}

    def get(*key):
        if key not in cache:
            cache[key] = build(tmp_path_factory.mktemp("_".join(map(str, key))), *key)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def bytelevel_base(tmp_path_factory):
    """bytelevel_base(family) -> an English byte-level BPE tokenizer folder built like that family's (1000 tokens
    plus its special tokens)."""
    return _cached(tmp_path_factory, lambda root, family: tiny.train_bytelevel_base(
        tiny.asset_lines("en_corpus.txt"), root / f"{family}_base", family))


@pytest.fixture(scope="session")
def bytelevel_zh(tmp_path_factory, bytelevel_base):
    """bytelevel_zh(family) -> `zhtune vocab train --base BASE` on the Chinese corpus (tokenizer.json folder)."""
    from zhtune import cli

    def build(root, family):
        out = root / "zh_vocab"
        assert cli.main(["vocab", "train", "--corpus", str(tiny.asset("zh_corpus.txt")), "--vocab-size",
                         str(BL_ZH_VOCAB), "--base", str(bytelevel_base(family)), "--output", str(out)]) == 0
        return out

    return _cached(tmp_path_factory, build)


@pytest.fixture(scope="session")
def bytelevel_merged(tmp_path_factory, bytelevel_base, bytelevel_zh):
    """bytelevel_merged(family) -> `zhtune vocab merge --base BASE --add ZH` output folder."""
    from zhtune import cli

    def build(root, family):
        out = root / "merged"
        assert cli.main(["vocab", "merge", "--base", str(bytelevel_base(family)), "--add", str(bytelevel_zh(family)),
                         "--output", str(out)]) == 0
        return out

    return _cached(tmp_path_factory, build)
