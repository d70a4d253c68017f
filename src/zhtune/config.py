"""Typed configs: dataclasses (one help string per field) filled from YAML and `key=value` overrides.

    cfg = load_config(TrainConfig, "examples/tiny/sft.yaml", ["learning_rate=1e-4"], ALIASES)

Unknown keys are an error that names the closest valid key; values are checked against the
field's type (bool, int, float, str, Literal choices, lists, str->str mappings, Optional).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, get_args, get_origin

import yaml

from zhtune.errors import ZhtuneError

T = TypeVar("T")


def opt(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with its help text (shown by `config_help` and `--help`)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """['lr=1e-4', 'dataset=[a.json,b.json]'] -> {'lr': 1e-4, 'dataset': ['a.json', 'b.json']}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ZhtuneError(f"cannot read argument {item!r}", where="command line",
                              expected="key=value (e.g. learning_rate=2e-4)")
        try:  # YAML gives numbers, booleans, lists and null their types
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key] = value if value is not None or raw.strip().lower() in ("null", "none", "~") else raw
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`, with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ZhtuneError(f"config file not found: {path}", expected="a YAML file (see examples/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ZhtuneError(f"config file is not UTF-8 text: {path}", where=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ZhtuneError(f"invalid YAML: {getattr(exc, 'problem', exc)}", where=where,
                          expected="key: value lines") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ZhtuneError(f"config must be a mapping of keys to values, got {type(data).__name__}",
                          where=str(path), expected="key: value lines")
    return data


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " (or null)"
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` to the annotated type `tp`; a ZhtuneError names `where` otherwise."""
    origin, args = get_origin(tp), get_args(tp)

    def bad() -> ZhtuneError:
        return ZhtuneError(f"invalid value {value!r}", where=where, expected=_describe(tp))

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~"))
        if is_null and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ZhtuneError:
                continue
        raise bad()
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(choice, str) and str(value) == choice):
                return choice
        raise bad()
    if origin in (list, tuple):
        items = value
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            items = [value]
        inner = args[0] if args else Any
        return [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(items)]
    if origin is dict:
        if isinstance(value, str):  # "a:b,c:d"
            pairs = [p.split(":", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise bad()
            value = {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(value, dict):
            raise bad()
        return {str(k): v for k, v in value.items()}
    if tp in (bool, int, float, str):
        return _coerce_scalar(value, tp, bad)
    return value


def _coerce_scalar(value: Any, tp: type, bad: Callable[[], ZhtuneError]) -> Any:
    """bool / int / float / str from YAML values or key=value strings ("yes", "1e3", "2.0" for an int)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, (int, str)) and str(value).strip().lower() in ("0", "false", "no", "off"):
            return False
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad() from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad()
        return str(value)


