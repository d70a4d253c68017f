"""Preference tuning (stage dpo): DPO / IPO / hinge on TRL's DPOTrainer, or reference-free ORPO / SimPO.

    zhtune train examples/tiny/dpo.yaml         (run.py dispatches stage=dpo here)

Reads top to bottom: setup -> train -> save. The reference model is never a second copy in memory:
  - a new LoRA adapter (on a base or a merged model): TRL disables the adapter for the reference pass,
    so the reference is exactly the model we started from;
  - continuing an adapter (peft_path, e.g. the SFT adapter): TRL keeps a frozen copy of that adapter
    ("ref", adapter-sized) and the reference is base + the SFT adapter, i.e. the SFT model;
  - full fine-tuning: the reference log-probabilities are computed once before training
    (precompute_ref_log_probs) by the model itself, so no second model is kept;
  - orpo / simpo need no reference at all.
Outputs follow the other stages: output_dir/dpo_lora_model/ (or dpo_model/), *_results.json with
rewards/chosen, rewards/rejected, rewards/accuracies and rewards/margins, training_loss.png.
"""

from __future__ import annotations

from pathlib import Path

from zhtune.config import TrainConfig
from zhtune.errors import ZhtuneError
from zhtune.train.callbacks import describe_outputs, describe_setup
from zhtune.train.common import (prepare_model, prepare_output_dir, prepare_tokenizer, record_run, run_parents,
                                 save_outputs, template_for, train_and_evaluate, training_arguments)

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
REFERENCE_FREE = ("orpo", "simpo")


def prepare_policy(cfg: TrainConfig, template, tokenizer=None):
    """(tokenizer, model, expansion, peft_config): a new LoRA adapter is handed to TRL as a config so
    that TRL's reference pass is the model with the adapter disabled."""
    tokenizer, model, expansion = prepare_model(cfg, template, tokenizer)
    _check_head(model)
    if cfg.finetuning_type == "full" or cfg.peft_path or cfg.pref_loss in REFERENCE_FREE:
        return tokenizer, model, expansion, None
    # attach_adapter resolved targets / modules_to_save (and prepared a quantised base); keep its config
    # and give TRL the bare model, which it wraps with exactly that config
    peft_config = model.peft_config["default"]
    return tokenizer, model.unload(), expansion, peft_config


def _check_head(model) -> None:
    """TRL's fused head projects with `lm_head.weight`; a LoRA on lm_head (an adapter trained elsewhere) is not
    in that matrix, so its log-probs would silently ignore it."""
    from peft.tuners.lora import LoraLayer

    if isinstance(model.get_output_embeddings(), LoraLayer):
        raise ZhtuneError("peft_path has a LoRA on lm_head, which TRL's fused DPO head does not apply",
                          where="peft_path", expected="an adapter without lm_head in its target_modules",
                          hint="merge that adapter first (zhtune merge), then run dpo on the merged model")


def expose_head_bias(model) -> None:
    """TRL's fused head reads `lm_head.weight` and `lm_head.bias`. peft's TrainableTokensWrapper (the new rows
    of a grown vocabulary) answers `.weight` with the trained matrix but has no `.bias` attribute; give it the
    wrapped layer's bias (None for LLaMA-family heads), which its own forward ignores too."""
    from peft.utils.other import TrainableTokensWrapper

    head = model.get_output_embeddings()
    if isinstance(head, TrainableTokensWrapper) and "bias" not in head.__dict__:
        head.bias = None


def preference_arguments(cfg: TrainConfig, out: Path, has_eval: bool):
    """DPOConfig (or ORPOConfig / CPOConfig): the arguments every stage trains with + the loss settings."""
    from zhtune.train.memory import offload_activations

    loss = dict(beta=cfg.pref_beta, max_length=cfg.cutoff_len, disable_dropout=True)
    if cfg.pref_loss == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return training_arguments(cfg, out, has_eval, ORPOConfig, **loss)
    if cfg.pref_loss == "simpo":
        from trl.experimental.cpo import CPOConfig

        # SimPO = CPO's simpo loss without the NLL term (cpo_alpha=0); gamma: the target margin
        return training_arguments(cfg, out, has_eval, CPOConfig, **loss, loss_type="simpo", cpo_alpha=0.0)
    from trl import DPOConfig

    # TRL 1.16 computes the chosen/rejected log-probs through its own fused LM head (add_fused_lm_head:
    # chunked, never the full [2B, T, V] logits; Triton on a GPU), so dpo needs no fused_loss of ours
    return training_arguments(cfg, out, has_eval, DPOConfig, **loss, loss_type=[cfg.pref_loss],
                              truncation_mode="keep_start", precompute_ref_log_probs=cfg.finetuning_type == "full",
                              activation_offloading=offload_activations(cfg))


