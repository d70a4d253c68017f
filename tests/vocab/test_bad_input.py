"""Bad input to `zhtune vocab train|merge|stats`: exit 2, the error names the file/line/flag, nothing left on disk."""

from __future__ import annotations

from zhtune import cli


def fails(capsys, parent, *args, says=()):
    """Run `zhtune ...`; it must exit 2, print each of `says`, and leave `parent` as it was."""
    before = sorted(p.name for p in parent.iterdir()) if parent.exists() else []
    assert cli.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    for text in says:
        assert str(text) in err, (text, err)
    assert "Traceback" not in err
    after = sorted(p.name for p in parent.iterdir()) if parent.exists() else []
    assert after == before, "nothing half-written"
    return err


# --- vocab train ---------------------------------------------------------------------------------

def test_train_missing_corpus(tmp_path, capsys):
    fails(capsys, tmp_path, "vocab", "train", "--corpus", tmp_path / "nope.txt", "--vocab-size", 1000,
          "--output", tmp_path / "out", says=["nope.txt", "--corpus"])


def test_train_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n   \n", encoding="utf-8")
    fails(capsys, tmp_path, "vocab", "train", "--corpus", tmp_path / "empty.txt", "--vocab-size", 1000,
          "--output", tmp_path / "out", says=["no text", "empty.txt"])


