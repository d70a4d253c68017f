"""`zhtune estimate [CONFIG.yaml] [key=value ...]`: peak GPU memory per device of a training config.

    zhtune estimate examples/chinese_llama_pt_lora.yaml --gpu-memory 24
    zhtune estimate model_name_or_path=llama-65b finetuning_type=qlora lora_rank=64 --gpu-memory 48

Reads only the model's config.json (or a named preset such as llama-7b, so it works offline): no
weights are loaded. The parts (weights, trainable parameters, gradients, optimizer states,
activations, framework buffers, CUDA context) are summed for the busiest moment of a step, per
device, after ZeRO / offload have divided what they divide. Also estimates the peak CPU RAM of
`zhtune merge` for the same model. The formulas are written out in docs/guides/estimate.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.config import TrainConfig
from zhtune.errors import ZhtuneError
from zhtune.io import read_json
from zhtune.model.load import check_architecture

GIB = 1024 ** 3
CUDA_CONTEXT = 0.5 * GIB       # CUDA context + cuBLAS/cuDNN workspaces, as nvidia-smi counts them
FRAGMENTATION = 0.03           # PyTorch caching allocator: reserved exceeds allocated by a few percent
PROCESS_BASE_RAM = 0.4 * GIB   # import torch + transformers + peft (measured, NOTES.md)


@dataclass(frozen=True)
class Shape:
    """The sizes of a LLaMA-family decoder that decide its memory."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None  # Qwen3 and others: its own, not hidden / heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        q = self.heads * (self.head_dim or h // self.heads)
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)   # input embeddings + output head

    @property
    def params(self) -> int:
        return self.linear_params + self.embed_params + (2 * self.layers + 1) * self.hidden


