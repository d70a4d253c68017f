"""`zhtune estimate [CONFIG.yaml] [key=value ...]`: peak GPU memory per device of a training config.

    zhtune estimate examples/chinese_llama_pt_lora.yaml --gpu-memory 24
    zhtune estimate model_name_or_path=llama-65b finetuning_type=qlora lora_rank=64 --gpu-memory 48

Reads only the model's config.json (or a named preset such as llama-7b, so it works offline): no
weights are loaded. The memory model (the parts of the peak, per device) is train/footprint.py; this
file is the command: the report, whether it fits, the cheapest change that makes it fit, and the peak
CPU RAM of `zhtune merge` for the same model. The formulas are written out in docs/guides/estimate.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from zhtune.errors import ZhtuneError
from zhtune.train.footprint import (GIB, PRESETS, Estimate, Plan, Shape, estimate, lora_params, plan_from_config,
                                    read_shape, tokenizer_vocab)

PROCESS_BASE_RAM = 0.4 * GIB   # import torch + transformers + peft (measured, NOTES.md)


# --------------------------------------------------------------------------------------------
# What to change when it does not fit: the cheapest change first, never one that is already on
# --------------------------------------------------------------------------------------------

def _candidates(shape: Shape, plan: Plan) -> list[tuple[str, dict]]:
    """(key=value text, Plan changes), cheapest first: exact and free, exact but slower, then approximations."""
    out: list[tuple[str, dict]] = []
    if plan.loss == "plain" and plan.zero_stage < 3 and not plan.pairs:
        out.append(("fused_loss=auto", {"loss": "chunked"}))
    if not plan.paged and plan.zero_stage == 0 and plan.cuda:
        out.append(("optim=paged_adamw_32bit", {"optim": "paged_adamw_32bit"}))
    if not plan.gradient_checkpointing:
        out.append(("gradient_checkpointing=true", {"gradient_checkpointing": True}))
    if not plan.offload_activations and plan.cuda:
        out.append(("offload_activations=true", {"offload_activations": True}))
    b = plan.batch
    while b > 1:
        b //= 2
        out.append((f"per_device_train_batch_size={b} gradient_accumulation_steps={plan.grad_accum * plan.batch // b}",
                    {"batch": b, "grad_accum": plan.grad_accum * plan.batch // b}))
    if plan.embeddings == "full" and plan.new_rows:
        out.append(("train_embeddings=new_rows", {"embeddings": "new_rows"}))
    if "8bit" not in plan.optim and plan.cuda:
        out.append(("optim=paged_adamw_8bit", {"optim": "paged_adamw_8bit"}))
    if plan.finetuning_type == "lora":
        out.append(("finetuning_type=qlora", {"finetuning_type": "qlora", "quantization_bit": 4}))
    return out


def suggest(shape: Shape, plan: Plan, budget: float) -> tuple[list[str], Estimate] | None:
    """The cheapest change (or fewest changes, cheapest first) after which the run fits in `budget` bytes;
    None when nothing zhtune can change on this many cards makes it fit."""
    import dataclasses

    def fits(p: Plan) -> Estimate | None:
        est = estimate(shape, p)
        return est if est.total <= budget else None

    cands = _candidates(shape, plan)
    for text, change in cands:                                         # one change, cheapest first
        est = fits(dataclasses.replace(plan, **change))
        if est:
            return [text], est
    chosen: list[tuple[str, dict]] = []
    current = plan
    for text, change in cands:                                         # else accumulate, cheapest first ...
        if text.startswith("per_device_train_batch_size") and any(c[0].startswith("per_device") for c in chosen):
            chosen = [c for c in chosen if not c[0].startswith("per_device")]
        chosen.append((text, change))
        current = dataclasses.replace(plan, **{k: v for _, c in chosen for k, v in c.items()})
        if fits(current):
            break
    else:
        return None
    for item in list(chosen):                                          # ... and drop what is not needed
        rest = [c for c in chosen if c is not item]
        if fits(dataclasses.replace(plan, **{k: v for _, c in rest for k, v in c.items()})):
            chosen = rest
    final = dataclasses.replace(plan, **{k: v for _, c in chosen for k, v in c.items()})
    return [t for t, _ in chosen], estimate(shape, final)


def merge_ram(model: str, shape: Shape, adapter_bytes: float) -> tuple[float, str]:
    """Peak CPU RAM of `zhtune merge`, which streams tensor by tensor (export/merge.py): the largest
    tensor as fp32, twice (in and merged out), + the adapters, + one shard when the base is .bin files."""
    largest_tensor = max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate) * 4 * 2
    path = Path(model).expanduser()
    bins = sorted(path.glob("*.bin")) if path.is_dir() and not any(path.glob("*.safetensors")) else []
    shard = max((p.stat().st_size for p in bins), default=0)
    how = "largest tensor x2 in fp32 + adapters"
    if bins:
        how += f" + the largest .bin shard ({shard / GIB:.1f} GiB)"
    return PROCESS_BASE_RAM + largest_tensor + adapter_bytes + shard, how


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

DESCRIPTION = """
估算训练时每张卡的峰值显存（只读 config.json，不加载权重），以及 zhtune merge 的峰值内存。
Estimate peak GPU memory per device for a `zhtune train` config from the model's config.json only
(or a preset name: llama-7b, llama-13b, llama-65b, llama-2-70b, chinese-llama-2-7b, ...), and the
peak CPU RAM of `zhtune merge`. Takes the same CONFIG.yaml and key=value arguments as zhtune train.
"""

EXAMPLES = """
zhtune estimate examples/chinese_llama_pt_lora.yaml model_name_or_path=llama-7b --vocab-size 49953 --gpu-memory 24
zhtune estimate model_name_or_path=llama-7b finetuning_type=lora cutoff_len=512 --gpu-memory 24
zhtune estimate model_name_or_path=llama-65b finetuning_type=qlora lora_rank=64 gradient_checkpointing=true \
    --gpu-memory 48
