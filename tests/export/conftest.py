"""Fixtures for merge/convert/export: adapters made with peft on the tiny model, as training saves them.

- big_tokenizer_dir: the base SentencePiece model + Chinese pieces appended to its protobuf
- pt_adapter: OUTPUT/pt_lora_model with a resized vocabulary (embed_tokens/lm_head in modules_to_save)
- sft_adapter: OUTPUT/sft_lora_model trained on top of it (LoRA only, template alpaca in run.yaml)
- tokens_adapter: an adapter with trainable-token rows (peft trainable_token_indices)
"""

from __future__ import annotations

import collections
import itertools
import shutil
from pathlib import Path

import pytest

N_NEW = 40  # Chinese pieces appended to the 1000-piece base vocabulary


def _append_pieces(base_sp: Path, lines: list[str], out: Path, n: int) -> Path:
    """Append the n most frequent Chinese characters/bigrams as NORMAL pieces after every base piece."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(base_sp.read_bytes())
    have = {p.piece for p in proto.pieces}
    counts = collections.Counter()
    for line in lines:
        chars = [c for c in line if "\u4e00" <= c <= "\u9fff"]
        counts.update(chars)
        counts.update(a + b for a, b in itertools.pairwise(line)
                      if "\u4e00" <= a <= "\u9fff" and "\u4e00" <= b <= "\u9fff")
    # characters first so every bigram's halves exist; bigrams merge later (lower scores)
    chars = [c for c, _ in counts.most_common() if len(c) == 1 and c not in have][: n // 2]
    pairs = [p for p, _ in counts.most_common() if len(p) == 2 and p not in have and all(c in chars for c in p)]
    new = (chars + pairs)[:n]
    low = min(p.score for p in proto.pieces)
    for i, piece in enumerate(new):
        proto.pieces.append(pb.ModelProto.SentencePiece(piece=piece, score=low - 1 - i, type=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proto.SerializeToString())
    return out


@pytest.fixture(scope="session")
def big_tokenizer_dir(tmp_path_factory, base_sp_model, zh_corpus) -> Path:
    from zhtune.vocab.hf import write_hf_tokenizer

    root = tmp_path_factory.mktemp("big_tok")
    lines = zh_corpus.read_text(encoding="utf-8").splitlines()
    sp = _append_pieces(Path(base_sp_model), lines, root / "sp" / "tokenizer.model", N_NEW)
    return write_hf_tokenizer(sp, root / "tokenizer")


def _randomize(model, seed: int) -> None:
    """Give every adapter weight (LoRA B starts at zero) and saved module a nonzero random change."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def save_adapter(peft_model, out: Path, tokenizer_dir: Path | None, base: Path, template: str | None,
                 stage: str) -> Path:
    """Save like the training stage: OUTPUT/{stage}_lora_model/ + tokenizer files + OUTPUT/run.yaml."""
    from zhtune.io import write_run_yaml

    folder = out / f"{stage}_lora_model"
    peft_model.save_pretrained(str(folder))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, folder / f.name)
    write_run_yaml(out, stage, {"model_name_or_path": str(base), "template": template}, {"model": str(base)})
    return folder


def make_lora(base_model, targets, seed, modules_to_save=None, r=4, alpha=8, **kw):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, modules_to_save=modules_to_save,
                     lora_dropout=0.0, **kw)
    model = get_peft_model(base_model, cfg)
    _randomize(model, seed)
    return model


@pytest.fixture(scope="session")
def pt_adapter(tmp_path_factory, tiny_model_dir, big_tokenizer_dir) -> Path:
    """Vocabulary grown 1000 -> 1040: full embed_tokens and lm_head saved (Chinese-LLaMA's PT recipe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(big_tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.resize_token_embeddings(len(tok))
    peft = make_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 1,
                     modules_to_save=["embed_tokens", "lm_head"])
    return save_adapter(peft, tmp_path_factory.mktemp("pt_out"), big_tokenizer_dir, tiny_model_dir, None, "pt")


@pytest.fixture(scope="session")
def sft_adapter(tmp_path_factory, tiny_model_dir, big_tokenizer_dir) -> Path:
    """An SFT adapter on the expanded model (LoRA only, rank 8, rslora), template alpaca."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(big_tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.resize_token_embeddings(len(tok))
    peft = make_lora(model, ["q_proj", "v_proj", "down_proj"], 2, r=8, alpha=16, use_rslora=True)
    return save_adapter(peft, tmp_path_factory.mktemp("sft_out"), big_tokenizer_dir, tiny_model_dir,
                        "alpaca", "sft")


@pytest.fixture(scope="session")
def tokens_adapter(tmp_path_factory, tiny_model_dir, base_tokenizer_dir) -> Path:
    """LoRA on q_proj + trainable-token rows of embed_tokens (peft saves only those rows)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    peft = make_lora(model, ["q_proj"], 3, trainable_token_indices={"embed_tokens": [5, 17, 900]})
    return save_adapter(peft, tmp_path_factory.mktemp("tok_out"), base_tokenizer_dir, tiny_model_dir,
                        "default", "sft")


@pytest.fixture(scope="session")
def merged_dir(tmp_path_factory, tiny_model_dir, pt_adapter, sft_adapter) -> Path:
    """tiny + pt + sft merged (fp32, HF) — the model the export tests start from."""
    from zhtune.export.merge import merge

    out = tmp_path_factory.mktemp("merged") / "model"
    return merge(tiny_model_dir, [pt_adapter, sft_adapter], out, log=lambda *_: None)
