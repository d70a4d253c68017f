"""The LM-head loss without full logits (train/loss.py) equals the plain path: loss and every gradient, for
each kind of head zhtune trains (frozen, new rows of a grown vocabulary, tied, whole-matrix copies, LoRA on
lm_head, full fine-tuning, QLoRA), through the Trainer's gradient-accumulation normalisation; TRL's fused DPO
head agrees on the same heads; the levers are config keys and refuse what this machine cannot run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from zhtune import tiny
from zhtune.config import TRAIN_ALIASES, TrainConfig, load_config
from zhtune.data.sft import IGNORE, Collator
from zhtune.errors import ZhtuneError
from zhtune.model.adapter import attach_adapter
from zhtune.train.dpo import expose_head_bias
from zhtune.train.loss import Head, LossTrainer, head_of, linear_cross_entropy
from zhtune.train.run import main as train_main


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to float32 rounding, relative to the tensor's scale (elements near 0 have absolute error)."""
    return float((a - b).abs().max()) <= rel * float(b.abs().max()) + 1e-7

VOCAB, NEW = 96, 8          # a tiny Llama whose vocabulary grew by 8 rows


def _cfg(**kw):
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in kw.items()], TRAIN_ALIASES)


@pytest.mark.parametrize("case", ["frozen", "trainable", "rows"])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_chunks_equal_full_logits(case, chunk):
    """fp64, so any difference is a mistake, not rounding: several chunks, or one."""
    torch.manual_seed(0)
    n, h, v = 50, 16, 97
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=case == "trainable")
    bias = torch.randn(v, dtype=torch.float64, requires_grad=case != "frozen")
    rows = torch.randn(3, h, dtype=torch.float64, requires_grad=True) if case == "rows" else None
    ids = torch.tensor([90, 3, 96]) if case == "rows" else None
    targets = torch.randint(0, v, (n,))
    targets[:5] = 90                                   # some targets are replaced rows
    leaves = [t for t in (hidden, weight, bias, rows) if t is not None and t.requires_grad]

    ours = linear_cross_entropy(hidden, Head(weight, bias, rows, ids), targets, chunk=chunk)
    got = torch.autograd.grad(ours * 0.37, leaves)
    full = weight if rows is None else weight.index_copy(0, ids, rows)
    plain = F.cross_entropy(F.linear(hidden, full, bias), targets, reduction="sum")
    want = torch.autograd.grad(plain * 0.37, leaves)
    assert float(ours.detach()) == pytest.approx(float(plain.detach()), rel=1e-12)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


# --- through the Trainer, on real (peft) models --------------------------------------------------------

def _model(case: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tied = case in ("new_rows_tied", "full_tied")
    config = LlamaConfig(vocab_size=VOCAB + NEW, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    new = list(range(VOCAB, VOCAB + NEW))
    if case == "lora_head":   # an adapter from elsewhere with LoRA on lm_head (zhtune never targets the head)
        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "lm_head"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    else:
        # no LoRA dropout: two forwards of the same batch must be the same function
        cfg = {"frozen": _cfg(lora_dropout=0), "new_rows": _cfg(lora_dropout=0), "new_rows_tied": _cfg(lora_dropout=0),
               "whole_matrices": _cfg(train_embeddings="full", lora_dropout=0),
               "full_tied": _cfg(finetuning_type="full")}[case]
        model = attach_adapter(model, cfg, new_rows=[] if case == "frozen" else new)
        with torch.no_grad():   # trained-looking rows, so a row mix-up cannot hide behind equal init
            for name, p in model.named_parameters():
                if "trainable_tokens_delta" in name or "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    model.train()
    return model


def _batch():
    """Two rows of an SFT batch: prompts masked (-100), padding, some labels on the new rows."""
    g = torch.Generator().manual_seed(1)
    features = []
    for n in (13, 9):
        ids = torch.randint(0, VOCAB + NEW, (n,), generator=g).tolist()
        labels = [IGNORE] * 4 + ids[4:]
        features.append({"input_ids": ids, "labels": labels})
    batch = Collator(pad_id=0)(features)
    batch["labels"][0, 6] = VOCAB + 3                  # a new row as a target
    keep = torch.zeros_like(batch["logits_to_keep"])
    keep[:, :-1] = batch["labels"][:, 1:] != IGNORE
    batch["logits_to_keep"], batch["shift_labels"] = keep, batch["labels"][:, 1:][keep[:, :-1]]
    return batch


def _trainer(model, tmp_path, fused: str):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=2)
    return LossTrainer(model=model, args=args, fused_loss=fused)


def _loss_and_grads(model, trainer, batch, n_items):
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, {k: v.clone() for k, v in batch.items()}, num_items_in_batch=n_items)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", ["frozen", "new_rows", "new_rows_tied", "whole_matrices", "lora_head", "full_tied"])
def test_trainer_loss_and_gradients_equal_the_plain_path(case, tmp_path):
    model = _model(case)
    assert head_of(model) is not None
    batch = _batch()
    n_items = int((batch["shift_labels"] != IGNORE).sum()) + 5   # as if another micro-batch held 5 more labels
    loss, grads = _loss_and_grads(model, _trainer(model, tmp_path, "chunked"), batch, torch.tensor(n_items))
    ref_loss, ref_grads = _loss_and_grads(model, _trainer(model, tmp_path, "plain"), batch, torch.tensor(n_items))
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert set(grads) == set(ref_grads) and grads
    for name, g in grads.items():
        assert close(g, ref_grads[name]), name
    if "new_rows" in case:
        assert any("trainable_tokens_delta" in n and g.abs().sum() > 0 for n, g in grads.items())


