"""DPO training throughput on CPU: `zhtune train stage=dpo` with LoRA vs full fine-tuning, same run.

    python benchmarks/dpo_throughput.py                       # tiny model (hidden 64, 2 layers), ~2-4 minutes
    python benchmarks/dpo_throughput.py --hidden 512 --layers 8 --steps 6   # a ~30M-parameter model

Same random Llama, same preference pairs (the shipped Chinese dpo_pairs asset, tokenised by a small
English SentencePiece model, so Chinese falls back to bytes: ~170 tokens per pair), same batch size.
Each measurement builds the trainer through zhtune's own dpo stage (prepare_policy ->
build_preference_dataset -> make_preference_trainer) and times optimizer steps after --warmup steps.
A DPO step is a policy forward+backward on chosen and rejected rows plus a no-grad reference forward
(LoRA: the adapter disabled; full: log-probs precomputed once before training, not timed).
samples/s = preference pairs per second; tokens/s = non-padding tokens of chosen and rejected rows;
"per CPU-second" divides by this process's CPU time instead of wall time (steadier on a shared machine).
Columns alternate (lora, full, lora, full, ...) and the medians over --repeats are shown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_model(root: Path, hidden: int, layers: int) -> Path:
    from zhtune import tiny

    tok = root / "tok"
    if hidden == 64 and layers == 2:
        return tiny.build_tiny_base(root / "model")          # exactly the tests' tiny model
    sp = tiny.train_base_sp(tiny.asset_lines("en_corpus.txt"), root / "sp" / "tokenizer.model", vocab_size=1000)
    from zhtune.vocab.hf import write_hf_tokenizer

    write_hf_tokenizer(sp, tok)
    return tiny.build_tiny_model(root / "model", vocab_size=1000, seed=0, tokenizer_dir=tok, hidden_size=hidden,
                                 num_layers=layers, num_heads=max(1, hidden // 64), num_kv_heads=max(1, hidden // 64),
                                 intermediate_size=hidden * 8 // 3 // 32 * 32 + 32)


def measure(model_dir: Path, out: Path, finetuning: str, steps: int, warmup: int, batch: int) -> dict:
    from transformers import TrainerCallback

    from zhtune import tiny
    from zhtune.config import TRAIN_ALIASES, TrainConfig, load_config
    from zhtune.data.preference import build_preference_dataset
    from zhtune.data.templates import get_template
    from zhtune.train.dpo import make_preference_trainer, prepare_policy

    cfg = load_config(TrainConfig, None, [
        "stage=dpo", f"model_name_or_path={model_dir}", f"dataset=[{tiny.asset('dpo_pairs.jsonl')}]",
        f"output_dir={out}", "overwrite_output_dir=true", f"finetuning_type={finetuning}", "template=chinese-alpaca",
        "cutoff_len=512", f"per_device_train_batch_size={batch}", f"max_steps={warmup + steps}", "save_steps=100000",
        "logging_steps=100000", "learning_rate=1e-4", "report_to=none",
        "training_args={include_num_input_tokens_seen: non_padding, disable_tqdm: true}"], TRAIN_ALIASES)
    template = get_template(cfg.template)
    tokenizer, model, _, peft_config = prepare_policy(cfg, template)
    data = build_preference_dataset(cfg, tokenizer, template)
    trainer = make_preference_trainer(cfg, model, tokenizer, data, out, peft_config)
    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                marks["t0"], marks["c0"], marks["n0"] = time.perf_counter(), time.process_time(), \
                    state.num_input_tokens_seen
            if state.global_step == warmup + steps:
                marks["t1"], marks["c1"], marks["n1"] = time.perf_counter(), time.process_time(), \
                    state.num_input_tokens_seen

    trainer.add_callback(Clock())
    trainer.train()
    seconds, cpu = marks["t1"] - marks["t0"], marks["c1"] - marks["c0"]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    # per CPU-second of this process: far steadier than wall time on a machine shared with other jobs
    return {"samples_s": steps * batch / seconds, "tokens_s": (marks["n1"] - marks["n0"]) / seconds,
            "samples_cpu_s": steps * batch / cpu, "tokens_cpu_s": (marks["n1"] - marks["n0"]) / cpu,
            "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, list[dict]] = {"lora": [], "full": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_model(root, args.hidden, args.layers)
        for r in range(args.repeats):
            for kind in ("lora", "full"):
                results[kind].append(measure(model_dir, root / f"out-{kind}-{r}", kind, args.steps, args.warmup,
                                             args.batch))
                last = results[kind][-1]
                print(f"  repeat {r + 1} {kind}: {last['samples_s']:.2f} pairs/s, {last['tokens_s']:.0f} tokens/s; "
                      f"per CPU-second {last['samples_cpu_s']:.2f} pairs, {last['tokens_cpu_s']:.0f} tokens",
                      flush=True)
    metrics = ("samples_s", "tokens_s", "samples_cpu_s", "tokens_cpu_s")
    med = {k: {m: statistics.median(x[m] for x in v) for m in metrics} for k, v in results.items()}
    print(f"\nDPO throughput, hidden {args.hidden} x {args.layers} layers, batch {args.batch} pairs, "
          f"{args.threads} threads, median of {args.repeats} x {args.steps} steps")
    print("| finetuning | trainable params | pairs/s | tokens/s | pairs per CPU-s | tokens per CPU-s | "
          "ratio to full (wall) | ratio to full (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in ("lora", "full"):
        m = med[kind]
        print(f"| {kind} | {results[kind][0]['trainable']:,} | {m['samples_s']:.2f} | {m['tokens_s']:.0f} | "
              f"{m['samples_cpu_s']:.2f} | {m['tokens_cpu_s']:.0f} | "
              f"{m['samples_s'] / med['full']['samples_s']:.2f}x | "
              f"{m['samples_cpu_s'] / med['full']['samples_cpu_s']:.2f}x |")


if __name__ == "__main__":
    main()
