"""What every `zhtune train` stage shares and must get right: the output folder guard and resume point,
model preparation, TrainingArguments, and saving the adapter / model folder atomically.

The stage files (pt.py, sft.py, dpo.py) call these top to bottom: setup -> train -> save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from zhtune.config import TrainConfig, to_dict
from zhtune.errors import ZhtuneError
from zhtune.io import RUN_FILE, atomic_output_dir, atomic_write_json, read_json, read_run_yaml, write_run_yaml

# keys that may change between a run and its resumption without making it "another run"
VOLATILE_KEYS = {"overwrite_output_dir", "resume_from_checkpoint", "report_to", "logging_steps",
                 "dataloader_num_workers", "preprocessing_num_workers", "data_cache", "nproc_per_node",
                 "save_total_limit"}
# what a zhtune train run writes into output_dir (anything else there is foreign)
RUN_FILES = {RUN_FILE, "trainer_state.json", "train_results.json", "eval_results.json", "all_results.json",
             "training_loss.png", "runs"}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# the adapter / model folders of every stage, and zhtune's own temporaries and lock files
_OURS = re.compile(r"checkpoint-\d+|(pt|sft|dpo)_(lora_)?model|\..+\.(lock|tmp)|\..+\.old-\d+")


def _ours(name: str) -> bool:
    return name in RUN_FILES or bool(_OURS.fullmatch(name))


def lock_output_dir(cfg: TrainConfig):
    """Hold output_dir for the whole run (io.output_lock): two trainings into one folder would leave run.yaml
    of one, checkpoints of both and results of the other. Rank 0 holds it for a multi-process run."""
    from zhtune.io import output_lock

    if not cfg.output_dir or not is_main_process():
        return contextlib.nullcontext()
    return output_lock(Path(cfg.output_dir).expanduser(), where="output_dir")


def _complete_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders written to the end (Trainer writes trainer_state.json last), oldest first."""
    found = []
    for child in out.glob("checkpoint-*"):
        step = child.name.split("-", 1)[1]
        if child.is_dir() and step.isdigit() and (child / "trainer_state.json").is_file():
            found.append((int(step), child))
    return [c for _, c in sorted(found)]


def _last_complete_checkpoint(out: Path) -> Path | None:
    found = _complete_checkpoints(out)
    return found[-1] if found else None


def check_checkpoint(path: Path) -> None:
    """Every file Trainer will read to resume from `path` is whole: a truncated optimizer.pt is named here,
    with the checkpoint before it to resume from, instead of a traceback from torch.load."""
    from zhtune.io import check_safetensors, check_torch_file, read_json

    try:
        for f in sorted(path.iterdir()):
            if f.suffix == ".safetensors":
                check_safetensors(f)
            elif f.suffix in (".pt", ".pth", ".bin"):
                check_torch_file(f)
            elif f.name == "trainer_state.json":
                read_json(f)
    except ZhtuneError as exc:
        step = int(path.name.split("-")[1]) if re.fullmatch(r"checkpoint-\d+", path.name) else None
        earlier = [c for c in _complete_checkpoints(path.parent) if step and int(c.name.split("-")[1]) < step]
        hint = (f"resume from the one before with resume_from_checkpoint={earlier[-1]} (a config key, or on the "
                f"command line), or start over with resume_from_checkpoint=null" if earlier else
                "start over with resume_from_checkpoint=null (or delete that checkpoint)")
        raise ZhtuneError(f"checkpoint {path} is damaged: {exc.what}", where="resume_from_checkpoint",
                          expected="a checkpoint written to the end", hint=hint) from None


def prepare_output_dir(cfg: TrainConfig) -> tuple[Path, str | None]:
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
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name)) if out.is_dir() else []
    if foreign and cfg.overwrite_output_dir:  # starting over deletes only what a training run wrote
        raise ZhtuneError(f"overwrite_output_dir would mix this run with files that are not from a zhtune train "
                          f"run in {out}: {', '.join(foreign[:5])}" + (f" and {len(foreign) - 5} more" if
                                                                       len(foreign) > 5 else ""),
                          where="output_dir", expected="a new or empty folder, or an earlier run's output_dir",
                          hint="move those files away or choose another output_dir")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite_output_dir:
        recorded = read_run_yaml(out)
        previous = {k: v for k, v in (recorded.get("config") or {}).items() if k not in VOLATILE_KEYS}
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
    if out.is_dir() and is_main_process():
        _remove_stale_temporaries(out)
    return out, _resume_point(cfg, out)


