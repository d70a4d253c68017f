"""Reading a LoRA adapter folder for the streaming merge: adapter_config.json + weights classified into
LoRA pairs (with their scale), whole saved tensors (modules_to_save) and trainable-token rows, read lazily.

Used by the merge command (export/merge.py) and by the parity check (export/parity.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhtune.errors import ZhtuneError
from zhtune.export.weights import WeightReader


@dataclass
class Lazy:
    """A tensor of the adapter file read only when the merge reaches it (embeddings can be huge)."""
    shape: tuple[int, ...]
    load: Callable[[], Any]   # -> a fresh tensor the caller may modify


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class Adapter:
    """A LoRA adapter folder, read into what the merge needs."""
    path: Path
    config: dict
    lora: dict[str, tuple[Any, Any, float, bool]] = field(default_factory=dict)  # param -> (A, B, scale, is_embedding)
    full: dict[str, Lazy] = field(default_factory=dict)    # param -> whole new tensor (modules_to_save)
    tokens: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # param -> (row ids, new rows)
    tokenizer_size: int | None = None   # len(tokenizer) of the tokenizer in the folder, if any
    template: str | None = None          # training template name (run.yaml)
    run: dict = field(default_factory=dict)

    def vocab_rows(self, current: int) -> int | None:
        """Rows of the vocabulary this adapter changes to: full embeddings of another size than
        `current`, or trainable rows past it (None: the vocabulary stays as it is)."""
        if EMBED in self.full:
            return self.full[EMBED].shape[0] if self.full[EMBED].shape[0] != current else None
        if EMBED in self.tokens and int(self.tokens[EMBED][0].max()) + 1 > current:
            return int(self.tokens[EMBED][0].max()) + 1
        return None


def resolve_adapter_dir(path: str | Path) -> Path:
    """The adapter folder: `path` itself, or the one *_lora_model folder inside a training output."""
    path = Path(path)
    if not path.exists():
        raise ZhtuneError(f"adapter folder not found: {path}", where="--lora", expected="an existing folder")
    if (path / "adapter_config.json").is_file():
        return path
    inner = sorted(p.parent for p in path.glob("*_lora_model/adapter_config.json"))
    if len(inner) == 1:
        return inner[0]
    raise ZhtuneError(f"no adapter_config.json in {path}", where=f"--lora {path}",
                      expected="a peft adapter folder (adapter_config.json + adapter_model.safetensors)",
                      hint=f"found {len(inner)} *_lora_model folders; pass one of them" if inner else
                      "pass the pt_lora_model / sft_lora_model folder that training wrote")


def read_run_yaml_near(adapter_dir: Path) -> dict:
    """run.yaml of the adapter folder, or of the training output around it."""
    from zhtune.io import read_run_yaml

    return read_run_yaml(adapter_dir) or read_run_yaml(adapter_dir.parent)


def read_adapter_config(path: Path, flag: str = "--lora") -> dict:
    """adapter_config.json as a mapping: malformed JSON or a JSON list is named, never a traceback."""
    from zhtune.io import read_json

    config = read_json(path / "adapter_config.json", "adapter_config.json")
    if config.get("peft_type", "LORA") != "LORA":
        raise ZhtuneError(f"adapter type {config.get('peft_type')} is not supported", where=f"{flag} {path}",
                          expected="a LoRA adapter (peft_type LORA)")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ZhtuneError(f"adapter_config.json {key} is {value!r}", where=f"{path / 'adapter_config.json'}: {key}",
                              expected="a positive number")
    return config


def adapter_weights(path: Path) -> Path:
    """The adapter's weights file, checked: a truncated safetensors file or a pickle that needs code is refused
    here, by name, before peft or torch meet it."""
    from zhtune.io import check_safetensors, load_state_dict

    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        weights = path / name
        if weights.is_file():
            if weights.suffix == ".safetensors":
                check_safetensors(weights)
            else:
                load_state_dict(weights)  # weights_only: refuses a pickle that would run code
            return weights
    raise ZhtuneError(f"adapter weights missing in {path}", where=str(path),
                      expected="adapter_model.safetensors (or adapter_model.bin) beside adapter_config.json")


def check_adapter(path: str | Path, flag: str = "--lora") -> Path:
    """An adapter folder whose config and weights can be read (for chat / serve before loading anything)."""
    path = resolve_adapter_dir(path)
    read_adapter_config(path, flag)
    adapter_weights(path)
    return path


def trained_base(adapter_dir: Path) -> tuple[str | None, Path | None]:
    """(the base model the adapter was trained on, as recorded; that folder if it exists here).

    run.yaml's parents.model is absolute (written so by io.write_run_yaml); config.model_name_or_path may be
    relative to where training ran (tried as given, then beside the training output); adapter_config.json's
    base_model_name_or_path last."""
    run = read_run_yaml_near(adapter_dir)
    parents, config = run.get("parents") or {}, run.get("config") or {}
    try:
        peft = read_adapter_config(adapter_dir)
    except ZhtuneError:
        peft = {}
    names = [parents.get("model") if isinstance(parents, dict) else None,
             parents.get("base") if isinstance(parents, dict) else None,
             config.get("model_name_or_path") if isinstance(config, dict) else None,
             peft.get("base_model_name_or_path")]
    names = [str(n) for n in names if n]
    for name in names:
        p = Path(name).expanduser()
        for cand in (p,) if p.is_absolute() else (p, adapter_dir.parent.parent / p, adapter_dir.parent / p):
            if (cand / "config.json").is_file():
                return name, cand.resolve()
    return (names[0] if names else None), None


def _pattern_value(patterns: dict, module: str, default):
    for pat, value in (patterns or {}).items():  # peft matches a pattern against the module's name suffix
        if re.match(rf"(.*\.)?({pat})$", module):
            return value
    return default


def load_adapter(path: str | Path) -> Adapter:
    """Read adapter_config.json + weights; classify every tensor; refuse what cannot be merged."""
    import torch

    from zhtune.io import load_state_dict

    path = resolve_adapter_dir(path)
    config = read_adapter_config(path)
    where = str(path / "adapter_config.json")
    if config.get("use_dora"):
        raise ZhtuneError("DoRA adapters are not supported by the streaming merge", where=f"{where}: use_dora",
                          expected="use_dora: false", hint="merge a DoRA adapter with peft's merge_and_unload")
    weights = adapter_weights(path)
    run = read_run_yaml_near(path)
    ad = Adapter(path=path, config=config, run=run, template=(run.get("config") or {}).get("template"))
    if weights.suffix == ".safetensors":  # headers now, tensors on demand
        file = WeightReader(path, [weights])
        keys, shape_of, get = file.names(), file.shape, file.get
    else:
        state = load_state_dict(weights)
        keys, shape_of = list(state), (lambda k: tuple(state[k].shape))

        def get(key):
            return state[key].clone()
    pairs: dict[str, dict[str, Any]] = {}
    trained: dict[str, Lazy] = {}
    for key in keys:
        name = key.removeprefix("base_model.model.")
        lazy = Lazy(shape_of(key), lambda key=key: get(key))
        t = None if name.endswith(".weight") and "lora_" not in name else get(key)  # LoRA/tokens: small, load now
        if m := re.match(r"(.+)\.lora_(A|B)(\.[^.]+)?\.weight$", name) or \
                re.match(r"(.+)\.lora_embedding_(A|B)(\.[^.]+)?$", name):
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
            pairs[m.group(1)]["embedding"] = "lora_embedding" in name
        elif name.endswith(".token_adapter.trainable_tokens_delta"):
            module = name.removesuffix(".token_adapter.trainable_tokens_delta")
            ad.tokens[module + ".weight"] = (torch.tensor(_token_indices(config, module, where)), t)
        elif name.endswith(".original_module.weight"):
            continue  # the untrained copy peft keeps beside a modules_to_save module
        elif name.endswith(".modules_to_save.weight"):  # the trained copy (wins over a plain duplicate)
            trained[name.removesuffix(".modules_to_save.weight") + ".weight"] = lazy
        elif name.endswith(".base_layer.weight"):  # the (resized) weight under a LoRA / token adapter
            module = name.removesuffix(".base_layer.weight").removesuffix(".token_adapter")
            ad.full[module + ".weight"] = lazy
        elif name.endswith(".weight") and "lora_" not in name:
            ad.full[name] = lazy
        else:
            raise ZhtuneError(f"adapter tensor {key!r} cannot be merged", where=str(weights),
                              expected="LoRA A/B, modules_to_save weights or trainable-token rows")
    ad.full.update(trained)
    alpha = config.get("lora_alpha", 8)
    for module, p in pairs.items():
        if "A" not in p or "B" not in p:
            raise ZhtuneError(f"adapter has lora_A without lora_B (or the reverse) for {module}", where=str(weights))
        r = p["A"].shape[0]
        a = _pattern_value(config.get("alpha_pattern"), module, alpha)
        scale = a / math.sqrt(r) if config.get("use_rslora") else a / r
        ad.lora[module + ".weight"] = (p["A"], p["B"], scale, p["embedding"])
    if any((path / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        ad.tokenizer_size = tokenizer_size(path, f"--lora {path}")
    return ad


def tokenizer_size(folder: Path, where: str) -> int:
    """len() of the tokenizer in `folder`; damaged tokenizer files are named, never a library traceback."""
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(str(folder)))
    except Exception as exc:  # noqa: BLE001 - tokenizers raise many kinds (Exception from Rust, OSError, ValueError)
        raise ZhtuneError(f"cannot load the tokenizer in {folder}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                          where=where, expected="readable tokenizer files (tokenizer.model / tokenizer.json)") from None


def _token_indices(config: dict, module: str, where: str) -> list[int]:
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return spec
    for key, ids in (spec or {}).items():
        if module == key or module.endswith("." + key):
            return ids
    raise ZhtuneError(f"trainable-token rows for {module} but no trainable_token_indices for it", where=where)
