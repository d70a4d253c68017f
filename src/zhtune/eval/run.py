"""`zhtune eval`: is the model better at Chinese? Multiple-choice benchmarks (C-Eval, CMMLU, MMLU) by
answer-letter log-probs or by generation, bits per character of held-out text, and ROUGE/BLEU of
generations; all over the one inference engine (hf, vLLM, llama.cpp).

    zhtune eval --model out/merged --task ceval --data ceval-exam --shots 5 --output ceval.json
    zhtune eval --model base --model out/merged --task ppl --data heldout.txt
    zhtune eval --model out/sft --task generate --data test.jsonl --output gen.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from zhtune.errors import ZhtuneError

TASKS = ("ceval", "cmmlu", "mmlu", "ppl", "generate")
# how the files this command writes begin: --overwrite replaces only such a file (io.check_output_file)
RESULT_MAGIC = b'{\n  "task": '
PREDICTIONS_MAGIC = b'{"source": '

_EXAMPLES = """
zhtune eval --model out/merged --task ceval --data ceval-exam                 # val split, 0-shot, letter log-probs
zhtune eval --model base --lora out/sft --task cmmlu --data cmmlu --shots 5 --output cmmlu.json
zhtune eval --model out/sft --task ceval --data ceval-exam --mode generate    # chat models: reply + answer extraction
zhtune eval --model out/merged --task mmlu --data mmlu --subjects anatomy virology --limit 20
zhtune eval --model base --model out/merged --task ppl --data heldout.txt     # bits per character, side by side
zhtune eval --model out/merged.q4_k_m.gguf --task ppl --data heldout.txt      # llama.cpp
zhtune eval --model out/sft --task generate --data test.jsonl --output gen.json   # ROUGE/BLEU + gen_predictions.jsonl
"""


def build_parser() -> argparse.ArgumentParser:
    from zhtune.args import bounded_int, make_parser
    from zhtune.infer.options import add_gen_args, add_model_args

    p = make_parser("eval", "评测：C-Eval / CMMLU / MMLU 选择题、每字符比特数、生成指标 (ROUGE / BLEU)。\n"
                            "Evaluate a model: C-Eval / CMMLU / MMLU accuracy, bits per character, ROUGE/BLEU.",
                    _EXAMPLES)
    add_model_args(p, several=True)
    p.add_argument("--task", required=True, choices=TASKS, help="benchmark, ppl (bits per character) or generate")
    p.add_argument("--data", required=True, type=Path,
                   help="benchmark folder (public layout), text file (ppl) or .jsonl/.json (generate)")
    p.add_argument("--split", default=None, help="benchmark split to score (default: ceval val, cmmlu/mmlu test)")
    p.add_argument("--shots", type=bounded_int("--shots", 0, 64), default=0, help="worked dev examples per prompt")
    p.add_argument("--subjects", nargs="+", default=None, metavar="SUBJECT", help="only these subjects")
    p.add_argument("--mode", choices=("logprob", "generate"), default="logprob",
                   help="benchmarks: answer-letter log-probs, or a reply with the chat template + answer extraction")
    p.add_argument("--limit", type=bounded_int("--limit", 1, 1 << 30), default=None,
                   help="at most N questions per subject / lines / records (a quick run)")
    p.add_argument("--output", type=Path, default=None, help="write the results JSON here (generate: required; "
                                                              "predictions go beside it)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace results (and predictions) an earlier zhtune eval wrote at --output")
    add_gen_args(p, "eval")
    return p


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="q" if desc != "ppl" else "line", file=sys.stderr, dynamic_ncols=True)


def _engine(args: argparse.Namespace, model: str):
    from zhtune.infer.options import engine_from_args

    return engine_from_args(argparse.Namespace(**{**vars(args), "model": model}))


def _model_name(args: argparse.Namespace, model: str) -> str:
    return " + ".join([model, *args.lora])


def _check(args: argparse.Namespace) -> None:
    """Flag combinations, before any model loads."""
    from zhtune.infer.options import params_from_args

    params_from_args(args, "eval")   # an out-of-range sampling flag is named whatever the task
    if len(args.model) > 1 and args.task != "ppl":
        raise ZhtuneError(f"{len(args.model)} --model given for --task {args.task}", where="--model",
                          expected="one --model (several only for --task ppl)")
    if len(args.model) > 1 and args.lora:
        raise ZhtuneError("--lora with several --model: which model would it apply to?", where="--lora",
                          hint="pass each adapter folder as its own --model")
    if args.task == "generate" and args.output is None:
        raise ZhtuneError("--task generate writes predictions beside the scores", where="--output",
                          expected="--output FILE.json")
    if args.task in ("ppl", "generate") and not args.data.is_file():
        raise ZhtuneError(f"not a file: {args.data}", where="--data",
                          expected="a text file (ppl)" if args.task == "ppl" else "a .jsonl / .json file")
    if args.task in ("ppl", "generate") and (args.shots or args.subjects or args.split or args.mode != "logprob"):
        raise ZhtuneError(f"--shots/--subjects/--split/--mode are for benchmarks, not --task {args.task}",
                          where="--task", expected="ceval | cmmlu | mmlu with those flags")
    if args.output is not None:
        _check_output(args.output, args.overwrite)
        if args.task == "generate":
            _check_output(_predictions(args.output), args.overwrite, PREDICTIONS_MAGIC, "predictions file")


def _predictions(output: Path) -> Path:
    """Where --task generate writes its predictions: beside the scores."""
    return output.with_name(output.stem + "_predictions.jsonl")


def _check_output(path: Path, overwrite: bool, magic: bytes = RESULT_MAGIC, what: str = "zhtune eval result") -> None:
    """--output can be written (checked now, not after the whole evaluation); nothing is created yet. An
    existing file is replaced only with --overwrite, and only one this command wrote."""
    from zhtune.io import check_output_file

    if path.is_dir():
        raise ZhtuneError(f"--output is a folder: {path}", where="--output", expected="a .json file path")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    try:   # a real try (root passes every permission check, yet cannot write into /proc)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ZhtuneError(f"cannot write {path}: {exc.strerror} in {folder}", where="--output",
                          expected="a path in a folder you can write") from None
    check_output_file(path, overwrite, magic, what)


def _write(path: Path | None, result: dict) -> None:
    if path is not None:
        from zhtune.io import atomic_write_json

        atomic_write_json(path, result)
        print(f"结果已写入 results written: {path}")


def run_benchmark(args: argparse.Namespace) -> dict:
    from zhtune.eval import choice
    from zhtune.eval.benchmarks import LAYOUTS
    from zhtune.infer.options import params_from_args

    params = params_from_args(args, "eval")
    split = args.split or LAYOUTS[args.task].default_split
    subjects = choice.load(args.task, args.data, split, args.subjects, args.shots, args.limit)  # before the model
    with _engine(args, args.model[0]) as engine:
        items, shortened = choice.prepare(engine, args.task, subjects, args.shots)
        with _progress(len(items), args.task) as bar:
            if args.mode == "logprob":
                picks = choice.score_letters(engine, args.task, items, bar)
            else:
                picks = choice.generate_letters(engine, items, params, bar)
    result = choice.report(args.task, _model_name(args, args.model[0]), args.shots, args.mode, split, items, picks)
    result["shots_reduced"] = shortened
    choice.print_report(result)
    if shortened:
        print(f"{shortened} prompts had fewer than {args.shots} examples to fit the context")
    return result


def run_ppl(args: argparse.Namespace) -> dict:
    from zhtune.eval.ppl import bits_per_char, read_lines

    total = sum(1 for _ in read_lines(args.data, args.limit))
    rows = {}
    for model in args.model:
        with _engine(args, model) as engine, _progress(total, "ppl") as bar:
            rows[_model_name(args, model)] = bits_per_char(engine, args.data, args.limit, bar)
    print(f"\nbits per character 每字符比特数 on {args.data} (lower is better)")
    print(f"{'model':<48} {'lines':>6} {'chars':>8} {'tokens':>8} {'tok/char':>8} {'bits/char':>9}")
    for name, r in rows.items():
        print(f"{name[-48:]:<48} {r['lines']:>6} {r['chars']:>8} {r['tokens']:>8} {r['tokens_per_char']:>8.3f} "
              f"{r['bits_per_char']:>9.4f}")
    return {"task": "ppl", "data": str(args.data), "models": rows}


def run_generate(args: argparse.Namespace) -> dict:
    from zhtune.eval.generation import evaluate, read_pairs
    from zhtune.infer.options import params_from_args
    from zhtune.io import atomic_write_text

    params = params_from_args(args, "eval")
    total = len(read_pairs(str(args.data), args.limit))   # the data is checked before the model loads
    with _engine(args, args.model[0]) as engine, _progress(total, "generate") as bar:
        scores, rows = evaluate(engine, str(args.data), params, args.limit, bar)
    import json

    predictions = _predictions(args.output)
    atomic_write_text(predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print("\n" + "\n".join(f"{k:<20} {v}" for k, v in scores.items()))
    print(f"预测已写入 predictions written: {predictions}")
    return {"task": "generate", "model": _model_name(args, args.model[0]), "data": str(args.data), **scores,
            "predictions": str(predictions)}


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check(args)
    run = {"ppl": run_ppl, "generate": run_generate}.get(args.task, run_benchmark)
    _write(args.output, run(args))
    return 0
