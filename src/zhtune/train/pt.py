"""Continued pre-training (stage pt): plain Chinese text packed into blocks, LoRA / QLoRA / full.

    zhtune train examples/tiny/pt.yaml          (run.py dispatches stage=pt here)

Reads top to bottom: setup -> train -> save.
"""

from __future__ import annotations

from pathlib import Path

from zhtune.config import TrainConfig
from zhtune.train.callbacks import describe_outputs, describe_setup
from zhtune.train.common import (make_trainer, prepare_model, prepare_output_dir, prepare_tokenizer, record_run,
                                 run_parents, save_outputs, template_for, train_and_evaluate)


def run(cfg: TrainConfig) -> Path:
    from zhtune.data.pretrain import build_pretrain_dataset
    from zhtune.model.adapter import adapter_summary
    from zhtune.train.loss import LossTrainer
    from zhtune.train.memory import check_levers, describe_levers, offload_activations, resolve_fused_loss

    # --- setup: output folder (or the run to resume), model + adapter, data, Trainer
    template = template_for(cfg)  # written into the saved tokenizer's chat_template for later stages
    parents = run_parents(cfg)
    out, resume = prepare_output_dir(cfg)
    check_levers(cfg)
    tokenizer = prepare_tokenizer(cfg, template)
    if cfg.streaming:  # tokenised and packed while training; the stream's position goes into each checkpoint
        from zhtune.data.streaming import attach, build_streaming_dataset

        data = build_streaming_dataset(cfg, tokenizer)  # bad settings are named before the model loads
    else:
        data = build_pretrain_dataset(cfg, tokenizer)  # bad data is named before the model loads
    tokenizer, model, expansion = prepare_model(cfg, tokenizer=tokenizer)
    loss = resolve_fused_loss(cfg, model)  # the LM head's loss without full logits (train/loss.py)
    trainer = make_trainer(cfg, model, tokenizer, data, out, trainer_cls=LossTrainer, fused_loss=loss[0],
                           offload_activations=offload_activations(cfg))
    if cfg.streaming:
        attach(trainer, data)
    print(describe_setup(cfg, expansion, adapter_summary(model), resume), flush=True)
    print(describe_levers(cfg, loss), flush=True)

    # --- train (run.yaml first: the same command recognises a killed run and resumes it)
    record_run(cfg, out, parents)
    metrics = train_and_evaluate(trainer, resume, data.eval is not None)

    # --- save: out/pt_lora_model (adapter + tokenizer + run.yaml), results, trainer_state, loss plot
    folder = save_outputs(trainer, cfg, tokenizer, out, metrics, parents)
    print(describe_outputs(out, folder, metrics), flush=True)
    return folder
