"""build_preference_dataset: every accepted shape, ids identical to SFT's rendering, bad input named."""

from __future__ import annotations

import pytest

from zhtune.config import TrainConfig
from zhtune.data.preference import build_preference_dataset
from zhtune.data.templates import get_template
from zhtune.errors import ZhtuneError
from zhtune.tiny import write_jsonl


@pytest.fixture(scope="module")
def tok(base_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_tokenizer_dir))


def cfg(**kw) -> TrainConfig:
    kw.setdefault("cutoff_len", 256)
    return TrainConfig(stage="dpo", **kw)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_text_pairs_match_the_sft_template_rendering(tmp_path, tok):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No.",
                                             "system": "Be brief.", "history": [["Hi", "Hello."]]}])
    t = get_template("default")
    b = build_preference_dataset(cfg(dataset=[str(p)]), tok, t)
    row = b.train[0]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    pairs = t.encode_pairs(msgs + [{"role": "assistant", "content": "Blue."}], tok.bos_token, tok.eos_token)
    # the prompt is tokenised segment by segment exactly like SFT; the answer carries the end marker
    assert row["prompt_ids"] == ids(tok, pairs[0][0]) + ids(tok, pairs[0][1]) + ids(tok, pairs[1][0])
    assert row["chosen_ids"] == ids(tok, "Blue." + tok.eos_token)
    assert row["rejected_ids"] == ids(tok, "No." + tok.eos_token)
    assert row["chosen_ids"][-1] == tok.eos_token_id
    assert row["prompt_ids"][0] == tok.bos_token_id and row["prompt_ids"].count(tok.bos_token_id) == 1
    assert b.stats["formats"] == ["preference"] and b.stats["pairs"] == 1


def test_conversation_shapes_are_detected(tmp_path, tok):
    t = get_template("default")
    rows = [
        {"conversations": [{"from": "human", "value": "Q?"}], "chosen": {"from": "gpt", "value": "Good."},
         "rejected": {"from": "gpt", "value": "Bad."}},
        {"messages": [{"role": "user", "content": "Q?"}], "chosen": "Good.", "rejected": "Bad."},
        {"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "Good."}],
         "rejected": [{"role": "assistant", "content": "Bad."}]},
        {"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Good."}],
         "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Bad."}]},
        {"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."},
    ]
    results = []
    for i, r in enumerate(rows):
        p = write_jsonl(tmp_path / f"{i}.jsonl", [r])
        results.append(build_preference_dataset(cfg(dataset=[str(p)]), tok, t).train[0])
    for r in results[1:]:
        assert (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) == \
            (results[0]["prompt_ids"], results[0]["chosen_ids"], results[0]["rejected_ids"])


def test_bad_pairs_are_skipped_and_counted_with_their_line(tmp_path, tok):
    p = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "chosen": "yes", "rejected": "no"},
        {"prompt": "same", "chosen": "A", "rejected": "A"},
        {"prompt": "empty", "chosen": "", "rejected": "no"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "long " * 300, "chosen": "a", "rejected": "b"},
    ])
    b = build_preference_dataset(cfg(dataset=[str(p)], cutoff_len=64), tok, get_template("default"))
    assert len(b.train) == 1
    skipped = b.stats["skipped"]
    assert skipped["chosen identical to rejected"] == {"count": 1, "first": f"{p}:2"}
    assert skipped["empty chosen or rejected"]["first"] == f"{p}:3"
    assert skipped["empty prompt"]["first"] == f"{p}:4"
    assert skipped["prompt fills cutoff_len=64"]["first"] == f"{p}:5"


def test_identical_pairs_are_printed_and_strict_refuses_them(tmp_path, tok, capsys):
    """Issue 16, defect 4: chosen == rejected pairs vanished without a word."""
    p = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "ok", "chosen": "yes", "rejected": "no"},
                                              {"prompt": "q", "chosen": "A ", "rejected": "A"}])
    build_preference_dataset(cfg(dataset=[str(p)]), tok, get_template("default"))
    assert f"跳过 skipped: 1 × chosen identical to rejected (first at {p}:2)" in capsys.readouterr().out
    with pytest.raises(ZhtuneError, match="record skipped: chosen identical to rejected") as err:
        build_preference_dataset(cfg(dataset=[str(p)], strict=True, data_cache=str(tmp_path / "fresh")), tok,
                                 get_template("default"))
    assert err.value.where == f"{p}:2"


def test_long_answers_are_cut_to_cutoff_len(tmp_path, tok):
    p = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "Q", "chosen": "word " * 200, "rejected": "no"}])
    b = build_preference_dataset(cfg(dataset=[str(p)], cutoff_len=40), tok, get_template("default"))
    row = b.train[0]
    assert len(row["prompt_ids"]) + len(row["chosen_ids"]) == 40
    assert b.stats["truncated"] == 1


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "a"}, "no 'rejected' field"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' is a int"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "chosen": "x", "rejected": "y"}, "does not end with a user turn"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "share every turn"),
    ({"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "user", "content": "x"},
      "rejected": "y"}, "message from 'user'"),
])
def test_structural_mistakes_raise_with_file_and_line(tmp_path, tok, record, message):
    p = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "fine", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(ZhtuneError, match=message) as err:
        build_preference_dataset(cfg(dataset=[str(p)]), tok, get_template("default"))
    assert err.value.where == f"{p}:2"


def test_sft_records_are_refused_and_all_skipped_is_an_error(tmp_path, tok):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(ZhtuneError, match="cannot be used for preference tuning") as err:
        build_preference_dataset(cfg(dataset=[str(sft)]), tok, get_template("default"))
    assert err.value.where == f"{sft}:1"
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(ZhtuneError, match="every preference record was skipped"):
        build_preference_dataset(cfg(dataset=[str(same)]), tok, get_template("default"))


def test_shipped_pairs_validation_split_and_cache(tmp_path, tok, dpo_pairs):
    c = cfg(dataset=[str(dpo_pairs)], val_size=0.25, data_cache=str(tmp_path / "cache"))
    first = build_preference_dataset(c, tok, get_template("llama2-zh"))
    assert len(first.train) + len(first.eval) == first.stats["records"] == 40
    assert len(first.eval) == 10 and first.stats["cache"] == "miss"
    again = build_preference_dataset(c, tok, get_template("llama2-zh"))
    assert again.stats["cache"] == "hit" and again.train["prompt_ids"] == first.train["prompt_ids"]