@pytest.mark.parametrize("collated", [True, False])
def test_only_labelled_positions_reach_the_head(collated, tmp_path, monkeypatch):
    """The head's own forward sees no position (its output is empty) and the chunked loss gets the hidden
    states of the labelled positions only: from the collator's mask (pt, sft) or from `labels` (streaming pt)."""
    import zhtune.train.loss as L

    model, batch = _model("frozen"), _batch()
    labels = int((batch["labels"][:, 1:] != IGNORE).sum())
    if not collated:
        batch = {k: v for k, v in batch.items() if k not in ("logits_to_keep", "shift_labels")}
    rows, widths = [], []
    real = L.linear_cross_entropy
    monkeypatch.setattr(L, "linear_cross_entropy", lambda h, *a, **k: rows.append(h.shape[0]) or real(h, *a, **k))
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: widths.append(out.numel()))
    _trainer(model, tmp_path, "chunked").compute_loss(model, batch).backward()
    assert rows == [labels] and widths == [0] and labels < batch["input_ids"].numel() - 6


def test_new_row_head_keeps_no_copy_of_the_matrix(tmp_path):
    """peft's new-row head builds its merged [V, H] matrix in its forward; the chunked path runs that forward
    without autograd (it reads the rows itself), so no [V, H] tensor waits for backward."""
    model = _model("new_rows")
    trainer = _trainer(model, tmp_path, "chunked")
    matrix = (VOCAB + NEW) * 32 * 4
    for fused in ("chunked", "plain"):
        trainer.fused_loss = fused
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, sizes=sizes: sizes.append(t.untyped_storage().nbytes()) or t, lambda t: t):
            loss = trainer.compute_loss(model, {k: v.clone() for k, v in _batch().items()})
        assert (matrix in sizes) == (fused == "plain"), fused
        loss.backward()
    assert torch.is_grad_enabled()


def test_qlora_head_is_exact(tiny_model_dir, tmp_path):
    """QLoRA: 4-bit linear layers, the head stays a plain (fp32) matrix."""
    pytest.importorskip("bitsandbytes")
    from zhtune.model.load import load_model

    cfg = _cfg(model_name_or_path=tiny_model_dir, finetuning_type="qlora", lora_rank=4)
    model = attach_adapter(load_model(cfg), cfg, new_rows=())
    batch = _batch()
    batch = {k: (v.clamp(max=999) if k in ("input_ids",) else v) for k, v in batch.items()}
    loss, grads = _loss_and_grads(model, _trainer(model, tmp_path, "chunked"), batch, None)
    ref_loss, ref_grads = _loss_and_grads(model, _trainer(model, tmp_path, "plain"), batch, None)
    assert loss == pytest.approx(ref_loss, rel=1e-5) and grads
    for name, g in grads.items():
        assert close(g, ref_grads[name], 1e-4), name


@pytest.mark.parametrize("case", ["new_rows", "new_rows_tied", "whole_matrices"])
def test_trl_fused_dpo_head_equals_full_logits(case):
    """stage=dpo: TRL 1.16 computes the per-token log-probs through its own fused head (lm_head.weight, which
    peft's wrappers give as the trained matrix): equal to log-softmax of the full logits, values and grads."""
    from trl.trainer.utils import add_fused_lm_head

    model = _model(case)
    batch = _batch()
    ids, labels = batch["input_ids"], batch["labels"]
    add_fused_lm_head(model.get_base_model())            # what DPOTrainer does to the policy
    expose_head_bias(model)                              # what zhtune's dpo.py adds for peft's new-row head
    fused = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True).log_probs
    weights = torch.linspace(0.5, 1.5, fused.numel()).view_as(fused)    # a non-uniform downstream gradient
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad((fused * weights).sum(), params)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = labels[:, 1:]
    plain = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * (target != IGNORE)
    want = torch.autograd.grad((plain * weights).sum(), params)
    assert torch.allclose(fused, plain, atol=1e-5)
    for a, b in zip(got, want):
        assert close(a, b)


