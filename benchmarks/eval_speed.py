"""Benchmark evaluation speed: `zhtune eval`'s letter scoring vs lm-evaluation-harness's `hf` model on the
same C-Eval-layout task, the same weights and the same prompts, in one run.

    flock /tmp/zhtune-heavy.lock python benchmarks/eval_speed.py                  # 120 questions, 0-shot
    flock /tmp/zhtune-heavy.lock python benchmarks/eval_speed.py --shots 5 --questions 60 --repeats 3
    flock /tmp/zhtune-heavy.lock python benchmarks/eval_speed.py --vocab 128000  # a LLaMA-3-sized vocabulary

The model: a random LLaMA body (hidden 768, 7 layers, fp32) with one of three tokenizers, all built here:
--vocab 4000 is benchmarks/infer_speed.py's model (4000-piece Chinese+English SentencePiece); 32000 a
LLaMA-2-sized SentencePiece BPE (byte fallback) and 128000 a LLaMA-3-style byte-level BPE (its pre-tokenizer,
128,000 pieces + 5 specials), both trained on Chinese (the bundled corpus + jieba's dictionary words, MIT) and
the bundled English: real vocabularies make the output head (vocab x hidden) a large share of the work, as in
the models users evaluate. The task: C-Eval's layout (dev/ + val/ CSVs, 4 subjects) written from the bundled held-out
Chinese text, scored with C-Eval's prompt (header, question, "A. …" to "D. …", "答案："). lm-eval runs it as a
local task with the same prompt (description + doc_to_text, target_delimiter "") and the same CSV files.
Both sides: fp32 on CPU, the model loaded before the clock starts; zhtune's time covers prompt building,
tokenization and scoring, lm-eval's covers simple_evaluate. Runs alternate; medians of wall time and of this
process's CPU time (all threads: less moved by other jobs on a shared box); accuracy of each.
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

VOCABS = (4000, 32000, 128000)

SUBJECTS = ["law", "logic", "high_school_physics", "civil_servant"]


def vocab_text() -> list[str]:
    """Chinese + English lines to train a large vocabulary on: the bundled corpora and jieba's dictionary
    words (most frequent first, 8 to a line: merges for whole Chinese words, as real vocabularies have)."""
    import jieba

    from zhtune import tiny

    rows = []
    for line in (Path(jieba.__file__).parent / "dict.txt").read_text(encoding="utf-8").splitlines():
        word, freq, *_ = line.split(" ")
        rows.append((-int(freq), word))
    words = [w for _, w in sorted(rows)]
    return (tiny.asset_lines("zh_corpus.txt") + tiny.asset_lines("en_corpus.txt")
            + ["".join(words[i:i + 8]) for i in range(0, len(words), 8)])


def build_model(root: Path, vocab: int) -> Path:
    """The random LLaMA body (hidden 768, 7 layers) with a `vocab`-entry tokenizer (cached under root)."""
    if vocab == 4000:
        return build(root)
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from zhtune import tiny
    from zhtune.vocab.hf import write_hf_tokenizer

    model_dir = root / f"model-{vocab}"
    if (model_dir / "config.json").is_file():
        return model_dir
    tok_dir = root / f"tokenizer-{vocab}"
    if vocab == 32000:
        write_hf_tokenizer(tiny.train_base_sp(vocab_text(), root / "sp32000.model", vocab_size=32000), tok_dir)
    else:
        tiny.train_bytelevel_base(vocab_text(), tok_dir, "llama3", vocab_size=vocab)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    cfg = tiny.tiny_llama_config(len(tok), hidden_size=768, num_layers=7, num_heads=12, num_kv_heads=12,
                                 intermediate_size=2048, max_position=2048)
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


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


def same_ids(engine, model_dir: Path, items, shots: int) -> None:
    """Both sides score the same ids: lm-eval's hf model encodes context + letter whole and splits it at the
    context's length; zhtune scores its prompt ids and each letter's token after the cue."""
    from transformers import AutoTokenizer

    from zhtune.eval import choice

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    letters = choice.letter_ids(engine, "ceval")
    for it in items:
        context = tok.encode(it.prompt)
        for letter, want in zip("ABCD", letters):
            whole = tok.encode(it.prompt + letter)
            if context != it.ids or whole != context + [want]:
                raise SystemExit(f"lm-eval and zhtune tokenize {it.question.where} differently")


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def run_zhtune(engine, data: Path, shots: int) -> tuple[float, float, float, int]:
    from zhtune.eval import choice

    class Quiet:
        def update(self, _n):
            pass

    wall, cpu = clocks()
    subjects = choice.load("ceval", data, "val", SUBJECTS, shots, None)
    items, _ = choice.prepare(engine, "ceval", subjects, shots)
    picks = choice.score_letters(engine, "ceval", items, Quiet())
    wall, cpu = (a - b for a, b in zip(clocks(), (wall, cpu)))
    right = sum(p == it.question.answer for p, it in zip(picks, items))
    return wall, cpu, right / len(items), len(items)


def run_lm_eval(lm, tasks: list[str], include: Path, shots: int) -> tuple[float, float, float, int]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include), verbosity="ERROR")
    wall, cpu = clocks()
    out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots or None, task_manager=manager, verbosity="ERROR")
    wall, cpu = (a - b for a, b in zip(clocks(), (wall, cpu)))
    n = sum(out["n-samples"][name]["effective"] for name in tasks)
    right = sum(out["results"][name]["acc,none"] * out["n-samples"][name]["effective"] for name in tasks)
    return wall, cpu, right / n, n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=120)
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, choices=VOCABS, default=4000,
                   help="tokenizer size: 4000 (infer_speed's model), 32000 (SentencePiece), 128000 (byte-level)")
    p.add_argument("--lm-eval-batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "zhtune-bench-eval")
    args = p.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from zhtune.eval import choice
    from zhtune.infer.resolve import load_engine

    torch.set_num_threads(args.threads)
    model_dir = build_model(args.work, args.vocab)
    data = write_task(args.work / f"ceval-{args.questions}", args.questions)
    include = args.work / "lm_eval_tasks"
    include.mkdir(parents=True, exist_ok=True)
    tasks = write_lm_eval_tasks(data, include)
    engine = load_engine(str(model_dir), dtype="fp32")
    items, _ = choice.prepare(engine, "ceval", choice.load("ceval", data, "val", SUBJECTS, args.shots, None),
                              args.shots)
    same_ids(engine, model_dir, items, args.shots)
    print(f"model {model_dir}: vocabulary {engine.vocab_size}, {sum(len(it.ids) for it in items) / len(items):.0f} "
          f"prompt tokens per question (lm-eval splits the same text into the same ids)", flush=True)
    lms = {bs: HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=bs)
           for bs in args.lm_eval_batch_sizes}
    times: dict[str, list[tuple[float, float]]] = {}
    accuracy: dict[str, float] = {}
    n = 0
    for r in range(args.repeats):
        for name, run in [("zhtune eval", lambda: run_zhtune(engine, data, args.shots)),
                          *((f"lm-eval hf bs={bs}", lambda lm=lm: run_lm_eval(lm, tasks, include, args.shots))
                            for bs, lm in lms.items())]:
            wall, cpu, acc, n = run()
            times.setdefault(name, []).append((wall, cpu))
            accuracy[name] = acc
            print(f"  repeat {r + 1}: {name:<18} {n / wall:7.2f} questions/s ({wall:6.1f} s wall, {cpu:6.1f} s CPU)"
                  f"  accuracy {acc:.4f}", flush=True)
    engine.close()
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    best = min((k for k in times if k.startswith("lm-eval")), key=wall.get)
    print(f"\nvocab {args.vocab}, {n} questions, {args.shots}-shot, {args.threads} threads, median of {args.repeats}")
    print(f"{'':<20} {'questions/s':>12} {'accuracy':>9} {'zhtune speed-up (wall)':>23} {'(CPU time)':>11}"
          f" {'per repeat (wall)':>18}")
    for name in times:
        pairs = " ".join(f"{w / z:.2f}" for (w, _), (z, _) in zip(times[name], times["zhtune eval"]))
        print(f"{name:<20} {n / wall[name]:>12.2f} {accuracy[name]:>9.4f} {wall[name] / wall['zhtune eval']:>22.2f}x"
              f" {cpu[name] / cpu['zhtune eval']:>10.2f}x {pairs:>18}")
    print(f"zhtune vs the best lm-eval ({best}): {wall[best] / wall['zhtune eval']:.2f}x wall, "
          f"{cpu[best] / cpu['zhtune eval']:.2f}x CPU time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
