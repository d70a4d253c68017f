"""SFT training throughput: `zhtune train` (packing) vs a plain transformers+peft script padding to cutoff_len.

    python benchmarks/train_throughput.py                 # ~8 minutes on 2 quiet CPU cores (much longer under load)
    python benchmarks/train_throughput.py --repeats 1     # quicker, noisier
    python benchmarks/train_throughput.py --llamafactory /work/lf-venv/bin/python   # + LLaMA-Factory 0.9.5 columns

Same random Llama (hidden 512, 8 layers, vocabulary of Chinese-LLaMA's merged size 49953), same
LoRA (rank 8 on every linear projection), same data (the Chinese alpaca asset repeated), same batch
size and number of optimizer steps, all in one run. Reports effective tokens/s (label tokens that
are not padding: what the loss learns from), model FLOP utilisation against this CPU's matmul rate
measured in the same run, and the ratio to the plain script; each column is a fresh process, the
columns are interleaved, and the medians over --repeats are shown. With --llamafactory (the python of
a venv holding llamafactory==0.9.5, see docs/benchmarks.md) LLaMA-Factory's own SFT runs on the same
model folder, records, prompt strings and hyper-parameters in several configurations, and the ratio
of zhtune to its fastest one is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 49953          # Chinese-LLaMA's merged vocabulary
TEMPLATE = "chinese-alpaca"
LORA = dict(r=8, lora_alpha=32, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


# --- setup: tokenizer, model, data (built once per run, shared by every column) ------------------------

def setup(work: Path, repeat: int, hidden: int, layers: int) -> dict:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import torch

    from zhtune import tiny
    from zhtune.vocab.hf import write_hf_tokenizer

    model_dir = work / "model"
    # a SentencePiece model that knows Chinese (trained on the shipped corpora), padded with unused
    # tokens to the merged vocabulary's size so the output layer costs what it costs on Chinese-LLaMA
    sp = tiny.train_base_sp(tiny.asset_lines("zh_corpus.txt") + tiny.asset_lines("en_corpus.txt"),
                            work / "sp" / "tokenizer.model", vocab_size=8000)
    write_hf_tokenizer(sp, work / "tok")
    tok = AutoTokenizer.from_pretrained(str(work / "tok"))
    tok.add_tokens([f"<unused_{i}>" for i in range(VOCAB - len(tok))], special_tokens=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 32 * 32 + 32,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    # keep what makes the folder load with sentencepiece's ids (see zhtune/vocab/hf.py)
    keep = json.loads((work / "tok" / "tokenizer_config.json").read_text())
    saved = json.loads((model_dir / "tokenizer_config.json").read_text())
    wanted = ("tokenizer_class", "add_bos_token", "add_eos_token", "legacy")
    saved.update({k: v for k, v in keep.items() if k in wanted})
    (model_dir / "tokenizer_config.json").write_text(json.dumps(saved))
    (model_dir / "tokenizer.model").write_bytes(sp.read_bytes())
    rows = [json.loads(x) for x in tiny.asset("sft_qa.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    data = tiny.write_jsonl(work / "sft.jsonl", rows * repeat)
    n_params = sum(p.numel() for p in model.parameters())
    return {"model": str(model_dir), "data": str(data), "params": n_params, "hidden": hidden, "layers": layers}


def matmul_rate(dtype_name: str, n: int = 2048, reps: int = 7) -> float:
    """This CPU's dense matmul rate (FLOP/s, median), the peak MFU is measured against."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


# --- the columns (each runs in its own process) --------------------------------------------------------

def sample_lengths(tok, rows: list[dict], cutoff: int) -> list[tuple[int, int]]:
    """(tokens, label tokens) of each record as both columns build it: prompt and answer tokenised
    apart, the answer (with EOS) carries the loss; the prompt text comes from the template registry."""
    from zhtune.data.templates import get_template

    template = get_template(TEMPLATE)
    out = []
    for r in rows:
        user = f"{r['instruction']}\n{r['input']}" if r.get("input") else r["instruction"]
        (prompt, answer), = template.encode_pairs([{"role": "user", "content": user},
                                                   {"role": "assistant", "content": r["output"]}],
                                                  tok.bos_token, tok.eos_token)
        p, a = (tok(x, add_special_tokens=False)["input_ids"] for x in (prompt, answer))
        out.append((p, a))
    return out


