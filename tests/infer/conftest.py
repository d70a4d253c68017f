"""Fixtures for the inference tests: LoRA adapters on the tiny model (one plain, one with a resized
vocabulary, one for another base), written the way `zhtune train` writes them (adapter + run.yaml)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from zhtune import tiny
from zhtune.io import write_run_yaml


def make_lora(base_dir: Path, out: Path, seed: int = 1, resize_to: int | None = None,
              template: str | None = "alpaca", tokenizer_dir: Path | None = None) -> Path:
    """A LoRA adapter with random non-zero B (so it changes the logits), saved with peft, plus the
    run.yaml `zhtune train` writes beside it (OUTPUT/run.yaml + OUTPUT/sft_lora_model/)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    modules_to_save = None
    if resize_to:
        model.resize_token_embeddings(resize_to, mean_resizing=False)
        modules_to_save = ["embed_tokens", "lm_head"]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save,
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = out / "sft_lora_model"
    peft_model.save_pretrained(adapter)
    for f in Path(tokenizer_dir or base_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, adapter / f.name)
    config = {"model_name_or_path": str(base_dir), "stage": "sft"}
    if template:
        config["template"] = template
    write_run_yaml(out, "sft", config, parents={"model": str(base_dir)})
    return adapter


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return make_lora(tiny_model_dir, tmp_path_factory.mktemp("lora") / "out", seed=1)


@pytest.fixture(scope="session")
def other_base_lora(tmp_path_factory, base_tokenizer_dir) -> Path:
    """An adapter trained on a different base (hidden 32 instead of 64)."""
    root = tmp_path_factory.mktemp("other")
    base = tiny.build_tiny_model(root / "base", vocab_size=1000, seed=5, tokenizer_dir=base_tokenizer_dir,
                                 hidden_size=32, num_heads=4, num_kv_heads=2)
    return make_lora(base, root / "out", seed=2)


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    """One hf engine over the tiny model shared by the tests (loading costs ~1 s)."""
    from zhtune.infer.resolve import load_engine

    eng = load_engine(str(tiny_model_dir))
    yield eng
    eng.close()
