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


def test_grown_vocabulary_trains_only_the_new_rows_by_default():
    """train_embeddings=new_rows: peft trainable tokens on embed_tokens and lm_head, no whole-matrix copy;
    full: modules_to_save copies (Chinese-LLaMA-Alpaca's way); none: the adapter alone."""
    new = list(range(120, 128))
    model = attach_adapter(_tiny("Llama"), _cfg(lora_rank=4), new_rows=new)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    rows = [p for n, p in trainable.items() if "trainable_tokens_delta" in n]
    assert len(rows) == 2 and all(tuple(p.shape) == (8, 32) for p in rows)      # embed_tokens + lm_head rows
    assert model.peft_config["default"].trainable_token_indices == {"embed_tokens": new, "lm_head": new}
    assert not any("modules_to_save" in n for n in trainable)

    full = attach_adapter(_tiny("Llama"), _cfg(lora_rank=4, train_embeddings="full"), new_rows=new)
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)

    none = attach_adapter(_tiny("Llama"), _cfg(lora_rank=4, train_embeddings="none"), new_rows=new)
    plain = attach_adapter(_tiny("Llama"), _cfg(lora_rank=4), new_rows=())
    for m in (none, plain):
        assert all("lora_" in n for n, p in m.named_parameters() if p.requires_grad)
    explicit = attach_adapter(_tiny("Llama"), _cfg(lora_rank=4, modules_to_save="[lm_head]"), new_rows=new)
    assert {n.split(".modules_to_save")[0].rsplit(".", 1)[-1] for n, p in explicit.named_parameters()
            if p.requires_grad and "modules_to_save" in n} == {"lm_head"}


def test_tied_head_shares_its_new_rows():
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = attach_adapter(transformers.LlamaForCausalLM(config), _cfg(lora_rank=4), new_rows=[126, 127])
    rows = [n for n, p in model.named_parameters() if p.requires_grad and "trainable_tokens_delta" in n]
    assert len(rows) == 1                                           # one set of rows, used by input and output
    assert model.get_output_embeddings().weight is not None


def test_full_finetuning_trains_everything():
    model = attach_adapter(_tiny("Llama"), _cfg(finetuning_type="full"), new_rows=())
    assert all(p.requires_grad for p in model.parameters())


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(ZhtuneError) as exc:
        attach_adapter(_tiny("Llama"), _cfg(peft_path=str(tmp_path)), new_rows=())
    assert exc.value.where == "peft_path"
