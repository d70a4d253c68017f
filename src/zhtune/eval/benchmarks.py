"""C-Eval, CMMLU and MMLU read from their public file layouts in a local folder, and the prompts built
from them (C-Eval's own: the question, "A. …" to "D. …", then "答案："). Used by zhtune.eval.choice.

    C-Eval  DIR/{dev,val,test}/{subject}_{split}.csv   header id,question,A,B,C,D,answer[,explanation]
    CMMLU   DIR/{dev,test}/{subject}.csv               header ,Question,A,B,C,D,Answer
    MMLU    DIR/{dev,val,test}/{subject}_{split}.csv   no header: question,A,B,C,D,answer

Every bad row is a ZhtuneError naming file:row; nothing is guessed.
"""

from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass
from pathlib import Path

from zhtune.errors import ZhtuneError
from zhtune.eval.subjects import BENCHMARKS

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Layout:
    splits: tuple[str, ...]
    default_split: str
    pattern: str                         # file path inside DIR
    columns: tuple[str, ...] | None      # header names of question, A-D, answer; None: no header (positional)
    header: str                          # prompt's first line ({name}: the subject's display name)
    cue: str                             # what the answer letter follows
    sep: str                             # between the cue and the letter in a worked example


LAYOUTS = {
    "ceval": Layout(("dev", "val", "test"), "val", "{split}/{subject}_{split}.csv",
                    ("question", "A", "B", "C", "D", "answer"),
                    "以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n", "答案：", ""),
    "cmmlu": Layout(("dev", "test"), "test", "{split}/{subject}.csv", ("Question", "A", "B", "C", "D", "Answer"),
                    "以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n", "答案：", ""),
    "mmlu": Layout(("dev", "val", "test"), "test", "{split}/{subject}_{split}.csv", None,
                   "The following are multiple choice questions (with answers) about {name}.\n\n", "Answer:", " "),
}


@dataclass
class Question:
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str          # "A".."D"
    where: str           # file:row


def read_split(task: str, data: Path, subject: str, split: str) -> list[Question]:
    """One subject's questions of one split, every row checked (file:row on the first bad one)."""
    layout = LAYOUTS[task]
    path = data / layout.pattern.format(split=split, subject=subject)
    if not path.is_file():
        raise ZhtuneError(f"{subject}: no {split} file", where=str(path),
                          expected=f"{task}'s layout: DIR/{layout.pattern}")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        index = list(range(6))
        if layout.columns:
            head = next(reader, None) or []
            missing = [c for c in layout.columns if c not in head]
            if missing:
                raise ZhtuneError(f"column {missing[0]!r} is missing (header: {','.join(head)})",
                                  where=f"{path}:1", expected="a header with " + ",".join(layout.columns))
            index = [head.index(c) for c in layout.columns]
        out = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            out.append(_question(subject, row, index, f"{path}:{reader.line_num}"))
    return out


def _question(subject: str, row: list[str], index: list[int], where: str) -> Question:
    if len(row) <= max(index):
        raise ZhtuneError(f"row has {len(row)} fields", where=where,
                          expected="question, A, B, C, D and answer fields")
    question, a, b, c, d, answer = (row[i] for i in index)
    answer = answer.strip()
    if answer not in LETTERS:
        raise ZhtuneError(f"answer {answer!r} is not one of A, B, C, D", where=where,
                          expected="an answer letter A-D",
                          hint="C-Eval's test split has no public answers: use --split val")
    return Question(subject, question, (a, b, c, d), answer, where)


def find_subjects(task: str, data: Path, split: str, wanted: list[str] | None) -> list[str]:
    """The subjects to evaluate: --subjects (each checked against the benchmark's list and the folder),
    else every known subject with a file for `split`."""
    known = BENCHMARKS[task]
    layout = LAYOUTS[task]
    if not data.is_dir():
        raise ZhtuneError(f"not a folder: {data}", where="--data", expected=f"{task}'s folder with {layout.pattern}")
    if split not in layout.splits:
        raise ZhtuneError(f"{task} has no {split!r} split", where="--split", expected=" | ".join(layout.splits))
    for name in wanted or []:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            raise ZhtuneError(f"unknown {task} subject {name!r}", where="--subjects",
                              expected=f"one of the {len(known)} {task} subjects",
                              hint=f"did you mean {close[0]}?" if close else f"e.g. {', '.join(list(known)[:4])}")
    present = [s for s in (wanted or known) if (data / layout.pattern.format(split=split, subject=s)).is_file()]
    if wanted and len(present) < len(wanted):
        lost = next(s for s in wanted if s not in present)
        where = str(data / layout.pattern.format(split=split, subject=lost))
        raise ZhtuneError(f"{lost}: no {split} file", where=where,
                          expected=f"{task}'s layout: DIR/{layout.pattern}")
    if not present:
        raise ZhtuneError(f"no {task} {split} files in {data}", where="--data",
                          expected=f"files named {layout.pattern.format(split=split, subject='SUBJECT')} "
                                   f"(e.g. {list(known)[0]})", hint="point --data at the unpacked benchmark folder")
    return present


def display_name(task: str, subject: str) -> str:
    return BENCHMARKS[task][subject][0]


def format_question(task: str, q: Question, with_answer: bool) -> str:
    layout = LAYOUTS[task]
    text = q.question.strip() + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, q.options))
    text += "\n" + layout.cue
    return text + (f"{layout.sep}{q.answer}\n\n" if with_answer else "")


def build_prompt(task: str, q: Question, shots: list[Question]) -> str:
    """The benchmark's header line, k worked dev examples, then the question up to the answer cue."""
    header = LAYOUTS[task].header.format(name=display_name(task, q.subject))
    return header + "".join(format_question(task, s, True) for s in shots) + format_question(task, q, False)
