"""The LM head and its cross-entropy without the [tokens x vocabulary] logits, for `zhtune train` pt and sft.

    loss_sum = linear_cross_entropy(hidden, head_of(model), targets)   # hidden [N, H], targets [N]

LLaMA-3 (128,256 rows), Qwen (151,936) and every grown Chinese vocabulary spend a large share of
training memory on the logits: tokens x vocabulary floats in the forward, again as the log-softmax and
again as their gradient. Here the head's projection and the loss run over chunks of positions, and each
chunk's gradients (with respect to the hidden states and to whatever of the head trains) are computed in
the forward pass while that chunk's logits exist; then the logits are dropped. The peak holds one chunk
of logits, the backward pass only scales the stored gradients, and no matmul is done twice. The
arithmetic is the plain path's (fp32 logits and softmax, the head's own dtype for the matmuls), so losses
and gradients match it within float rounding (tests/train/test_loss.py). On a GPU with Liger Kernel
installed, its fused linear cross-entropy (Triton) does the same job for a head that is one plain matrix.

LossTrainer is the Trainer of pt.py and sft.py: it runs the model with no position kept for the head,
takes the decoder's last hidden state at the labelled positions only, computes the loss here and
normalises it as transformers does (sum over labels / labels in the accumulated batch).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer

IGNORE = -100
CHUNK_BYTES = 128 * 2**20    # fp32 logits of one chunk of positions (+ its gradient in the head's dtype)


def chunk_positions(vocab: int) -> int:
    """Positions per chunk: CHUNK_BYTES of fp32 logits (261 positions of a 128,256 vocabulary), at least 64
    rows so the matmuls stay efficient: each is still [rows, H] x [H, V] with V in the tens of thousands."""
    return max(64, CHUNK_BYTES // (4 * vocab))


# --- the head, seen through peft's wrappers -----------------------------------------------------------

@dataclass
class Head:
    """What the output layer computes: logits = hidden @ weight.T + bias, except that the rows `row_ids`
    of weight are replaced by `rows` (peft trainable tokens: only the new rows of a grown vocabulary train)."""

    weight: torch.Tensor                  # [V, H]; a parameter, or computed (base + LoRA delta)
    bias: torch.Tensor | None = None      # [V]
    rows: torch.Tensor | None = None      # [k, H] trainable rows that replace weight[row_ids]
    row_ids: torch.Tensor | None = None   # [k] long

    @property
    def single_matrix(self) -> bool:
        """One matrix (and bias): what Liger's kernel takes."""
        return self.rows is None


def _one_active(layer) -> str | None:
    active = list(getattr(layer, "active_adapters", []) or [])
    return active[0] if len(active) == 1 and not getattr(layer, "disable_adapters", False) else None