# --- end to end: `zhtune train`, gradient accumulation, a grown vocabulary, merge ---------------------------

def _train(out, model, *extra):
    assert train_main([f"model_name_or_path={model}", f"output_dir={out}", "seed=0", "report_to=none",
                       "max_steps=2", "logging_steps=1", "save_steps=100", "per_device_train_batch_size=2",
                       "gradient_accumulation_steps=2", "learning_rate=1e-2", "lora_rank=4", *extra]) == 0
    return load_file(str(next(out.glob("*_lora_model")) / "adapter_model.safetensors"))


def test_grown_vocabulary_sft_trains_the_same_and_merges(tmp_path, tiny_model_dir, grown_tokenizer_dir, capsys):
    """sft on a grown vocabulary with gradient accumulation: the chunked loss trains exactly the adapter the
    full-logits loss trains (new rows included); the adapter holds the new rows only (plus the resized matrices
    peft saves with a grown vocabulary) and `zhtune merge` merges it into a model that gives its logits."""
    from zhtune.export.merge import merge
    from zhtune.export.parity import verify_merge

    common = ["stage=sft", f"dataset={tiny.asset('sft_qa.jsonl')}", f"tokenizer_name_or_path={grown_tokenizer_dir}",
              "cutoff_len=96", "embedding_init=mean", "lora_dropout=0"]
    ours = _train(tmp_path / "chunked", tiny_model_dir, *common, "fused_loss=chunked")
    assert "loss chunked" in capsys.readouterr().out
    plain = _train(tmp_path / "plain", tiny_model_dir, *common, "fused_loss=plain")
    assert set(ours) == set(plain)
    rows = [k for k in ours if k.endswith("trainable_tokens_delta")]
    assert len(rows) == 2 and not any("modules_to_save" in k for k in ours)
    for key in ours:
        # after 2 AdamW steps at lr 1e-2: Adam divides by sqrt(v), so the rounding of near-zero gradients shows
        # up to ~1e-4 of a row's scale; a row mix-up would be ~lr, i.e. ~0.2 of it
        assert close(ours[key], plain[key], 1e-3), key
    config = json.loads((tmp_path / "chunked" / "sft_lora_model" / "adapter_config.json").read_text())
    assert set(config["trainable_token_indices"]) == {"embed_tokens", "lm_head"}

    adapter = tmp_path / "chunked" / "sft_lora_model"
    merged = merge(tiny_model_dir, [adapter], tmp_path / "merged", log=lambda *_: None)
    assert verify_merge(tiny_model_dir, [adapter], merged, log=lambda *_: None).max_abs_diff <= 1e-4
    # only the new rows changed: the merged matrices hold the base's rows unchanged and the trained rows after them
    base, out = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    for name, peft_name in (("model.embed_tokens.weight", "model.embed_tokens"), ("lm_head.weight", "lm_head")):
        old, new = base[name].shape[0], out[name]
        delta = ours[f"base_model.model.{peft_name}.token_adapter.trainable_tokens_delta"]
        start = ours[f"base_model.model.{peft_name}.token_adapter.base_layer.weight"][old:]   # the rows' init
        assert torch.equal(new[:old], base[name]), name
        assert torch.equal(new[old:], delta) and delta.shape[0] == new.shape[0] - old > 0, name
        assert (delta - start).abs().max() > 0, name            # the new rows trained (those the batches used)


