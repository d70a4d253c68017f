"""The memory levers of `zhtune train`, resolved for this machine before training starts.

    optim = resolve_optim(cfg)                    # `optim: auto` -> a concrete transformers optimizer name
    loss = resolve_fused_loss(cfg, model)         # `fused_loss` -> chunked | liger | plain (train/loss.py)
    offload = offload_activations(cfg)            # `offload_activations` -> on only where there is a GPU

Each lever is one config key (config.py); `zhtune estimate` models the same keys (train/footprint.py).
A lever that cannot work here is a ZhtuneError naming its key before any model is loaded (check_levers).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from zhtune.errors import ZhtuneError


def _cuda() -> bool:
    from zhtune.model.load import device_kind

    return device_kind() == "cuda"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def sharded_weights(cfg) -> bool:
    """FSDP or DeepSpeed ZeRO-3: a layer's weights exist whole only inside its own forward."""
    if cfg.fsdp:
        return True
    if not cfg.deepspeed or not Path(cfg.deepspeed).expanduser().is_file():
        return False
    try:
        zero = json.loads(Path(cfg.deepspeed).expanduser().read_text(encoding="utf-8")).get("zero_optimization") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return int(zero.get("stage", 0)) == 3


def resolve_optim(cfg) -> str:
    """`optim: auto` -> paged_adamw_32bit on a GPU with bitsandbytes (AdamW whose states move to CPU RAM when
    the card fills up, instead of an out-of-memory error), adamw_torch elsewhere (CPU, DeepSpeed, FSDP:
    those bring their own optimizer handling). Any other value is passed to transformers as written."""
    if cfg.optim != "auto":
        return cfg.optim
    if _cuda() and _installed("bitsandbytes") and not cfg.deepspeed and not cfg.fsdp:
        return "paged_adamw_32bit"
    return "adamw_torch"


def check_levers(cfg) -> None:
    """Refuse, before any work, a lever this machine cannot run."""
    if cfg.fused_loss == "liger" and not (_cuda() and _installed("liger_kernel")):
        raise ZhtuneError("fused_loss=liger needs a CUDA GPU and Liger Kernel"
                          + ("" if _cuda() else " (no GPU here)"), where="fused_loss",
                          expected="pip install 'zhtune[liger]' on a CUDA machine",
                          hint="fused_loss=chunked (or auto) computes the same loss in pure PyTorch, on CPU too")
    if cfg.fused_loss in ("chunked", "liger") and sharded_weights(cfg):
        raise ZhtuneError(f"fused_loss={cfg.fused_loss} cannot read the head's weights under FSDP / ZeRO-3 "
                          "(they exist whole only inside the head's own forward)", where="fused_loss",
                          expected="fused_loss=auto or plain with FSDP / ZeRO-3, or ZeRO-0/1/2")
    if any(k in cfg.optim for k in ("paged_", "bnb", "8bit")) and not _installed("bitsandbytes"):
        raise ZhtuneError(f"optim={cfg.optim} needs bitsandbytes, which is not installed", where="optim",
                          expected="pip install 'zhtune[qlora]'", hint="or optim=adamw_torch")


def resolve_fused_loss(cfg, model) -> tuple[str, str]:
    """(chunked | liger | plain, why) for the model as prepared (its head seen through peft's wrappers)."""
    from zhtune.train.loss import head_of

    if cfg.fused_loss == "plain":
        return "plain", "fused_loss=plain"
    if sharded_weights(cfg):
        return "plain", "FSDP / ZeRO-3 shard the head: transformers' loss"
    head = head_of(model)
    if head is None:
        if cfg.fused_loss != "auto":
            raise ZhtuneError(f"fused_loss={cfg.fused_loss}: this model's output head "
                              f"({type(model.get_output_embeddings()).__name__}) is not one matrix zhtune can "
                              "project in chunks exactly", where="fused_loss", expected="fused_loss=auto or plain")
        return "plain", f"head {type(model.get_output_embeddings()).__name__}: transformers' loss"
    if cfg.fused_loss == "liger" or (cfg.fused_loss == "auto" and head.single_matrix and _cuda()
                                     and _installed("liger_kernel")):
        if not head.single_matrix:
            return "chunked", "the head has trainable rows, which Liger's kernel does not take"
        return "liger", "Liger Kernel's fused linear cross-entropy"
    return "chunked", "chunks of positions, pure PyTorch"


def offload_activations(cfg) -> bool:
    """Offload only where activations live on a GPU (on CPU they are in RAM already)."""
    return bool(cfg.offload_activations) and _cuda()


def describe_levers(cfg, loss: tuple[str, str] | None) -> str:
    """One line printed before training: which levers are on, and why."""
    parts = [] if loss is None else [f"loss {loss[0]} ({loss[1]})"]
    optim = resolve_optim(cfg)
    parts.append(f"optim {optim}" + (" (no GPU: bitsandbytes runs it unpaged, the states are in RAM already)"
                                     if optim.startswith("paged_") and not _cuda() else ""))
    if cfg.gradient_checkpointing:
        parts.append("gradient checkpointing")
    if cfg.offload_activations:
        parts.append("activations offloaded to CPU" if offload_activations(cfg)
                     else "offload_activations ignored: no GPU (activations are in RAM already)")
    return "显存 memory: " + ", ".join(parts)
