"""Packing without cross-sample attention: a packed sample's loss equals its loss alone, and changing one
sample never changes another's logits in the same row (tiny Llama, fp32)."""

from __future__ import annotations

import pytest
import torch

from zhtune.config import TrainConfig
from zhtune.data.pretrain import build_pretrain_dataset
from zhtune.data.sft import IGNORE, build_sft_dataset, best_fit_bins
from zhtune.data.templates import get_template


@pytest.fixture(scope="module")
def tok(base_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_tokenizer_dir))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    # a KV cache turns off transformers' packed-sequence detection: training runs without one
    m.config.use_cache = False
    return m.eval()


def token_losses(model, batch) -> torch.Tensor:
    """(B, T) cross-entropy of each label under the logits of the token before it; 0 where unlabelled."""
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}
        logits = model(**inputs).logits.float()
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none")
    out = torch.zeros(batch["labels"].shape)
    out[:, 1:] = ce * (labels != IGNORE)
    return out


def segments(position_ids: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts[:-1], starts[1:]))


def sft_bundles(tok, sft_qa, packing):
    cfg = TrainConfig(stage="sft", dataset=[str(sft_qa)], max_samples=12, cutoff_len=512, packing=packing)
    return build_sft_dataset(cfg, tok, get_template("alpaca"))


def test_packed_sft_loss_equals_unpacked(tok, model, sft_qa):
    packed, alone = sft_bundles(tok, sft_qa, True), sft_bundles(tok, sft_qa, False)
    assert len(packed.train) < len(alone.train) and packed.stats["label_tokens"] == alone.stats["label_tokens"]
    by_ids = {tuple(r["input_ids"]): r for r in alone.train}
    rows = [packed.train[i] for i in range(min(2, len(packed.train)))]
    batch = packed.collator(rows)                       # 2 rows of different length: padding included
    assert "attention_mask" not in batch
    losses = token_losses(model, batch)
    checked = 0
    for i, row in enumerate(rows):
        assert len(segments(row["position_ids"])) > 1
        for a, b in segments(row["position_ids"]):
            sample = by_ids[tuple(row["input_ids"][a:b])]  # every packed sample is one of the unpacked ones
            single = token_losses(model, alone.collator([sample]))[0]
            assert torch.allclose(losses[i, a:b], single, atol=1e-5), (i, a, b)
            checked += 1
    assert checked >= 4
    # the Trainer's loss (mean over label tokens) is the same number packed or not, and computing
    # logits only where there is a label (the collator's logits_to_keep/shift_labels) changes nothing
    n_labels = (batch["labels"] != IGNORE).sum().item()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (n_labels, model.config.vocab_size) and len(batch["shift_labels"]) == n_labels
    assert abs(out.loss.item() - losses.sum().item() / n_labels) < 1e-5


def test_trainer_trains_and_evaluates_with_the_collator(tok, tiny_model_dir, sft_qa, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    cfg = TrainConfig(stage="sft", dataset=[str(sft_qa)], max_samples=16, cutoff_len=256, packing=True, val_size=4)
    data = build_sft_dataset(cfg, tok, get_template("alpaca"))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.config.use_cache = False
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2,
                             learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, label_names=["labels"])
    trainer = Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                      data_collator=data.collator)
    assert trainer.train().metrics["train_loss"] > 0
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
    assert 0 < trainer.evaluate()["eval_loss"] < 20


def test_changing_one_sample_leaves_the_others_untouched(tok, model, sft_qa):
    packed = sft_bundles(tok, sft_qa, True)
    batch = packed.collator([packed.train[0]])
    (a0, a1), (b0, b1) = segments(packed.train[0]["position_ids"])[:2]
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        changed = batch["input_ids"].clone()
        changed[0, a0 + 1:a1] = (changed[0, a0 + 1:a1] + 7) % model.config.vocab_size
        after = model(input_ids=changed, position_ids=batch["position_ids"]).logits
    assert not torch.allclose(before[0, a0 + 1:a1], after[0, a0 + 1:a1])      # A's own logits did change
    assert torch.allclose(before[0, b0:], after[0, b0:], atol=1e-5)         # everything after A did not


def test_packed_pretraining_documents_do_not_see_each_other(tok, model, tmp_path):
    docs = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.", "Hello world, again.",
            "Numbers 12345 and more words here."]
    (tmp_path / "c.txt").write_text("\n".join(docs), encoding="utf-8")
    cfg = TrainConfig(stage="pt", dataset=[str(tmp_path / "c.txt")], cutoff_len=48)
    b = build_pretrain_dataset(cfg, tok)
    row = b.train[0]
    assert len(row["input_ids"]) == 48
    losses = token_losses(model, b.collator([row]))[0]
    first = tok(docs[0])["input_ids"] + [tok.eos_token_id]
    second = tok(docs[1])["input_ids"] + [tok.eos_token_id]
    assert row["input_ids"][:len(first) + len(second)] == first + second     # EOS between documents
    alone = torch.tensor([second])
    single = token_losses(model, {"input_ids": alone, "labels": alone})[0]
    a = len(first)
    assert row["position_ids"][a] == 0 and row["labels"][a] == IGNORE
    assert torch.allclose(losses[a:a + len(second)], single, atol=1e-5)


def test_best_fit_fills_rows():
    import numpy as np

    lengths = np.array([5, 3, 7, 2, 8, 1, 4, 10, 6, 4])
    bins = best_fit_bins(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(10))
    assert all(lengths[b].sum() <= 10 for b in bins) and len(bins) == 5        # 50 tokens in 5 full rows
