"""`zhtune eval --task ppl` (bits per character) and `--task generate` (ROUGE / BLEU as LLaMA-Factory)."""

from __future__ import annotations

import json
import math

import pytest

from zhtune import tiny
from zhtune.cli import main as cli
from zhtune.eval.generation import similarity
from zhtune.eval.ppl import bits_per_char


class _Null:
    def update(self, _n):
        pass


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    lines = tiny.asset_lines("zh_heldout.txt")[:6] + ["", "The cat sat on the mat."]
    path = tmp_path_factory.mktemp("ppl") / "heldout.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bits_per_char_is_the_direct_computation(hf_engine, tiny_model_dir, heldout):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = bits_per_char(hf_engine, heldout, None, _Null())
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    nats = chars = tokens = 0
    for line in heldout.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        ids = tok(line)["input_ids"]   # BOS first, each line alone
        assert ids[0] == tok.bos_token_id
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        nats -= float(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
        chars += len(line)
        tokens += len(ids) - 1
    assert r["lines"] == 7 and r["chars"] == chars and r["tokens"] == tokens
    assert r["bits_per_char"] == pytest.approx(nats / math.log(2) / chars, rel=1e-5)


def test_several_models_side_by_side_across_tokenizers(tiny_model_dir, grown_tokenizer_dir, heldout, tmp_path,
                                                       capsys):
    from transformers import AutoTokenizer

    child = tiny.build_tiny_model(tmp_path / "child", vocab_size=len(AutoTokenizer.from_pretrained(
        str(grown_tokenizer_dir))), seed=1, tokenizer_dir=grown_tokenizer_dir)
    out = tmp_path / "ppl.json"
    assert cli(["eval", "--model", str(tiny_model_dir), "--model", str(child), "--task", "ppl",
                "--data", str(heldout), "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["models"]
    base, grown = rows[str(tiny_model_dir)], rows[str(child)]
    assert base["chars"] == grown["chars"]           # the same text, counted in characters
    assert grown["tokens"] < base["tokens"]          # the Chinese pieces make fewer tokens
    assert all(0 < r["bits_per_char"] < 100 for r in (base, grown))
    printed = capsys.readouterr().out
    assert "bits/char" in printed and str(child)[-30:] in printed


def test_llamacpp_bits_per_char_match_hf(hf_engine, gguf_file, heldout):
    from zhtune.infer.resolve import load_engine

    with load_engine(str(gguf_file), n_ctx=256, n_parallel=2) as engine:
        r = bits_per_char(engine, heldout, None, _Null())
    ref = bits_per_char(hf_engine, heldout, None, _Null())
    assert r["tokens"] == ref["tokens"] and r["bits_per_char"] == pytest.approx(ref["bits_per_char"], rel=1e-3)


def test_similarity_like_llama_factory():
    same = similarity("今天天气很好", "今天天气很好")
    assert same == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}
    apart = similarity("猫", "今天天气很好")
    assert apart["rouge-1"] == 0.0 and apart["bleu-4"] < 5
    assert similarity("", "今天")["rouge-l"] == 0.0   # an empty reply scores 0, not an error
    part = similarity("今天天气不好", "今天天气很好")
    assert 0 < part["rouge-1"] < 100 and 0 < part["bleu-4"] < 100


def test_generate_writes_scores_and_predictions(tiny_model_dir, tmp_path):
    data = tiny.write_jsonl(tmp_path / "test.jsonl", [
        {"instruction": "你好", "input": "", "output": "你好！"},
        {"instruction": "1+1=?", "input": "", "output": "2"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ])
    out = tmp_path / "gen.json"
    assert cli(["eval", "--model", str(tiny_model_dir), "--task", "generate", "--data", str(data),
                "--max-new-tokens", "4", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"} <= set(r)
    assert r["predict_samples"] == 3
    rows = [json.loads(x) for x in (tmp_path / "gen_predictions.jsonl").read_text().splitlines()]
    assert [x["label"] for x in rows] == ["你好！", "2", "hello"] and all("predict" in x for x in rows)
    scored = [similarity(x["predict"], x["label"]) for x in rows]
    assert r["predict_rouge-1"] == pytest.approx(sum(s["rouge-1"] for s in scored) / 3, abs=1e-3)


def test_existing_output_is_refused_without_overwrite(tiny_model_dir, tmp_path, capsys):
    """--output (and generate's predictions beside it) that exist: exit 2 naming the file, before the model
    loads; --overwrite replaces what an earlier zhtune eval wrote, never a file of the user's."""
    data = tiny.write_jsonl(tmp_path / "test.jsonl", [{"instruction": "你好", "input": "", "output": "你好！"}])
    out, predictions = tmp_path / "gen.json", tmp_path / "gen_predictions.jsonl"
    argv = ["eval", "--model", str(tiny_model_dir), "--task", "generate", "--data", str(data),
            "--max-new-tokens", "2", "--output", str(out)]
    assert cli(argv) == 0
    first = out.read_text(encoding="utf-8")
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "Traceback" not in err
    assert cli([*argv, "--overwrite"]) == 0 and json.loads(out.read_text(encoding="utf-8"))["task"] == "generate"
    out.unlink()
    assert cli(argv) == 2 and str(predictions) in capsys.readouterr().err   # the predictions file is checked too
    out.write_text('{"mine": 1}\n', encoding="utf-8")   # the user's own JSON at that path
    assert cli([*argv, "--overwrite"]) == 2
    assert "not a zhtune eval result" in capsys.readouterr().err and out.read_text() == '{"mine": 1}\n'
    assert first.startswith('{\n  "task": ')


def test_bad_text_and_records_are_named(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("好的\n".encode() + b"\xff\xfe\n")
    assert cli(["eval", "--model", str(tiny_model_dir), "--task", "ppl", "--data", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    rec = tiny.write_jsonl(tmp_path / "r.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q"}])
    assert cli(["eval", "--model", str(tiny_model_dir), "--task", "generate", "--data", str(rec),
                "--output", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err
    assert f"{rec}:2" in err and "output" in err and "Traceback" not in err
    assert not (tmp_path / "g.json").exists()
    assert cli(["eval", "--model", str(tiny_model_dir), "--task", "generate", "--data", str(rec)]) == 2
    assert "--output" in capsys.readouterr().err
