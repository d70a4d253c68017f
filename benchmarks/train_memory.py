"""Peak memory and step time of one SFT step and one PT step on a large vocabulary: zhtune vs plain
transformers + peft, and `zhtune estimate`'s prediction for the same run.

    python benchmarks/train_memory.py                                         # ~10 GiB RSS at its peak
    python benchmarks/train_memory.py --layers 2 --seq 1024 --repeats 1       # smaller, quicker

It takes the shared heavy-job lock (--lock, flock(2) on /tmp/zhtune-heavy.lock) around each pair of runs
(plain, then zhtune, of one stage), so other heavy jobs wait only minutes and each pair sees the same box.

The model is a random Llama with LLaMA-3's vocabulary (128,256 rows, untied head), hidden 1024,
4 layers (intermediate 2816, 16 heads, 8 key/value heads), LoRA r=8 on every linear projection
(dropout 0.05), fp32 on CPU; a batch is 2 rows x 2048 tokens. PT: packed documents of 512 tokens, every
next token labelled. SFT: packed samples of 512 tokens, the first 40% of each a prompt (label -100).
Columns (each run in its own subprocess, run in turn so the machine's drift hits all of them alike):

- plain: transformers' Trainer on the peft model; the collator gives only input_ids, labels and
  position_ids, so the model computes logits over every position and transformers' loss over them.
- zhtune: what `zhtune train` runs: zhtune's adapter (attach_adapter), its collator (only labelled
  positions reach the head) and its Trainer (train/loss.py: the chunked LM-head loss).

Each run trains 2 optimizer steps (AdamW) and reports the second step's time and the process's peak
RSS (VmHWM) above its floor (the peak after importing torch, transformers, peft, zhtune), or on a GPU
torch.cuda.max_memory_allocated. `zhtune estimate`'s CPU prediction for each run (fp32, no CUDA
context: Estimate.allocated) is printed beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time

VOCAB = 128256


def _vm(key: str) -> int:
    """A /proc/self/status field in bytes (VmHWM: peak RSS, VmRSS: current)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def batch_rows(stage: str, rows: int, seq: int, seed: int) -> list[dict]:
    """Packed rows of 512-token samples: pt labels every token but each sample's first; sft masks 40%."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        ids = torch.randint(0, VOCAB, (seq,), generator=g)
        labels, position = ids.clone(), torch.arange(seq) % 512
        starts = position == 0
        labels[starts] = -100
        if stage == "sft":
            labels[position < 0.4 * 512] = -100
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "position_ids": position.tolist()})
    return out


def run_column(args) -> dict:
    """One column in this (child) process: build the model, train 2 steps, report time and peak memory."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from zhtune.config import TrainConfig
    from zhtune.data.sft import Collator
    from zhtune.model.adapter import attach_adapter
    from zhtune.train.loss import LossTrainer
    from zhtune.train.memory import resolve_fused_loss

    cuda = args.device == "cuda"
    floor = _vm("VmHWM")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8,
                         max_position_embeddings=args.seq, tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    cfg = TrainConfig(stage=args.stage, lora_rank=8, lora_alpha=16, lora_dropout=0.05,
                      fused_loss="chunked" if args.column == "zhtune" else "plain")
    model = attach_adapter(model, cfg, new_rows=())                      # LoRA r=8 on every projection
    rows = batch_rows(args.stage, args.batch * 2, args.seq, seed=1)
    steps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            steps.append(-time.perf_counter())

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            steps[-1] += time.perf_counter()

    targs = TrainingArguments(output_dir=args.out, per_device_train_batch_size=args.batch, max_steps=2,
                              learning_rate=1e-4, optim="adamw_torch", save_strategy="no", report_to="none",
                              logging_steps=1, use_cpu=not cuda, dataloader_num_workers=0, seed=0,
                              remove_unused_columns=False, bf16=cuda)
    if args.column == "zhtune":
        loss = resolve_fused_loss(cfg, model)[0]
        trainer = LossTrainer(model=model, args=targs, train_dataset=rows, data_collator=Collator(pad_id=0),
                              callbacks=[Clock()], fused_loss=loss)
    else:
        trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Clock()],
                          data_collator=Collator(pad_id=0, label_logits_only=False))
    if cuda:
        model.to("cuda")
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else _vm("VmHWM") - floor
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": steps[-1], "peak": peak, "loss": losses[0], "transformers": transformers.__version__}


