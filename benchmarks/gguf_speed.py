"""CPU generation speed: llama.cpp on zhtune's GGUF exports (f16, q8_0, q4_k_m) vs transformers fp32.

    python benchmarks/gguf_speed.py                  # ~49M-parameter random LLaMA, 1 thread, 128 tokens
    python benchmarks/gguf_speed.py --threads 2 --tokens 256   # on a quiet machine

One model (random weights, widths multiples of 256 so k-quants apply to every matrix) is written
as an HF folder, exported with `zhtune.export.gguf.export_gguf`, and each side greedily generates
the same number of tokens for one sequence from the same prompt (end-of-sequence ignored).
Rounds interleave the engines; prints tokens/s (median) and the median per-round ratio to transformers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

PROMPT = "中国的首都是北京。The capital of China is Beijing, and"


def build(root: Path, hidden: int, layers: int, inter: int) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    from zhtune import tiny
    from zhtune.vocab.hf import write_hf_tokenizer

    sp = tiny.train_base_sp(tiny.asset_lines("en_corpus.txt") + tiny.asset_lines("zh_corpus.txt"),
                            root / "sp.model", vocab_size=4000)
    torch.manual_seed(0)
    cfg = tiny.tiny_llama_config(4000, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                                 num_kv_heads=hidden // 64, intermediate_size=inter, max_position=2048)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "model")
    write_hf_tokenizer(sp, root / "model")
    return root / "model"


def hf_runner(model_dir: Path, tokens: int, threads: int):
    """A function that greedily generates `tokens` tokens with transformers fp32; returns tokens/s."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids

    def run() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            seconds = time.perf_counter() - t0
        assert out.shape[1] - ids.shape[1] == tokens
        return tokens / seconds

    return run


def llama_runner(gguf: Path, tokens: int, threads: int):
    """The same with llama.cpp (greedy; end-of-sequence ignored: we stop after `tokens`)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = llm.tokenize(PROMPT.encode("utf-8"), add_bos=True)

    def run() -> float:
        llm.reset()
        t0 = time.perf_counter()
        for n, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1), 1):
            if n == tokens:
                break
        return tokens / (time.perf_counter() - t0)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from zhtune.export.gguf import export_gguf

    with tempfile.TemporaryDirectory(prefix="zhtune-gguf-bench-") as tmp:
        root = Path(tmp)
        model_dir = build(root, args.hidden, args.layers, args.intermediate)
        params = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 4 / 1e6
        files = {q: export_gguf(model_dir, root / f"m.{q}.gguf", q, modelfile=False, log=lambda *_: None)
                 for q in ("f16", "q8_0", "q4_k_m")}
        runners = {"transformers fp32": hf_runner(model_dir, args.tokens, args.threads)}
        runners.update({f"llama.cpp {q}": llama_runner(p, args.tokens, args.threads) for q, p in files.items()})
        sizes = {f"llama.cpp {q}": p.stat().st_size / 2**20 for q, p in files.items()}
        for run in runners.values():  # warm-up
            run()
        # rounds interleave the engines, so the (shared, drifting) machine load hits all of them alike
        rows = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                rows[name].append(run())
    print(f"\n{params:.0f}M-parameter LLaMA (hidden {args.hidden}, {args.layers} layers), {args.threads} threads, "
          f"{args.tokens} new tokens, greedy, one sequence; {args.repeats} interleaved rounds")
    print("| engine | file (MiB) | tokens/s (median) | × transformers (median of per-round ratios) |")
    print("| --- | --- | --- | --- |")
    base = rows["transformers fp32"]
    for name, values in rows.items():
        ratio = statistics.median(v / b for v, b in zip(values, base))
        size = f"{sizes[name]:.0f}" if name in sizes else f"{params * 4 / 1.048576:.0f} (safetensors)"
        print(f"| {name} | {size} | {statistics.median(values):.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