def run_plain(env: dict, steps: int, batch: int, cutoff: int, bf16: bool) -> dict:
    """The seeds' way: every sample padded to cutoff_len, attention_mask, Trainer + peft LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    tok = AutoTokenizer.from_pretrained(env["model"])
    rows = [json.loads(x) for x in Path(env["data"]).read_text(encoding="utf-8").splitlines()][: steps * batch]
    features, real, labelled, attn = [], 0, 0, 0
    for p, a in sample_lengths(tok, rows, cutoff):
        ids = (p + a)[:cutoff]
        labels = ([-100] * len(p) + a)[:cutoff]
        n = len(ids)
        real, labelled, attn = real + n, labelled + sum(x != -100 for x in labels[1:]), attn + n * (n + 1) // 2
        pad = cutoff - n
        features.append({"input_ids": ids + [tok.eos_token_id] * pad, "labels": labels + [-100] * pad,
                         "attention_mask": [1] * n + [0] * pad})
    model = AutoModelForCausalLM.from_pretrained(env["model"], dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    args = TrainingArguments(output_dir=env["out"], per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, bf16=bf16, seed=42, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=default_data_collator)
    metrics = trainer.train().metrics
    return {"seconds": metrics["train_runtime"], "steps": steps, "tokens": real, "label_tokens": labelled,
            "attention_pairs": attn, "loss": metrics["train_loss"]}


def run_zhtune(env: dict, steps: int, batch: int, cutoff: int, bf16: bool) -> dict:
    """`zhtune train stage=sft packing=true`: one epoch over the packed rows (counted by the driver)."""
    from zhtune.train.run import main

    argv = ["stage=sft", f"model_name_or_path={env['model']}", f"dataset=[{env['data']}]", f"template={TEMPLATE}",
            f"cutoff_len={cutoff}", "packing=true", f"per_device_train_batch_size={batch}", "num_train_epochs=1",
            "learning_rate=2e-4", "logging_steps=1", "save_steps=100000", "lora_rank=8", "lora_alpha=32",
            "lora_dropout=0.05", f"bf16={str(bf16).lower()}", f"output_dir={env['out']}",
            f"data_cache={env['cache']}", f"max_samples={env['zh_samples']}"]
    assert main(argv) == 0
    result = json.loads((Path(env["out"]) / "train_results.json").read_text())
    return {"seconds": result["train_runtime"], "loss": result.get("train_loss"), **env["zh_data"]}


# --- LLaMA-Factory 0.9.5 (runs under its own venv's python: this file imports only the stdlib at the top) --

# the configurations compared: LF's defaults (no packing, gradient checkpointing ON by default), `packing`
# (rows of cutoff_len, attention_mask all ones: samples attend to earlier samples in the row), and
# `neat_packing` (a 4-D block-diagonal mask: no sample sees another, the one comparable to zhtune's packing)
LF_CONFIGS = {
    "default": {},
    "default-nogc": {"disable_gradient_checkpointing": True},
    "packing": {"packing": True},
    "packing-nogc": {"packing": True, "disable_gradient_checkpointing": True},
    "neat": {"neat_packing": True},
    "neat-nogc": {"neat_packing": True, "disable_gradient_checkpointing": True},
}
LF_TEMPLATE = "zhtune_chinese_alpaca"


def lf_template_strings() -> dict:
    """Our template's prompt and answer around a `{{content}}` placeholder (from the one template registry),
    for LF to train on the same strings as the other columns (single-turn samples: the system prompt is
    part of the first user turn). LF's built-in `alpaca` differs ('Response:\\n', an extra '\\n\\n' label)."""
    from zhtune.data.templates import get_template

    (prompt, answer), = get_template(TEMPLATE).encode_pairs(
        [{"role": "user", "content": "{{content}}"}, {"role": "assistant", "content": "{{content}}"}], "<s>", "</s>")
    assert prompt.startswith("<s>") and answer.endswith("</s>"), (prompt, answer)
    return {"user": prompt[len("<s>"):], "assistant": answer[: -len("</s>")]}


def lf_register_template(strings: dict) -> None:
    """Register those strings as an LF template (what LF's template.py documents for a new format)."""
    from llamafactory.data.formatter import EmptyFormatter, StringFormatter
    from llamafactory.data.template import register_template

    register_template(name=LF_TEMPLATE, format_prefix=EmptyFormatter(slots=[{"bos_token"}]),
                      format_user=StringFormatter(slots=[strings["user"]]),
                      format_assistant=StringFormatter(slots=[strings["assistant"], {"eos_token"}]))


