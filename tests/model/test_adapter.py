"""LoRA targets found by inspection (LLaMA, Qwen2, Mistral), shorthand names, bad names, full fine-tuning."""

from __future__ import annotations

import pytest

from zhtune.config import TRAIN_ALIASES, TrainConfig, load_config
from zhtune.errors import ZhtuneError
from zhtune.model.adapter import attach_adapter, embedding_names, linear_targets, resolve_targets

ALL = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _tiny(kind: str):
    import transformers

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
    config = getattr(transformers, f"{kind}Config")(**common)
    return getattr(transformers, f"{kind}ForCausalLM")(config)


@pytest.mark.parametrize("kind", ["Llama", "Qwen2", "Mistral"])
def test_default_targets_are_every_attention_and_mlp_linear(kind):
    model = _tiny(kind)
    assert linear_targets(model) == ALL  # never lm_head
    assert embedding_names(model) == ["embed_tokens", "lm_head"]


def test_shorthand_and_unknown_targets():
    model = _tiny("Llama")
    assert resolve_targets(model, ["q", "k", "v", "o", "gate", "down", "up"]) == \
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    with pytest.raises(ZhtuneError) as exc:
        resolve_targets(model, ["q_proj", "query_key_value"])
    assert exc.value.where == "lora_target" and "q_proj" in exc.value.expected


def _cfg(**kw):
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in kw.items()], TRAIN_ALIASES)


def test_lora_trains_only_the_adapter_and_saves_embeddings_when_vocab_grew():
    model = attach_adapter(_tiny("Llama"), _cfg(lora_rank=4), vocab_grew=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)
    plain = attach_adapter(_tiny("Llama"), _cfg(lora_rank=4), vocab_grew=False)
    assert not any("modules_to_save" in n for n, p in plain.named_parameters() if p.requires_grad)


def test_full_finetuning_trains_everything():
    model = attach_adapter(_tiny("Llama"), _cfg(finetuning_type="full"), vocab_grew=False)
    assert all(p.requires_grad for p in model.parameters())


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(ZhtuneError) as exc:
        attach_adapter(_tiny("Llama"), _cfg(peft_path=str(tmp_path)), vocab_grew=False)
    assert exc.value.where == "peft_path"