def head_of(model) -> Head | None:
    """The output head of a (peft) causal LM as a Head; None when it is a kind this module cannot compute
    exactly (a quantised head, LoRA with dropout on lm_head, several active adapters)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    module = model.get_output_embeddings()
    if isinstance(module, ModulesToSaveWrapper):               # a trained copy of the whole head
        name = _one_active(module)
        module = module.modules_to_save[name] if name else module.original_module
    if isinstance(module, TrainableTokensWrapper):             # new rows of a grown vocabulary
        layer, name = module.token_adapter, _one_active(module.token_adapter)
        if name is None:
            return None if layer.active_adapters and not layer.disable_adapters else _linear(layer.base_layer)
        base = _linear(layer.base_layer)
        if base is None:
            return None
        rows = layer.trainable_tokens_delta[name]
        # peft's forward is F.linear(x, merged weight): the base layer's bias (if any) is not applied
        return Head(base.weight, None, rows, torch.tensor(layer.token_indices[name], device=rows.device))
    if isinstance(module, LoraLayer):                          # LoRA on lm_head (an adapter from elsewhere)
        name = _one_active(module)
        base = _linear(module.get_base_layer())
        if base is None or module.merged or name is None:
            return base if not module.merged or name is None else None
        if module.training and not isinstance(module.lora_dropout[name], torch.nn.Identity):
            return None                                        # dropout on the LoRA input: no single matrix
        base.weight = base.weight + module.get_delta_weight(name).to(base.weight.dtype)
        return base
    return _linear(module)


def _linear(module) -> Head | None:
    # exactly nn.Linear: bitsandbytes' 4/8-bit layers subclass it but keep packed weights
    return Head(module.weight, module.bias) if type(module) is torch.nn.Linear else None


# --- the chunked loss ---------------------------------------------------------------------------------

def _chunk(head: Head, h: torch.Tensor, t: torch.Tensor, need: tuple[bool, bool, bool, bool]):
    """One chunk: (loss sum, dlogits [n, V] in fp32 with the replaced rows' columns zeroed, their columns [n, k])."""
    up = torch.promote_types(h.dtype, torch.float32)                           # the plain path's .float()
    z = torch.nn.functional.linear(h, head.weight, head.bias).to(up)           # [n, V]
    if head.rows is not None:
        bias = None if head.bias is None else head.bias[head.row_ids]
        z[:, head.row_ids] = torch.nn.functional.linear(h, head.rows, bias).to(up)
    # log-sum-exp and softmax in place: torch.logsumexp would allocate another [n, V] for exp(z - max)
    target = z.gather(1, t[:, None]).squeeze(1)
    top = z.amax(dim=1, keepdim=True)
    total = z.sub_(top).exp_().sum(dim=1, keepdim=True)                      # z is now exp(logits - max)
    loss = (top.squeeze(1) + total.log().squeeze(1) - target).sum()
    if not any(need):
        return loss, None, None
    z.div_(total)                                                              # softmax
    z[torch.arange(len(t), device=z.device), t] -= 1                          # d(sum of CE) / d(logits)
    d_rows = None
    if head.rows is not None:
        d_rows = z[:, head.row_ids]                                           # (a copy)
        z[:, head.row_ids] = 0                                                # those rows of weight are unused
    return loss, z, d_rows


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)      # accumulate in fp32 (fp64 stays fp64)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i) with rows replaced; gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, row_ids, targets, chunk):
        head = Head(weight, bias, rows, row_ids)
        need = ctx.needs_input_grad[:4]
        g_hidden = torch.empty_like(hidden) if need[0] else None
        # gradients of the head accumulate over chunks in fp32 (one rounding at the end, like one big matmul)
        g_weight = torch.zeros(weight.shape, dtype=_acc(weight), device=weight.device) if need[1] else None
        g_bias = torch.zeros(bias.shape, dtype=_acc(bias), device=bias.device) if need[2] else None
        g_rows = torch.zeros(rows.shape, dtype=_acc(rows), device=rows.device) if need[3] else None
        total = torch.zeros((), dtype=_acc(hidden), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            loss, d, d_rows = _chunk(head, h, t, need)
            total += loss
            if d is None:
                continue
            if g_bias is not None:
                g_bias += d.sum(0)
                if d_rows is not None:
                    g_bias[row_ids] += d_rows.sum(0)
            d = d.to(weight.dtype)                        # the plain path's backward runs in the head's dtype
            if g_hidden is not None:
                gh = d @ weight
                if d_rows is not None:
                    gh += d_rows.to(rows.dtype) @ rows
                g_hidden[start:start + chunk] = gh
            if g_weight is not None:
                g_weight += d.t() @ h.to(d.dtype)
            if g_rows is not None:
                g_rows += d_rows.to(rows.dtype).t() @ h.to(rows.dtype)
        ctx.save_for_backward(g_hidden, None if g_weight is None else g_weight.to(weight.dtype),
                              None if g_bias is None else g_bias.to(bias.dtype),
                              None if g_rows is None else g_rows.to(rows.dtype))
        return total

    @staticmethod
    def backward(ctx, grad):
        return (*(None if g is None else g * grad.to(g.dtype) for g in ctx.saved_tensors), None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, head: Head, targets: torch.Tensor, chunk: int | None = None):
    """Sum of the cross-entropies of `hidden` [N, H] through `head` against `targets` [N] (no -100 among
    them), never holding more than one chunk of logits. Differentiable in hidden and the head's tensors."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0                         # keeps the graph: every rank must run backward
    chunk = chunk or chunk_positions(head.weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, head.rows, head.row_ids, targets, chunk)


def liger_cross_entropy(hidden: torch.Tensor, head: Head, targets: torch.Tensor):
    """The same sum by Liger Kernel's fused linear cross-entropy (Triton, GPU)."""
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, targets, head.bias)


