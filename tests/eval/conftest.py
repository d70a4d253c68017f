"""Benchmark fixtures in the public file layouts (C-Eval, CMMLU, MMLU), written by the tests: a few
subjects, synthetic questions with seeded answers. Nothing downloaded."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

SUBJECTS = {"ceval": ["law", "high_school_physics", "civil_servant"],
            "cmmlu": ["anatomy", "chinese_history"],
            "mmlu": ["anatomy", "philosophy"]}
STEPS = 30
OPTION_WORDS = {"zh": ["山", "水", "火", "木", "金", "土", "日", "月", "风", "雨", "雪", "云"],
                "en": ["cat", "dog", "sun", "moon", "tree", "river", "stone", "fire", "wind", "rain", "snow", "cloud"]}


def question_rows(subject: str, split: str, n: int, seed: int, lang: str) -> list[tuple[str, str, str, str, str, str]]:
    """(question, A, B, C, D, answer) rows, reproducible from the seed."""
    rng = random.Random(f"{subject}/{split}/{seed}")
    rows = []
    for i in range(n):
        options = rng.sample(OPTION_WORDS[lang], 4)
        text = f"{split}{i} {subject} 第{i}题：哪一个字是正确的？" if lang == "zh" else f"Which word is right ({i})?"
        rows.append((text, *options, rng.choice("ABCD")))
    return rows


def write_benchmark(task: str, root: Path, n_dev: int = 5, n_eval: int = 4, seed: int = 0) -> Path:
    """The benchmark's folder: dev + evaluation split for each subject of SUBJECTS[task]."""
    for subject in SUBJECTS[task]:
        splits = {"dev": n_dev, ("test" if task == "cmmlu" else "val"): n_eval}
        if task == "mmlu":
            splits["test"] = n_eval
        for split, n in splits.items():
            rows = question_rows(subject, split if split != "test" or task != "mmlu" else "val", n, seed,
                                 "en" if task == "mmlu" else "zh")
            name = f"{subject}.csv" if task == "cmmlu" else f"{subject}_{split}.csv"
            path = root / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                if task == "ceval":
                    explanation = ["explanation"] if split == "dev" else []
                    w.writerow(["id", "question", "A", "B", "C", "D", "answer", *explanation])
                    w.writerows([i, *r, *(["因为。"] if split == "dev" else [])] for i, r in enumerate(rows))
                elif task == "cmmlu":
                    w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                    w.writerows([i, *r] for i, r in enumerate(rows))
                else:
                    w.writerows(rows)
    return root


@pytest.fixture(scope="session")
def ceval_dir(tmp_path_factory) -> Path:
    return write_benchmark("ceval", tmp_path_factory.mktemp("ceval"))


@pytest.fixture(scope="session")
def hf_engine(tiny_model_dir):
    from zhtune.infer.resolve import load_engine

    engine = load_engine(str(tiny_model_dir))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def mmlu_dir(tmp_path_factory) -> Path:
    return write_benchmark("mmlu", tmp_path_factory.mktemp("mmlu"))


@pytest.fixture(scope="session")
def knowing_model_dir(tmp_path_factory, tiny_model_dir, mmlu_dir) -> Path:
    """The tiny model fine-tuned (full weights, a few Adam steps on the answer-letter token only) on the
    MMLU fixture's anatomy test questions in the 0-shot prompt: a model that knows the answers. (MMLU: English
    prompts are short in the tiny English tokenizer, so a few steps suffice.)"""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhtune.eval.benchmarks import build_prompt
    from zhtune.eval.choice import load

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    questions = [q for _, qs in load("mmlu", mmlu_dir, "test", ["anatomy"], 0, None) for q in qs]
    rows = [tok(build_prompt("mmlu", q, []) + " " + q.answer)["input_ids"] for q in questions]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r[:-1] + [0] * (width - len(r)) for r in rows])      # right-padded prompts
    mask = torch.tensor([[1] * (len(r) - 1) + [0] * (width - len(r)) for r in rows])
    last = torch.tensor([len(r) - 2 for r in rows])                           # each prompt's last position
    letters = torch.tensor([r[-1] for r in rows])
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):   # cross-entropy of the letter after each prompt, all questions in one batch
        logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(rows)), last]
        loss = torch.nn.functional.cross_entropy(logits, letters)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("knowing") / "model"
    model.save_pretrained(out)
    for f in Path(tiny_model_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, out / f.name)
    return out
