"""Multiple-choice benchmarks (C-Eval, CMMLU, MMLU) over the engine: by the next-token log-probability
of the answer letters (Chinese-LLaMA-Alpaca's constrained decoding; one forward per question, only the
last position's logits) or by generation with the chat template and answer extraction. Run by
`zhtune eval --task ceval|cmmlu|mmlu` (zhtune.eval.run).
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from zhtune.errors import ZhtuneError
from zhtune.eval.benchmarks import LAYOUTS, LETTERS, Question, build_prompt, find_subjects, read_split
from zhtune.eval.subjects import BENCHMARKS, CATEGORIES, CMMLU_CHINA_SPECIFIC
from zhtune.infer.engine import Engine, GenParams

CHUNK = 64   # questions per engine call (the engine batches inside; progress moves per chunk)


@dataclass
class Item:
    question: Question
    prompt: str
    ids: list[int]


def letter_ids(engine: Engine, task: str) -> list[int]:
    """The token that starts each answer letter right after the cue, read off the tokenizer: ids of
    cue+letter minus ids of cue (so a SentencePiece "▁A" is never taken for the "A" after "答案：")."""
    layout = LAYOUTS[task]
    cue = engine.encode(layout.cue, bos=False)
    ids = []
    for letter in LETTERS:
        whole = engine.encode(layout.cue + layout.sep + letter, bos=False)
        rest = whole[len(cue):] if whole[:len(cue)] == cue else whole[-1:]
        ids.append(rest[0] if rest else whole[-1])
    if len(set(ids)) < len(ids):
        raise ZhtuneError("the answer letters do not start with distinct tokens in this tokenizer",
                          where="--mode logprob", hint="use --mode generate")
    return ids


def load(task: str, data: Path, split: str, subjects: list[str] | None, shots: int,
         limit: int | None) -> list[tuple[list[Question], list[Question]]]:
    """(dev examples, questions) of every subject, all files checked before any model loads."""
    out = []
    for subject in find_subjects(task, data, split, subjects):
        dev = read_split(task, data, subject, "dev") if shots else []
        if shots > len(dev):
            raise ZhtuneError(f"--shots {shots} but {subject}'s dev split has {len(dev)} questions",
                              where="--shots", expected=f"at most {len(dev)}")
        out.append((dev[:shots], read_split(task, data, subject, split)[:limit]))
    return out


def prepare(engine: Engine, task: str, subjects: list[tuple[list[Question], list[Question]]],
            shots: int) -> tuple[list[Item], int]:
    """Each question's prompt with the dev examples (fewer for a question whose prompt would not fit the
    context; how many were shortened is returned)."""
    items, shortened = [], 0
    for dev, questions in subjects:
        for q in questions:
            k = shots
            while True:
                prompt = build_prompt(task, q, dev[:k])
                ids = engine.encode(prompt, bos=True)
                if len(ids) < engine.max_model_len or k == 0:
                    break
                k -= 1
            if len(ids) >= engine.max_model_len:
                raise ZhtuneError(f"the question alone is {len(ids)} tokens; the model's context is "
                                  f"{engine.max_model_len}", where=q.where, hint="a longer --context-length")
            shortened += k < shots
            items.append(Item(q, prompt, ids))
    return items, shortened


def score_letters(engine: Engine, task: str, items: list[Item], progress) -> list[str]:
    """The letter with the highest next-token log-probability after each prompt."""
    candidates = letter_ids(engine, task)
    picks = []
    for start in range(0, len(items), CHUNK):
        chunk = items[start:start + CHUNK]
        for scored in engine.score([it.ids for it in chunk], prompt=False, candidates=candidates):
            picks.append(max(LETTERS, key=lambda letter: scored.next[candidates[LETTERS.index(letter)]]))
        progress.update(len(chunk))
    return picks


_ANSWER = [re.compile(p) for p in (
    r"答案(?:是|为|应该是|应为)?\s*[:：]?\s*[(（]?([ABCD])(?![A-Za-z])",
    r"(?:answer is|Answer:)\s*\(?([ABCD])(?![A-Za-z])",
    r"^\s*\(?([ABCD])(?:[.．、:：)）\s]|$)",
    r"(?<![A-Za-z])([ABCD])(?![A-Za-z])",
)]


def extract_answer(text: str) -> str | None:
    """The answer letter in a generated reply: an explicit "答案是 X" / "answer is X", a reply that
    starts with the letter, else the first standalone A-D."""
    for pattern in _ANSWER:
        hit = pattern.search(text)
        if hit:
            return hit.group(1)
    return None


def generate_letters(engine: Engine, items: list[Item], params: GenParams, progress) -> list[str | None]:
    """Each prompt as a user message under the model's chat template; the letter read off the reply."""
    picks = []
    for start in range(0, len(items), CHUNK):
        chunk = items[start:start + CHUNK]
        replies = engine.generate([[{"role": "user", "content": it.prompt}] for it in chunk], params)
        picks += [extract_answer(r.text) for r in replies]
        progress.update(len(chunk))
    return picks


def report(task: str, model: str, shots: int, mode: str, split: str, items: list[Item], picks: list) -> dict:
    """The issue's JSON: accuracy per subject, per category (over its questions) and overall."""
    right: dict[str, list[int]] = defaultdict(list)
    for it, pick in zip(items, picks):
        right[it.question.subject].append(int(pick == it.question.answer))
    table = BENCHMARKS[task]
    subjects = {s: {"name": table[s][0], "category": table[s][1], "accuracy": sum(r) / len(r), "n": len(r)}
                for s, r in right.items()}
    groups: dict[str, list[int]] = defaultdict(list)
    for s, r in right.items():
        groups[table[s][1]] += r
        if task == "cmmlu" and s in CMMLU_CHINA_SPECIFIC:
            groups["China specific"] += r
    categories = {c: {"accuracy": sum(groups[c]) / len(groups[c]), "n": len(groups[c])}
                  for c in [*CATEGORIES, "China specific"] if groups.get(c)}
    every = [x for r in right.values() for x in r]
    return {"task": task, "model": model, "shots": shots, "mode": mode, "split": split, "subjects": subjects,
            "categories": categories, "average": sum(every) / len(every) if every else 0.0,
            "average_subjects": sum(v["accuracy"] for v in subjects.values()) / max(1, len(subjects)),
            "n": len(every), "unanswered": sum(p is None for p in picks)}


def print_report(result: dict, out=None) -> None:
    out = out or sys.stdout
    print(f"\n{result['task']} ({result['split']}, {result['shots']}-shot, {result['mode']}): {result['model']}",
          file=out)
    print(f"{'subject 科目':<44} {'category':<16} {'n':>5} {'acc %':>7}", file=out)
    for s, v in sorted(result["subjects"].items(), key=lambda kv: (kv[1]["category"], kv[0])):
        print(f"{s + ' ' + v['name'] if v['name'] != s.replace('_', ' ') else s:<44} {v['category']:<16} "
              f"{v['n']:>5} {100 * v['accuracy']:>7.2f}", file=out)
    print("-" * 75, file=out)
    for c, v in result["categories"].items():
        print(f"{c:<61} {v['n']:>5} {100 * v['accuracy']:>7.2f}", file=out)
    print(f"{'average 平均 (all questions)':<61} {result['n']:>5} {100 * result['average']:>7.2f}", file=out)
    if result["unanswered"]:
        print(f"{result['unanswered']} replies held no answer letter (counted wrong)", file=out)
