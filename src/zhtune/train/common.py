"""What every `zhtune train` stage shares and must get right: the output folder guard and resume point,
model preparation, TrainingArguments, and saving the adapter / model folder atomically.

The stage files (pt.py, sft.py, dpo.py) call these top to bottom: setup -> train -> save.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from zhtune.config import to_dict
from zhtune.errors import ZhtuneError
from zhtune.io import RUN_FILE, atomic_output_dir, atomic_write_json, read_run_yaml, write_run_yaml

# keys that may change between a run and its resumption without making it "another run"
VOLATILE_KEYS = {"overwrite_output_dir", "resume_from_checkpoint", "report_to", "logging_steps",
                 "dataloader_num_workers", "preprocessing_num_workers", "data_cache", "nproc_per_node",
                 "save_total_limit"}
# what a zhtune train run writes into output_dir (anything else there is foreign)
RUN_FILES = {RUN_FILE, "trainer_state.json", "train_results.json", "eval_results.json", "all_results.json",
             "training_loss.png", "runs"}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _ours(name: str) -> bool:
    return name in RUN_FILES or name.startswith(("checkpoint-", ".")) or name.endswith(("_lora_model", "_model"))


def _last_complete_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint-N that was written to the end (Trainer writes trainer_state.json last)."""
    found = []
    for child in out.glob("checkpoint-*"):
        step = child.name.split("-", 1)[1]
        if child.is_dir() and step.isdigit() and (child / "trainer_state.json").is_file():
            found.append((int(step), child))
    return max(found)[1] if found else None


def prepare_output_dir(cfg) -> tuple[Path, str | None]:
    """Check output_dir (writing nothing) and return (output_dir, checkpoint to resume from or None).

    The same config in run.yaml -> resume; another run's config or foreign files -> refused unless
    overwrite_output_dir (which starts over).
    """
    if not cfg.output_dir:
        raise ZhtuneError("output_dir is not set", where="output_dir", expected="a folder for this run's outputs")
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ZhtuneError(f"output_dir is a file: {out}", where="output_dir", expected="a folder")
    current = {k: v for k, v in to_dict(cfg).items() if k not in VOLATILE_KEYS}
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite_output_dir:
        recorded = read_run_yaml(out)
        previous = {k: v for k, v in (recorded.get("config") or {}).items() if k not in VOLATILE_KEYS}
        foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name))
        if not recorded or foreign:
            raise ZhtuneError(f"output_dir {out} holds files that are not from a zhtune train run: "
                              f"{', '.join(foreign[:5]) or RUN_FILE + ' is missing'}", where="output_dir",
                              expected="a new or empty folder, or the folder of this same run (to resume)",
                              hint="choose another output_dir or set overwrite_output_dir=true")
        changed = sorted(k for k in set(current) | set(previous) if current.get(k) != previous.get(k))
        if changed:
            raise ZhtuneError(f"output_dir {out} holds another run (its run.yaml differs in: "
                              f"{', '.join(changed[:8])})", where="output_dir",
                              expected="the same config to resume that run, or a new folder",
                              hint="choose another output_dir or set overwrite_output_dir=true to start over")
    return out, _resume_point(cfg, out)


