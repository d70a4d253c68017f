"""build_sft_dataset: loss only on answers, truncation, skips, validation split, the data_cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from zhtune.config import TrainConfig
from zhtune.data.sft import IGNORE, build_sft_dataset
from zhtune.data.templates import get_template
from zhtune.errors import ZhtuneError
from zhtune.tiny import write_jsonl


@pytest.fixture(scope="module")
def tok(base_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_tokenizer_dir))


def cfg(**kw) -> TrainConfig:
    kw.setdefault("cutoff_len", 256)
    return TrainConfig(stage="sft", **kw)


def answer_spans(row):
    """Label runs (start, end) that are not -100."""
    spans, start = [], None
    for i, x in enumerate(row["labels"] + [IGNORE]):
        if x != IGNORE and start is None:
            start = i
        if x == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_labels_cover_exactly_the_answers(tmp_path, tok):
    p = write_jsonl(tmp_path / "m.jsonl", [{"conversations": [
        {"from": "human", "value": "What is one plus one?"}, {"from": "gpt", "value": "It is two."},
        {"from": "human", "value": "And two plus two?"}, {"from": "gpt", "value": "Four."}]}])
    template = get_template("default")
    b = build_sft_dataset(cfg(dataset=[str(p)]), tok, template)
    row = b.train[0]
    assert row["input_ids"][0] == tok.bos_token_id
    # the whole row is exactly the template's conversation, tokenised prompt and answer apart
    pairs = template.encode_pairs([{"role": "user", "content": "What is one plus one?"},
                                   {"role": "assistant", "content": "It is two."},
                                   {"role": "user", "content": "And two plus two?"},
                                   {"role": "assistant", "content": "Four."}], tok.bos_token, tok.eos_token)
    segs = [tok(t, add_special_tokens=False)["input_ids"] for pair in pairs for t in pair]
    assert row["input_ids"] == sum(segs, [])
    spans = answer_spans(row)
    assert [row["input_ids"][a:b] for a, b in spans] == [segs[1], segs[3]]
    assert tok.decode(row["input_ids"][spans[1][0]:spans[1][1]]).strip() == "Four.</s>"
    assert b.stats["label_tokens"] == len(segs[1]) + len(segs[3])


def test_train_on_prompt_puts_loss_everywhere_but_the_first_token(tmp_path, tok, sft_qa):
    b = build_sft_dataset(cfg(dataset=[str(sft_qa)], max_samples=4, train_on_prompt=True), tok,
                          get_template("alpaca"))
    for row in b.train:
        assert row["labels"][0] == IGNORE and row["labels"][1:] == row["input_ids"][1:]


def test_truncation_is_counted_and_all_too_long_is_an_error(tmp_path, tok):
    rows = [{"instruction": "short", "output": "ok"}, {"instruction": "long " * 200, "output": "answer " * 50}]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    b = build_sft_dataset(cfg(dataset=[str(p)], cutoff_len=64), tok, get_template("default"))
    # the long one's prompt fills cutoff_len: no answer left, so it is skipped (and named)
    assert b.stats["skipped"]["no answer tokens within cutoff_len=64"] == {"count": 1, "first": f"{p}:2"}
    assert len(b.train) == 1
    q = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "short", "output": "answer " * 100}] * 3 + rows[:1])
    b = build_sft_dataset(cfg(dataset=[str(q)], cutoff_len=64), tok, get_template("default"))
    assert b.stats["truncated"] == 3 and all(len(r["input_ids"]) <= 64 for r in b.train)
    long_only = write_jsonl(tmp_path / "l.jsonl", [rows[1]] * 2)
    with pytest.raises(ZhtuneError, match="all 2 records are longer than cutoff_len=64"):
        build_sft_dataset(cfg(dataset=[str(long_only)], cutoff_len=64), tok, get_template("default"))


def test_skips_and_cuts_are_printed_and_strict_refuses_them(tmp_path, tok, capsys):
    """Issue 16, defect 4: a record dropped for cutoff_len was counted but never shown."""
    rows = [{"instruction": "short", "output": "answer " * 100}, {"instruction": "long " * 200, "output": "a"},
            {"instruction": "fine", "output": "ok"}]
    p = write_jsonl(tmp_path / "s.jsonl", rows)
    build_sft_dataset(cfg(dataset=[str(p)], cutoff_len=64), tok, get_template("default"))
    out = capsys.readouterr().out
    assert f"跳过 skipped: 1 × no answer tokens within cutoff_len=64 (first at {p}:2)" in out
    assert f"截断 truncated: 1 × longer than cutoff_len=64 tokens, cut at the end (first at {p}:1)" in out
    with pytest.raises(ZhtuneError, match="record skipped: no answer tokens within cutoff_len=64") as err:
        build_sft_dataset(cfg(dataset=[str(p)], cutoff_len=64, strict=True, data_cache=str(tmp_path / "fresh")), tok,
                          get_template("default"))
    assert err.value.where == f"{p}:2" and "strict" in err.value.expected
    # strict also holds when the tokenised records come from the cache of a run that was not strict
    cached = cfg(dataset=[str(p)], cutoff_len=64, data_cache=str(tmp_path / "c"))
    build_sft_dataset(cached, tok, get_template("default"))
    cached.strict = True
    with pytest.raises(ZhtuneError, match=rf"records were skipped: no answer tokens .*first at {p}:2"):
        build_sft_dataset(cached, tok, get_template("default"))


def test_empty_answers_are_skipped_and_reported(tmp_path, tok):
    p = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "q1", "output": "a"}, {"instruction": "q2", "output": " "},
                                           {"instruction": "q3", "output": ""}])
    b = build_sft_dataset(cfg(dataset=[str(p)]), tok, get_template("default"))
    assert b.stats["skipped"] == {"empty response": {"count": 2, "first": f"{p}:2"}}
    assert b.stats["records"] == 3 and b.stats["samples"] == 1
    only_empty = write_jsonl(tmp_path / "o.jsonl", [{"instruction": "q", "output": ""}])
    with pytest.raises(ZhtuneError, match=r"every record was skipped: empty response: 1 \(first at .*o.jsonl:1\)"):
        build_sft_dataset(cfg(dataset=[str(only_empty)]), tok, get_template("default"))


def test_plain_text_is_refused_for_sft(tmp_path, tok, zh_corpus):
    with pytest.raises(ZhtuneError, match="plain text cannot be used for instruction tuning") as err:
        build_sft_dataset(cfg(dataset=[str(zh_corpus)]), tok, get_template("default"))
    assert "zh_corpus.txt:1" in str(err.value)


def test_validation_split_is_seeded(tmp_path, tok, sft_qa):
    def eval_ids(seed, size):
        b = build_sft_dataset(cfg(dataset=[str(sft_qa)], val_size=size, seed=seed), tok, get_template("alpaca"))
        assert len(b.train) + len(b.eval) == 48
        return len(b.eval), sorted(tuple(r["input_ids"]) for r in b.eval)

    assert eval_ids(1, 0.25) == eval_ids(1, 0.25)
    assert eval_ids(1, 0.25)[0] == 12 and eval_ids(2, 5)[0] == 5
    assert eval_ids(1, 0.25)[1] != eval_ids(2, 0.25)[1]
    with pytest.raises(ZhtuneError, match="leaving none"):
        eval_ids(1, 48)


def test_val_file(tmp_path, tok, sft_qa):
    v = write_jsonl(tmp_path / "v.jsonl", [{"instruction": "q", "output": "a"}] * 3)
    b = build_sft_dataset(cfg(dataset=[str(sft_qa)], val_file=[str(v)]), tok, get_template("alpaca"))
    assert len(b.train) == 48 and len(b.eval) == 3
    with pytest.raises(ZhtuneError, match=r"nope.jsonl \| where: val_file\[0\]"):
        build_sft_dataset(cfg(dataset=[str(sft_qa)], val_file=[str(tmp_path / "nope.jsonl")]), tok,
                          get_template("alpaca"))
    empty = write_jsonl(tmp_path / "empty_answers.jsonl", [{"instruction": "q", "output": ""}])
    with pytest.raises(ZhtuneError, match="every record was skipped") as err:
        build_sft_dataset(cfg(dataset=[str(sft_qa)], val_file=[str(empty)]), tok, get_template("alpaca"))
    assert err.value.where == "val_file"
    with pytest.raises(ZhtuneError, match="both val_file and val_size"):
        build_sft_dataset(cfg(dataset=[str(sft_qa)], val_file=[str(v)], val_size=0.1), tok, get_template("alpaca"))


def test_data_cache_is_reused_and_keyed_by_the_inputs(tmp_path, tok, sft_qa, copy_of):
    data = copy_of(sft_qa)
    cache = tmp_path / "cache"
    c = cfg(dataset=[str(data)], data_cache=str(cache), packing=True, val_size=0.1)
    first = build_sft_dataset(c, tok, get_template("alpaca"))
    again = build_sft_dataset(c, tok, get_template("alpaca"))
    assert (first.stats["cache"], again.stats["cache"]) == ("miss", "hit")
    assert again.stats["cache_dir"] == first.stats["cache_dir"]
    assert all(Path(f["filename"]).is_relative_to(cache) for f in again.train.cache_files)
    assert again.train[:]["input_ids"] == first.train[:]["input_ids"] and len(again.eval) == len(first.eval)
    assert {k: v for k, v in again.stats.items() if k != "cache"} == \
        {k: v for k, v in first.stats.items() if k != "cache"}
    # another template, cutoff or a changed file is another cache entry; no temp folders are left behind
    other = build_sft_dataset(c, tok, get_template("chinese-alpaca"))
    assert other.stats["cache"] == "miss" and other.stats["cache_dir"] != first.stats["cache_dir"]
    with open(data, "a", encoding="utf-8") as handle:
        handle.write('{"instruction": "新问题", "output": "新答案"}\n')
    changed = build_sft_dataset(c, tok, get_template("alpaca"))
    assert changed.stats["cache"] == "miss" and changed.stats["records"] == 49
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_a_failed_build_leaves_nothing_in_the_cache(tmp_path, tok):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": ""}])
    cache = tmp_path / "cache"
    with pytest.raises(ZhtuneError):
        build_sft_dataset(cfg(dataset=[str(p)], data_cache=str(cache)), tok, get_template("default"))
    # what finished (the tokenised parts in units/) stays for the next run; nothing half-written anywhere
    assert [p.name for p in cache.iterdir()] == ["units"]
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name or ".lock" in p.name]


def test_collator_pads_unpacked_rows_with_an_attention_mask(tmp_path, tok, sft_qa):
    b = build_sft_dataset(cfg(dataset=[str(sft_qa)], max_samples=3), tok, get_template("alpaca"))
    rows = [b.train[i] for i in range(3)]
    batch = b.collator(rows)
    width = max(len(r["input_ids"]) for r in rows)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "logits_to_keep", "shift_labels"}
    assert batch["input_ids"].shape == (3, width)
    assert batch["shift_labels"].tolist() == [x for r in rows for x in r["labels"][1:] if x != IGNORE]
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][i, n:].eq(IGNORE).all() and batch["input_ids"][i, :n].tolist() == r["input_ids"]
