"""Data at corpus scale: `zhtune train stage=pt`'s data preparation vs a Chinese-LLaMA-Alpaca-style script
(load_dataset("text") + map(tokenize) + map(group_texts)): peak RSS and tokens/s at 50, 200 and 800 MB of
Chinese text with 1 and 2 processes; and training tokens/s with streaming=true vs the prepared cache.

    python benchmarks/data_scale.py                          # everything: ~1.5 h on 2 quiet cores, ~10 GB of scratch
    python benchmarks/data_scale.py --sizes 50 --repeats 1   # a quick look
    python benchmarks/data_scale.py --scratch /big/tmp       # where corpora and caches go (deleted at the end)
    python benchmarks/data_scale.py --sizes 800 --skip-training   # one part at a time (--skip-prep: training only)
    python benchmarks/data_scale.py --sizes 800 --processes 1 --repeats 1 --skip-training   # 2 columns, not 4

The corpora are made from the shipped Chinese assets: documents of 1-8 random lines of zh_corpus.txt and
zh_heldout.txt (seeded), written to the scratch folder, never to the repository. The tokenizer is a
SentencePiece BPE of 8,000 pieces trained on the assets (Chinese-aware: ~4.5 bytes of text per token).
Every column is a fresh process; its peak RSS is the largest sum of RSS over the process and its workers
(and peak_pss_mib in the JSON rows the same with PSS, which counts the pages workers share once),
sampled every 0.1 s; its time is the preparation call alone (imports and loading the tokenizer excluded).
tokens/s divides the same token count (zhtune's: documents + EOS) by each column's time, so the ratio of
two columns is the ratio of their times. TOKENIZERS_PARALLELISM=false everywhere: processes are the only
parallelism, as `num_proc` / `preprocessing_num_workers` say. Columns are interleaved; medians are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"

BLOCK = 512


# --- setup: corpora and tokenizer (in the scratch folder) ----------------------------------------------

def make_corpus(path: Path, megabytes: int, seed: int = 0) -> Path:
    from zhtune import tiny

    if path.is_file() and path.stat().st_size >= megabytes * 1_000_000:
        return path
    lines = tiny.asset_lines("zh_corpus.txt") + tiny.asset_lines("zh_heldout.txt")
    rng, size = random.Random(seed), 0
    with open(path, "w", encoding="utf-8") as handle:
        while size < megabytes * 1_000_000:
            doc = "".join(rng.choice(lines) for _ in range(rng.randint(1, 8))) + "\n"
            handle.write(doc)
            size += len(doc.encode("utf-8"))
    return path


def make_tokenizer(folder: Path) -> Path:
    from zhtune import tiny
    from zhtune.vocab.hf import write_hf_tokenizer

    if not (folder / "tokenizer_config.json").is_file():
        sp = tiny.train_base_sp(tiny.asset_lines("zh_corpus.txt") + tiny.asset_lines("en_corpus.txt"),
                                folder.parent / "sp" / "tokenizer.model", vocab_size=8000)
        write_hf_tokenizer(sp, folder)
    return folder


# --- the columns (each runs in its own process: `--worker NAME`) -----------------------------------------

def work_zhtune(corpus: str, tokenizer: str, cache: str, procs: int) -> dict:
    import datasets  # noqa: F401  (imported before the clock starts, as the baseline's is)
    from transformers import AutoTokenizer

    from zhtune.config import TrainConfig
    from zhtune.data.pretrain import build_pretrain_dataset

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = TrainConfig(stage="pt", dataset=[corpus], cutoff_len=BLOCK, data_cache=cache,
                      preprocessing_num_workers=procs)
    start = time.perf_counter()
    data = build_pretrain_dataset(cfg, tok)
    return {"seconds": time.perf_counter() - start, "tokens": data.stats["tokens"], "rows": len(data.train)}


def work_cla(corpus: str, tokenizer: str, cache: str, procs: int) -> dict:
    """What run_clm_pt_with_peft.py of Chinese-LLaMA-Alpaca does with one file (without its save_to_disk)."""
    from itertools import chain

    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)

    def tokenize_function(examples):
        return tok(examples["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}  # noqa: SIM118 - as CLA writes it
        total = len(concatenated[list(examples.keys())[0]])
        if total >= BLOCK:
            total = (total // BLOCK) * BLOCK
        result = {k: [t[i:i + BLOCK] for i in range(0, total, BLOCK)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    start = time.perf_counter()
    raw = load_dataset("text", data_files=corpus, cache_dir=os.path.join(cache, "text"), keep_in_memory=False)
    tokenized = raw.map(tokenize_function, batched=True, num_proc=procs if procs > 1 else None,
                        remove_columns="text", load_from_cache_file=False, keep_in_memory=False,
                        cache_file_names={k: os.path.join(cache, "tokenized.arrow") for k in raw})
    grouped = tokenized.map(group_texts, batched=True, num_proc=procs if procs > 1 else None,
                            load_from_cache_file=False, keep_in_memory=False,
                            cache_file_names={k: os.path.join(cache, "grouped.arrow") for k in tokenized})
    return {"seconds": time.perf_counter() - start, "rows": len(grouped["train"])}


def run_column(name: str, corpus: Path, tokenizer: Path, scratch: Path, procs: int) -> dict:
    """A column in a fresh process; its time, tokens, the peak RSS of its process tree (MiB) and the CPU
    seconds of the whole tree (a shared machine steals wall time, not CPU time)."""
    import resource

    import psutil

    cache = Path(tempfile.mkdtemp(prefix=f"cache-{name}-", dir=scratch))
    cmd = [sys.executable, __file__, "--worker", name, "--corpus", str(corpus), "--tokenizer", str(tokenizer),
           "--cache", str(cache), "--procs", str(procs)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, peak_pss, done = 0, 0, threading.Event()

    def sample():
        # RSS counts the pages forked workers share with their parent (the imported libraries) once per
        # process; PSS splits each shared page between its sharers, so its sum is what the tree really holds
        nonlocal peak, peak_pss
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
                if len(tree) > 1:
                    peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}): {out[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_mib": peak / 2**20, "peak_pss_mib": (peak_pss or peak) / 2**20, "cpu_s": cpu}


def prep_table(sizes: list[int], repeats: int, scratch: Path, tokenizer: Path, processes: list[int]) -> list[dict]:
    rows = []
    for size in sizes:
        corpus = make_corpus(scratch / f"zh_{size}mb.txt", size)
        runs: dict[tuple[str, int], list[dict]] = {}
        for _ in range(repeats):
            for name, procs in [(n, p) for p in processes for n in ("zhtune", "cla")]:   # interleaved
                runs.setdefault((name, procs), []).append(run_column(name, corpus, tokenizer, scratch, procs))
                print(f"  {size} MB {name} x{procs}: {runs[(name, procs)][-1]}", file=sys.stderr, flush=True)
        tokens = runs[("zhtune", processes[0])][0]["tokens"]
        for (name, procs), got in runs.items():
            seconds = statistics.median(r["seconds"] for r in got)
            rows.append({"size_mb": size, "column": name, "procs": procs, "seconds": seconds, "tokens": tokens,
                         "tokens_per_s": tokens / seconds, "peak_mib": statistics.median(r["peak_mib"] for r in got),
                         "peak_pss_mib": statistics.median(r["peak_pss_mib"] for r in got),
                         "cpu_s": statistics.median(r["cpu_s"] for r in got), "load": os.getloadavg()[0]})
        corpus.unlink()
    return rows


# --- training throughput: streaming vs the cached path ----------------------------------------------

def make_model(folder: Path, tokenizer: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    for name in os.listdir(tokenizer):
        shutil.copy(tokenizer / name, folder / name)
    return folder


def train_once(model: Path, corpus: Path, scratch: Path, cache: Path, streaming: bool, steps: int) -> float:
    out = Path(tempfile.mkdtemp(prefix="train-", dir=scratch))
    cmd = [sys.executable, "-m", "zhtune", "train", "stage=pt", f"model_name_or_path={model}", f"dataset=[{corpus}]",
           f"output_dir={out}", f"max_steps={steps}", f"cutoff_len={BLOCK}", "per_device_train_batch_size=4",
           "save_steps=100000", "logging_steps=10", "report_to=none", f"data_cache={cache}",
           f"streaming={str(streaming).lower()}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if done.returncode != 0:
        raise SystemExit(f"training failed: {done.stderr[-3000:]}")
    seconds = json.loads((out / "train_results.json").read_text())["train_runtime"]
    shutil.rmtree(out, ignore_errors=True)
    return steps * 4 * BLOCK / seconds


def streaming_table(repeats: int, scratch: Path, tokenizer: Path, steps: int) -> dict:
    corpus = make_corpus(scratch / "zh_stream_50mb.txt", 50, seed=1)
    model, cache = make_model(scratch / "model", tokenizer), scratch / "train-cache"
    train_once(model, corpus, scratch, cache, False, 1)          # build the cache first: its time is not training
    cached, streamed = [], []
    for _ in range(repeats):
        cached.append(train_once(model, corpus, scratch, cache, False, steps))
        streamed.append(train_once(model, corpus, scratch, cache, True, steps))
        print(f"  training tokens/s: cached {cached[-1]:,.0f}, streaming {streamed[-1]:,.0f}", file=sys.stderr,
              flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    corpus.unlink()
    return {"cached": statistics.median(cached), "streaming": statistics.median(streamed),
            "ratios": [s / c for s, c in zip(streamed, cached)]}


# --- report ----------------------------------------------------------------------------------------

def report(rows: list[dict], stream: dict | None) -> str:
    by = {(r["size_mb"], r["column"], r["procs"]): r for r in rows}
    head = ("| corpus | processes | zhtune s (CPU s) | CLA-style s (CPU s) | zhtune tokens/s | zhtune / CLA | "
            "zhtune peak RSS | CLA peak RSS |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"] if rows else []
    for (size, column, procs), r in sorted(by.items()):
        if column != "zhtune" or (size, "cla", procs) not in by:
            continue
        cla = by[(size, "cla", procs)]
        lines.append(f"| {size} MB | {procs} | {r['seconds']:.0f} ({r['cpu_s']:.0f}) | {cla['seconds']:.0f} "
                     f"({cla['cpu_s']:.0f}) | {r['tokens_per_s']:,.0f} | {cla['seconds'] / r['seconds']:.2f}x | "
                     f"{r['peak_mib']:,.0f} MiB | {cla['peak_mib']:,.0f} MiB |")
    sizes = sorted({r["size_mb"] for r in rows})
    lines.append("")
    lines += [json.dumps(r) for r in rows]
    for size in sizes:
        if not all((size, n, p) in by for n in ("zhtune", "cla") for p in (1, 2)):
            continue
        one, two = by[(size, "zhtune", 1)], by[(size, "zhtune", 2)]
        cone, ctwo = by[(size, "cla", 1)], by[(size, "cla", 2)]
        lines.append(f"- {size} MB: zhtune 2 processes over 1: {one['seconds'] / two['seconds']:.2f}x "
                     f"(CLA-style: {cone['seconds'] / ctwo['seconds']:.2f}x)")
    if len(sizes) > 1:
        small, big = sizes[0], sizes[-1]
        for procs in sorted({p for s, n, p in by if n == "zhtune" and s == small} & {p for s, n, p in by
                                                                                    if n == "zhtune" and s == big}):
            ratio = by[(big, "zhtune", procs)]["peak_mib"] / by[(small, "zhtune", procs)]["peak_mib"]
            lines.append(f"- zhtune peak RSS {big} MB / {small} MB ({procs} process{'es' if procs > 1 else ''}): "
                         f"{ratio:.2f}x")
    if stream:
        lines.append(f"- training tokens/s, streaming / cached: {stream['streaming'] / stream['cached']:.3f} "
                     f"(cached {stream['cached']:,.0f}, streaming {stream['streaming']:,.0f}; per repeat "
                     + ", ".join(f"{x:.3f}" for x in stream["ratios"]) + ")")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 800], help="corpus sizes in MB")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every column (medians are shown)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to run (1 2)")
    parser.add_argument("--scratch", default=None, help="folder for corpora and caches (default: a temp folder)")
    parser.add_argument("--train-steps", type=int, default=40, help="optimizer steps per training run")
    parser.add_argument("--skip-training", action="store_true", help="only the preparation table")
    parser.add_argument("--skip-prep", action="store_true", help="only the streaming / cached training runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    for hidden in ("--corpus", "--tokenizer", "--cache"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--procs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work = {"zhtune": work_zhtune, "cla": work_cla}[args.worker]
        print(json.dumps(work(args.corpus, args.tokenizer, args.cache, args.procs)), flush=True)
        return
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="zhtune-data-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = make_tokenizer(scratch / "tokenizer")
        rows = [] if args.skip_prep else prep_table(args.sizes, args.repeats, scratch, tokenizer,
                                                                 args.processes)
        stream = None if args.skip_training else streaming_table(args.repeats + 1, scratch, tokenizer,
                                                                 args.train_steps)
        print(report(rows, stream))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
