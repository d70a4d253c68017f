"""`zhtune eval --task ceval|cmmlu|mmlu` on benchmark folders written by the tests: letter scoring agrees
with transformers, a model that learned the answers scores higher than its base, the JSON shape, and
every kind of bad input named."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from zhtune.cli import main as cli
from zhtune.eval import choice
from zhtune.eval.benchmarks import LETTERS, build_prompt

from .conftest import SUBJECTS, write_benchmark


def run_eval(*argv) -> int:
    return cli(["eval", *map(str, argv)])


def test_letter_scores_agree_with_transformers(hf_engine, tiny_model_dir, ceval_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    subjects = choice.load("ceval", ceval_dir, "val", None, 2, None)
    items, shortened = choice.prepare(hf_engine, "ceval", subjects, 2)
    assert len(items) == 12 and shortened == 0
    letters = choice.letter_ids(hf_engine, "ceval")
    scored = hf_engine.score([it.ids for it in items], prompt=False, candidates=letters)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    for it, s in zip(items, scored):   # one question at a time, no padding: the reference
        ids = tok(it.prompt)["input_ids"]
        assert ids == it.ids
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        for letter, t in zip(LETTERS, letters):
            assert tok.decode([t]) == letter   # the token after "答案：" is the bare letter
            assert abs(s.next[t] - float(ref[t])) < 1e-4
    picks = choice.score_letters(hf_engine, "ceval", items, progress=_Null())
    assert picks == [max(LETTERS, key=lambda x: s.next[letters[LETTERS.index(x)]]) for s in scored]


class _Null:
    def update(self, _n):
        pass


def test_cli_json_shape_and_shots(tiny_model_dir, ceval_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert run_eval("--model", tiny_model_dir, "--task", "ceval", "--data", ceval_dir, "--shots", 5,
                    "--output", out) == 0
    r = json.loads(out.read_text(encoding="utf-8"))
    assert {"task", "model", "shots", "mode", "subjects", "categories", "average"} <= set(r)
    assert r["task"] == "ceval" and r["shots"] == 5 and r["mode"] == "logprob" and r["split"] == "val"
    assert set(r["subjects"]) == set(SUBJECTS["ceval"]) and all(v["n"] == 4 for v in r["subjects"].values())
    assert set(r["categories"]) == {"Humanities", "STEM", "Other"}
    assert r["subjects"]["law"]["category"] == "Humanities"
    assert r["average"] == pytest.approx(sum(v["accuracy"] * v["n"] for v in r["subjects"].values()) / 12)
    assert "average" in capsys.readouterr().out


def test_a_model_that_learned_the_answers_scores_higher(tiny_model_dir, knowing_model_dir, mmlu_dir, tmp_path):
    scores = {}
    for name, model in (("base", tiny_model_dir), ("tuned", knowing_model_dir)):
        out = tmp_path / f"{name}.json"
        assert run_eval("--model", model, "--task", "mmlu", "--data", mmlu_dir, "--subjects", "anatomy",
                        "--output", out) == 0
        scores[name] = json.loads(out.read_text())["average"]
    assert scores["tuned"] == 1.0 and scores["base"] < 1.0, scores


@pytest.mark.parametrize("task", ["cmmlu", "mmlu"])
def test_other_layouts(task, tiny_model_dir, tmp_path):
    data = write_benchmark(task, tmp_path / task)
    out = tmp_path / "r.json"
    assert run_eval("--model", tiny_model_dir, "--task", task, "--data", data, "--shots", 1, "--limit", 3,
                    "--output", out) == 0
    r = json.loads(out.read_text())
    assert r["split"] == "test" and r["n"] == 3 * len(SUBJECTS[task])
    if task == "cmmlu":
        assert "China specific" in r["categories"]
    assert "A. " in build_prompt(task, choice.load(task, data, "test", None, 0, 1)[0][1][0], [])


def test_generate_mode_with_the_chat_template(tiny_model_dir, ceval_dir, tmp_path):
    out = tmp_path / "g.json"
    assert run_eval("--model", tiny_model_dir, "--task", "ceval", "--data", ceval_dir, "--mode", "generate",
                    "--subjects", "law", "--max-new-tokens", 3, "--output", out) == 0
    r = json.loads(out.read_text())
    assert r["mode"] == "generate" and r["n"] == 4 and set(r["subjects"]) == {"law"}
    assert r["unanswered"] + sum(v["n"] for v in r["subjects"].values()) >= 4


@pytest.mark.parametrize("text,letter", [("答案是B。", "B"), ("答案：C选项", "C"), ("D. 因为", "D"),
                                         ("The answer is (A).", "A"), ("我选择 B", "B"), ("不知道", None)])
def test_extract_answer(text, letter):
    assert choice.extract_answer(text) == letter


# --- bad input: exit 2, the place named, no traceback ----------------------------------------------
def _edit(path, fn):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    fn(rows)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)


def _broken(tmp_path, ceval_dir, fn):
    data = tmp_path / "ceval"
    shutil.copytree(ceval_dir, data)
    _edit(data / "val" / "law_val.csv", fn)
    return data


def _drop_column(rows):
    for r in rows:
        del r[3]     # column "B"


def _bad_answer(rows):
    rows[3][6] = "E"


BAD = [
    ("missing column", _drop_column, [], "law_val.csv:1", "'B'"),
    ("answer outside A-D", _bad_answer, [], "law_val.csv:4", "'E'"),
    ("unknown subject", None, ["--subjects", "lawn"], "--subjects", "law"),
    ("shots beyond dev", None, ["--shots", "9"], "--shots", "at most 5"),
    ("test split has no answers", None, ["--split", "train"], "--split", "dev | val | test"),
]


@pytest.mark.parametrize("name,edit,extra,where,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_named(name, edit, extra, where, words, tiny_model_dir, ceval_dir, tmp_path, capsys):
    data = _broken(tmp_path, ceval_dir, edit) if edit else ceval_dir
    assert run_eval("--model", tiny_model_dir, "--task", "ceval", "--data", data, *extra) == 2
    err = capsys.readouterr().err
    assert where in err and words in err and "Traceback" not in err


def test_empty_folder_and_wrong_kind(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_eval("--model", tiny_model_dir, "--task", "mmlu", "--data", tmp_path / "empty") == 2
    assert "no mmlu test files" in capsys.readouterr().err
    assert run_eval("--model", tiny_model_dir, "--model", tiny_model_dir, "--task", "ceval",
                    "--data", tmp_path / "empty") == 2
    assert "--model" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert run_eval("--model", tiny_model_dir, "--task", "mmlu", "--data", tmp_path / "empty",
                    "--output", blocked / "r.json") == 2   # checked before any work, not after it
    assert "--output" in capsys.readouterr().err