def predicted(args, stage: str, column: str) -> float:
    """zhtune estimate's CPU peak for the run (fp32, no CUDA context): the allocated bytes."""
    import dataclasses

    from zhtune.config import TrainConfig
    from zhtune.train import estimate as E

    shape = E.Shape("bench", args.hidden, args.intermediate, args.layers, 16, 8, VOCAB)
    cfg = TrainConfig(stage=stage, lora_rank=8, lora_dropout=0.05, per_device_train_batch_size=args.batch,
                      cutoff_len=args.seq, bf16=False, optim="adamw_torch",
                      fused_loss="chunked" if column == "zhtune" else "plain")
    plan = dataclasses.replace(E.plan_from_config(cfg), cuda=args.device == "cuda", half=args.device == "cuda")
    return E.estimate(shape, plan).allocated


def child(args, stage: str, column: str) -> dict:
    cmd = [sys.executable, __file__, "--column", column, "--stage", stage, "--out", args.out,
           *(f"--{k}={getattr(args, k)}" for k in ("hidden", "intermediate", "layers", "seq", "batch", "device",
                                                  "threads"))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{stage} {column} failed")
    return json.loads(lines[-1][7:])


@contextlib.contextmanager
def heavy_lock(path: str):
    """flock(2) on the shared lock file (what `flock PATH CMD` takes); '' for none."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs of every column (medians reported)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--lock", default="/tmp/zhtune-heavy.lock", help="lock file held around each pair of runs "
                    "('' for none)")
    ap.add_argument("--column", help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.column:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_column(args)), flush=True)
        return
    import tempfile

    args.out = args.out or tempfile.mkdtemp(prefix="zhtune-train-memory-")
    print(f"model: random Llama, vocab {VOCAB}, hidden {args.hidden}, {args.layers} layers, LoRA r=8 on every "
          f"projection; batch {args.batch} x {args.seq}; {args.device}, {args.threads} torch threads; "
          f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for stage in ("pt", "sft"):
            with heavy_lock(args.lock):
                for column in ("plain", "zhtune"):
                    r = child(args, stage, column)
                    runs.setdefault((stage, column), []).append(r)
                    print(f"  [{rep + 1}/{args.repeats}] {stage} {column}: peak {r['peak'] / 2**30:.2f} GiB, "
                          f"step {r['seconds']:.1f} s, loss {r['loss']:.4f}, load {os.getloadavg()[0]:.2f}",
                          flush=True)
    report(args, runs)


def report(args, runs: dict) -> None:
    gib = 2**30
    unit = "peak above import floor (RSS)" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    print(f"\n| step | column | {unit}, GiB | vs plain | step time, s | vs plain | estimate, GiB "
          "| estimate / measured |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for stage in ("pt", "sft"):
        base = runs[(stage, "plain")]
        base_peak = statistics.median(r["peak"] for r in base)
        for column in ("plain", "zhtune"):
            rs = runs[(stage, column)]
            peak = statistics.median(r["peak"] for r in rs)
            secs = statistics.median(r["seconds"] for r in rs)
            # time ratio: median of the per-repeat ratios (each pair ran back to back)
            ratio = statistics.median(r["seconds"] / b["seconds"] for r, b in zip(rs, base))
            est = predicted(args, stage, column)
            print(f"| {stage} | {column} | {peak / gib:.2f} | {peak / base_peak:.2f}× | {secs:.1f} | {ratio:.2f}× | "
                  f"{est / gib:.2f} | {est / peak:.2f} |")
    print("load average at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
