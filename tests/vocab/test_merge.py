"""`zhtune vocab merge`: layout, exact fast tokenizer, preservation of non-Chinese text, modes, bad input."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from zhtune.vocab import hf
from zhtune.vocab.merge import _score_ladder, base_sp_model_for, han_count

HF = "merged_tokenizer_hf"


def sp(path):
    return spm.SentencePieceProcessor(model_file=str(path))


def proto(path):
    return hf.read_sp_model(path)


def tokens_per_han(encode, lines):
    han = [line for line in lines if han_count(line)]
    return sum(len(encode(line)) for line in han) / sum(han_count(line) for line in han)


def test_layout_and_base_record(merged_preserve, base_tokenizer_dir):
    sp_models = list((merged_preserve / "merged_tokenizer_sp").glob("*.model"))
    assert [p.name for p in sp_models] == ["chinese_llama.model"]
    folder = merged_preserve / HF
    for name in (*hf.HF_FILES, "zhtune_vocab.json", "base_tokenizer.model"):
        assert (folder / name).is_file(), name
    assert (folder / "tokenizer.model").read_bytes() == sp_models[0].read_bytes()
    info = json.loads((folder / "zhtune_vocab.json").read_text(encoding="utf-8"))
    assert info["base_tokenizer"] == str(base_tokenizer_dir.resolve())
    assert info["base_vocab_size"] == 1000 and info["mode"] == "preserve"
    assert info["added_pieces"] == len(proto(folder / "tokenizer.model").pieces) - 1000 > 1000
    assert (folder / "base_tokenizer.model").read_bytes() == (base_tokenizer_dir / "tokenizer.model").read_bytes()
    assert (merged_preserve / "run.yaml").is_file()
    assert len(AutoTokenizer.from_pretrained(str(folder))) == 1000 + info["added_pieces"]


def test_base_sp_model_for(merged_preserve, base_tokenizer_dir, copy_of, tmp_path):
    folder = merged_preserve / HF
    assert base_sp_model_for(folder) == folder / "base_tokenizer.model"
    moved = copy_of(folder)
    (moved / "base_tokenizer.model").unlink()  # the copy is gone: fall back to the recorded location
    assert base_sp_model_for(moved) == base_tokenizer_dir / "tokenizer.model"
    assert base_sp_model_for(base_tokenizer_dir) is None


@pytest.mark.parametrize("fixture", ["merged_preserve", "merged_chars"])
def test_fast_tokenizer_equals_sentencepiece(fixture, request, all_asset_lines, edge_lines, english_and_code):
    folder = request.getfixturevalue(fixture) / HF
    ref = sp(folder / "tokenizer.model")
    tok = AutoTokenizer.from_pretrained(str(folder))
    for line in all_asset_lines + edge_lines + english_and_code:
        ids = tok.encode(line, add_special_tokens=False)
        assert ids == ref.encode(line), (line, tok.convert_ids_to_tokens(ids), ref.encode(line, out_type=str))
        assert tok.decode(ids) == line == ref.decode(ids)


@pytest.mark.parametrize("fixture", ["merged_preserve", "merged_chars"])
def test_non_chinese_text_keeps_base_ids(fixture, request, base_tokenizer_dir, english_and_code, edge_lines):
    folder = request.getfixturevalue(fixture) / HF
    base, merged = sp(base_tokenizer_dir / "tokenizer.model"), sp(folder / "tokenizer.model")
    base_fast = AutoTokenizer.from_pretrained(str(base_tokenizer_dir))
    merged_fast = AutoTokenizer.from_pretrained(str(folder))
    plain = english_and_code + [line for line in edge_lines if not any(ord(c) > 0x2000 for c in line)]
    assert len(plain) > 300
    for line in plain:
        assert merged.encode(line) == base.encode(line), line
        assert merged_fast.encode(line) == base_fast.encode(line), line


def test_preserve_pieces_and_scores(merged_preserve, base_tokenizer_dir, zh_sp_model):
    base = proto(base_tokenizer_dir / "tokenizer.model")
    merged = proto(merged_preserve / HF / "tokenizer.model")
    n = len(base.pieces)
    for old, new in zip(base.pieces, merged.pieces[:n]):
        assert (old.piece, old.score, old.type) == (new.piece, new.score, new.type)
    added = merged.pieces[n:]
    assert all(any(ord(c) >= 0x2E80 for c in p.piece) for p in added), "only pieces with CJK characters"
    scores = [p.score for p in added]
    assert max(scores) < min(p.score for p in base.pieces), "every base merge stays first"
    assert all(a > b for a, b in zip(scores, scores[1:])), "distinct, in the added model's order"
    zh = proto(zh_sp_model)
    zh_rank = {p.piece: i for i, p in enumerate(sorted(zh.pieces, key=lambda p: -p.score))}
    ranks = [zh_rank[p.piece] for p in added]
    assert ranks == sorted(ranks), "new pieces keep the added model's own order"


def test_preserve_compresses_like_the_added_model(merged_preserve, base_tokenizer_dir, zh_sp_model, zh_heldout):
    held = zh_heldout.read_text(encoding="utf-8").splitlines()
    alone = tokens_per_han(sp(zh_sp_model).encode, held)
    merged = tokens_per_han(sp(merged_preserve / HF / "tokenizer.model").encode, held)
    base = tokens_per_han(sp(base_tokenizer_dir / "tokenizer.model").encode, held)
    assert base > 2.5 * merged, (base, merged)
    assert merged <= alone * 1.03, (merged, alone)


def test_all_pieces_reproduces_chinese_llama_alpaca(merged_all, base_tokenizer_dir, zh_sp_model):
    base = proto(base_tokenizer_dir / "tokenizer.model")
    merged = proto(merged_all / HF / "tokenizer.model")
    base_set = {p.piece for p in base.pieces}
    expected = [p.piece for p in proto(zh_sp_model).pieces if p.type == hf.NORMAL and p.piece not in base_set]
    added = merged.pieces[len(base.pieces):]
    assert [p.piece for p in added] == expected, "every new piece, in the added model's order"
    assert {p.score for p in added} == {0.0}
    assert any(not any(ord(c) > 0x2E80 for c in p.piece) for p in added), "non-Chinese pieces too"
    report = json.loads((merged_all / "merge_report.json").read_text(encoding="utf-8"))
    # score-0 pieces outrank the base's merges, so English changes (what preserve avoids)
    assert report["non_chinese_unchanged"] < report["non_chinese_lines"]


def test_chars_mode_from_ranges_and_file(merged_chars, base_tokenizer_dir, tmp_path, cli_run):
    base = proto(base_tokenizer_dir / "tokenizer.model")
    added = proto(merged_chars / HF / "tokenizer.model").pieces[len(base.pieces):]
    assert all(len(p.piece) == 1 and 0x4E00 <= ord(p.piece) <= 0x9FFF for p in added)
    assert len(added) == 0x9FFF - 0x4E00 + 1 - sum(1 for p in base.pieces if len(p.piece) == 1
                                                   and 0x4E00 <= ord(p.piece) <= 0x9FFF)
    chars_file = tmp_path / "chars.txt"
    chars_file.write_text("乙\n甲甲甲\n乙 abc 丙，\n", encoding="utf-8")
    cli_run("vocab", "merge", "--base", base_tokenizer_dir, "--mode", "chars", "--chars", chars_file,
            "--output", tmp_path / "m")
    added = [p.piece for p in proto(tmp_path / "m" / HF / "tokenizer.model").pieces[len(base.pieces):]]
    assert added == ["甲", "乙", "丙", "，"], "CJK characters of the file, most frequent first"
    ids = sp(tmp_path / "m" / HF / "tokenizer.model").encode("甲乙丙")
    assert ids == sp(tmp_path / "m" / HF / "tokenizer.model").encode("甲乙丙") and len(ids) == 4  # ▁ + 3 chars


def test_several_add_models(tmp_path, base_tokenizer_dir, zh_sp_model, cli_run, zh_heldout):
    second = tmp_path / "second"
    assert cli_run("vocab", "train", "--corpus", zh_heldout, "--vocab-size", 2500, "--output", second) == 0
    out = tmp_path / "m"
    assert cli_run("vocab", "merge", "--base", base_tokenizer_dir, "--add", zh_sp_model,
                   "--add", second, "--output", out) == 0
    info = json.loads((out / HF / "zhtune_vocab.json").read_text(encoding="utf-8"))
    assert len(info["added_from"]) == 2
    pieces = [p.piece for p in proto(out / HF / "tokenizer.model").pieces]
    assert len(pieces) == len(set(pieces)), "no duplicate pieces"
    first = {p.piece for p in proto(zh_sp_model).pieces}
    origin = [piece in first for piece in pieces[1000:]]
    assert False in origin and origin == sorted(origin, reverse=True), "the first model's pieces, then the second's"


def test_merge_is_byte_identical(tmp_path, base_tokenizer_dir, zh_sp_model, cli_run):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert cli_run("vocab", "merge", "--base", base_tokenizer_dir, "--add", zh_sp_model, "--output", out) == 0
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file() and p.name != "run.yaml")
    assert len(files) >= 8
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


def test_score_ladder_stays_distinct_for_huge_scores():
    import numpy as np

    for below in (-31740.0, -1e9):
        ladder = np.array(_score_ladder(below, 5000), dtype=np.float32)
        assert ladder[0] < np.float32(below) and np.all(np.diff(ladder) < 0)


def test_check_text_is_checked_too(tmp_path, base_tokenizer_dir, zh_sp_model, cli_run, merged_preserve):
    extra = tmp_path / "mine.txt"
    extra.write_text("我的文本\nmy own text\n  indented code()\n", encoding="utf-8")
    out = tmp_path / "m"
    assert cli_run("vocab", "merge", "--base", base_tokenizer_dir, "--add", zh_sp_model, "--output", out,
                   "--check-text", extra) == 0
    with_extra = json.loads((out / "merge_report.json").read_text(encoding="utf-8"))
    default = json.loads((merged_preserve / "merge_report.json").read_text(encoding="utf-8"))
    assert with_extra["check_lines"] == default["check_lines"] + 3
    assert with_extra["non_chinese_unchanged"] == with_extra["non_chinese_lines"] == default["non_chinese_lines"] + 2
    assert with_extra["fast_equals_sentencepiece"] == with_extra["check_lines"]


def test_base_with_llama_like_huge_negative_score(tmp_path, base_sp_model, zh_sp_model, cli_run, all_asset_lines,
                                                  edge_lines, english_and_code):
    """LLaMA's tokenizer gives "▁▁" the score -1e9, where float32 steps are 64 apart: new scores must stay distinct."""
    base = proto(base_sp_model)
    for p in base.pieces:
        if p.piece == "▁▁":
            p.score = -1e9
    (tmp_path / "llama_like.model").write_bytes(base.SerializeToString())
    out = tmp_path / "m"
    assert cli_run("vocab", "merge", "--base", tmp_path / "llama_like.model", "--add", zh_sp_model,
                   "--output", out) == 0
    merged = proto(out / HF / "tokenizer.model")
    added = [p.score for p in merged.pieces[len(base.pieces):]]
    assert max(added) < -1e9 and len(set(added)) == len(added)
    result = hf.compare_with_sp(out / HF, all_asset_lines + edge_lines + english_and_code)
    assert result["same_ids"] == result["lines"], result["first_difference"]
    base_sp, merged_sp = sp(tmp_path / "llama_like.model"), sp(out / HF / "tokenizer.model")
    assert all(base_sp.encode(line) == merged_sp.encode(line) for line in english_and_code)