# Offline presets (the published config.json values). Chinese-LLaMA vocabularies: 49953 (v1), 55296 (v2).
PRESETS: dict[str, Shape] = {s.name: s for s in [
    Shape("llama-7b", 4096, 11008, 32, 32, 32, 32000),
    Shape("llama-13b", 5120, 13824, 40, 40, 40, 32000),
    Shape("llama-33b", 6656, 17920, 60, 52, 52, 32000),
    Shape("llama-65b", 8192, 22016, 80, 64, 64, 32000),
    Shape("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    Shape("llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
    Shape("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
    Shape("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),
    Shape("llama-3-70b", 8192, 28672, 80, 64, 8, 128256),
    Shape("chinese-llama-7b", 4096, 11008, 32, 32, 32, 49953),
    Shape("chinese-llama-13b", 5120, 13824, 40, 40, 40, 49953),
    Shape("chinese-llama-2-7b", 4096, 11008, 32, 32, 32, 55296),
    Shape("chinese-llama-2-13b", 5120, 13824, 40, 40, 40, 55296),
]}
PRESETS["llama-70b"] = PRESETS["llama-2-70b"]


def read_shape(model: str, vocab: int | None = None) -> Shape:
    """A preset name or a folder / config.json path -> Shape (vocab overridden when given)."""
    if model in PRESETS:
        shape = PRESETS[model]
    else:
        path = Path(model).expanduser()
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.is_file():
            raise ZhtuneError(f"no config.json for {model!r}", where="model_name_or_path",
                              expected=f"a model folder with config.json, or a preset: {', '.join(PRESETS)}",
                              hint="estimate without the weights: add model_name_or_path=<preset>, "
                                   "e.g. model_name_or_path=chinese-llama-2-7b")
        try:
            c = read_json(cfg_file, "config.json")
            c = c.get("text_config", c)
            check_architecture(c, str(cfg_file))
            shape = Shape(path.name, int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"]),
                          int(c["num_attention_heads"]), int(c.get("num_key_value_heads") or c["num_attention_heads"]),
                          int(c["vocab_size"]), bool(c.get("tie_word_embeddings", False)),
                          int(c["head_dim"]) if c.get("head_dim") else None)
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise ZhtuneError(f"cannot read the model sizes from {cfg_file}: {exc}", where=str(cfg_file),
                              expected="a LLaMA-style config.json (hidden_size, intermediate_size, "
                                       "num_hidden_layers, num_attention_heads, vocab_size)") from None
    if vocab:
        shape = dataclasses.replace(shape, vocab=int(vocab))
    return shape


def tokenizer_vocab(path: str | None) -> int | None:
    """len(tokenizer) of a tokenizer folder without loading transformers (tokenizer.json, else the SP model)."""
    if not path or not Path(path).expanduser().is_dir():
        return None
    folder = Path(path).expanduser()
    if (folder / "tokenizer.json").is_file():
        data = read_json(folder / "tokenizer.json")
        ids = set((data.get("model") or {}).get("vocab", {}).values())
        ids |= {t["id"] for t in data.get("added_tokens", [])}
        return len(ids) or None
    if (folder / "tokenizer.model").is_file():
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    return None


# --------------------------------------------------------------------------------------------
# What is trained and how
# --------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """The memory-relevant choices of a training config (zhtune's; a few exist for published references)."""

    finetuning_type: str = "lora"           # lora | qlora | full
    quantization_bit: int | None = None      # 4 (nf4 + double quantisation) or 8
    lora_rank: int = 8
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"])
    lora_dropout: float = 0.05
    embeddings: str = "none"                # none | new_rows (peft trainable tokens) | full (modules_to_save)
    new_rows: int = 0                       # rows the vocabulary grew by (what new_rows trains)
    batch: int = 1                          # per device
    seq: int = 512
    pairs: bool = False                     # dpo: chosen + rejected in one forward (2x the rows)
    reference_adapter: bool = False         # dpo on peft_path: TRL keeps a frozen copy of the adapter
    gradient_checkpointing: bool = False
    offload_activations: bool = False       # saved activations in CPU RAM (TRL's offloader)
    loss: str = "chunked"                   # plain | chunked | liger | trl (dpo's fused head) | chunked_output
    half: bool = True                       # bf16/fp16 weights and activations (GPU default); False = fp32
    fp32_master: bool = False               # full fine-tuning with fp16 autocast: zhtune keeps fp32 weights
    optim: str = "adamw_torch"
    zero_stage: int = 0                     # 0 = no DeepSpeed
    offload_optimizer: bool = False
    offload_param: bool = False
    num_gpus: int = 1
    grad_accum: int = 1
    step_in_backward: bool = False          # torchtune's optimizer_in_bwd: each gradient freed as it is made
    cuda: bool = True                       # False: a CPU run (no CUDA context), for the benchmark

    @property
    def paged(self) -> bool:
        return "paged" in self.optim.lower()


def _zero_from_file(path: str) -> tuple[int, bool, bool]:
    """(stage, offload optimizer, offload params) from a DeepSpeed JSON config."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ZhtuneError(f"DeepSpeed config not found: {path}", where="deepspeed",
                          expected="a JSON file such as examples/deepspeed/ds_zero2.json")
    zero = read_json(file, "DeepSpeed config").get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ZhtuneError("zero_optimization is not a mapping", where=str(file), expected='"zero_optimization": {...}')

    def offloaded(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")

    return int(zero.get("stage", 0)), offloaded("offload_optimizer"), offloaded("offload_param")


def _loss_kind(cfg: TrainConfig, stage: int) -> str:
    """What computes the LM head's loss on a GPU for this config (train/memory.py decides the same way)."""
    if cfg.stage == "dpo":
        return "plain" if cfg.pref_loss in ("orpo", "simpo") else "trl"
    if cfg.fused_loss == "plain" or stage == 3 or cfg.fsdp:
        return "plain"
    return "liger" if cfg.fused_loss == "liger" else "chunked"


def plan_from_config(cfg: TrainConfig, num_gpus: int = 1, new_rows: int = 0) -> Plan:
    """A TrainConfig -> Plan, for a GPU. `new_rows`: how many rows the tokenizer adds to the model."""
    stage, off_opt, off_par = _zero_from_file(cfg.deepspeed) if cfg.deepspeed else (0, False, False)
    save, rank, wanted, tokens = cfg.modules_to_save, cfg.lora_rank, list(cfg.lora_target), None
    adapter = Path(cfg.peft_path or "").expanduser() / "adapter_config.json"
    if cfg.peft_path and adapter.is_file():       # continuing an adapter: its own rank, targets, embeddings
        known = read_json(adapter)
        rank, wanted = int(known.get("r", rank)), sorted(known.get("target_modules") or wanted)
        save, tokens = known.get("modules_to_save") or [], known.get("trainable_token_indices")
    targets = [t if t.endswith("_proj") else f"{t}_proj" for t in wanted] or Plan().lora_targets
    if tokens:
        ids = tokens if isinstance(tokens, list) else next(iter(tokens.values()), [])
        embeddings, new_rows = "new_rows", len(ids)
    elif save is not None:
        embeddings = "full" if save else "none"
    else:
        embeddings = cfg.train_embeddings if new_rows else "none"
    optim = cfg.optim
    if optim == "auto":   # as `zhtune train` resolves it on a GPU with bitsandbytes (train/memory.py)
        optim = "adamw_torch" if cfg.deepspeed or cfg.fsdp else "paged_adamw_32bit"
    return Plan(
        finetuning_type=cfg.finetuning_type, quantization_bit=cfg.quantization_bit, lora_rank=rank,
        lora_targets=targets, lora_dropout=cfg.lora_dropout, embeddings=embeddings, new_rows=new_rows,
        batch=cfg.per_device_train_batch_size, seq=cfg.cutoff_len, pairs=cfg.stage == "dpo",
        reference_adapter=cfg.stage == "dpo" and bool(cfg.peft_path) and cfg.pref_loss not in ("orpo", "simpo"),
        gradient_checkpointing=bool(cfg.gradient_checkpointing), offload_activations=bool(cfg.offload_activations),
        loss=_loss_kind(cfg, stage), half=cfg.bf16 is not False or cfg.fp16,
        fp32_master=cfg.finetuning_type == "full" and cfg.fp16 and not cfg.deepspeed,
        optim=optim, zero_stage=stage, offload_optimizer=off_opt, offload_param=off_par, num_gpus=num_gpus,
        grad_accum=cfg.gradient_accumulation_steps)


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------

@dataclass
class Estimate:
    parts: dict[str, float]                  # bytes per device, in table order; they sum to `total`
    notes: list[str]
    trainable: int
    cpu_offload: float = 0.0                # bytes moved to CPU RAM by offload
    paged: float = 0.0                      # paged optimizer states: on the card while it has room, else CPU RAM
    context: float = 0.0                    # the CUDA context (in the last part; torch's memory stats omit it)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def allocated(self) -> float:
        """What PyTorch's allocator holds at the peak (torch.cuda.max_memory_allocated's view; the CPU peak)."""
        return sum(v for k, v in self.parts.items() if k != "allocator + CUDA context")

    @property
    def reserved(self) -> float:
        """allocated + the allocator's slack: torch.cuda.max_memory_reserved's view (no CUDA context)."""
        return self.total - self.context


def _optimizer_bytes(optim: str) -> float:
    """Optimizer state bytes per trainable parameter (fp32 states)."""
    name = optim.lower()
    if "8bit" in name:
        return 2.0                            # two 8-bit moments (+ block scales, negligible)
    if "adafactor" in name:
        return 0.1                            # factored second moment: rows + columns only
    if name.startswith("sgd"):
        return 4.0                            # momentum
    return 8.0                                # AdamW: exp_avg + exp_avg_sq in fp32


def lora_params(shape: Shape, plan: Plan) -> int:
    shapes = shape.linear_shapes()
    unknown = [t for t in plan.lora_targets if t not in shapes]
    if unknown:
        raise ZhtuneError(f"lora_target {unknown} is not a linear layer of a LLaMA-family model", where="lora_target",
                          expected=f"some of {', '.join(shapes)}")
    return shape.layers * sum(plan.lora_rank * (shapes[t][0] + shapes[t][1]) for t in plan.lora_targets)


def embedding_trainable(shape: Shape, plan: Plan) -> int:
    """Parameters of embed_tokens / lm_head that train besides the adapter."""
    if plan.finetuning_type == "full" or plan.embeddings == "none":
        return 0
    if plan.embeddings == "full":
        return shape.embed_params
    return plan.new_rows * shape.hidden * (1 if shape.tied else 2)


def activation_bytes_per_token_layer(shape: Shape, plan: Plan, act: int) -> float:
    """Bytes one decoder layer keeps for backward per token (no checkpointing), LLaMA with SDPA attention.

    act = bytes per activation element (2 for bf16/fp16, 4 for fp32). Counted from what autograd saves:
      two RMSNorms, each saving its fp32 input copy (4h bytes each; 2h more with trainable norm weights),
      the q/k/v input (h), q + k + v + attention output for SDPA (2h + 2kv), the o_proj input (h),
      the MLP input (h), gate, silu(gate), up and their product (4i).
    LoRA with dropout adds, per adapted layer, the dropped-out copy of its input (in) plus a bool mask.
    """
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    norm = 2 * (4 * h + (act * h if plan.finetuning_type == "full" else 0))
    base = norm + act * (h + 2 * h + 2 * kv + h + h + 4 * i)
    if plan.finetuning_type != "full" and plan.lora_dropout > 0:
        shapes = shape.linear_shapes()
        base += sum((act + 1) * shapes[t][0] + act * plan.lora_rank for t in plan.lora_targets)
    return float(base)


def loss_bytes(shape: Shape, plan: Plan, tokens: int, act: int, head_trains: bool) -> float:
    """The LM head's output and loss at their peak, for T = `tokens` positions (all of them: with sft's
    prompt masking fewer positions reach the head, so this is an upper bound there).

    plain: the logits (act), their fp32 copy, the fp32 log-softmax and the logits' gradient: T·V·(act+4+4+4)
      (fp32 models: T·V·12, the copy is the same tensor).
    chunked (train/loss.py): one chunk of fp32 logits and its gradient in the head's dtype, plus the
      hidden states' gradient (T·h·act), plus the head's gradient accumulated in fp32 when the whole head trains.
    liger: Triton chunks of about T·h/V positions: ~T·h·(4+4), plus the head's fp32 gradient when it trains.
    trl (dpo): TRL's tiles of 4096 positions x 32768 vocabulary in the compute dtype, the hidden states'
      fp32 gradient, and the head's fp32 gradient when anything of it trains (new rows included).
    chunked_output (torchtune's CEWithChunkedOutputLoss): all logits in 16-bit, 8 chunks upcast one at a time.
    """
    from zhtune.train.loss import CHUNK_BYTES, chunk_positions

    v, h = shape.vocab, shape.hidden
    head_grad = v * h * 4 if head_trains else 0.0
    if plan.loss == "plain":
        return tokens * v * (act + (4 if act < 4 else 0) + 4 + 4)
    if plan.loss == "chunked":
        rows = min(tokens, chunk_positions(v))
        return rows * v * (4 + (act if act < 4 else 0)) + tokens * h * act + head_grad   # fp32: d is z itself
    if plan.loss == "liger":
        return tokens * h * 8 + head_grad
    if plan.loss == "trl":
        return min(tokens, 4096) * min(v, 32768) * act + tokens * h * 4 + head_grad
    if plan.loss == "chunked_output":
        return tokens * v * act + 2 * (tokens / 8) * v * 4
    raise ValueError(f"unknown loss kind {plan.loss!r} (CHUNK_BYTES={CHUNK_BYTES})")


def _weights(shape: Shape, plan: Plan, half: int) -> float:
    other = shape.params - shape.linear_params                       # embeddings, head, norms: kept in 16-bit
    if plan.quantization_bit == 4:
        # nf4: 0.5 byte/param + double-quantised constants (8-bit absmax per 64, fp32 per 256 blocks: 0.127 bit)
        return shape.linear_params * (0.5 + 0.127 / 8) + other * half
    if plan.quantization_bit == 8:
        return shape.linear_params * 1.0 + shape.layers * 7 * shape.hidden * 4 + other * half
    return shape.params * (4 if plan.finetuning_type == "full" and plan.fp32_master else half)


def estimate(shape: Shape, plan: Plan) -> Estimate:
    """Peak memory per device, in parts (bytes)."""
    notes: list[str] = []
    n = max(1, plan.num_gpus)
    half, act = (2, 2) if plan.half else (4, 4)
    full = plan.finetuning_type == "full"
    ds = plan.zero_stage > 0

    # --- weights of the base model (frozen, or the trainable weights themselves for full fine-tuning)
    weights = _weights(shape, plan, half)
    if plan.quantization_bit == 4:
        notes.append("4-bit nf4 with double quantisation: 4.127 bits per linear weight")
    if ds and plan.zero_stage == 3:
        weights = 0.0 if plan.offload_param else weights / n
        if plan.offload_param:
            notes.append("ZeRO-3 offload_param: weights live in CPU RAM, gathered layer by layer")

    # --- what is trained: adapters (fp32 for LoRA; compute dtype for QLoRA, as QLoRA and TRL do), embeddings
    trainable_lora = 0 if full else lora_params(shape, plan)
    trainable_embed = embedding_trainable(shape, plan)
    trainable = shape.params if full else trainable_lora + trainable_embed
    if ds:
        # DeepSpeed holds trainable params and grads in 16-bit, plus an fp32 master copy beside the moments
        p_bytes, g_bytes = half, half
        opt_per_param = _optimizer_bytes(plan.optim) + 4.0
    elif full:
        # the weights above are the trainable params; torch AdamW keeps its moments in the params' dtype
        p_bytes = g_bytes = 4 if plan.fp32_master else half
        opt_per_param = _optimizer_bytes(plan.optim) * p_bytes / 4
    else:
        lora_dtype = half if plan.quantization_bit else 4
        p_bytes = (trainable_lora * lora_dtype + trainable_embed * half) / max(trainable, 1)
        g_bytes = p_bytes
        # torch optimizers keep moments in the param dtype; bitsandbytes' (paged, 8-bit) in their own
        bnb = any(k in plan.optim.lower() for k in ("paged", "bnb", "8bit"))
        opt_per_param = _optimizer_bytes(plan.optim) * (1.0 if bnb else p_bytes / 4)
    # full fine-tuning: the params are the weights, already counted above
    params_part = 0.0 if full else trainable * p_bytes
    if plan.reference_adapter and not full:
        params_part *= 2                                              # + the frozen reference copy (no grads)
        notes.append("DPO on peft_path: a frozen copy of the adapter is the reference (counted in params)")
    grads = trainable * g_bytes
    if plan.step_in_backward:                       # each gradient is applied and freed as soon as it exists
        grads = max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate) * g_bytes
    optimizer = trainable * opt_per_param
    step_extra_grad = trainable * 4.0 if ds and plan.zero_stage in (1, 2) else 0.0  # fp32 grad partition at step
    cpu = 0.0
    if ds:
        if plan.zero_stage >= 2:
            grads /= n
        optimizer /= n
        step_extra_grad /= n
        if plan.zero_stage == 3:
            params_part = 0.0 if plan.offload_param else params_part / n
        if plan.offload_optimizer:
            cpu += optimizer + step_extra_grad
            optimizer, step_extra_grad = 0.0, 0.0
            notes.append("offload_optimizer: optimizer states and the fp32 step run in CPU RAM")
    paged = 0.0
    if plan.paged and plan.cuda and not ds:
        paged, optimizer = optimizer, 0.0
        notes.append(f"{plan.optim}: optimizer states in CUDA unified memory, on the card while there is room, "
                     "else in CPU RAM (slower steps, no out-of-memory)")

    # --- activations of one micro-batch (DPO: chosen + rejected rows together)
    rows = plan.batch * (2 if plan.pairs else 1)
    tokens = rows * plan.seq
    per_layer = activation_bytes_per_token_layer(shape, plan, act)
    kept = tokens * shape.layers * (act * shape.hidden if plan.gradient_checkpointing else per_layer)
    live = tokens * per_layer if plan.gradient_checkpointing else 0.0   # the layer being recomputed in backward
    if plan.offload_activations and plan.cuda:
        # TRL's offloader keeps a few tensors in flight; what autograd would keep goes to CPU RAM
        cpu += kept
        kept = tokens * (act * shape.hidden if plan.gradient_checkpointing else per_layer)
        notes.append(f"offload_activations: {cpu / GIB:.2f} GiB of saved activations in CPU RAM")

    # --- the LM head's output and loss (train/loss.py); peft's new-row head keeps a merged copy of the matrix
    head_trains = full or plan.embeddings == "full" or (plan.embeddings == "new_rows" and plan.loss == "trl")
    logits = loss_bytes(shape, plan, tokens, act, head_trains)
    if plan.embeddings == "new_rows" and not full and plan.loss in ("plain", "trl", "liger"):
        logits += shape.vocab * shape.hidden * half   # peft's head keeps its merged [V, h] matrix for backward
    # the head's backward is done (its logits freed) before the last layer is recomputed: only the excess counts
    recompute = max(0.0, live - logits)
    buffers = 1e8 * half if ds else 0.0                               # ZeRO's gradient reduce bucket (1e8 elements)
    if ds and plan.zero_stage == 3:
        buffers += 2 * 1e8 * half                                     # prefetch + live parameters being gathered
    backward_phase = kept + max(live, logits)
    step_extra = max(0.0, step_extra_grad - backward_phase)           # the step runs after activations are freed

    parts = {
        "weights": weights,
        "trainable params": params_part,
        "gradients": grads,
        "optimizer states": optimizer,
        "activations": kept,
        "logits + loss": logits,
        "layer recomputed in backward": recompute,
        "optimizer step (fp32 grads)": step_extra,
        "framework buffers": buffers,
    }
    allocated = sum(parts.values())
    context = CUDA_CONTEXT if plan.cuda else 0.0
    parts["allocator + CUDA context"] = allocated * FRAGMENTATION + context
    return Estimate(parts=parts, notes=notes, trainable=trainable, cpu_offload=cpu, paged=paged, context=context)


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
