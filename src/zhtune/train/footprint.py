"""The memory model behind `zhtune estimate`: a model's sizes (Shape) and a config's choices (Plan) -> the
peak bytes per device, in parts (Estimate).

    shape = read_shape("llama-3-8b")                      # or a model folder: only its config.json is read
    est = estimate(shape, plan_from_config(cfg))          # est.parts, est.total, est.paged, est.cpu_offload

The parts (weights, trainable parameters, gradients, optimizer states, activations, the LM head's logits and
loss, framework buffers, allocator + CUDA context) are summed for the busiest moment of a step, per device,
after ZeRO / offload / paging have divided what they divide. The formulas are written out in
docs/guides/estimate.md; train/estimate.py is the command (report, suggestions) over them.
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
    half, act = (2, 2) if plan.half else (4, 4)
    full = plan.finetuning_type == "full"
    ds = plan.zero_stage > 0
    weights = _weights_on_device(shape, plan, half, notes)
    state = _training_state(shape, plan, half, notes)

    # --- activations of one micro-batch (DPO: chosen + rejected rows together)
    tokens = plan.batch * (2 if plan.pairs else 1) * plan.seq
    kept, live = _activations(shape, plan, tokens, act, state, notes)

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
    step_extra = max(0.0, state.step_grad - backward_phase)           # the step runs after activations are freed

    parts = {
        "weights": weights,
        "trainable params": state.params,
        "gradients": state.grads,
        "optimizer states": state.optimizer,
        "activations": kept,
        "logits + loss": logits,
        "layer recomputed in backward": recompute,
        "optimizer step (fp32 grads)": step_extra,
        "framework buffers": buffers,
    }
    allocated = sum(parts.values())
    context = CUDA_CONTEXT if plan.cuda else 0.0
    parts["allocator + CUDA context"] = allocated * FRAGMENTATION + context
    return Estimate(parts=parts, notes=notes, trainable=state.trainable, cpu_offload=state.cpu, paged=state.paged,
                    context=context)


def _weights_on_device(shape: Shape, plan: Plan, half: int, notes: list[str]) -> float:
    """The base model's weights on one device (frozen, or the trained weights themselves for full fine-tuning)."""
    weights = _weights(shape, plan, half)
    if plan.quantization_bit == 4:
        notes.append("4-bit nf4 with double quantisation: 4.127 bits per linear weight")
    if plan.zero_stage == 3:
        weights = 0.0 if plan.offload_param else weights / max(1, plan.num_gpus)
        if plan.offload_param:
            notes.append("ZeRO-3 offload_param: weights live in CPU RAM, gathered layer by layer")
    return weights


@dataclass
class TrainingState:
    """What training adds besides the weights, per device, in bytes (trainable: a count of parameters)."""

    trainable: int
    params: float                  # the trainable parameters (0 for full fine-tuning: they are the weights)
    grads: float
    optimizer: float               # resident optimizer states
    step_grad: float = 0.0         # ZeRO-1/2: the fp32 gradient partition made at the optimizer step
    cpu: float = 0.0               # moved to CPU RAM (offload_optimizer)
    paged: float = 0.0             # paged optimizer states (CUDA unified memory)


def _training_state(shape: Shape, plan: Plan, half: int, notes: list[str]) -> TrainingState:
    """Trainable parameters, their gradients and optimizer states, after ZeRO / offload / paging divided them."""
    full, ds, n = plan.finetuning_type == "full", plan.zero_stage > 0, max(1, plan.num_gpus)
    # what is trained: adapters (fp32 for LoRA; compute dtype for QLoRA, as QLoRA and TRL do), embeddings
    trainable_lora = 0 if full else lora_params(shape, plan)
    trainable_embed = embedding_trainable(shape, plan)
    trainable = shape.params if full else trainable_lora + trainable_embed
    if ds:
        # DeepSpeed holds trainable params and grads in 16-bit, plus an fp32 master copy beside the moments
        p_bytes, g_bytes = half, half
        opt_per_param = _optimizer_bytes(plan.optim) + 4.0
    elif full:
        # the weights are the trainable params; torch AdamW keeps its moments in the params' dtype
        p_bytes = g_bytes = 4 if plan.fp32_master else half
        opt_per_param = _optimizer_bytes(plan.optim) * p_bytes / 4
    else:
        lora_dtype = half if plan.quantization_bit else 4
        p_bytes = (trainable_lora * lora_dtype + trainable_embed * half) / max(trainable, 1)
        g_bytes = p_bytes
        # torch optimizers keep moments in the param dtype; bitsandbytes' (paged, 8-bit) in their own
        bnb = any(k in plan.optim.lower() for k in ("paged", "bnb", "8bit"))
        opt_per_param = _optimizer_bytes(plan.optim) * (1.0 if bnb else p_bytes / 4)
    state = TrainingState(trainable, 0.0 if full else trainable * p_bytes, trainable * g_bytes,
                          trainable * opt_per_param, trainable * 4.0 if ds and plan.zero_stage in (1, 2) else 0.0)
    if plan.reference_adapter and not full:
        state.params *= 2                                              # + the frozen reference copy (no grads)
        notes.append("DPO on peft_path: a frozen copy of the adapter is the reference (counted in params)")
    if plan.step_in_backward:                       # each gradient is applied and freed as soon as it exists
        state.grads = max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate) * g_bytes
    if ds:
        if plan.zero_stage >= 2:
            state.grads /= n
        state.optimizer /= n
        state.step_grad /= n
        if plan.zero_stage == 3:
            state.params = 0.0 if plan.offload_param else state.params / n
        if plan.offload_optimizer:
            state.cpu += state.optimizer + state.step_grad
            state.optimizer, state.step_grad = 0.0, 0.0
            notes.append("offload_optimizer: optimizer states and the fp32 step run in CPU RAM")
    if plan.paged and plan.cuda and not ds:
        state.paged, state.optimizer = state.optimizer, 0.0
        notes.append(f"{plan.optim}: optimizer states in CUDA unified memory, on the card while there is room, "
                     "else in CPU RAM (slower steps, no out-of-memory)")
    return state


def _activations(shape: Shape, plan: Plan, tokens: int, act: int, state: TrainingState,
                 notes: list[str]) -> tuple[float, float]:
    """(kept for backward through the step, the one layer recomputed in backward with checkpointing); what
    offload_activations moves to CPU RAM is added to state.cpu."""
    per_layer = activation_bytes_per_token_layer(shape, plan, act)
    kept = tokens * shape.layers * (act * shape.hidden if plan.gradient_checkpointing else per_layer)
    live = tokens * per_layer if plan.gradient_checkpointing else 0.0
    if plan.offload_activations and plan.cuda:
        # TRL's offloader keeps a few tensors in flight; what autograd would keep goes to CPU RAM
        state.cpu += kept
        kept = tokens * (act * shape.hidden if plan.gradient_checkpointing else per_layer)
        notes.append(f"offload_activations: {state.cpu / GIB:.2f} GiB of saved activations in CPU RAM")
    return kept, live
