"""`zhtune vocab train`: corpus formats, sampling, skipped lines, Chinese defaults, determinism."""

from __future__ import annotations

import json

import sentencepiece as spm
import yaml

from zhtune.vocab import hf
from zhtune.vocab.train import sample


def test_outputs_and_chinese_defaults(zh_sp_dir, zh_heldout):
    for name in ("zh_sp.model", "zh_sp.vocab", "run.yaml", "corpus_report.json"):
        assert (zh_sp_dir / name).is_file(), name
    proto = hf.read_sp_model(zh_sp_dir / "zh_sp.model")
    spec = proto.trainer_spec
    assert spec.model_type == 2 and spec.byte_fallback and spec.split_digits and spec.vocab_size == 4000
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.remove_extra_whitespaces
    assert [proto.pieces[i].piece for i in range(3)] == ["<unk>", "<s>", "</s>"]
    vocab_lines = (zh_sp_dir / "zh_sp.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == 4000 and vocab_lines[1].startswith("<s>\t")
    sp = spm.SentencePieceProcessor(model_file=str(zh_sp_dir / "zh_sp.model"))
    extra = ["全角ＡＢＣ１２３！？", "数字 20240101", "  两个空格"]
    for line in zh_heldout.read_text(encoding="utf-8").splitlines() + extra:
        assert sp.decode(sp.encode(line)) == line
    assert sp.encode("2024", out_type=str)[-4:] == ["2", "0", "2", "4"], "digits split"
    run = yaml.safe_load((zh_sp_dir / "run.yaml").read_text(encoding="utf-8"))
    assert run["stage"] == "vocab train" and run["config"]["vocab_size"] == 4000
    report = json.loads((zh_sp_dir / "corpus_report.json").read_text(encoding="utf-8"))
    assert report["files"] == 1 and report["kept"] == report["lines"] > 300


def test_train_is_deterministic(tmp_path, zh_sp_dir, zh_corpus, cli_run):
    out = tmp_path / "again"
    assert cli_run("vocab", "train", "--corpus", zh_corpus, "--vocab-size", 4000, "--output", out,
                   "--threads", 1) == 0
    assert (out / "zh_sp.model").read_bytes() == (zh_sp_dir / "zh_sp.model").read_bytes()
    assert (out / "zh_sp.vocab").read_bytes() == (zh_sp_dir / "zh_sp.vocab").read_bytes()


def test_formats_folders_and_skipped_lines(tmp_path, zh_corpus, cli_run, capsys):
    lines = zh_corpus.read_text(encoding="utf-8").splitlines()
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_bytes("\n".join(lines[:150]).encode("utf-8") + b"\nbad \xff\xfe line\n"
                                   + ("长" * 3000).encode("utf-8") + b"\n")
    (corpus / "sub" / "b.jsonl").write_text(
        "".join(json.dumps({"content": line, "id": i}, ensure_ascii=False) + "\n"
                for i, line in enumerate(lines[150:300])), encoding="utf-8")
    (corpus / "sub" / "c.json").write_text(json.dumps([{"content": "\n".join(lines[300:])}], ensure_ascii=False),
                                           encoding="utf-8")
    (corpus / "notes.md").write_text("ignored", encoding="utf-8")
    out = tmp_path / "out"
    assert cli_run("vocab", "train", "--corpus", corpus, "--text-field", "content", "--vocab-size", 4000,
                   "--max-line-bytes", 4000, "--output", out) == 0
    printed = capsys.readouterr().out
    assert f"{corpus / 'a.txt'}:151" in printed and f"{corpus / 'a.txt'}:152" in printed
    report = json.loads((out / "corpus_report.json").read_text(encoding="utf-8"))
    assert report["files"] == 3 and report["skipped_files"] == 1
    assert report["skipped_not_utf8"] == 1 and report["first_not_utf8"] == f"{corpus / 'a.txt'}:151"
    assert report["skipped_too_long"] == 1 and report["first_too_long"] == f"{corpus / 'a.txt'}:152"
    assert report["lines"] == len([line for line in lines if line.strip()])


def test_max_sentences_samples(tmp_path, zh_corpus, cli_run):
    out = tmp_path / "out"
    assert cli_run("vocab", "train", "--corpus", zh_corpus, "--vocab-size", 3000, "--max-sentences", 300,
                   "--output", out, "--character-coverage", 0.999) == 0
    report = json.loads((out / "corpus_report.json").read_text(encoding="utf-8"))
    assert report["kept"] == 300 < report["lines"]


def test_reservoir_sample_is_uniform_deterministic_and_ordered():
    lines = [f"s{i}" for i in range(10_000)]
    a, b = sample(iter(lines), 1000), sample(iter(lines), 1000)
    assert a == b and len(a) == 1000
    assert a == sorted(a, key=lambda s: int(s[1:])), "kept in corpus order"
    assert sum(int(s[1:]) >= 5000 for s in a) in range(400, 600), "both halves are sampled"
    assert sample(iter(lines[:10]), 1000) == lines[:10]


def test_unigram(tmp_path, zh_corpus, cli_run):
    out = tmp_path / "uni"
    assert cli_run("vocab", "train", "--corpus", zh_corpus, "--vocab-size", 3500, "--model-type", "unigram",
                   "--output", out) == 0
    assert hf.read_sp_model(out / "zh_sp.model").trainer_spec.model_type == 1
