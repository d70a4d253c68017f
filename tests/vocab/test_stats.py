"""`zhtune vocab stats`: the table and the JSON, for HF folders and .model files."""

from __future__ import annotations

import json

from zhtune.vocab.stats import ROWS


def test_stats_table_and_json(tmp_path, capsys, cli_run, base_tokenizer_dir, zh_sp_model, merged_preserve,
                              merged_all, zh_heldout, en_corpus):
    out = tmp_path / "stats.json"
    assert cli_run("vocab", "stats", "--tokenizer", base_tokenizer_dir, "--tokenizer", zh_sp_model,
                   "--tokenizer", merged_preserve / "merged_tokenizer_hf", "--tokenizer",
                   merged_all / "merged_tokenizer_hf", "--text", zh_heldout, "--text", en_corpus,
                   "--json", out) == 0
    printed = capsys.readouterr().out
    for _, label, _ in ROWS:
        assert label in printed
    data = json.loads(out.read_text(encoding="utf-8"))
    base, alone, preserve, every = data["tokenizers"]
    assert data["lines"] == base["roundtrip_lines"] > 300
    assert (base["kind"], alone["kind"]) == ("hf", "sentencepiece")
    assert base["vocab_size"] == 1000 and alone["vocab_size"] == 4000
    assert preserve["vocab_size"] > 4000
    assert base["tokens_per_cjk_char"] > 2.5 * preserve["tokens_per_cjk_char"]
    assert preserve["tokens_per_cjk_char"] < alone["tokens_per_cjk_char"] * 1.03
    assert base["non_cjk_identical_to_first"] is None
    assert preserve["non_cjk_identical_to_first"] == 1.0 > every["non_cjk_identical_to_first"]
    assert preserve["fast_equals_sentencepiece"] == 1.0
    assert base["byte_fallback_tokens"] > 10 * preserve["byte_fallback_tokens"]
    for row in data["tokenizers"]:
        assert row["roundtrip_share"] == 1.0
        assert row["tokens"] == round(row["tokens_per_line"] * data["lines"]) or abs(
            row["tokens"] / data["lines"] - row["tokens_per_line"]) < 0.01


def test_stats_on_a_bare_sentencepiece_folder(tmp_path, capsys, cli_run, zh_sp_dir, zh_heldout):
    """A folder with only a .model must be read with sentencepiece (AutoTokenizer would give other ids)."""
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "zh_sp.model").write_bytes((zh_sp_dir / "zh_sp.model").read_bytes())
    out = tmp_path / "s.json"
    assert cli_run("vocab", "stats", "--tokenizer", folder, "--tokenizer", zh_sp_dir / "zh_sp.model",
                   "--text", zh_heldout, "--json", out) == 0
    rows = json.loads(out.read_text(encoding="utf-8"))["tokenizers"]
    assert rows[0]["kind"] == "sentencepiece" and rows[0]["tokens"] == rows[1]["tokens"]


def test_stats_accepts_a_merge_output_folder(tmp_path, cli_run, merged_preserve, zh_heldout):
    out = tmp_path / "s.json"
    assert cli_run("vocab", "stats", "--tokenizer", merged_preserve,
                   "--tokenizer", merged_preserve / "merged_tokenizer_hf", "--text", zh_heldout, "--json", out) == 0
    rows = json.loads(out.read_text(encoding="utf-8"))["tokenizers"]
    assert rows[0]["path"] == rows[1]["path"] and rows[0]["tokens"] == rows[1]["tokens"]
