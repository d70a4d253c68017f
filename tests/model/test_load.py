"""Loading: fp32 on CPU, QLoRA 4-bit trains on this CPU (also after an eval forward), clear errors."""

from __future__ import annotations

import sys

import pytest
import torch

from zhtune.config import TRAIN_ALIASES, TrainConfig, load_config
from zhtune.errors import ZhtuneError
from zhtune.model.adapter import attach_adapter
from zhtune.model.load import load_model


def _cfg(model_dir, **kw):
    args = [f"model_name_or_path={model_dir}"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(TrainConfig, None, args, TRAIN_ALIASES)


def _lora_grad(model, ids) -> float:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()
               if p.requires_grad and "lora_B" in n and p.grad is not None)


def test_fp32_on_cpu(tiny_model_dir):
    model = load_model(_cfg(tiny_model_dir))
    assert next(model.parameters()).dtype == torch.float32 and model.training


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_on_cpu_even_after_an_eval_forward(tiny_model_dir, bits):
    pytest.importorskip("bitsandbytes")
    # without checkpointing the hidden states do not require grad: the path where bitsandbytes repacks
    cfg = _cfg(tiny_model_dir, finetuning_type="qlora", quantization_bit=bits, lora_rank=4,
               lora_dropout=0, gradient_checkpointing=False)
    model = load_model(cfg)
    kind = "Linear4bit" if bits == 4 else "Linear8bitLt"
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == kind
    model = attach_adapter(model, cfg, new_rows=())
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    before = _lora_grad(model, ids)
    assert before > 0
    model.eval()
    with torch.no_grad():  # what Trainer's evaluation does between training steps
        model(input_ids=ids)
    assert _lora_grad(model, ids) == pytest.approx(before, rel=1e-4)  # gradients still reach every layer


def test_qlora_without_bitsandbytes_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ZhtuneError) as exc:
        load_model(_cfg(tiny_model_dir, finetuning_type="qlora"))
    assert "bitsandbytes" in str(exc.value) and "quantization_bit" in exc.value.where


def test_bad_quantization_bit_and_missing_model(tmp_path):
    with pytest.raises(ZhtuneError) as exc:
        _cfg(tmp_path, quantization_bit=3)
    assert exc.value.where == "quantization_bit"
    with pytest.raises(ZhtuneError) as exc:
        load_model(_cfg(tmp_path / "no-such-model"))
    assert exc.value.where == "model_name_or_path" and "no-such-model" in str(exc.value)
    with pytest.raises(ZhtuneError) as exc:
        load_model(_cfg(""))
    assert exc.value.where == "model_name_or_path"


def _edit_config(folder, **changes):
    import json

    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(changes)
    path.write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_unsupported_architecture_is_named_with_the_supported_list(tmp_path, tiny_model_dir, copy_of, capsys):
    """train, estimate and export gguf refuse a model_type outside the supported list, naming both."""
    from zhtune.cli import main

    gpt2 = _edit_config(copy_of(tiny_model_dir), model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ZhtuneError) as exc:
        load_model(_cfg(gpt2))
    assert "'gpt2'" in str(exc.value) and "GPT2LMHeadModel" in str(exc.value)
    assert "llama, mistral, qwen2, qwen3" in exc.value.expected and exc.value.where == "model_name_or_path"
    for argv in (["estimate", f"model_name_or_path={gpt2}"],
                 ["export", "gguf", "--model", str(gpt2), "--output", str(tmp_path / "x.gguf")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "'gpt2'" in err and "llama, mistral, qwen2, qwen3" in err and "Traceback" not in err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("change,says", [
    ({"vocab_size": 1200}, "model.embed_tokens.weight is [1000, 64] in the weights but config.json implies [1200, 64]"),
    ({"num_hidden_layers": 3}, "the weights have no model.layers.2"),
    ({"num_hidden_layers": 1}, "the weights hold model.layers.1"),
    ({"intermediate_size": 96}, "in the weights but config.json implies [96, 64]"),
])
def test_config_that_disagrees_with_the_weights_is_refused_by_name(change, says, tiny_model_dir, copy_of):
    folder = _edit_config(copy_of(tiny_model_dir), **change)
    with pytest.raises(ZhtuneError) as exc:
        load_model(_cfg(folder))
    assert says in str(exc.value) and exc.value.where.endswith("config.json")


def test_untied_config_without_a_head_is_refused(tiny_model_dir, copy_of):
    from safetensors.torch import load_file, save_file

    folder = copy_of(tiny_model_dir)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["lm_head.weight"]  # a tied checkpoint ...
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ZhtuneError) as exc:  # ... under a config that says the head is its own
        load_model(_cfg(folder))
    assert "lm_head.weight" in str(exc.value) and "tie_word_embeddings" in exc.value.hint
    _edit_config(folder, tie_word_embeddings=True)
    model = load_model(_cfg(folder))  # the same weights with the config that describes them load, tied
    assert model.lm_head.weight is model.model.embed_tokens.weight