def make_preference_trainer(cfg: TrainConfig, model, tokenizer, data, out: Path, peft_config=None):
    """TRL's DPOTrainer on our pre-tokenised pairs (or ORPO / CPO-SimPO on the rendered texts)."""
    from trl import DPOTrainer

    from zhtune.train.callbacks import LossPlotCallback

    args = preference_arguments(cfg, out, data.eval is not None)
    callbacks = [LossPlotCallback(out)]
    if cfg.pref_loss in REFERENCE_FREE:
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer

        base = ORPOTrainer if cfg.pref_loss == "orpo" else CPOTrainer

        class ReferenceFreeTrainer(base):  # type: ignore[misc, valid-type]
            def create_model_card(self, *args, **kwargs):
                """TRL writes README.md into output_dir at every checkpoint; our output layout has none."""

        columns = ["prompt", "chosen", "rejected"]
        texts = [None if d is None else d.select_columns(columns) for d in (data.train, data.eval)]
        return ReferenceFreeTrainer(model=model, args=args, train_dataset=texts[0], eval_dataset=texts[1],
                                    processing_class=tokenizer, callbacks=callbacks)

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            """Our pairs are already rendered by the SFT template and tokenised like SFT
            (data/preference.py); TRL's own preparation would tokenise them again and add a second BOS."""
            return dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])

        def create_model_card(self, *args, **kwargs):
            """TRL writes README.md into output_dir at every checkpoint; our output layout has none."""

    trainer = PreTokenizedDPOTrainer(model=model, ref_model=None, args=args, train_dataset=data.train,
                                     eval_dataset=data.eval, processing_class=tokenizer, peft_config=peft_config,
                                     callbacks=callbacks)
    expose_head_bias(trainer.accelerator.unwrap_model(trainer.model))   # peft wrapped it inside TRL
    return trainer


def reward_metrics(log_history: list[dict]) -> dict[str, dict]:
    """The last logged rewards/* of training and of evaluation, for the results json."""
    out: dict[str, dict] = {"train": {}, "eval": {}}
    for entry in log_history:
        for key in REWARD_KEYS:
            if key in entry:
                out["train"][key] = entry[key]
            if f"eval_{key}" in entry:
                out["eval"][f"eval_{key}"] = entry[f"eval_{key}"]
    return out


def run(cfg: TrainConfig) -> Path:
    from zhtune.data.preference import build_preference_dataset
    from zhtune.model.adapter import adapter_summary
    from zhtune.train.memory import check_levers, describe_levers

    # --- setup: template, output folder, policy model (+ adapter config for TRL), pairs, trainer
    template = template_for(cfg)
    parents = run_parents(cfg)
    out, resume = prepare_output_dir(cfg)
    check_levers(cfg)
    tokenizer = prepare_tokenizer(cfg, template)
    data = build_preference_dataset(cfg, tokenizer, template)  # bad pairs are named before the model loads
    tokenizer, model, expansion, peft_config = prepare_policy(cfg, template, tokenizer)
    trainer = make_preference_trainer(cfg, model, tokenizer, data, out, peft_config)
    print(describe_setup(cfg, expansion, adapter_summary(trainer.model), resume), flush=True)
    print(f"偏好损失 preference loss: {cfg.pref_loss} (beta={cfg.pref_beta}); reference 参考模型: "
          + _describe_reference(cfg, trainer), flush=True)
    print(describe_levers(cfg, None if cfg.pref_loss in REFERENCE_FREE else ("fused", "TRL's fused LM head")),
          flush=True)

    # --- train (run.yaml first: the same command recognises a killed run and resumes it)
    record_run(cfg, out, parents)
    metrics = train_and_evaluate(trainer, resume, data.eval is not None)
    rewards = reward_metrics(trainer.state.log_history)
    metrics["train"].update(rewards["train"])
    if "eval" in metrics:
        metrics["eval"].pop("perplexity", None)          # exp(DPO loss) means nothing
        metrics["eval"].update(rewards["eval"])
    _drop_reference_adapter(trainer)

    # --- save: out/dpo_lora_model (adapter + tokenizer + run.yaml), results with rewards/*, loss plot
    folder = save_outputs(trainer, cfg, tokenizer, out, metrics, parents)
    print(describe_outputs(out, folder, metrics), flush=True)
    acc = metrics["train"].get("rewards/accuracies")
    if acc is not None:
        print(f"奖励准确率 reward accuracy: {acc:.3f} (train)"
              + (f", {metrics['eval']['eval_rewards/accuracies']:.3f} (eval)"
                 if "eval_rewards/accuracies" in metrics.get("eval", {}) else ""), flush=True)
    return folder


def _describe_reference(cfg: TrainConfig, trainer) -> str:
    if cfg.pref_loss in REFERENCE_FREE:
        return "none (reference-free 无需参考模型)"
    if getattr(trainer, "ref_model", None) is not None:
        return "a second copy of the model"
    if cfg.finetuning_type == "full":
        return "log-probs precomputed before training 训练前预先计算"
    peft = trainer.accelerator.unwrap_model(trainer.model).peft_config
    return "a frozen copy of the peft_path adapter (the SFT model)" if "ref" in peft else \
        "the model with the adapter disabled 关闭适配器的原模型"


def _drop_reference_adapter(trainer) -> None:
    """The frozen 'ref' copy TRL adds when continuing an adapter is not part of the result."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.set_adapter("default")
        model.delete_adapter("ref")
