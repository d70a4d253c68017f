"""The HF folder written from a SentencePiece model gives sentencepiece's ids, decodes back, loads everywhere."""

from __future__ import annotations

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from zhtune.errors import ZhtuneError
from zhtune.vocab import hf


def assert_same_as_sp(folder, lines):
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(folder))
    for line in lines:
        ids = tok.encode(line, add_special_tokens=False)
        assert ids == sp.encode(line), f"{line!r}: {tok.convert_ids_to_tokens(ids)} vs {sp.encode(line, out_type=str)}"
        assert tok.decode(ids) == line
        assert sp.decode(ids) == line
    return tok, sp


def test_base_folder_matches_sentencepiece(base_tokenizer_dir, all_asset_lines, edge_lines, english_and_code):
    tok, sp = assert_same_as_sp(base_tokenizer_dir, all_asset_lines + edge_lines + english_and_code)
    # BOS added like LLaMA's tokenizer; the leading space keeps its own ▁ (transformers' Llama pipeline drops it)
    assert tok(" lead space")["input_ids"] == [1, *sp.encode(" lead space")]
    assert sp.encode(" lead space", out_type=str)[0] == "▁▁" or sp.encode(" lead space", out_type=str)[:2] == ["▁", "▁"]
    assert tok.decode(tok("hello world")["input_ids"], skip_special_tokens=True) == "hello world"


def test_folder_files_and_config(base_tokenizer_dir):
    names = {p.name for p in base_tokenizer_dir.iterdir()}
    assert set(hf.HF_FILES) <= names
    tok = AutoTokenizer.from_pretrained(str(base_tokenizer_dir))
    assert tok.is_fast and (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert len(tok) == 1000


def test_model_folder_loads_the_same_tokenizer(tiny_model_dir, base_tokenizer_dir, edge_lines):
    """A model folder (config.json model_type llama) must not swap in transformers' Llama pipeline."""
    in_model = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    alone = AutoTokenizer.from_pretrained(str(base_tokenizer_dir))
    for line in edge_lines:
        assert in_model.encode(line) == alone.encode(line)


def test_save_pretrained_round_trip(tmp_path, base_tokenizer_dir, edge_lines):
    tok = AutoTokenizer.from_pretrained(str(base_tokenizer_dir))
    tok.save_pretrained(tmp_path / "resaved")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "resaved"))
    for line in edge_lines:
        assert again.encode(line) == tok.encode(line)


def test_write_is_deterministic(tmp_path, base_sp_model):
    a = hf.write_hf_tokenizer(base_sp_model, tmp_path / "a")
    b = hf.write_hf_tokenizer(base_sp_model, tmp_path / "b", extra_config=None)
    for name in hf.HF_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_extra_config_is_kept(tmp_path, base_sp_model):
    out = hf.write_hf_tokenizer(base_sp_model, tmp_path / "t", extra_config={"model_max_length": 4096})
    assert AutoTokenizer.from_pretrained(str(out)).model_max_length == 4096


def test_merges_follow_piece_scores(base_sp_model):
    proto = hf.read_sp_model(base_sp_model)
    score = {p.piece: p.score for p in proto.pieces}
    merges = hf.sp_merges(proto)
    joined = [score[a + b] for a, b in merges]
    assert joined == sorted(joined, reverse=True), "higher-scored pieces are joined first"
    assert all(a in score and b in score for a, b in merges)


def test_not_a_sentencepiece_model(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("this is not a protobuf", encoding="utf-8")
    with pytest.raises(ZhtuneError) as exc:
        hf.write_hf_tokenizer(bad, tmp_path / "out")
    assert str(bad) in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_unigram_is_refused(tmp_path, zh_corpus):
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(zh_corpus.read_text(encoding="utf-8").splitlines()),
                                   model_writer=buf, vocab_size=3000, model_type="unigram", minloglevel=2)
    (tmp_path / "u.model").write_bytes(buf.getvalue())
    with pytest.raises(ZhtuneError, match="BPE"):
        hf.write_hf_tokenizer(tmp_path / "u.model", tmp_path / "out")


def _train(tmp_path, name, lines, **options):
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
                                   byte_fallback=True, minloglevel=2, num_threads=1, **options)
    (tmp_path / name).write_bytes(buf.getvalue())
    return tmp_path / name


def test_nfkc_base_with_whitespace_cleanup(tmp_path, all_asset_lines, edge_lines):
    """sentencepiece's default normaliser (nmt_nfkc, remove_extra_whitespaces) is reproduced too."""
    lines = [line for line in all_asset_lines if line.strip()]
    model = _train(tmp_path, "nfkc.model", lines, vocab_size=3000)
    assert hf.read_sp_model(model).normalizer_spec.remove_extra_whitespaces
    folder = hf.write_hf_tokenizer(model, tmp_path / "nfkc")
    result = hf.compare_with_sp(folder, all_asset_lines + edge_lines + ["ﬁ ligature ①  ", "  x  y  "])
    assert result["same_ids"] == result["lines"], result["first_difference"]


def test_user_defined_pieces(tmp_path, en_corpus):
    lines = en_corpus.read_text(encoding="utf-8").splitlines()
    model = _train(tmp_path, "ud.model", lines, vocab_size=1000, normalization_rule_name="identity",
                   remove_extra_whitespaces=False, user_defined_symbols=["<sep>", "[INST]"])
    folder = hf.write_hf_tokenizer(model, tmp_path / "ud")
    assert hf.compare_with_sp(folder, lines)["same_ids"] == len(lines)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = AutoTokenizer.from_pretrained(str(folder))
    sep = sp.piece_to_id("<sep>")
    assert sep in tok.encode("a<sep>b", add_special_tokens=False) and sep in sp.encode("a<sep>b")