def record_run(cfg, out: Path, parents: dict[str, str]) -> None:
    """Write output_dir/run.yaml just before training (after everything that can fail on bad input),
    so the same command later recognises this run and resumes it."""
    if not is_main_process():
        return
    if cfg.overwrite_output_dir and out.is_dir():
        for child in out.glob("checkpoint-*"):  # starting over: old checkpoints must not be resumed
            shutil.rmtree(child, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_run_yaml(out, cfg.stage, to_dict(cfg), _local(parents))


def _resume_point(cfg, out: Path) -> str | None:
    value = cfg.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", "none", ""):
        return None
    if cfg.overwrite_output_dir and value == "auto":
        return None
    if value == "auto":
        found = _last_complete_checkpoint(out)
        return str(found) if found else None
    path = Path(value).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise ZhtuneError(f"not a complete checkpoint: {path}", where="resume_from_checkpoint",
                          expected="auto, null, or a checkpoint-N folder holding trainer_state.json")
    return str(path)


def _local(parents: dict[str, str]) -> dict[str, str]:
    """Parent paths that exist locally (Hub ids stay in the config, not as resolved paths)."""
    return {k: v for k, v in parents.items() if v and Path(v).expanduser().exists()}


def run_parents(cfg) -> dict[str, str]:
    """The folders this run derives from, recorded in run.yaml for merge / chat to find."""
    return {"model": cfg.model_name_or_path, "tokenizer": cfg.tokenizer_name_or_path or cfg.model_name_or_path,
            "peft_path": cfg.peft_path or "", "base_tokenizer": cfg.base_tokenizer or ""}


def template_for(cfg):
    """The config's chat template; an unknown name is an error that names the `template` key."""
    from zhtune.data.templates import get_template

    try:
        return get_template(cfg.template)
    except ZhtuneError as exc:
        exc.where = exc.where or "template"
        raise


# --- model ------------------------------------------------------------------------------------

def prepare_model(cfg, template=None):
    """tokenizer (+ template's chat_template) -> base model -> grown vocabulary -> adapter.

    Returns (tokenizer, model, expansion info).
    """
    from transformers import set_seed

    from zhtune.data.templates import install
    from zhtune.model.adapter import attach_adapter
    from zhtune.model.embeddings import base_tokenizer_path, calibration_texts, check_vocab_sizes, expand_embeddings
    from zhtune.model.load import load_model, load_tokenizer

    set_seed(cfg.seed)  # LoRA's random init must be the same in a resumed and a fresh run
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg)
    check_vocab_sizes(model, tokenizer)  # before adding template tokens: a too-small tokenizer is a mistake
    if template is not None:
        install(tokenizer, template)
    expansion = expand_embeddings(model, tokenizer, base_tokenizer_path(cfg), method=cfg.embedding_init,
                                  calibration=lambda: calibration_texts(cfg))  # read only if the vocab grew
    model = attach_adapter(model, cfg, expansion.grew)
    return tokenizer, model, expansion


# --- Trainer ----------------------------------------------------------------------------------

def training_arguments(cfg, out: Path, has_eval: bool):
    """TrainingArguments from the config (+ training_args passed through, checked against transformers)."""
    from transformers import TrainingArguments

    from zhtune.model.load import device_kind, mixed_precision

    bf16, fp16 = mixed_precision(cfg)
    _check_reporters(cfg.report_to)
    kwargs: dict[str, Any] = dict(
        output_dir=str(out), per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim, logging_steps=cfg.logging_steps, logging_first_step=True, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, seed=cfg.seed, bf16=bf16, fp16=fp16,
        eval_strategy="steps" if has_eval and cfg.eval_steps else "no", eval_steps=cfg.eval_steps,
        activation_checkpointing=bool(cfg.gradient_checkpointing),  # transformers 5's gradient_checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        report_to=[r for r in cfg.report_to if r != "none"] or "none",
        dataloader_num_workers=cfg.dataloader_num_workers, remove_unused_columns=False, label_names=["labels"],
        deepspeed=cfg.deepspeed, fsdp=cfg.fsdp or "", fsdp_config=cfg.fsdp_config,
        use_cpu=device_kind() == "cpu", include_num_input_tokens_seen=True,
        ddp_find_unused_parameters=False if cfg.finetuning_type != "full" else None,
    )
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key, value in cfg.training_args.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ZhtuneError(f"unknown TrainingArguments key {key!r}", where=f"training_args.{key}",
                              expected="a transformers TrainingArguments field",
                              hint=f"did you mean {close[0]!r}?" if close else None)
        kwargs[key] = value
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ZhtuneError(f"invalid training arguments: {exc}", where="config",
                          expected="values transformers' TrainingArguments accepts") from None