def _remove_stale_temporaries(out: Path) -> None:
    """What a killed run left inside output_dir (a half-saved adapter folder, a results file being written):
    this run holds the folder's lock, so none of them is being written now."""
    for child in out.iterdir():
        if re.fullmatch(r"\..+\.(tmp|old-\d+)", child.name):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            print(f"已清理 removed a stale temporary left by an interrupted run: {child}", file=sys.stderr)


def record_run(cfg: TrainConfig, out: Path, parents: dict[str, str]) -> None:
    """Write output_dir/run.yaml just before training (after everything that can fail on bad input),
    so the same command later recognises this run and resumes it."""
    if not is_main_process():
        return
    if cfg.overwrite_output_dir and out.is_dir():
        for child in out.iterdir():  # starting over: the earlier run's checkpoints, adapter and results go
            if _ours(child.name) and child.name != RUN_FILE and not child.name.endswith(".lock"):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_run_yaml(out, cfg.stage, to_dict(cfg), _local(parents))


def _resume_point(cfg: TrainConfig, out: Path) -> str | None:
    value = cfg.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", "none", ""):
        return None
    if cfg.overwrite_output_dir and value == "auto":
        return None
    if value == "auto":
        found = _last_complete_checkpoint(out)
        if found:
            check_checkpoint(found)
        return str(found) if found else None
    path = Path(value).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise ZhtuneError(f"not a complete checkpoint: {path}", where="resume_from_checkpoint",
                          expected="auto, null, or a checkpoint-N folder holding trainer_state.json")
    check_checkpoint(path)
    return str(path)


def _local(parents: dict[str, str]) -> dict[str, str]:
    """Parent paths that exist locally (Hub ids stay in the config, not as resolved paths)."""
    return {k: v for k, v in parents.items() if v and Path(v).expanduser().exists()}


def run_parents(cfg: TrainConfig) -> dict[str, str]:
    """The folders this run derives from, recorded in run.yaml for merge / chat to find."""
    return {"model": cfg.model_name_or_path, "tokenizer": cfg.tokenizer_name_or_path or cfg.model_name_or_path,
            "peft_path": cfg.peft_path or "", "base_tokenizer": cfg.base_tokenizer or ""}


def template_for(cfg: TrainConfig):
    """The config's chat template (an unknown name is an error that names the `template` key); none named:
    the base's own chat_template when it is a registry template, else default. The choice is written back
    into cfg.template, so run.yaml records it and a resumed run finds the same one."""
    from zhtune.data.templates import training_template

    try:
        template, source = training_template(cfg.template, [cfg.tokenizer_name_or_path, cfg.model_name_or_path])
    except ZhtuneError as exc:
        exc.where = exc.where or "template"
        raise
    if cfg.template is None:
        cfg.template = template.name
        if is_main_process():
            print(f"对话模板 template: {template.name} ({source})", flush=True)
    return template


# --- model ------------------------------------------------------------------------------------

def prepare_tokenizer(cfg: TrainConfig, template=None):
    """The training tokenizer with the template's chat_template (and literal tokens) installed.

    Loaded before the model, so the data is read and validated (file:line errors) before the model takes
    seconds to load. (The template adds at most a few tokens: the too-small-tokenizer check still holds.)
    """
    from zhtune.data.templates import install
    from zhtune.model.load import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    if template is not None:
        install(tokenizer, template)
    return tokenizer


def prepare_model(cfg: TrainConfig, template=None, tokenizer=None):
    """tokenizer (+ template) -> base model -> grown vocabulary -> adapter; (tokenizer, model, expansion info).

    The stages pass the `tokenizer` prepare_tokenizer made, reading the data in between.
    """
    from transformers import set_seed

    from zhtune.model.adapter import attach_adapter
    from zhtune.model.embeddings import base_tokenizer_path, calibration_texts, check_vocab_sizes, expand_embeddings
    from zhtune.model.load import load_model

    if tokenizer is None:
        tokenizer = prepare_tokenizer(cfg, template)
    set_seed(cfg.seed)  # LoRA's random init must be the same in a resumed and a fresh run
    model = load_model(cfg)
    check_vocab_sizes(model, tokenizer)
    expansion = expand_embeddings(model, tokenizer, base_tokenizer_path(cfg), method=cfg.embedding_init,
                                  calibration=lambda: calibration_texts(cfg))  # read only if the vocab grew
    model = attach_adapter(model, cfg, new_rows=range(expansion.old_vocab, expansion.new_vocab))
    return tokenizer, model, expansion