zhtune estimate model_name_or_path=llama-2-70b finetuning_type=full \
    deepspeed=examples/deepspeed/ds_zero3_offload.json --num-gpus 8 --gpu-memory 80
"""


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _describe_plan(plan: Plan) -> str:
    zero = f"ZeRO-{plan.zero_stage}" + (" +offload" if plan.offload_optimizer or plan.offload_param else "") \
        if plan.zero_stage else "no DeepSpeed"
    embed = {"full": ", embed/lm_head trained in full", "none": "",
             "new_rows": f", {plan.new_rows} new embed/lm_head rows trained"}[plan.embeddings]
    return (f"{plan.finetuning_type}" + (f" {plan.quantization_bit}-bit" if plan.quantization_bit else "")
            + (f", r={plan.lora_rank}" if plan.finetuning_type != "full" else "")
            + (embed if plan.finetuning_type != "full" else "")
            + f", batch {plan.batch}{'x2 (dpo pairs)' if plan.pairs else ''} x {plan.seq} tokens, "
            + ("gradient checkpointing, " if plan.gradient_checkpointing else "")
            + ("activations offloaded, " if plan.offload_activations else "")
            + f"loss {plan.loss}, {'16-bit' if plan.half else 'fp32'}, {plan.optim}, {zero}, {plan.num_gpus} GPU(s)")


def render(shape: Shape, plan: Plan, est: Estimate, gpu_memory: float | None, merge: tuple[float, str]) -> str:
    def gib(x: float) -> str:
        return f"{x / GIB:8.2f}"

    lines = [
        f"模型 model: {shape.name}  ({_count(shape.params)} params, hidden {shape.hidden}, {shape.layers} layers, "
        f"vocab {shape.vocab})",
        f"训练 plan:  {_describe_plan(plan)}",
        f"可训练 trainable: {est.trainable:,} parameters",
        "",
        f"  {'part 部分':<30} {'GiB':>8}",
    ]
    for name, value in est.parts.items():
        lines.append(f"  {name:<30} {gib(value)}")
    lines.append(f"  {'-' * 39}")
    lines.append(f"  {'peak per GPU 每卡峰值':<30} {gib(est.total)}")
    if est.paged:
        lines.append(f"  {'+ paged optimizer states':<30} {gib(est.paged)}  (spill to CPU RAM when the card is full)")
    if est.cpu_offload:
        lines.append(f"  {'CPU RAM for offload':<30} {gib(est.cpu_offload)}")
    lines += [f"  note: {n}" for n in est.notes]
    if gpu_memory:
        fits = est.total <= gpu_memory * GIB
        lines.append(("能装下 fits" if fits else "装不下 does NOT fit") + f" on a {gpu_memory:g} GiB card "
                     f"({est.total / (gpu_memory * GIB):.0%} of it)")
        if not fits:
            found = suggest(shape, plan, gpu_memory * GIB)
            if found:
                lines.append(f"  最省的改法 cheapest change that fits: {' '.join(found[0])}  "
                             f"(-> {found[1].total / GIB:.2f} GiB)")
            else:
                lines.append("  nothing zhtune can change on this many cards makes it fit: more GPUs with a ZeRO-3 "
                             "config (examples/deepspeed/, --num-gpus), a shorter cutoff_len, or a smaller model")
    lines.append(f"merge 合并峰值内存 peak CPU RAM: {merge[0] / GIB:.2f} GiB ({merge[1]})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from zhtune.args import make_parser
    from zhtune.config import TRAIN_ALIASES, TrainConfig, load_config

    parser = make_parser("estimate", DESCRIPTION, EXAMPLES)
    parser.add_argument("config", nargs="?", help="a zhtune train YAML config (optional)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config keys overriding the file")
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per card: say whether it fits")
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs the run is spread over (ZeRO divides by it)")
    parser.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (default: the tokenizer's, "
                                                                      "else config.json's)")
    parser.add_argument("--json", action="store_true", help="print the parts as JSON")
    args = parser.parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    if config is None and not overrides:
        parser.print_help()
        return 2
    if args.num_gpus < 1:
        raise ZhtuneError(f"--num-gpus must be at least 1, got {args.num_gpus}", where="--num-gpus")
    if args.gpu_memory is not None and not 0 < args.gpu_memory < 1e5:   # (also refuses nan)
        raise ZhtuneError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory:g}",
                          where="--gpu-memory", expected="the card's memory in GiB, e.g. 24 or 80")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise ZhtuneError(f"--vocab-size must be at least 1, got {args.vocab_size}", where="--vocab-size")
    cfg = load_config(TrainConfig, config, overrides, TRAIN_ALIASES)
    if not cfg.model_name_or_path:
        raise ZhtuneError("model_name_or_path is not set", where="model_name_or_path",
                          expected=f"a model folder with config.json or a preset: {', '.join(PRESETS)}")
    base = read_shape(cfg.model_name_or_path)
    vocab = args.vocab_size or tokenizer_vocab(cfg.tokenizer_name_or_path) or base.vocab
    shape = read_shape(cfg.model_name_or_path, vocab)
    plan = plan_from_config(cfg, args.num_gpus, new_rows=max(0, vocab - base.vocab))
    est = estimate(shape, plan)
    adapter = lora_params(shape, plan) * 4 + (shape.embed_params * 2 if plan.embeddings != "none" else 0)
    merge = merge_ram(cfg.model_name_or_path, shape, 0 if plan.finetuning_type == "full" else adapter)
    if args.json:
        fits = None if args.gpu_memory is None else est.total <= args.gpu_memory * GIB
        found = suggest(shape, plan, args.gpu_memory * GIB) if fits is False else None
        print(json.dumps({"parts_gib": {k: v / GIB for k, v in est.parts.items()}, "peak_gib": est.total / GIB,
                          "paged_optimizer_gib": est.paged / GIB, "cpu_offload_gib": est.cpu_offload / GIB,
                          "merge_ram_gib": merge[0] / GIB, "trainable": est.trainable, "fits": fits,
                          "suggestion": None if not found else {"change": found[0], "peak_gib": found[1].total / GIB}},
                         ensure_ascii=False, indent=1))
    else:
        print(render(shape, plan, est, args.gpu_memory, merge))
    return 0