def _check_reporters(report_to: list[str]) -> None:
    """report_to=tensorboard / wandb needs that package; say so before any work, not from deep in Trainer."""
    import importlib.util

    for name in report_to:
        module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise ZhtuneError(f"report_to={name} needs the {module} package, which is not installed",
                              where="report_to", expected=f"pip install {module}, or report_to=none")


def make_trainer(cfg, model, tokenizer, data, out: Path, trainer_cls=None, **extra):
    """A transformers Trainer (or `trainer_cls`) over the bundle, with our callbacks."""
    from transformers import Trainer

    from zhtune.train.callbacks import LossPlotCallback

    args = training_arguments(cfg, out, data.eval is not None)
    trainer_cls = trainer_cls or Trainer
    return trainer_cls(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                       data_collator=data.collator, processing_class=tokenizer,
                       callbacks=[LossPlotCallback(out)], **extra)


def train_and_evaluate(trainer, resume: str | None, has_eval: bool) -> dict[str, dict]:
    """Train (from `resume` if given), evaluate when there is an eval set; {'train': ..., 'eval': ...}."""
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = {"train": dict(result.metrics)}
    if has_eval:
        ev = trainer.evaluate()
        if "eval_loss" in ev:
            ev["perplexity"] = math.exp(min(ev["eval_loss"], 50.0))
        metrics["eval"] = ev
    return metrics


# --- saving -----------------------------------------------------------------------------------

def save_tokenizer(tokenizer, source: str, folder: Path) -> None:
    """tokenizer.save_pretrained plus what it leaves out: tokenizer.model and the keys that make a
    LLaMA tokenizer folder load with sentencepiece's ids (see vocab/hf.py)."""
    tokenizer.save_pretrained(str(folder))
    src = Path(source).expanduser()
    if (src / "tokenizer.model").is_file():
        shutil.copyfile(src / "tokenizer.model", folder / "tokenizer.model")
    src_cfg, dst_cfg = src / "tokenizer_config.json", folder / "tokenizer_config.json"
    if src_cfg.is_file() and dst_cfg.is_file():
        keep = json.loads(src_cfg.read_text(encoding="utf-8"))
        saved = json.loads(dst_cfg.read_text(encoding="utf-8"))
        saved.update({k: v for k, v in keep.items() if k in ("tokenizer_class", "add_bos_token", "add_eos_token",
                                                               "legacy")})
        atomic_write_json(dst_cfg, saved)


def save_outputs(trainer, cfg, tokenizer, out: Path, metrics: dict[str, dict], parents: dict[str, str]) -> Path:
    """Results json, trainer_state.json, loss plot, and the adapter (or full model) folder, atomically."""
    from zhtune.train.callbacks import plot_loss

    folder = out / (f"{cfg.stage}_lora_model" if cfg.finetuning_type != "full" else f"{cfg.stage}_model")
    sharded = bool(cfg.deepspeed or cfg.fsdp)
    # ZeRO-3 / FSDP: every rank takes part in gathering the weights; only rank 0 writes them
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    if not trainer.is_world_process_zero():
        return folder
    model = trainer.accelerator.unwrap_model(trainer.model)
    with atomic_output_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        save_tokenizer(tokenizer, cfg.tokenizer_name_or_path or cfg.model_name_or_path, tmp)
        write_run_yaml(tmp, cfg.stage, to_dict(cfg), _local(parents))
    allres: dict[str, Any] = {}
    for split, values in metrics.items():
        atomic_write_json(out / f"{split}_results.json", values)
        allres.update(values)
    atomic_write_json(out / "all_results.json", allres)
    tmp_state = out / ".trainer_state.json.tmp"
    trainer.state.save_to_json(str(tmp_state))
    os.replace(tmp_state, out / "trainer_state.json")
    plot_loss(trainer.state.log_history, out / "training_loss.png")
    return folder
