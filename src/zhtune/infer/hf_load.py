"""Loading for the transformers backend (zhtune.infer.hf): the tokenizer, the base model (dtype, 8/4-bit,
GPUs) and its LoRA adapters applied unmerged, each checked against the base first, so a mismatch is named
instead of failing inside peft."""

from __future__ import annotations

from pathlib import Path

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import ModelSpec


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a folder it cannot read
        raise ZhtuneError(f"cannot load the tokenizer from {folder}: {exc}", where=str(folder),
                          expected="tokenizer files (tokenizer.model / tokenizer.json + tokenizer_config.json)",
                          ) from None


def _pick_dtype(dtype: str, cuda: bool):
    import torch

    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype == "auto":
        if not cuda:
            return torch.float32   # fp32 on CPU: bf16 matmuls are not faster for decode everywhere
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in names:
        raise ZhtuneError(f"unknown dtype {dtype!r}", where="--dtype", expected="auto | fp32 | bf16 | fp16")
    return names[dtype]


def load_base(spec: ModelSpec, dtype: str, load_in_8bit: bool, load_in_4bit: bool,
               num_gpus: int | None, device: str | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.from_pretrained(str(spec.base))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad config.json
        raise ZhtuneError(f"not a transformers model: {spec.base} ({exc})", where="--model",
                          expected="a folder with a valid config.json") from None
    from zhtune.model.load import check_local_model

    check_local_model(spec.base, where="--model")  # a config.json that is not these weights' is named by tensor
    cuda = torch.cuda.is_available() and device != "cpu"
    kwargs: dict = {"dtype": _pick_dtype(dtype, cuda)}
    if load_in_8bit and load_in_4bit:
        raise ZhtuneError("both 8-bit and 4-bit asked for", where="--load-in-8bit/--load-in-4bit",
                          expected="at most one of them")
    if load_in_8bit or load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ZhtuneError("8/4-bit loading needs bitsandbytes", where="--load-in-4bit",
                              hint="pip install 'zhtune[qlora]'") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=kwargs["dtype"], bnb_4bit_use_double_quant=True)
    if cuda:
        n = num_gpus or torch.cuda.device_count()
        if n > torch.cuda.device_count():
            raise ZhtuneError(f"--num-gpus {n} but only {torch.cuda.device_count()} GPUs are visible",
                              where="--num-gpus", expected=f"1..{torch.cuda.device_count()}")
        # device_map="auto" spreads layers over the GPUs we allow (as the seeds' --num_gpus)
        kwargs["device_map"] = {"": 0} if n == 1 else "auto"
        if n > 1:
            kwargs["max_memory"] = {i: torch.cuda.mem_get_info(i)[0] for i in range(n)}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(spec.base), **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for weights it cannot load
        raise ZhtuneError(f"cannot load model {spec.base}: {exc}", where="--model",
                          expected="an HF causal LM folder (config.json + safetensors weights)") from None
    return model


def _adapter_tensors(adapter: Path) -> dict:
    from safetensors import safe_open

    f = adapter / "adapter_model.safetensors"
    if not f.is_file():
        return {}
    with safe_open(str(f), "pt") as h:
        return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}  # noqa: SIM118 - safe_open has keys(), not __iter__


def _adapter_vocab(adapter: Path, shapes: dict) -> int | None:
    """Rows of the embedding this adapter expects (a resized vocabulary), if it carries one."""
    for key, shape in shapes.items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")) and len(shape) == 2:
            return shape[0]
        if "lora_embedding_A" in key:
            return shape[1]
    return None


def _check_adapter(model, adapter: Path, shapes: dict, flag: str) -> None:
    """Every module the adapter touches exists in the base with the shapes it was trained on."""
    modules = dict(model.named_modules())
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if not name.endswith(suffix):
                continue
            mod = modules.get(name[: -len(suffix)])
            if mod is None:
                raise ZhtuneError(f"adapter {adapter} was trained for another base: module "
                                  f"{name[: -len(suffix)]} does not exist in {model.config._name_or_path}",
                                  where=flag, expected="an adapter trained on this base model")
            want = getattr(mod, "in_features", None) if "lora_A" in suffix else getattr(mod, "out_features", None)
            got = shape[1] if "lora_A" in suffix else shape[0]
            if want is not None and want != got:
                raise ZhtuneError(f"adapter {adapter} was trained for another base: {name} has size {got}, "
                                  f"the base's {name[: -len(suffix)]} has {want}",
                                  where=flag, expected="an adapter trained on this base model (same hidden size)")


def apply_adapters(model, spec: ModelSpec, tokenizer_len: int):
    from peft import PeftModel

    if not spec.loras:
        if tokenizer_len > model.get_input_embeddings().weight.shape[0]:
            raise ZhtuneError(f"tokenizer has {tokenizer_len} tokens but the model's embedding has "
                              f"{model.get_input_embeddings().weight.shape[0]} rows", where="--model",
                              expected="a tokenizer that matches the model (merge the vocab-expanded adapter first)")
        return model
    rows = model.get_input_embeddings().weight.shape[0]
    for i, lo in enumerate(spec.loras):
        shapes = _adapter_tensors(lo)
        vocab = _adapter_vocab(lo, shapes) or (tokenizer_len if lo == spec.tokenizer else None)
        if vocab and vocab != rows:   # a vocab-expanded adapter: grow the base first
            model.resize_token_embeddings(vocab, mean_resizing=False)
            rows = vocab
        _check_adapter(model if i == 0 else model.base_model.model, lo, shapes, f"--lora {lo}")
    try:
        model = PeftModel.from_pretrained(model, str(spec.loras[0]), adapter_name="a0", is_trainable=False)
        for i, lo in enumerate(spec.loras[1:], 1):
            model.load_adapter(str(lo), adapter_name=f"a{i}", is_trainable=False)
        if len(spec.loras) > 1:   # stacked adapters all active: base + sum of their deltas, unmerged
            model.base_model.set_adapter([f"a{i}" for i in range(len(spec.loras))])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ZhtuneError(f"adapter does not fit the base model {spec.base}: {str(exc).splitlines()[0]}",
                          where="--lora", expected="adapters trained on this base model") from None
    return model


def cache_arg(model) -> str:
    """The keyword the model's forward takes its KV cache by: `cache` since transformers 5.25 (there
    `past_key_values` still works, with a FutureWarning on every call), `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model   # peft's forward is **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