def lf_environment(env: dict) -> dict:
    """LF's subprocess environment: an empty `torchaudio` module first on PYTHONPATH (LF imports it; its real
    wheel pulls a CUDA build), the datasets cache inside the work dir."""
    shim = Path(env["work"]) / "lf-shim"
    (shim / "torchaudio").mkdir(parents=True, exist_ok=True)
    (shim / "torchaudio" / "__init__.py").touch()
    return {**os.environ, "PYTHONPATH": str(shim), "HF_DATASETS_CACHE": str(Path(env["work"]) / "lf-datasets"),
            "WANDB_DISABLED": "true"}


def lf_counts(dataset) -> dict:
    """Real tokens, label tokens and within-sample (query, key) pairs of the rows LF trained on. Samples are
    found from position_ids (restarting at 0 per sample; LF's row padding is a run of zeros) when packed,
    else each row is one sample (LF pads batches in the collator, not in the dataset)."""
    tokens = labelled = pairs = 0
    for row in dataset:
        labelled += sum(x != -100 for x in row["labels"])
        if "position_ids" in row:
            runs, n = [], 0
            for pos in row["position_ids"]:
                if pos == 0 and n:
                    runs.append(n)
                    n = 0
                n += 1
            runs.append(n)
            runs = [r for r in runs if r > 1]          # length-1 runs: the padding's zeros
        else:
            runs = [len(row["input_ids"])]
        tokens += sum(runs)
        pairs += sum(r * (r + 1) // 2 for r in runs)
    return {"tokens": tokens, "label_tokens": labelled, "attention_pairs": pairs}


def run_llamafactory(env: dict, steps: int, batch: int, cutoff: int, bf16: bool, config: str) -> dict:
    """LLaMA-Factory's own SFT (`run_exp`, what `llamafactory-cli train cfg.yaml` calls) for one epoch
    over the same records as the plain script (unpacked) or as zhtune (packed); train_runtime is its
    Trainer's, like the other columns'. The rows are counted after the clock stopped (on_train_end)."""
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    lf_register_template(env["lf_template"])
    out = Path(env["out"])
    (out / "dataset_info.json").write_text(json.dumps({"zh_alpaca": {
        "file_name": env["data"], "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}))
    extra = LF_CONFIGS[config]
    packed = bool(extra.get("packing") or extra.get("neat_packing"))
    seen: dict = {}

    class Count(TrainerCallback):
        def on_train_end(self, args, state, control, train_dataloader=None, **kw):
            seen.update(lf_counts(train_dataloader.dataset), steps=state.global_step)

    run_exp({"stage": "sft", "do_train": True, "model_name_or_path": env["model"], "dataset": "zh_alpaca",
             "dataset_dir": str(out), "template": LF_TEMPLATE, "cutoff_len": cutoff, "overwrite_cache": True,
             "max_samples": env["zh_samples"] if packed else steps * batch, "finetuning_type": "lora",
             "lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target": ",".join(LORA["target_modules"]),
             "output_dir": str(out / "run"), "per_device_train_batch_size": batch, "num_train_epochs": 1,
             "learning_rate": 2e-4, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
             "bf16": bf16, "use_cpu": True, "seed": 42, "dataloader_num_workers": 0, "plot_loss": False, **extra},
            callbacks=[Count()])
    result = json.loads((out / "run" / "train_results.json").read_text())
    return {"seconds": result["train_runtime"], "loss": result.get("train_loss"), **seen}


def column_main(args) -> None:
    env = json.loads(args.env)
    env["out"] = tempfile.mkdtemp(prefix="out-", dir=env["work"])
    if args.column == "llamafactory":
        result = run_llamafactory(env, args.steps, args.batch, args.cutoff, args.bf16, args.lf_config)
    else:
        fn = run_plain if args.column == "plain" else run_zhtune
        result = fn(env, args.steps, args.batch, args.cutoff, args.bf16)
    print("RESULT " + json.dumps(result), flush=True)


# --- the driver ----------------------------------------------------------------------------------------

def flops(r: dict, env: dict) -> float:
    """Useful model FLOPs: LoRA training costs forward 2N + backward-to-activations 2N per token (frozen
    weights get no gradient). The decoder layers' N counts for every real (non-padding) token, the
    output layer's only where a label needs its logits; causal attention adds 12 * layers * hidden
    per (query, key) pair within a sample. Padding and unneeded logits are waste, not useful work."""
    n_head = VOCAB * env["hidden"]
    n_layers = env["params"] - 2 * n_head                      # embedding lookup: no matmul
    return (4 * n_layers * r["tokens"] + 4 * n_head * r["label_tokens"]
            + 12 * env["layers"] * env["hidden"] * r["attention_pairs"])


def run_column(name: str, bf16: bool, env: dict, args) -> dict:
    kind = name.split()[0]
    python, extra, child_env = sys.executable, [], None
    if kind == "lf":
        python, extra, child_env = args.llamafactory, ["--lf-config", name.split()[1]], lf_environment(env)
    cmd = [python, __file__, "--column", {"lf": "llamafactory"}.get(kind, kind),
           "--env", json.dumps(env), "--steps", str(args.steps), "--batch", str(args.batch),
           "--cutoff", str(args.cutoff)] + (["--bf16"] if bf16 else []) + extra
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        if kind == "lf":         # LF's columns are optional: report the failure, keep the others
            print(f"  column {name} failed (output above); left out of the table", flush=True)
            return None
        raise SystemExit(f"column {name} failed")
    return json.loads(lines[-1][7:])


def zhtune_data(env: dict, steps: int, batch: int, cutoff: int) -> tuple[int, dict]:
    """Records that make about `steps` optimizer steps of packed rows, and what those rows hold."""
    from transformers import AutoTokenizer

    from zhtune.config import TrainConfig
    from zhtune.data.sft import build_sft_dataset
    from zhtune.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(env["model"])
    rows = [json.loads(x) for x in Path(env["data"]).read_text(encoding="utf-8").splitlines()]
    per_sample = sum(len(p) + len(a) for p, a in sample_lengths(tok, rows[:48], cutoff)) / 48
    n = int(steps * batch * cutoff * 0.92 / per_sample)
    cfg = TrainConfig(stage="sft", dataset=[env["data"]], template=TEMPLATE, cutoff_len=cutoff, packing=True,
                      max_samples=n)
    bundle = build_sft_dataset(cfg, tok, get_template(TEMPLATE))
    attn = sum(p + 1 for pos in bundle.train["position_ids"] for p in pos)
    return n, {"steps": -(-len(bundle.train) // batch), "tokens": bundle.stats["tokens"],
               "label_tokens": bundle.stats["label_tokens"], "attention_pairs": attn,
               "packing_efficiency": bundle.stats["packing_efficiency"]}


def lf_columns(args, env: dict) -> list[tuple[str, bool]]:
    """LLaMA-Factory's columns when --llamafactory names a python that imports it; else none, with the reason."""
    if not args.llamafactory:
        print("LLaMA-Factory columns skipped: no --llamafactory PYTHON given (see docs/benchmarks.md)", flush=True)
        return []
    fp32 = [c for c in args.lf_configs.split(",") if c]
    bf16 = [] if args.no_bf16 else [c for c in args.lf_bf16_configs.split(",") if c]
    unknown = sorted(set(fp32 + bf16) - set(LF_CONFIGS))
    if unknown:
        raise SystemExit(f"unknown LLaMA-Factory configuration(s) {unknown}; known: {', '.join(LF_CONFIGS)}")
    try:
        probe = subprocess.run([args.llamafactory, "-c", "import llamafactory; print(llamafactory.__version__)"],
                               capture_output=True, text=True, env=lf_environment(env))
    except OSError as e:
        print(f"LLaMA-Factory columns skipped: cannot run {args.llamafactory}: {e}", flush=True)
        return []
    if probe.returncode:
        print(f"LLaMA-Factory columns skipped: {args.llamafactory} cannot import llamafactory:\n"
              + probe.stderr[-1500:], flush=True)
        return []
    print(f"LLaMA-Factory {probe.stdout.strip()} from {args.llamafactory}", flush=True)
    env["lf_template"] = lf_template_strings()
    return [(f"lf {c} fp32", False) for c in fp32] + [(f"lf {c} bf16", True) for c in bf16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per column (about; zhtune runs whole epochs)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--cutoff", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="runs of every column (median reported)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast columns")
    ap.add_argument("--llamafactory", metavar="PYTHON",
                    help="python of a venv with llamafactory==0.9.5 (see docs/benchmarks.md): adds its columns")
    ap.add_argument("--lf-configs", default="default,packing,neat,neat-nogc",
                    help=f"LLaMA-Factory configurations to run, of {','.join(LF_CONFIGS)}")
    ap.add_argument("--lf-bf16-configs", default="neat-nogc",
                    help="LLaMA-Factory configurations also run in bf16 (unless --no-bf16); '' for none")
    ap.add_argument("--column", help=argparse.SUPPRESS)
    ap.add_argument("--env", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lf-config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.column:
        return column_main(args)

    import torch

    work = Path(tempfile.mkdtemp(prefix="zhtune-bench-"))
    env = setup(work, repeat=40, hidden=args.hidden, layers=args.layers)
    env.update(work=str(work), cache=str(work / "cache"))
    env["zh_samples"], env["zh_data"] = zhtune_data(env, args.steps, args.batch, args.cutoff)
    args.steps = env["zh_data"]["steps"]          # the plain script runs as many steps as zhtune's epoch
    columns = [("plain fp32", False), ("zhtune fp32", False)]
    if not args.no_bf16:
        columns += [("plain bf16", True), ("zhtune bf16", True)]
    columns += lf_columns(args, env)
    print(f"model: Llama {env['params'] / 1e6:.1f}M params "
          f"(hidden {args.hidden}, {args.layers} layers, vocab {VOCAB}), "
          f"LoRA r=8 on all linears; batch {args.batch}, cutoff_len {args.cutoff}, {args.steps} steps; "
          f"torch threads {torch.get_num_threads()}; work dir {work}", flush=True)
    print("load average (1, 5, 15 min) at the start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    results: dict[str, list[dict]] = {name: [] for name, _ in columns}
    peaks: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for rep in range(args.repeats):
        for name, bf16 in columns:
            for dt in peaks:
                peaks[dt].append(matmul_rate(dt))
            r = run_column(name, bf16, env, args)
            if r is None:
                continue
            results[name].append(r)
            print(f"  [{rep + 1}/{args.repeats}] {name}: {r['steps']} steps in {r['seconds']:.1f}s, "
                  f"{r['label_tokens'] / r['seconds']:.1f} label tok/s, loss {r['loss']:.3f}", flush=True)
    report(results, peaks, env, args)


def report(results: dict, peaks: dict, env: dict, args) -> None:
    peak = {dt: statistics.median(v) for dt, v in peaks.items()}
    base = statistics.median(r["label_tokens"] / r["seconds"] for r in results["plain fp32"])
    print(f"\nmatmul 2048² (median): fp32 {peak['float32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s")
    head = "| column | steps | tokens/step (non-pad) | label tokens/step | effective tok/s | vs plain fp32 | MFU |"
    print(head + "\n|" + " --- |" * 7)
    for name, runs in results.items():
        if not runs:
            continue
        rate = statistics.median(r["label_tokens"] / r["seconds"] for r in runs)
        rate_peak = peak["bfloat16" if "bf16" in name else "float32"]
        mfu = statistics.median(flops(r, env) / r["seconds"] for r in runs) / rate_peak
        r = runs[0]
        print(f"| {name} | {r['steps']} | {r['tokens'] / r['steps']:.0f} | {r['label_tokens'] / r['steps']:.0f} | "
              f"{rate:.1f} | {rate / base:.2f}× | {mfu * 100:.1f}% |")
    lf_ratios(results)
    print("load average (1, 5, 15 min) at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


def lf_ratios(results: dict) -> None:
    """zhtune against LLaMA-Factory's fastest configuration of the same dtype (and the fastest that keeps
    samples apart: neat_packing), medians of effective tokens/s."""
    rate = {name: statistics.median(r["label_tokens"] / r["seconds"] for r in runs)
            for name, runs in results.items() if runs}
    for dt in ("fp32", "bf16"):
        ours = rate.get(f"zhtune {dt}")
        lf = {n: v for n, v in rate.items() if n.startswith("lf ") and n.endswith(dt)}
        if ours is None or not lf:
            continue
        best = max(lf, key=lf.get)
        line = f"zhtune {dt} / LLaMA-Factory's best {dt} ({best}): {ours / lf[best]:.2f}×"
        neat = {n: v for n, v in lf.items() if n.startswith("lf neat")}
        if neat:
            nbest = max(neat, key=neat.get)
            line += f"; / its best without cross-sample attention ({nbest}): {ours / neat[nbest]:.2f}×"
        print(line)
    lf_all = {n: v for n, v in rate.items() if n.startswith("lf ")}
    ours_all = {n: v for n, v in rate.items() if n.startswith("zhtune ")}
    if lf_all and ours_all:
        a, b = max(ours_all, key=ours_all.get), max(lf_all, key=lf_all.get)
        print(f"best zhtune ({a}) / best LLaMA-Factory ({b}): {ours_all[a] / lf_all[b]:.2f}×")


if __name__ == "__main__":
    main()