# --- the Trainer of pt / sft ---------------------------------------------------------------------------

def label_positions(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Pop the labels from a batch -> (keep [B, T] bool: positions whose next token has a label, targets [N]),
    from the collator's logits_to_keep / shift_labels (data/sft.py) or from `labels` (shifted here)."""
    labels = inputs.pop("labels")
    keep, shift = inputs.pop("logits_to_keep", None), inputs.pop("shift_labels", None)
    if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and shift is not None:
        return keep, shift
    nxt = torch.full_like(labels, IGNORE)
    nxt[:, :-1] = labels[:, 1:]                           # position t predicts label t+1
    keep = nxt != IGNORE
    return keep, nxt[keep]


@contextlib.contextmanager
def last_hidden_state(model):
    """Capture the decoder's output (after the final norm, [B, T, H]) during a forward of `model`."""
    box: dict[str, torch.Tensor] = {}
    decoder = model.get_base_model().get_decoder() if hasattr(model, "get_base_model") else model.get_decoder()

    def keep(module, args, out):
        box["hidden"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    handle = decoder.register_forward_hook(keep)
    try:
        yield box
    finally:
        handle.remove()


@contextlib.contextmanager
def head_without_grad(model):
    """Run the output head's own forward (which sees no position here) without autograd. Its [B, 0, V]
    output is discarded, but peft's new-row head builds its merged [V, H] matrix inside that forward
    and F.linear would keep it for backward: a whole copy of the head held for nothing."""
    head = model.get_output_embeddings()
    state: list[bool] = []

    def off(module, args):
        state.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def back(module, args, out):
        torch.set_grad_enabled(state.pop())

    handles = [head.register_forward_pre_hook(off), head.register_forward_hook(back)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if state:                                          # the forward raised inside the head
            torch.set_grad_enabled(state.pop())


class LossTrainer(Trainer):
    """transformers' Trainer with the LM-head loss computed here (`fused_loss`: chunked | liger | plain) and,
    on a GPU, the activations saved for backward kept in CPU RAM (`offload_activations`, TRL's offloader)."""

    def __init__(self, *args, fused_loss: str = "chunked", offload_activations: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_loss = fused_loss
        self.offload_context: Any = contextlib.nullcontext()
        if offload_activations:
            from trl.models import get_act_offloading_ctx_manager

            self.offload_context = get_act_offloading_ctx_manager(self.model, warn_if_no_head=False)

    def training_step(self, *args, **kwargs):
        with self.offload_context:
            return super().training_step(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        head = None if self.fused_loss == "plain" else head_of(unwrapped)
        if head is None:                                  # transformers' own loss, over full logits
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        keep, targets = label_positions(inputs)
        with last_hidden_state(unwrapped) as box, head_without_grad(unwrapped):
            model(**inputs, logits_to_keep=torch.zeros_like(keep))   # the head sees no position: no logits
        hidden = box["hidden"][keep]                      # [N, H], row-major like the targets
        if self.fused_loss == "liger" and head.single_matrix:
            total = liger_cross_entropy(hidden, head, targets)
        else:
            total = linear_cross_entropy(hidden, head, targets)
        loss = total / (num_items_in_batch if num_items_in_batch is not None else max(1, targets.numel()))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as Trainer.compute_loss: the count is over all ranks, and DDP averages the ranks' gradients
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                           else self.args.n_gpu)
        return (loss, {"loss": loss}) if return_outputs else loss
