"""`zhtune vocab train --base` / `vocab merge` / `vocab stats` on byte-level BPE bases (LLaMA-3, GPT-2, Qwen2,
SmolLM, Mistral-Nemo style): non-CJK ids unchanged, every added token reachable, round trip, AutoTokenizer."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from zhtune.vocab.bytelevel import read_bytelevel, token_bytes
from zhtune.vocab.cjk import CJK, han_count

HF = "merged_tokenizer_hf"
FAMILIES = ("llama3", "gpt2", "qwen2", "smollm", "tekken")


def raw(folder) -> Tokenizer:
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def ids(tok: Tokenizer, lines: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]


def tokens_per_han(tok: Tokenizer, lines: list[str]) -> float:
    han = [line for line in lines if han_count(line)]
    return sum(map(len, ids(tok, han))) / sum(map(han_count, han))


def new_tokens(folder, base) -> list[str]:
    vocab, size = read_bytelevel(folder).vocab, read_bytelevel(base).size
    return [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= size]


@pytest.mark.parametrize("family", FAMILIES)
def test_vocab_train_uses_the_base_alphabet_and_pre_tokenizer(family, bytelevel_base, bytelevel_zh):
    base, zh = read_bytelevel(bytelevel_base(family)), read_bytelevel(bytelevel_zh(family))
    assert zh.family == base.family == family  # same pre-tokenizer, recognised by its regex / structure
    assert zh.data["normalizer"] == base.data["normalizer"]  # qwen2: NFC
    assert zh.ignore_merges == base.ignore_merges == (family in ("llama3", "tekken"))
    assert all(token_bytes(t) is not None for t in zh.vocab)  # every token a GPT-2 byte string
    assert len(zh.vocab) >= 3000
    assert AutoTokenizer.from_pretrained(str(bytelevel_zh(family))).decode([zh.vocab[t] for t in ("ä¸Ń",)]) == "中"


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_keeps_base_ids_on_non_chinese_text(family, bytelevel_base, bytelevel_merged, english_and_code,
                                                  edge_lines):
    base, merged = bytelevel_base(family), bytelevel_merged(family) / HF
    plain = english_and_code + [line for line in edge_lines if not any(CJK(c) for c in line)]
    assert len(plain) > 300
    assert ids(raw(merged), plain) == ids(raw(base), plain)
    fast_base, fast = AutoTokenizer.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(merged))
    assert [fast(x).input_ids for x in plain] == [fast_base(x).input_ids for x in plain]  # BOS too (llama3, tekken)
    # the base's tokens keep their ids; the special tokens too
    base_vocab = read_bytelevel(base).vocab
    assert all(fast.convert_tokens_to_ids(t) == i for t, i in base_vocab.items())
    assert fast.all_special_tokens == fast_base.all_special_tokens
    assert [fast.convert_tokens_to_ids(t) for t in fast.all_special_tokens] == \
        [fast_base.convert_tokens_to_ids(t) for t in fast_base.all_special_tokens]


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_round_trip_and_autotokenizer(family, bytelevel_merged, all_asset_lines, edge_lines,
                                            english_and_code):
    merged = bytelevel_merged(family) / HF
    tok, fast = raw(merged), AutoTokenizer.from_pretrained(str(merged))
    lines = all_asset_lines + edge_lines + english_and_code
    for line, row in zip(lines, ids(tok, lines)):
        assert fast(line, add_special_tokens=False).input_ids == row, line
        assert fast.decode(row) == line == tok.decode(row, skip_special_tokens=False)
    assert len(fast) == read_bytelevel(merged).size


@pytest.mark.parametrize("family", FAMILIES)
def test_every_added_token_is_reachable(family, bytelevel_base, bytelevel_merged):
    merged = bytelevel_merged(family) / HF
    added = new_tokens(merged, bytelevel_base(family))
    assert len(added) > 3000
    # what the merges alone make of its bytes (ignore_merges off: no whole-word shortcut) is the token itself
    data = json.loads((merged / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["ignore_merges"] = False
    bpe = Tokenizer.from_str(json.dumps(data)).model
    assert [t for t in added if [x.value for x in bpe.tokenize(t)] != [t]] == []
    # and a token that is a whole word encodes to itself, through the pre-tokenizer and (LLaMA-3, tekken) the
    # ignore_merges whole-word lookup
    tok = raw(merged)
    words = []
    for t in added:
        try:
            text = token_bytes(t).decode("utf-8")
        except UnicodeDecodeError:
            continue  # the first bytes of a character: reached inside longer tokens only
        if len(tok.pre_tokenizer.pre_tokenize_str(text)) == 1:
            words.append((t, text))
    assert len(words) > 2500
    assert [t for t, text in words if tok.encode(text, add_special_tokens=False).tokens != [t]] == []
    # added tokens hold CJK characters (or the first bytes of a character only CJK ones start with)
    assert all(any(CJK(c) for c in text) for _, text in words)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_compresses_like_the_chinese_vocabulary(family, bytelevel_base, bytelevel_zh, bytelevel_merged,
                                                      zh_heldout):
    held = zh_heldout.read_text(encoding="utf-8").splitlines()
    alone = tokens_per_han(raw(bytelevel_zh(family)), held)
    merged = tokens_per_han(raw(bytelevel_merged(family) / HF), held)
    base = tokens_per_han(raw(bytelevel_base(family)), held)
    assert base > 3 * merged, (base, merged)
    assert merged <= alone * 1.03, (merged, alone)


def test_merge_report_and_files(bytelevel_base, bytelevel_merged, bytelevel_zh):
    out, base = bytelevel_merged("llama3"), bytelevel_base("llama3")
    report = json.loads((out / "merge_report.json").read_text(encoding="utf-8"))
    assert report["kind"] == "bytelevel" and report["pre_tokenizer"] == "llama3"
    assert report["non_chinese_unchanged"] == report["non_chinese_lines"] > 300
    assert report["roundtrip_ok"] == report["check_lines"]
    assert report["reachable_by_merges"] == report["added_tokens"] == report["vocab_size"] - report["base_vocab_size"]
    assert report["word_tokens_encode_to_themselves"] == report["word_tokens"]
    hf = out / HF
    assert (hf / "base_tokenizer" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    info = json.loads((hf / "zhtune_vocab.json").read_text(encoding="utf-8"))
    assert info["base_tokenizer"] == str(base.resolve()) and info["added_from"] == [str(bytelevel_zh("llama3") /
                                                                                        "tokenizer.json")]
    assert json.loads((hf / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (out / "run.yaml").is_file()
    # new merges all rank after every base merge
    base_merges = read_bytelevel(base).merges
    assert read_bytelevel(hf).merges[:len(base_merges)] == base_merges


def test_merge_a_sentencepiece_model_into_a_bytelevel_base(tmp_path, cli_run, bytelevel_base, zh_sp_model,
                                                           english_and_code, zh_heldout):
    """--add chinese_sp.model (Chinese-LLaMA's kind of vocabulary): its pieces, in the byte alphabet."""
    import sentencepiece as spm

    base = bytelevel_base("llama3")
    out = tmp_path / "merged"
    assert cli_run("vocab", "merge", "--base", base, "--add", zh_sp_model, "--output", out) == 0
    merged = raw(out / HF)
    assert ids(merged, english_and_code) == ids(raw(base), english_and_code)
    held = zh_heldout.read_text(encoding="utf-8").splitlines()
    for line, row in zip(held, ids(merged, held)):
        assert merged.decode(row) == line
    sp = spm.SentencePieceProcessor(model_file=str(zh_sp_model))
    alone = sum(len(sp.encode(x)) for x in held if han_count(x)) / sum(map(han_count, held))
    assert tokens_per_han(merged, held) <= alone * 1.1
    report = json.loads((out / "merge_report.json").read_text(encoding="utf-8"))
    assert report["reachable_by_merges"] == report["added_tokens"] > 2000


def test_chars_mode_and_multiple_adds(tmp_path, cli_run, bytelevel_base, bytelevel_zh, english_and_code):
    base = bytelevel_base("qwen2")
    out = tmp_path / "chars"
    assert cli_run("vocab", "merge", "--base", base, "--mode", "chars", "--chars", "4E00-4E3F", "--output", out) == 0
    tok = raw(out / HF)
    assert tok.encode("一丁七", add_special_tokens=False).tokens == ["ä¸Ģ", "ä¸ģ", "ä¸ĥ"]
    assert ids(tok, english_and_code) == ids(raw(base), english_and_code)
    two = tmp_path / "two"
    assert cli_run("vocab", "merge", "--base", base, "--add", bytelevel_zh("qwen2"),
                   "--add", out / HF / "tokenizer.json", "--output", two) == 0
    report = json.loads((two / "merge_report.json").read_text(encoding="utf-8"))
    assert len(report["added_from"]) == 2 and report["non_chinese_unchanged"] == report["non_chinese_lines"]


@pytest.mark.parametrize("family", ["llama3", "smollm"])
def test_stats_reads_bytelevel_tokenizers(family, tmp_path, cli_run, capsys, bytelevel_base, bytelevel_zh,
                                          bytelevel_merged, zh_heldout):
    out = tmp_path / "stats.json"
    assert cli_run("vocab", "stats", "--tokenizer", bytelevel_base(family), "--tokenizer", bytelevel_zh(family),
                   "--tokenizer", bytelevel_merged(family), "--text", zh_heldout, "--json", out) == 0
    printed = capsys.readouterr().out
    assert "byte-level BPE" in printed
    base, zh, merged = json.loads(out.read_text(encoding="utf-8"))["tokenizers"]
    assert base["kind"] == merged["kind"] == "byte-level BPE"
    assert merged["roundtrip_share"] == 1.0
    assert merged["tokens_per_cjk_char"] <= zh["tokens_per_cjk_char"] * 1.03 < base["tokens_per_cjk_char"] / 3
    # "byte fallback" of a byte-level BPE: tokens that are part of a character; the base spells Chinese that way
    assert base["byte_fallback_tokens"] > 10 * merged["byte_fallback_tokens"] > 0


# --- bad input: refused by name, exit 2, nothing written ------------------------------------------------------

def _other_kind(folder, kind: str):
    """A tokenizer folder whose tokenizer.json is a WordPiece or Unigram model (BERT / T5 style)."""
    from tokenizers import models, pre_tokenizers

    if kind == "WordPiece":
        tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    else:
        tok = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def refused(capsys, tmp_path, *args, says=()):
    before = sorted(p.name for p in tmp_path.iterdir())
    from zhtune import cli

    assert cli.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in says:
        assert text in err, (text, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing half-written"
    return err


@pytest.mark.parametrize("kind", ["WordPiece", "Unigram"])
def test_wordpiece_and_unigram_bases_are_refused_by_type(kind, tmp_path, capsys, zh_heldout, bytelevel_zh):
    base = _other_kind(tmp_path / f"{kind}_base", kind)
    refused(capsys, tmp_path, "vocab", "merge", "--base", base, "--add", bytelevel_zh("llama3"), "--output",
            tmp_path / "out", says=[kind, "--base", "byte-level BPE"])
    refused(capsys, tmp_path, "vocab", "train", "--corpus", zh_heldout, "--vocab-size", 500, "--base", base,
            "--output", tmp_path / "out", says=[kind, "--base"])
    refused(capsys, tmp_path, "vocab", "merge", "--base", bytelevel_zh("llama3"), "--add", base, "--output",
            tmp_path / "out", says=[kind, "--add", "byte alphabet"])


def test_add_outside_the_base_alphabet_or_normalisation_is_refused(tmp_path, capsys, bytelevel_base, bytelevel_zh,
                                                                   base_tokenizer_dir, zh_heldout):
    llama3 = bytelevel_base("llama3")
    # a SentencePiece-style BPE tokenizer.json (▁ for spaces, <0x..> byte fallback): not GPT-2 byte strings
    sp_json = tmp_path / "sp_style.json"
    sp_json.write_bytes((base_tokenizer_dir / "tokenizer.json").read_bytes())
    refused(capsys, tmp_path, "vocab", "merge", "--base", llama3, "--add", sp_json, "--output", tmp_path / "out",
            says=["BPE", "byte alphabet", "--add"])
    # Qwen's NFC normaliser vs LLaMA-3's none: the tokens describe text the base never sees that way
    refused(capsys, tmp_path, "vocab", "merge", "--base", llama3, "--add", bytelevel_zh("qwen2"), "--output",
            tmp_path / "out", says=["normalises text differently", "NFC", "vocab train --base"])
    # a SentencePiece model trained with case folding (nmt_nfkc_cf)
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(zh_heldout.read_text(encoding="utf-8").splitlines()),
                                   model_writer=buf, vocab_size=1500, model_type="bpe", minloglevel=2,
                                   byte_fallback=True, normalization_rule_name="nmt_nfkc_cf",
                                   character_coverage=0.98)
    folded = tmp_path / "folded.model"
    folded.write_bytes(buf.getvalue())
    refused(capsys, tmp_path, "vocab", "merge", "--base", llama3, "--add", folded, "--output", tmp_path / "out",
            says=["nmt_nfkc_cf", "--add"])
    buf = io.BytesIO()  # a unigram SentencePiece model: pieces without a merge order
    spm.SentencePieceTrainer.train(sentence_iterator=iter(zh_heldout.read_text(encoding="utf-8").splitlines()),
                                   model_writer=buf, vocab_size=1500, model_type="unigram", minloglevel=2,
                                   character_coverage=0.98)
    unigram = tmp_path / "unigram.model"
    unigram.write_bytes(buf.getvalue())
    refused(capsys, tmp_path, "vocab", "merge", "--base", llama3, "--add", unigram, "--output", tmp_path / "out",
            says=["unigram", "--add", "not BPE", "vocab train --base"])
    refused(capsys, tmp_path, "vocab", "merge", "--base", llama3, "--add", bytelevel_zh("llama3"), "--mode",
            "all-pieces", "--output", tmp_path / "out", says=["all-pieces", "preserve"])
