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
    model = attach_adapter(model, cfg, vocab_grew=False)
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
