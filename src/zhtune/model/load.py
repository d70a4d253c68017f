"""Load the tokenizer and base model for training: dtype, device placement, optional 4/8-bit (QLoRA).

    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg)          # fp32 on CPU, bf16 on a capable GPU, bitsandbytes when quantised

Used by every `zhtune train` stage (train/pt.py, train/sft.py, ...).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from zhtune.config import TrainConfig
from zhtune.errors import ZhtuneError
from zhtune.io import looks_like_local_path, read_json

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_path(path: str, key: str = "model_name_or_path") -> str:
    """A local HF model folder, or (when online) a Hub id; anything else is a ZhtuneError naming `key`."""
    if not path:
        raise ZhtuneError(f"{key} is not set", where=key, expected="a base model folder (HF format) or a Hub id",
                          hint="e.g. model_name_or_path=path/to/llama-7b-hf "
                               "(see `python -m zhtune.tiny` for a tiny one)")
    local = Path(path).expanduser()
    if local.exists():
        if local.is_dir() and not (local / "config.json").is_file() and key == "model_name_or_path":
            raise ZhtuneError(f"no config.json in model folder {path}", where=key,
                              expected="a Hugging Face model folder (config.json + *.safetensors)",
                              hint="convert Meta .pth weights first: zhtune convert meta ...")
        if (local / "config.json").is_file():  # read first: the tokenizer loader would otherwise be blamed
            read_json(local / "config.json", "config.json", where=f"{key}: {local / 'config.json'}")
        return str(local)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if offline or not _HUB_ID.match(path) or looks_like_local_path(path):
        raise ZhtuneError(f"path not found: {path}", where=key,
                          expected="an existing folder" + ("" if offline else " or a Hub id like org/name"))
    return path


# The model_types every stage handles (train, merge, export gguf, chat/serve, estimate): LLaMA-1/2/3.x (rope
# scaling, tied heads), Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms). One list, checked by check_architecture.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_architecture(config: dict, where: str) -> str:
    """The config's model_type, or a ZhtuneError naming it (and its architectures) and the supported list."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise ZhtuneError(f"model_type {model_type!r} ({archs}) is not supported by zhtune", where=where,
                          expected=f"model_type one of: {', '.join(SUPPORTED_MODEL_TYPES)}",
                          hint="LLaMA-1/2/3.x, Mistral / Mistral-Nemo, Qwen2 / Qwen2.5, Qwen3 and models built "
                               "on them (Chinese-LLaMA, SmolLM, ...) are supported")
    return model_type


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} the model of `config` (a config.json dict) has, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    skip = ("architectures", "transformers_version")
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in skip})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_weights_match_config(model_dir: str | Path, where: str = "--model") -> None:
    """Refuse a model folder whose weights are not the model its config.json describes (another vocabulary
    or width, missing layers, a head the config ties or the reverse), naming the tensor and both shapes."""
    import json

    from zhtune.export.weights import WeightReader

    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        want = expected_shapes(config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ZhtuneError(f"cannot read the model config {model_dir / 'config.json'}: {exc}", where=where,
                          expected="a valid config.json of a causal LM") from None
    reader = WeightReader(model_dir)
    have = {n: reader.shape(n) for n in reader.names() if not n.endswith("rotary_emb.inv_freq")}
    tied = bool(config.get("tie_word_embeddings"))
    cfg_file = str(model_dir / "config.json")
    for name, shape in want.items():
        if name not in have:
            if name == "lm_head.weight" and tied:
                continue
            raise ZhtuneError(f"the weights have no {name} but config.json describes it", where=cfg_file,
                              expected=f"{name} {list(shape)} in the weights of {model_dir}",
                              hint="config.json and the weights come from different models" + (
                                  "; an untied head (tie_word_embeddings: false) needs lm_head.weight"
                                  if name == "lm_head.weight" else ""))
        if have[name] != shape:
            raise ZhtuneError(f"{name} is {list(have[name])} in the weights but config.json implies {list(shape)}",
                              where=cfg_file, expected="config.json of the model these weights belong to",
                              hint="vocab_size / hidden_size / heads in config.json disagree with the weights")
    extra = sorted(set(have) - set(want))
    if extra:
        raise ZhtuneError(f"the weights hold {extra[0]} ({len(extra)} tensors in all) that config.json's "
                          f"{config.get('model_type')} has no place for", where=cfg_file,
                          expected="config.json of the model these weights belong to",
                          hint="e.g. more layers than num_hidden_layers, or biases the architecture lacks")


def check_local_model(model_dir: str | Path, where: str) -> None:
    """check_weights_match_config for a local folder of a supported architecture that is not pre-quantised
    (GPTQ/AWQ checkpoints hold packed tensors of other names; other architectures keep transformers' checks)."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return
    config = read_json(config_file, "config.json", where=f"{where}: {config_file}")
    if config.get("model_type") in SUPPORTED_MODEL_TYPES and not config.get("quantization_config"):
        check_weights_match_config(model_dir, where=where)


def device_kind() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def mixed_precision(cfg: TrainConfig) -> tuple[bool, bool]:
    """(bf16, fp16) for TrainingArguments: bf16 by default on a GPU that supports it, off on CPU."""
    import torch

    on_gpu = device_kind() == "cuda"
    bf16 = cfg.bf16 if cfg.bf16 is not None else bool(on_gpu and torch.cuda.is_bf16_supported())
    if bf16 and cfg.fp16:
        raise ZhtuneError("bf16 and fp16 are both on", where="bf16 / fp16", expected="at most one of them")
    return bool(bf16), bool(cfg.fp16)


def model_dtype(cfg: TrainConfig):
    """Weights dtype: the GPU's half type when training in mixed precision there, fp32 on CPU."""
    import torch

    bf16, fp16 = mixed_precision(cfg)
    if device_kind() != "cuda":
        return torch.float32  # CPU: bf16 only as autocast (bf16=true), weights stay fp32
    if bf16:
        return torch.bfloat16
    if fp16 and cfg.finetuning_type != "full":  # fp16 master weights would break full fine-tuning
        return torch.float16
    return torch.float32


def load_tokenizer(cfg: TrainConfig):
    """The training tokenizer (tokenizer_name_or_path, else the model's), right-padded, with a pad token."""
    from transformers import AutoTokenizer

    key = "tokenizer_name_or_path" if cfg.tokenizer_name_or_path else "model_name_or_path"
    path = check_model_path(cfg.tokenizer_name_or_path or cfg.model_name_or_path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ZhtuneError(f"cannot load a tokenizer from {path}: {exc}", where=key,
                          expected="a folder with tokenizer.model / tokenizer.json and tokenizer_config.json") from None
    if tokenizer.pad_token is None:
        # pad with an existing token (unk, else eos) rather than adding one: adding would grow the vocabulary;
        # padded positions carry label -100 and attention 0 so the choice does not change the loss
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def quantization_config(cfg: TrainConfig):
    """BitsAndBytesConfig for QLoRA (nf4 + double quantisation, or 8-bit), or None."""
    if cfg.quantization_bit is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ZhtuneError(f"quantization_bit={cfg.quantization_bit} needs bitsandbytes, which is not installed",
                          where="finetuning_type / quantization_bit", expected="pip install 'zhtune[qlora]'",
                          hint="or train with finetuning_type=lora") from None
    from transformers import BitsAndBytesConfig

    if cfg.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=model_dtype(cfg))


def load_model(cfg: TrainConfig):
    """The base causal LM for training (quantised for QLoRA), in train mode."""
    from transformers import AutoModelForCausalLM

    path = check_model_path(cfg.model_name_or_path)
    if Path(path).is_dir():  # a local folder: refuse other architectures and mismatched weights before loading
        check_architecture(read_json(Path(path) / "config.json", "config.json"), "model_name_or_path")
        check_weights_match_config(path, where="model_name_or_path")
    quant = quantization_config(cfg)
    kwargs: dict[str, Any] = {"dtype": model_dtype(cfg), "trust_remote_code": False}
    if quant is not None:
        # bitsandbytes weights must be placed at load time: the process's own device (one per rank)
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))} if device_kind() == "cuda" else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ZhtuneError(f"cannot load the model from {path}: {exc}", where="model_name_or_path",
                          expected="a causal LM folder in Hugging Face format") from None
    if quant is not None:
        _keep_cpu_4bit_trainable(model)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    model.train()  # never run a no-grad eval forward first: see _keep_cpu_4bit_trainable
    return model


def _keep_cpu_4bit_trainable(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    On AVX512-BF16 CPUs, Linear4bit repacks its weight the first time it sees an eval-mode forward
    without gradients (Trainer's evaluation does exactly that); after the repack backward silently
    yields no gradients. The flag below is the one bitsandbytes itself sets to enable that path.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (4-bit packed weights counted at their packed size × 2)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
