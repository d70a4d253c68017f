"""build_pretrain_dataset: EOS between documents, blocks of cutoff_len, unpacked rows, bad input."""

from __future__ import annotations

import pytest

from zhtune.config import TrainConfig
from zhtune.data.pretrain import build_pretrain_dataset
from zhtune.data.sft import IGNORE
from zhtune.errors import ZhtuneError
from zhtune.tiny import write_jsonl


@pytest.fixture(scope="module")
def tok(base_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_tokenizer_dir))


def pt(**kw) -> TrainConfig:
    return TrainConfig(stage="pt", **kw)


def test_blocks_hold_every_document_token_once(tok, zh_corpus):
    lines = [x for x in zh_corpus.read_text(encoding="utf-8").splitlines()]
    b = build_pretrain_dataset(pt(dataset=[str(zh_corpus)], cutoff_len=128, max_samples=40), tok)
    docs = [tok(x)["input_ids"] + [tok.eos_token_id] for x in lines[:40] if x.strip()]
    flat = [t for r in b.train for t in r["input_ids"]]
    assert flat == [t for d in docs for t in d]
    assert all(len(r["input_ids"]) == 128 for r in b.train.select(range(len(b.train) - 1)))
    assert b.stats["tokens"] == len(flat) and b.stats["documents"] == len(docs)
    assert b.stats["rows"] == -(-len(flat) // 128) and b.stats["packing"] is True
    # every document start: position 0 and no label (not predicted from the previous document)
    starts, pos = set(), 0
    for d in docs:
        starts.add(pos)
        pos += len(d)
    for r_i, r in enumerate(b.train):
        for j, (p, lab) in enumerate(zip(r["position_ids"], r["labels"])):
            at = r_i * 128 + j
            assert (p == 0) == (at in starts or j == 0)
            assert (lab == IGNORE) == (at in starts)


def test_unpacked_rows_are_documents_split_at_cutoff(tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "short one"}, {"text": "a much longer document " * 10}])
    b = build_pretrain_dataset(pt(dataset=[str(p)], cutoff_len=32, packing=False), tok)
    lengths = [len(r["input_ids"]) for r in b.train]
    long_len = len(tok("a much longer document " * 10)["input_ids"]) + 1
    assert lengths[0] == len(tok("short one")["input_ids"]) + 1
    assert lengths[1:] == [32] * (long_len // 32) + ([long_len % 32] if long_len % 32 else [])
    assert "position_ids" not in b.train.column_names
    assert {"input_ids", "labels", "attention_mask"} <= set(b.collator([b.train[0], b.train[1]]))


def test_validation_by_document_and_blank_lines_counted(tok, tmp_path):
    (tmp_path / "c.txt").write_text("one doc here\n\n two doc here\nthree\n\n", encoding="utf-8")
    b = build_pretrain_dataset(pt(dataset=[str(tmp_path / "c.txt")], cutoff_len=16, val_size=1), tok)
    assert b.stats["documents"] == 2 and b.stats["eval_documents"] == 1
    assert b.stats["skipped"] == {"empty text": {"count": 2, "first": f"{tmp_path / 'c.txt'}:2"}}


def test_strict_refuses_an_empty_document(tok, tmp_path):
    (tmp_path / "c.txt").write_text("one doc here\n\ntwo\n", encoding="utf-8")
    with pytest.raises(ZhtuneError, match="record skipped: empty text") as err:
        build_pretrain_dataset(pt(dataset=[str(tmp_path / "c.txt")], cutoff_len=16, strict=True), tok)
    assert err.value.where == f"{tmp_path / 'c.txt'}:2"


def test_bad_pretraining_input(tok, tmp_path, sft_qa):
    with pytest.raises(ZhtuneError, match="alpaca record in pre-training data") as err:
        build_pretrain_dataset(pt(dataset=[str(sft_qa)]), tok)
    assert "sft_qa.jsonl:1" in str(err.value)
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine"}, {"text": 5}])
    with pytest.raises(ZhtuneError, match="'text' is a int") as err:
        build_pretrain_dataset(pt(dataset=[str(p)]), tok)
    assert "t.jsonl:2" in str(err.value)
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ZhtuneError, match="every document is empty"):
        build_pretrain_dataset(pt(dataset=[str(tmp_path / "blank.txt")]), tok)


def test_pretraining_cache_hit(tok, tmp_path, zh_corpus):
    c = pt(dataset=[str(zh_corpus)], cutoff_len=64, max_samples=20, data_cache=str(tmp_path / "cache"))
    first, again = build_pretrain_dataset(c, tok), build_pretrain_dataset(c, tok)
    assert (first.stats["cache"], again.stats["cache"]) == ("miss", "hit")
    assert again.train[:]["input_ids"] == first.train[:]["input_ids"]
