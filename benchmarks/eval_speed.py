"""Benchmark evaluation speed: `zhtune eval`'s letter scoring vs lm-evaluation-harness's `hf` model on the
same C-Eval-layout task, the same weights and the same prompts, in one run.

    flock /tmp/zhtune-heavy.lock python benchmarks/eval_speed.py                  # 120 questions, 0-shot
    flock /tmp/zhtune-heavy.lock python benchmarks/eval_speed.py --shots 5 --questions 60 --repeats 3

The model is benchmarks/infer_speed.py's random LLaMA (hidden 768, 7 layers, 4000-piece Chinese+English
SentencePiece). The task: C-Eval's layout (dev/ + val/ CSVs, 4 subjects) written from the bundled held-out
Chinese text, scored with C-Eval's prompt (header, question, "A. …" to "D. …", "答案："). lm-eval runs it as a
local task with the same prompt (description + doc_to_text, target_delimiter "") and the same CSV files.
Both sides: fp32 on CPU, the model loaded before the clock starts; zhtune's time covers prompt building,
tokenization and scoring, lm-eval's covers simple_evaluate. Runs alternate; medians; accuracy of each.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from infer_speed import build  # noqa: E402  (the same model as the inference benchmark)

SUBJECTS = ["law", "logic", "high_school_physics", "civil_servant"]


def write_task(root: Path, questions: int, seed: int = 0) -> Path:
    """C-Eval's layout with questions cut from held-out Chinese text; options are other phrases."""
    from zhtune import tiny

    text = [line for line in tiny.asset_lines("zh_heldout.txt") + tiny.asset_lines("zh_corpus.txt") if len(line) > 40]
    rng = random.Random(seed)
    per = -(-questions // len(SUBJECTS))
    for subject in SUBJECTS:
        for split, n in (("dev", 5), ("val", per)):
            path = root / split / f"{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
                for i in range(n):
                    line = rng.choice(text)
                    start = rng.randrange(0, len(line) - 30)
                    options = [(lambda s: s[rng.randrange(0, len(s) - 8):][:8])(rng.choice(text)) for _ in range(4)]
                    w.writerow([i, line[start:start + 30] + "？", *options, rng.choice("ABCD")])
    return root


TASK_YAML = """
task: {name}
dataset_path: csv
dataset_kwargs:
  data_files:
    val: {val}
    dev: {dev}
validation_split: val
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "以下是中国关于{zh}考试的单项选择题，请选出其中的正确答案。\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_lm_eval_tasks(data: Path, root: Path) -> list[str]:
    from zhtune.eval.subjects import CEVAL

    names = []
    for subject in SUBJECTS:
        name = f"zhtune_ceval_{subject}"
        (root / f"{name}.yaml").write_text(TASK_YAML.format(
            name=name, zh=CEVAL[subject][0], val=data / "val" / f"{subject}_val.csv",
            dev=data / "dev" / f"{subject}_dev.csv"), encoding="utf-8")
        names.append(name)
    return names


def run_zhtune(engine, data: Path, shots: int) -> tuple[float, float, int]:
    from zhtune.eval import choice

    class Quiet:
        def update(self, _n):
            pass

    t = time.perf_counter()
    subjects = choice.load("ceval", data, "val", SUBJECTS, shots, None)
    items, _ = choice.prepare(engine, "ceval", subjects, shots)
    picks = choice.score_letters(engine, "ceval", items, Quiet())
    seconds = time.perf_counter() - t
    right = sum(p == it.question.answer for p, it in zip(picks, items))
    return seconds, right / len(items), len(items)


def run_lm_eval(lm, tasks: list[str], include: Path, shots: int) -> tuple[float, float, int]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include), verbosity="ERROR")
    t = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots or None, task_manager=manager, verbosity="ERROR")
    seconds = time.perf_counter() - t
    n = sum(out["n-samples"][name]["effective"] for name in tasks)
    right = sum(out["results"][name]["acc,none"] * out["n-samples"][name]["effective"] for name in tasks)
    return seconds, right / n, n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=120)
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lm-eval-batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "zhtune-bench-eval")
    args = p.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from zhtune.infer.resolve import load_engine

    torch.set_num_threads(args.threads)
    model_dir = build(args.work)
    data = write_task(args.work / f"ceval-{args.questions}", args.questions)
    include = args.work / "lm_eval_tasks"
    include.mkdir(parents=True, exist_ok=True)
    tasks = write_lm_eval_tasks(data, include)
    engine = load_engine(str(model_dir), dtype="fp32")
    lms = {bs: HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=bs)
           for bs in args.lm_eval_batch_sizes}
    times: dict[str, list[float]] = {}
    accuracy: dict[str, float] = {}
    n = 0
    for r in range(args.repeats):
        for name, run in [("zhtune eval", lambda: run_zhtune(engine, data, args.shots)),
                          *((f"lm-eval hf bs={bs}", lambda lm=lm: run_lm_eval(lm, tasks, include, args.shots))
                            for bs, lm in lms.items())]:
            seconds, acc, n = run()
            times.setdefault(name, []).append(seconds)
            accuracy[name] = acc
            print(f"  repeat {r + 1}: {name:<18} {n / seconds:7.2f} questions/s  accuracy {acc:.4f}", flush=True)
    engine.close()
    best = min(statistics.median(v) for k, v in times.items() if k.startswith("lm-eval"))
    print(f"\n{n} questions, {args.shots}-shot, {args.threads} threads, median of {args.repeats}")
    print(f"{'':<20} {'questions/s':>12} {'accuracy':>9} {'speed-up vs best lm-eval':>26}")
    for name, v in times.items():
        med = statistics.median(v)
        print(f"{name:<20} {n / med:>12.2f} {accuracy[name]:>9.4f} {best / med:>25.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