@pytest.mark.parametrize("streaming", [False, True])
def test_pt_chunked_trains_like_plain_with_checkpointing_and_offload(streaming, tmp_path, tiny_model_dir, capsys):
    """stage=pt from the command line, packed blocks (the collator's label mask) or streaming (labels only):
    the chunked loss trains the adapter the full-logits loss trains, with gradient checkpointing and
    offload_activations on (on CPU the run says offloading is ignored: activations are in RAM already)."""
    common = ["stage=pt", f"dataset={tiny.asset('zh_corpus.txt')}", "cutoff_len=64", "max_samples=40",
              "lora_dropout=0", "gradient_checkpointing=true", "offload_activations=true",
              *(["streaming=true"] if streaming else [])]
    ours = _train(tmp_path / "chunked", tiny_model_dir, *common)             # fused_loss=auto
    text = capsys.readouterr().out
    assert "loss chunked" in text and "gradient checkpointing" in text
    assert ("activations offloaded to CPU" if torch.cuda.is_available() else "offload_activations ignored") in text
    plain = _train(tmp_path / "plain", tiny_model_dir, *common, "fused_loss=plain")
    assert set(ours) == set(plain) and ours
    for key in ours:
        assert close(ours[key], plain[key], 1e-3), key


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_pt_with_an_8bit_optimizer_trains(optim, tmp_path, tiny_model_dir, capsys):
    """optim=adamw_bnb_8bit / paged_adamw_8bit (bitsandbytes runs its 8-bit AdamW on this CPU too; paged
    runs unpaged without a GPU, and the run says so)."""
    pytest.importorskip("bitsandbytes")
    before = _train(tmp_path / "a", tiny_model_dir, "stage=pt", f"dataset={tiny.asset('zh_corpus.txt')}",
                    "cutoff_len=64", f"optim={optim}", "max_samples=40")
    assert all(torch.isfinite(t).all() for t in before.values())
    assert any(t.abs().sum() > 0 for k, t in before.items() if "lora_B" in k)
    state = json.loads((tmp_path / "a" / "trainer_state.json").read_text())
    assert all(h["loss"] == h["loss"] for h in state["log_history"] if "loss" in h)   # no NaN
    text = capsys.readouterr().out
    assert f"optim {optim}" in text
    assert ("unpaged" in text) is (optim.startswith("paged_") and not torch.cuda.is_available())


# --- the levers as config keys ----------------------------------------------------------------------------------

def test_levers_are_config_keys_and_refuse_what_cannot_run(tmp_path, capsys):
    from zhtune.train.memory import check_levers, resolve_optim

    assert train_main(["--help-config"]) == 0
    text = capsys.readouterr().out
    for key in ("fused_loss", "offload_activations", "train_embeddings", "optim"):
        assert f"  {key} (" in text, key
    if not torch.cuda.is_available():
        assert resolve_optim(_cfg()) == "adamw_torch"
        with pytest.raises(ZhtuneError) as exc:
            check_levers(_cfg(fused_loss="liger"))
        assert exc.value.where == "fused_loss" and "GPU" in str(exc.value)
    zero3 = tmp_path / "z3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ZhtuneError, match="ZeRO-3"):
        check_levers(_cfg(fused_loss="chunked", deepspeed=str(zero3)))
    check_levers(_cfg(deepspeed=str(zero3)))             # auto: falls back to transformers' loss
    with pytest.raises(ZhtuneError):
        _cfg(fused_loss="off")                           # the values are auto, chunked, liger, plain


@pytest.mark.gpu
def test_liger_and_chunked_agree_on_gpu(tmp_path):
    pytest.importorskip("liger_kernel")
    from zhtune.train.loss import liger_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", requires_grad=True)
    weight = torch.randn(5000, 64, device="cuda", requires_grad=True)
    targets = torch.randint(0, 5000, (300,), device="cuda")
    a = linear_cross_entropy(hidden, Head(weight), targets, chunk=64)
    ga = torch.autograd.grad(a, [hidden, weight])
    b = liger_cross_entropy(hidden, Head(weight), targets)
    gb = torch.autograd.grad(b, [hidden, weight])
    assert float(a) == pytest.approx(float(b), rel=1e-4)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
def test_offloaded_activations_train_the_same_on_gpu(tmp_path, tiny_model_dir):
    common = ["stage=pt", f"dataset={tiny.asset('zh_corpus.txt')}", "cutoff_len=64", "gradient_checkpointing=true",
              "max_samples=40", "lora_dropout=0"]
    a = _train(tmp_path / "a", tiny_model_dir, *common)
    b = _train(tmp_path / "b", tiny_model_dir, *common, "offload_activations=true")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-5), key


@pytest.mark.gpu
def test_paged_adamw_trains_on_gpu(tmp_path, tiny_model_dir, capsys):
    """optim=auto on a GPU with bitsandbytes is paged_adamw_32bit (states spill to CPU RAM instead of an OOM)."""
    pytest.importorskip("bitsandbytes")
    out = _train(tmp_path / "a", tiny_model_dir, "stage=pt", f"dataset={tiny.asset('zh_corpus.txt')}",
                 "cutoff_len=64", "max_samples=40")
    assert "optim paged_adamw_32bit" in capsys.readouterr().out
    assert all(torch.isfinite(t).all() for t in out.values())
    assert any(t.abs().sum() > 0 for k, t in out.items() if "lora_B" in k)
