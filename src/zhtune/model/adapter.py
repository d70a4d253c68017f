"""Make a loaded model trainable: LoRA / QLoRA adapters via peft (or continue one), or full fine-tuning.

    model = attach_adapter(model, cfg, new_rows=range(32000, 49953))   # the rows the vocabulary grew by

LoRA targets default to every linear layer of attention and MLP, found by inspecting the model
(q_proj..down_proj on LLaMA/Mistral/Qwen2, W_pack on Baichuan, c_attn/w1/w2 on Qwen-1), never the
output head. When the vocabulary grew, `train_embeddings` says what of embed_tokens / lm_head trains:
only the added rows (new_rows, the default: peft trainable tokens), both whole matrices
(full: modules_to_save, as Chinese-LLaMA-Alpaca did), or nothing. Used by `zhtune train`.

Why new_rows by default: on LLaMA-3 (128,256 x 4096) each whole matrix trained is 525M parameters,
i.e. a trained copy, its gradient and two AdamW moments: ~6 GiB per matrix in bf16 with fp32
moments, more than a 24 GB card can spare beside an 8B model. The old rows already fit the base's
pieces; the new rows are what the new vocabulary lacks, and training only them leaves English
tokens' embeddings exactly as they were. `zhtune merge` merges both formats.
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


def embedding_training(model, cfg: TrainConfig, new_rows: list[int]) -> tuple[list[str], dict[str, list[int]] | None]:
    """(modules_to_save, trainable_token_indices) for peft: modules_to_save as configured, else what
    train_embeddings says for the rows the vocabulary grew by (`new_rows`, empty when it did not grow)."""
    if cfg.modules_to_save is not None:
        return list(cfg.modules_to_save), None
    if not new_rows or cfg.train_embeddings == "none":
        return [], None
    names = embedding_names(model)
    if cfg.train_embeddings == "full":
        return names, None
    # untied: the input and output rows train apart; tied: peft shares one set of rows between the two
    return [], {name: list(new_rows) for name in names}


def attach_adapter(model, cfg: TrainConfig, new_rows=()):
    """Full fine-tuning: the model as is. LoRA/QLoRA: a peft model with only the adapter trainable, plus
    what `train_embeddings` / `modules_to_save` say of the embeddings (`new_rows`: the ids of the rows
    the vocabulary grew by; empty when it did not grow)."""
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
        save, tokens = embedding_training(model, cfg, list(new_rows))
        # a tied head (LLaMA-3.2, SmolLM, Qwen small models) must stay tied: peft then trains one copy for both
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        tied = out is not None and out.weight is inp.weight
        lora = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=resolve_targets(model, list(cfg.lora_target)),
            modules_to_save=list(save) or None, trainable_token_indices=tokens, task_type="CAUSAL_LM",
            bias="none", ensure_weight_tying=bool(tied and save),  # (trainable tokens tie by themselves)
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
        rows = config.trainable_token_indices
        if rows:
            ids = rows if isinstance(rows, list) else next(iter(rows.values()))
            where = ", ".join(rows) if isinstance(rows, dict) else "embed_tokens"
            summary["trainable_rows"] = f"{len(ids)} new rows of {where}"
    return summary