def test_train_folder_without_corpus_files(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("中文", encoding="utf-8")
    fails(capsys, tmp_path, "vocab", "train", "--corpus", tmp_path / "docs", "--vocab-size", 1000,
          "--output", tmp_path / "out", says=[".txt", "--corpus"])


def test_train_vocab_size_too_big(tmp_path, capsys, zh_heldout):
    err = fails(capsys, tmp_path, "vocab", "train", "--corpus", zh_heldout, "--vocab-size", 200000,
                "--output", tmp_path / "out", says=["--vocab-size", "cannot support", "at most"])
    assert "INTERNAL" not in err


def test_train_vocab_size_below_characters(tmp_path, capsys, zh_corpus):
    fails(capsys, tmp_path, "vocab", "train", "--corpus", zh_corpus, "--vocab-size", 1000,
          "--output", tmp_path / "out", says=["--vocab-size", "at least 2"])


def test_train_jsonl_missing_field(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "你好"}\n{"content": "世界"}\n', encoding="utf-8")
    fails(capsys, tmp_path, "vocab", "train", "--corpus", data, "--vocab-size", 1000, "--output", tmp_path / "out",
          says=[f"{data}:2", "'text'", "content", "--text-field"])


def test_train_jsonl_bad_json(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "你好"}\n{"text": \n', encoding="utf-8")
    fails(capsys, tmp_path, "vocab", "train", "--corpus", data, "--vocab-size", 1000, "--output", tmp_path / "out",
          says=[f"{data}:2", "JSON"])


def test_train_bad_flags(tmp_path, capsys, zh_corpus):
    fails(capsys, tmp_path, "vocab", "train", "--corpus", zh_corpus, "--vocab-size", 10,
          "--output", tmp_path / "out", says=["--vocab-size"])
    fails(capsys, tmp_path, "vocab", "train", "--corpus", zh_corpus, "--vocab-size", 4000,
          "--character-coverage", 2, "--output", tmp_path / "out", says=["--character-coverage"])


def test_train_refuses_existing_output(tmp_path, capsys, zh_corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    fails(capsys, tmp_path, "vocab", "train", "--corpus", zh_corpus, "--vocab-size", 4000, "--output", out,
          says=["already exists", "--overwrite"])
    assert (out / "keep.txt").read_text(encoding="utf-8") == "mine"
    # --overwrite replaces only an earlier zhtune output: the user's file is named, never deleted
    fails(capsys, tmp_path, "vocab", "train", "--corpus", zh_corpus, "--vocab-size", 4000, "--output", out,
          "--overwrite", says=["keep.txt", "no zhtune output wrote"])
    assert (out / "keep.txt").read_text(encoding="utf-8") == "mine"
    (out / "keep.txt").unlink()
    args = ["vocab", "train", "--corpus", str(zh_corpus), "--vocab-size", "4000", "--output", str(out)]
    assert cli.main(args) == 0 and cli.main([*args, "--overwrite"]) == 0
    assert (out / "zh_sp.model").is_file()


# --- vocab merge ---------------------------------------------------------------------------------

def test_merge_base_missing(tmp_path, capsys, zh_sp_model):
    fails(capsys, tmp_path, "vocab", "merge", "--base", tmp_path / "llama", "--add", zh_sp_model,
          "--output", tmp_path / "out", says=["llama", "--base"])


def test_merge_base_not_sentencepiece(tmp_path, capsys, zh_sp_model):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00\x01 definitely not a protobuf \xff" * 10)
    fails(capsys, tmp_path, "vocab", "merge", "--base", bad, "--add", zh_sp_model,
          "--output", tmp_path / "out", says=[str(bad), "SentencePiece"])


def test_merge_base_with_only_tokenizer_json(tmp_path, capsys, zh_sp_model, base_tokenizer_dir):
    folder = tmp_path / "llama3"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((base_tokenizer_dir / "tokenizer.json").read_bytes())
    fails(capsys, tmp_path, "vocab", "merge", "--base", folder, "--add", zh_sp_model,
          "--output", tmp_path / "out",
          says=["tokenizer.json but no tokenizer.model", "--base", "copy tokenizer.model"])


def test_merge_add_not_sentencepiece(tmp_path, capsys, base_tokenizer_dir):
    bad = tmp_path / "zh.model"
    bad.write_text("hello", encoding="utf-8")
    fails(capsys, tmp_path, "vocab", "merge", "--base", base_tokenizer_dir, "--add", bad,
          "--output", tmp_path / "out", says=[str(bad)])


def test_merge_flag_mistakes(tmp_path, capsys, base_tokenizer_dir, zh_sp_model):
    common = ["vocab", "merge", "--base", base_tokenizer_dir, "--output", tmp_path / "out"]
    fails(capsys, tmp_path, *common, says=["--add"])
    fails(capsys, tmp_path, *common, "--mode", "chars", says=["--chars"])
    fails(capsys, tmp_path, *common, "--add", zh_sp_model, "--chars", "4E00-9FFF", says=["--chars"])
    fails(capsys, tmp_path, *common, "--mode", "chars", "--chars", "not-a-range", says=["--chars", "4E00-9FFF"])
    fails(capsys, tmp_path, *common, "--mode", "chars", "--chars", "9FFF-4E00", says=["--chars"])
    fails(capsys, tmp_path, *common, "--add", zh_sp_model, "--cjk-ranges", "CJK", says=["--cjk-ranges"])
    fails(capsys, tmp_path, *common, "--mode", "chars", "--chars", "0061-0065", says=["no new character"])
    fails(capsys, tmp_path, *common, "--add", zh_sp_model, "--check-text", tmp_path / "missing.txt",
          says=["missing.txt", "--check-text"])
    fails(capsys, tmp_path, *common, "--add", zh_sp_model, "--name", "a/b", says=["--name"])


def test_merge_refuses_existing_output(tmp_path, capsys, merged_preserve, base_tokenizer_dir, zh_sp_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("mine", encoding="utf-8")
    fails(capsys, tmp_path, "vocab", "merge", "--base", base_tokenizer_dir, "--add", zh_sp_model,
          "--output", out, says=["already exists", "--overwrite"])
    assert (out / "x").read_text(encoding="utf-8") == "mine"


# --- vocab stats ---------------------------------------------------------------------------------

def test_stats_bad_inputs(tmp_path, capsys, base_tokenizer_dir, zh_heldout):
    fails(capsys, tmp_path, "vocab", "stats", "--tokenizer", tmp_path / "none", "--text", zh_heldout,
          says=["none", "--tokenizer"])
    fails(capsys, tmp_path, "vocab", "stats", "--tokenizer", base_tokenizer_dir, "--text", tmp_path / "t.txt",
          says=["t.txt", "--text"])
    text = tmp_path / "latin1.txt"
    text.write_bytes("第一行\n".encode("utf-8") + "caf\xe9\n".encode("latin-1"))
    fails(capsys, tmp_path, "vocab", "stats", "--tokenizer", base_tokenizer_dir, "--text", text,
          says=[f"{text}:2", "UTF-8"])
    empty = tmp_path / "folder"
    empty.mkdir()
    fails(capsys, tmp_path, "vocab", "stats", "--tokenizer", empty, "--text", zh_heldout, says=["folder"])


def test_merge_base_not_bpe(tmp_path, capsys, zh_sp_model, zh_corpus):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(zh_corpus.read_text(encoding="utf-8").splitlines()),
                                   model_writer=buf, vocab_size=3000, model_type="unigram", minloglevel=2)
    (tmp_path / "t5.model").write_bytes(buf.getvalue())
    fails(capsys, tmp_path, "vocab", "merge", "--base", tmp_path / "t5.model", "--add", zh_sp_model,
          "--output", tmp_path / "out", says=["t5.model", "--base", "BPE"])
