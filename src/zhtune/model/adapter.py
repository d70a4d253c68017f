"""Make a loaded model trainable: LoRA / QLoRA adapters via peft (or continue one), or full fine-tuning.

    model = attach_adapter(model, cfg, vocab_grew=True)

LoRA targets default to every linear layer of attention and MLP, found by inspecting the model
(q_proj..down_proj on LLaMA/Mistral/Qwen2, W_pack on Baichuan, c_attn/w1/w2 on Qwen-1), never the
output head. When the vocabulary grew, the embeddings and the head are trained in full and saved
with the adapter (modules_to_save). Used by `zhtune train`.
"""

from __future__ import annotations

from pathlib import Path

from zhtune.config import TrainConfig
from zhtune.errors import ZhtuneError


def _is_linear(module) -> bool:
    import torch

    # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear; GPT-2-style models use Conv1D
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def embedding_names(model) -> list[str]:
    """Short names of the input embeddings and the output head, e.g. ['embed_tokens', 'lm_head']."""
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    names = []
    for name, module in model.named_modules():
        if any(module is w for w in wanted) and _short(name) not in names:
            names.append(_short(name))
    return names


def linear_targets(model) -> list[str]:
    """Short names of every linear layer except the output head (and anything called lm_head)."""
    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if _is_linear(module) and module is not head and "lm_head" not in name:
            names.add(_short(name))
    return sorted(names)


def resolve_targets(model, wanted: list[str]) -> list[str]:
    """`lora_target` as given (with the seeds' shorthand q,k,v,o,gate,up,down accepted) -> module names."""
    found = linear_targets(model)
    if not wanted or wanted == ["all"]:
        if not found:
            raise ZhtuneError("found no linear layers to adapt in this model", where="lora_target",
                              expected="module names, e.g. q_proj,v_proj")
        return found
    out = []
    for name in wanted:
        if name in found:
            out.append(name)
        elif f"{name}_proj" in found:
            out.append(f"{name}_proj")
        else:
            raise ZhtuneError(f"lora_target {name!r} is not a linear layer of this model", where="lora_target",
                              expected=f"some of: {', '.join(found)} (or leave it empty for all of them)")
    return out


def attach_adapter(model, cfg: TrainConfig, vocab_grew: bool):
    """Full fine-tuning: the model as is. LoRA/QLoRA: a peft model with only the adapter trainable."""
    if cfg.finetuning_type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization_bit is not None:
        # fp32 norms/head, frozen base, and input grads so checkpointing works through 4/8-bit layers
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(cfg.gradient_checkpointing),
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.peft_path:
        from zhtune.export.adapters import check_adapter

        path = Path(cfg.peft_path).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise ZhtuneError(f"no adapter_config.json in {path}", where="peft_path",
                              expected="an adapter folder written by `zhtune train` (e.g. out/pt_lora_model)")
        check_adapter(path, "peft_path")  # a truncated or pickled adapter is named, not a library traceback
        model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
    else:
        save = cfg.modules_to_save
        if save is None:
            save = embedding_names(model) if vocab_grew else []
        # a tied head (LLaMA-3.2, SmolLM, Qwen small models) must stay tied: peft then trains one copy for both
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        tied = out is not None and out.weight is inp.weight
        lora = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=resolve_targets(model, list(cfg.lora_target)),
            modules_to_save=list(save) or None, task_type="CAUSAL_LM", bias="none",
            ensure_weight_tying=bool(tied and save),
        )
        model = get_peft_model(model, lora)
    model.train()
    return model


def adapter_summary(model) -> dict:
    """What is trained: target modules, modules_to_save, trainable / total parameters."""
    from zhtune.model.load import count_parameters

    trainable, total = count_parameters(model)
    summary = {"trainable_params": trainable, "total_params": total}
    config = getattr(model, "peft_config", {}).get("default") if hasattr(model, "peft_config") else None
    if config is not None:
        summary["lora_target"] = sorted(config.target_modules or [])
        summary["modules_to_save"] = sorted(config.modules_to_save or [])
    return summary