# --- Trainer ----------------------------------------------------------------------------------

def training_arguments(cfg: TrainConfig, out: Path, has_eval: bool, args_class=None, **stage_args):
    """The trainer's arguments, built once from the config: transformers' TrainingArguments, or the
    `args_class` a stage trains with (TRL's DPOConfig / ORPOConfig / CPOConfig, which extend it) with
    `stage_args` (beta, loss_type, ...). `training_args` passes any other field of that class through,
    checked by name."""
    from transformers import TrainingArguments

    from zhtune.model.load import device_kind, mixed_precision
    from zhtune.train.memory import resolve_optim

    args_class = args_class or TrainingArguments
    bf16, fp16 = mixed_precision(cfg)
    _check_reporters(cfg.report_to)
    kwargs: dict[str, Any] = dict(
        output_dir=str(out), per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        optim=resolve_optim(cfg), logging_steps=cfg.logging_steps, logging_first_step=True, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, seed=cfg.seed, bf16=bf16, fp16=fp16,
        eval_strategy="steps" if has_eval and cfg.eval_steps else "no", eval_steps=cfg.eval_steps,
        activation_checkpointing=bool(cfg.gradient_checkpointing),  # transformers 5's gradient_checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        report_to=[r for r in cfg.report_to if r != "none"] or "none",
        dataloader_num_workers=cfg.dataloader_num_workers, remove_unused_columns=False, label_names=["labels"],
        deepspeed=cfg.deepspeed, fsdp=cfg.fsdp or "", fsdp_config=cfg.fsdp_config,
        use_cpu=device_kind() == "cpu", include_num_input_tokens_seen=True,
        ddp_find_unused_parameters=False if cfg.finetuning_type != "full" else None,
        **stage_args,
    )
    name = args_class.__name__
    known = {f.name for f in dataclasses.fields(args_class) if f.init}
    for key, value in cfg.training_args.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ZhtuneError(f"unknown {name} key {key!r}", where=f"training_args.{key}",
                              expected=f"a field of {name}",
                              hint=f"did you mean {close[0]!r}?" if close else None)
        kwargs[key] = value
    try:
        return args_class(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ZhtuneError(f"invalid training arguments: {exc}", where="config",
                          expected=f"values {name} accepts") from None


def _check_reporters(report_to: list[str]) -> None:
    """report_to=tensorboard / wandb needs that package; say so before any work, not from deep in Trainer."""
    import importlib.util

    for name in report_to:
        module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise ZhtuneError(f"report_to={name} needs the {module} package, which is not installed",
                              where="report_to", expected=f"pip install {module}, or report_to=none")


def make_trainer(cfg: TrainConfig, model, tokenizer, data, out: Path, trainer_cls=None, **extra):
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
        keep = read_json(src_cfg, "tokenizer_config.json")
        saved = read_json(dst_cfg, "tokenizer_config.json")
        saved.update({k: v for k, v in keep.items() if k in ("tokenizer_class", "add_bos_token", "add_eos_token",
                                                               "legacy")})
        atomic_write_json(dst_cfg, saved)


def save_outputs(trainer, cfg: TrainConfig, tokenizer, out: Path, metrics: dict[str, dict],
                 parents: dict[str, str]) -> Path:
    """Results json, trainer_state.json, loss plot, and the adapter (or full model) folder, atomically."""
    from zhtune.train.callbacks import plot_loss

    folder = out / (f"{cfg.stage}_lora_model" if cfg.finetuning_type != "full" else f"{cfg.stage}_model")
    sharded = bool(cfg.deepspeed or cfg.fsdp)
    # ZeRO-3 / FSDP: every rank takes part in gathering the weights; only rank 0 writes them
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    if not trainer.is_world_process_zero():
        return folder
    model = trainer.accelerator.unwrap_model(trainer.model)
    with atomic_output_dir(folder, owned=True) as tmp:  # output_dir was checked: the folder is ours
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