def build(cls: type[T], data: dict[str, Any], source: str, aliases: dict[str, str] | None = None) -> T:
    """Instantiate dataclass `cls` from `data`; `source` names where the keys came from."""
    aliases = aliases or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in fields:
            close = difflib.get_close_matches(key, list(fields) + list(aliases), n=1, cutoff=0.6)
            raise ZhtuneError(f"unknown config key {key!r}", where=f"{source}",
                              expected="one of the keys listed by --help-config",
                              hint=f"did you mean {close[0]!r}?" if close else None)
        kwargs[name] = coerce(value, hints[name], f"{source}: {key}")
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and n not in kwargs]  # type: ignore[misc]
        raise ZhtuneError(f"missing required config keys: {', '.join(missing) or exc}", where=source) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                aliases: dict[str, str] | None = None) -> T:
    """YAML file (optional) then `key=value` overrides (later wins) -> a validated `cls`."""
    merged: dict[str, Any] = {}
    aliases = aliases or {}
    sources: list[tuple[dict[str, Any], str]] = []
    if path is not None:
        sources.append((load_yaml(path), str(path)))
    if overrides:
        sources.append((parse_overrides(overrides), "command line"))
    for data, source in sources:
        # check each source's keys where they were written, so the error names the right place
        build_keys = {aliases.get(k, k): v for k, v in data.items()}
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key in data:
            if aliases.get(key, key) not in fields:
                build(cls, {key: data[key]}, source, aliases)  # raises with a suggestion
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            coerce(value, hints[aliases.get(key, key)], f"{source}: {key}")
        merged.update(build_keys)
    return build(cls, merged, str(path) if path and not overrides else "config", aliases)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass, fit for run.yaml."""
    return dataclasses.asdict(cfg)


def config_help(cls: type) -> str:
    """A table of keys, types, defaults and help for `--help-config`."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        lines.append(f"  {f.name} ({_describe(hints[f.name])}, default: {default!r})\n"
                     f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# `zhtune train` (pt | sft | dpo). Keys follow transformers' TrainingArguments where they exist.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainConfig:
    # what to train
    stage: Literal["pt", "sft", "dpo"] = opt("sft", "pt: continued pre-training on plain text; sft: instruction "
                                               "tuning; dpo: preference tuning")
    model_name_or_path: str = opt("", "base model folder (HF format) or Hub id")
    tokenizer_name_or_path: Optional[str] = opt(None, "tokenizer folder (e.g. `vocab merge`'s merged_tokenizer_hf); "
                                                      "default: the model's")
    base_tokenizer: Optional[str] = opt(None, "the base model's original tokenizer, used to initialise new "
                                              "embedding rows (default: recorded by `vocab merge`)")
    embedding_init: Literal["auto", "mean", "logprob"] = opt(
        "auto", "new rows when the tokenizer grew: mean = mean of the base rows of the piece's text; logprob = "
                "input rows as mean, lm_head rows fitted on the training data so a new piece's day-0 probability "
                "tracks the base's probability of its text; auto = logprob unless the head is tied")
    finetuning_type: Literal["lora", "qlora", "full"] = opt("lora", "LoRA adapters, QLoRA (4/8-bit base) or "
                                                                    "full fine-tuning")
    quantization_bit: Optional[int] = opt(None, "4 or 8: load the base quantised with bitsandbytes (QLoRA)")
    lora_rank: int = opt(8, "LoRA rank r")
    lora_alpha: float = opt(32.0, "LoRA scaling alpha")
    lora_dropout: float = opt(0.05, "dropout on the LoRA path")
    lora_target: list[str] = opt([], "module names to adapt; default: every linear projection of attention "
                                     "and MLP, found by inspecting the model")
    modules_to_save: Optional[list[str]] = opt(None, "modules trained in full and saved with the adapter "
                                                     "(overrides train_embeddings when set)")
    train_embeddings: Literal["new_rows", "full", "none"] = opt(
        "new_rows", "when the tokenizer grew, what of embed_tokens / lm_head trains: new_rows = only the added rows "
                    "(peft trainable tokens: the old rows and their optimizer states are never copied); full = both "
                    "whole matrices (modules_to_save, as Chinese-LLaMA-Alpaca did); none")
    peft_path: Optional[str] = opt(None, "an existing adapter folder to continue training")
    # data
    dataset: list[str] = opt([], "training files or folders (.txt, .json, .jsonl), or Hub dataset names")
    format: Literal["auto", "text", "alpaca", "sharegpt", "messages", "preference"] = opt(
        "auto", "record format; auto detects it from the keys")
    columns: dict[str, str] = opt({}, "map our field names to yours, e.g. {instruction: question, output: answer}")
    template: Optional[str] = opt(None, "chat template for sft/dpo (see `zhtune train --help-templates`); "
                                        "default: the base's own chat_template when it is one of them, else default")
    cutoff_len: int = opt(512, "maximum tokens per sample (pt: block size)")
    packing: Optional[bool] = opt(None, "pack several samples per row without cross-attention "
                                        "(default: on for pt, off for sft/dpo)")
    train_on_prompt: bool = opt(False, "also put the loss on prompts (default: answers only)")
    val_file: list[str] = opt([], "validation files")
    val_size: float = opt(0.0, "hold out this fraction (<1) or number (>=1) of training samples for evaluation")
    max_samples: Optional[int] = opt(None, "use at most this many records per dataset (quick runs)")
    data_cache: Optional[str] = opt(None, "folder for the tokenised dataset cache (reused across runs)")
    preprocessing_num_workers: Optional[int] = opt(None, "processes for tokenisation (datasets.map num_proc)")
    streaming: bool = opt(False, "stage=pt only: tokenise and pack while training instead of preparing the "
                                 "cache first (corpora larger than the disk); needs max_steps")
    strict: bool = opt(False, "turn any skipped record (empty text or answer, no answer within cutoff_len, "
                              "chosen == rejected) into an error")
    # preference tuning
    pref_loss: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = opt("sigmoid", "dpo loss type")
    pref_beta: float = opt(0.1, "beta of the preference loss")
    # output and the optimisation (TrainingArguments names)
    output_dir: str = opt("", "output folder (checkpoints, adapter, results, loss plot)")
    overwrite_output_dir: bool = opt(False, "allow writing into an output_dir that holds another run")
    learning_rate: float = opt(2e-4, "peak learning rate")
    num_train_epochs: float = opt(3.0, "epochs (ignored when max_steps > 0)")
    max_steps: int = opt(-1, "total optimizer steps (overrides epochs when > 0)")
    per_device_train_batch_size: int = opt(4, "batch size per device")
    per_device_eval_batch_size: int = opt(4, "eval batch size per device")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    lr_scheduler_type: str = opt("cosine", "transformers scheduler name")
    warmup_ratio: float = opt(0.0, "fraction of steps for linear warm-up")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping")
    optim: str = opt("auto", "transformers optimizer name: adamw_torch, adamw_bnb_8bit (8-bit states), "
                             "paged_adamw_32bit / paged_adamw_8bit (states spill to CPU RAM instead of running out "
                             "of GPU memory), ...; auto = paged_adamw_32bit on a GPU with bitsandbytes (no "
                             "DeepSpeed/FSDP), else adamw_torch")
    logging_steps: int = opt(10, "log every N steps")
    save_steps: int = opt(500, "checkpoint every N steps")
    save_total_limit: Optional[int] = opt(None, "keep at most N checkpoints")
    eval_steps: Optional[int] = opt(None, "evaluate every N steps (default: at the end only)")
    seed: int = opt(42, "random seed")
    bf16: Optional[bool] = opt(None, "bf16 mixed precision (default: on where the GPU supports it)")
    fp16: bool = opt(False, "fp16 mixed precision")
    gradient_checkpointing: Optional[bool] = opt(None, "recompute activations to save memory "
                                                       "(default: on for qlora, off otherwise)")
    offload_activations: bool = opt(False, "keep the activations saved for backward in CPU RAM instead of GPU "
                                           "memory (with gradient_checkpointing: each layer's input); GPU only")
    fused_loss: Literal["auto", "chunked", "liger", "plain"] = opt(
        "auto", "LM head + cross-entropy without the [tokens x vocabulary] logits (pt, sft): chunked = in chunks "
                "of positions, pure PyTorch, exact; liger = Liger Kernel's fused linear cross-entropy (GPU, pip "
                "install 'zhtune[liger]'); auto = liger on a GPU when installed and the head is one plain matrix, "
                "else chunked; plain = transformers' loss over full logits. dpo always uses TRL's own fused head")
    report_to: list[str] = opt(["none"], "tensorboard, wandb, ... or none")
    dataloader_num_workers: int = opt(0, "data loader worker processes")
    resume_from_checkpoint: Optional[str] = opt("auto", "auto: resume from the last checkpoint in output_dir; "
                                                        "a path; or null to start over")
    deepspeed: Optional[str] = opt(None, "DeepSpeed JSON config (see examples/deepspeed/)")
    fsdp: Optional[str] = opt(None, "FSDP options, e.g. 'full_shard auto_wrap'")
    fsdp_config: Optional[str] = opt(None, "FSDP JSON config")
    nproc_per_node: Optional[int] = opt(None, "launch torchrun with N processes on this node for you")
    training_args: dict[str, Any] = opt({}, "any other transformers TrainingArguments keys, passed through")

    def validate(self) -> None:
        """Cross-field checks and defaults that depend on other keys (called by load_config)."""
        if self.quantization_bit is not None and self.quantization_bit not in (4, 8):
            raise ZhtuneError(f"quantization_bit must be 4 or 8, got {self.quantization_bit}",
                              where="quantization_bit", expected="4 (nf4, QLoRA) or 8")
        if self.finetuning_type == "full" and self.quantization_bit is not None:
            raise ZhtuneError("full fine-tuning cannot train a quantised model", where="quantization_bit",
                              expected="finetuning_type=qlora (or lora), or no quantization_bit")
        if self.finetuning_type == "qlora" and self.quantization_bit is None:
            self.quantization_bit = 4
        if self.finetuning_type == "lora" and self.quantization_bit is not None:
            self.finetuning_type = "qlora"  # a quantised base can only be trained through an adapter
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = self.finetuning_type == "qlora"
        if self.streaming and self.stage != "pt":
            raise ZhtuneError(f"streaming=true with stage={self.stage}", where="streaming",
                              expected="stage=pt (instruction and preference data are prepared in data_cache: "
                                       "tokenised in parts from disk, memory-mapped, never whole in memory)",
                              hint="set streaming=false; data_cache can point at a larger disk")
        if self.peft_path and self.finetuning_type == "full":
            raise ZhtuneError("peft_path continues an adapter, but finetuning_type is full", where="peft_path",
                              expected="finetuning_type=lora or qlora")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Values out of range are refused by name (max_steps=-5 ran 3 epochs; warmup_ratio=10 kept the
        learning rate near 0), never passed on to transformers to be read some other way."""
        for key in ("lora_rank", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "cutoff_len", "logging_steps", "save_steps"):
            _at_least(self, key, 1)
        for key in ("max_samples", "save_total_limit", "eval_steps", "preprocessing_num_workers", "nproc_per_node"):
            if getattr(self, key) is not None:
                _at_least(self, key, 1)
        _at_least(self, "dataloader_num_workers", 0)
        if self.max_steps != -1 and self.max_steps < 1:
            raise ZhtuneError(f"max_steps must be -1 (train num_train_epochs) or at least 1, got {self.max_steps}",
                              where="max_steps", expected="-1, or a number of optimizer steps >= 1")
        for key in ("learning_rate", "num_train_epochs", "lora_alpha", "pref_beta"):
            if not getattr(self, key) > 0:  # also refuses nan
                raise ZhtuneError(f"{key} must be positive, got {getattr(self, key)}", where=key)
        for key, low, high in (("warmup_ratio", 0.0, 1.0), ("lora_dropout", 0.0, 1.0)):
            if not low <= getattr(self, key) < high:
                raise ZhtuneError(f"{key} must be in [{low}, {high}), got {getattr(self, key)}", where=key,
                                  expected=f"a fraction: {low} <= {key} < {high}",
                                  hint="warmup_ratio is a fraction of the steps (e.g. 0.03), not a step count"
                                  if key == "warmup_ratio" else None)
        for key in ("weight_decay", "max_grad_norm", "val_size"):
            if not getattr(self, key) >= 0:
                raise ZhtuneError(f"{key} must be >= 0, got {getattr(self, key)}", where=key)
        if self.val_size >= 1 and not float(self.val_size).is_integer():
            raise ZhtuneError(f"val_size {self.val_size} is neither a fraction (< 1) nor a number of samples",
                              where="val_size", expected="0 <= val_size < 1, or a whole number of samples")


def _at_least(cfg, key: str, low: int) -> None:
    if getattr(cfg, key) < low:
        raise ZhtuneError(f"{key} must be at least {low}, got {getattr(cfg, key)}", where=key)


# Chinese-LLaMA-Alpaca run_pt.sh / run_sft.sh (and LLaMA-Factory) names -> ours
TRAIN_ALIASES: dict[str, str] = {
    "pretrained_model": "model_name_or_path",
    "pretrained_model_name_or_path": "model_name_or_path",
    "chinese_tokenizer_path": "tokenizer_name_or_path",
    "dataset_dir": "dataset",
    "data_cache_dir": "data_cache",
    "validation_file": "val_file",
    "block_size": "cutoff_len",
    "max_seq_length": "cutoff_len",
    "lora_trainable": "lora_target",
    "lora_r": "lora_rank",
    "per_device_batch_size": "per_device_train_batch_size",
}
