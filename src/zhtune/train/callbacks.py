"""Trainer callbacks shared by every `zhtune train` stage: the loss plot (redrawn at every checkpoint,
so a killed run still shows its curve) and a readable start/end summary.
"""

from __future__ import annotations

import io
from pathlib import Path

from transformers import TrainerCallback

from zhtune.config import TrainConfig
from zhtune.io import atomic_write_bytes


def plot_loss(log_history: list[dict], path: Path) -> Path | None:
    """training_loss.png: training loss per step (and eval loss when there is one). None without data."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss ({Path(path).parent.name})")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


class LossPlotCallback(TrainerCallback):
    """Redraw output_dir/training_loss.png whenever a checkpoint is written and at the end."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / "training_loss.png"

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss(state.log_history, self.path)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss(state.log_history, self.path)


def describe_setup(cfg: TrainConfig, expansion, summary: dict, resume: str | None) -> str:
    """A short bilingual block printed before training starts (the data's block is printed by data/prepare.py's
    summary, or data/streaming.py, before it)."""
    lines = [
        f"阶段 stage:        {cfg.stage} ({cfg.finetuning_type}"
        + (f", {cfg.quantization_bit}-bit" if cfg.quantization_bit else "") + ")",
        f"模型 model:        {cfg.model_name_or_path}",
        f"词表 vocabulary:   {expansion.old_vocab} -> {expansion.new_vocab}"
        + (f" (new rows: {expansion.method or 'mean'} init from {expansion.base_tokenizer}"
           + (f", {expansion.fit['positions']:,} calibration positions" if expansion.fit.get("positions") else "")
           + ")" if expansion.grew else ""),
        f"可训练 trainable:  {summary['trainable_params']:,} / {summary['total_params']:,} parameters",
    ]
    if summary.get("lora_target"):
        lines.append(f"LoRA targets:      {', '.join(summary['lora_target'])} (r={cfg.lora_rank}, "
                     f"alpha={cfg.lora_alpha})")
    if summary.get("modules_to_save"):
        lines.append(f"全量训练 modules_to_save: {', '.join(summary['modules_to_save'])}")
    if summary.get("trainable_rows"):
        lines.append(f"新词行 trainable rows: {summary['trainable_rows']}")
    lines.append(f"输出 output_dir:   {cfg.output_dir}" + (f"  (resuming 从断点继续: {resume})" if resume else ""))
    return "\n".join(lines)


def describe_outputs(out: Path, folder: Path, metrics: dict[str, dict]) -> str:
    """What was written, and the next command to run."""
    train = metrics.get("train", {})
    lines = [f"完成 done: train_loss={train.get('train_loss', float('nan')):.4f} "
             f"in {train.get('train_runtime', 0):.1f}s"]
    if "eval" in metrics:
        ev = metrics["eval"]
        lines.append(f"验证 eval: loss={ev.get('eval_loss', float('nan')):.4f} "
                     f"perplexity={ev.get('perplexity', float('nan')):.2f}")
    lines.append(f"已保存 saved: {folder}")
    lines.append(f"曲线 loss plot: {out / 'training_loss.png'}")
    from zhtune.args import zhtune_command

    chat = zhtune_command("chat", "--model", folder)
    if folder.name.endswith("_lora_model"):
        merged = folder.parent.with_name(folder.parent.name + "-merged")
        lines.append(f"下一步 next: {chat}   ·   {zhtune_command('merge', '--lora', folder, '--output', merged)}")
    else:
        lines.append(f"下一步 next: {chat}")
    return "\n".join(lines)
