"""Engine overhead on CPU: zhtune's inference engine vs the raw library on the same weights, same run.

    python benchmarks/infer_speed.py                       # ~56M-param random LLaMA, 1 thread
    python benchmarks/infer_speed.py --repeats 5 --tokens 128 --quants f16 q8_0 q4_k_m

Backends: zhtune hf (fp32) vs transformers `generate` with a streamer; zhtune llamacpp vs
llama_cpp.Llama.create_completion(stream=True) on the same GGUF (f16, q8_0, q4_k_m). Both sides
stream one sequence greedily from the same 64-token Chinese prompt ids and stop at the same place.
Measured per run: first-token latency (prefill), prefill tokens/s, decode tokens/s after the first
token. Runs alternate raw / zhtune; medians are printed with the ratio zhtune / raw.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

PROMPT_TOKENS = 64


def build(root: Path) -> Path:
    """A random LLaMA (hidden 768, 7 layers, widths multiples of 256 so k-quants apply) with a
    4000-piece Chinese+English SentencePiece tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    from zhtune import tiny
    from zhtune.vocab.hf import write_hf_tokenizer

    model_dir = root / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    sp = tiny.train_base_sp(tiny.asset_lines("zh_corpus.txt") + tiny.asset_lines("en_corpus.txt"),
                            root / "sp.model", vocab_size=4000)
    torch.manual_seed(0)
    cfg = tiny.tiny_llama_config(4000, hidden_size=768, num_layers=7, num_heads=12, num_kv_heads=12,
                                 intermediate_size=2048, max_position=2048)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    write_hf_tokenizer(sp, model_dir)
    return model_dir


def prompt_text(engine) -> str:
    """Held-out Chinese text cut to exactly PROMPT_TOKENS tokens (BOS included) by this tokenizer."""
    from zhtune import tiny

    text = "".join(tiny.asset_lines("zh_heldout.txt"))
    lo, hi = 1, len(text)
    while lo < hi:   # shortest prefix with >= PROMPT_TOKENS tokens
        mid = (lo + hi) // 2
        if len(engine.tokenize_prompt(text[:mid])) >= PROMPT_TOKENS:
            hi = mid
        else:
            lo = mid + 1
    return text[:lo]


class Timer:
    """Records when the first and the last piece of output arrived, in wall time and in this process's
    CPU time (all threads: the engine decodes on a worker thread). With one compute thread per side,
    CPU time is the work done and does not grow when other jobs share the cores; wall time does."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.first = self.last = self.cpu_first = self.cpu_last = None

    def tick(self) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if self.first is None:
            self.first, self.cpu_first = now, cpu
        self.last, self.cpu_last = now, cpu

    def result(self, prompt_len: int, n_tokens: int) -> dict:
        ttft, ttft_cpu = self.first - self.start, self.cpu_first - self.cpu_start
        return {"ttft_ms": 1000 * ttft, "prefill_tps": prompt_len / ttft,
                "decode_tps": (n_tokens - 1) / (self.last - self.first),
                "ttft_cpu_ms": 1000 * ttft_cpu,
                "decode_cpu_tps": (n_tokens - 1) / max(self.cpu_last - self.cpu_first, 1e-9), "tokens": n_tokens}


def raw_hf(model, ids, tokens: int) -> dict:
    import torch
    from transformers.generation.streamers import BaseStreamer

    timer = Timer()

    class Stream(BaseStreamer):
        calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:      # the first put is the prompt
                timer.tick()

        def end(self):
            pass

    timer.reset()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, streamer=Stream(),
                             pad_token_id=0)
    return timer.result(len(ids), out.shape[1] - len(ids))


def zhtune_run(engine, text: str, prompt_len: int, tokens: int) -> dict:
    from zhtune.infer.engine import GenParams

    params = GenParams(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
    if engine.backend == "llamacpp":
        engine.clear_cache()        # no prefix-cache hit: measure the whole prefill, like the raw side
    timer = Timer()
    last = None
    for delta in engine.stream(text, params):
        last = delta
        timer.tick()
    return timer.result(prompt_len, last.completion_tokens)


def raw_llama(llm, ids, tokens: int) -> dict:
    llm.reset()
    timer = Timer()
    for _ in llm.create_completion(ids, max_tokens=tokens, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                   stream=True):
        timer.tick()
    # every sampled token but the last is evaluated into the context
    return timer.result(len(ids), llm.n_tokens - len(ids) + 1)


def concurrency(engine, text: str, tokens: int, streams: int) -> float:
    """Total generated tokens/s with `streams` requests at once (distinct prompts, greedy)."""
    from zhtune.infer.engine import GenParams

    prompts = [f"{text} {i}" for i in range(streams)]
    if engine.backend == "llamacpp":
        engine.clear_cache()
    t0 = time.perf_counter()
    done = engine.generate(prompts, GenParams(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0))
    return sum(c.completion_tokens for c in done) / (time.perf_counter() - t0)


METRICS = (("ttft_ms", "first token ms"), ("prefill_tps", "prefill tok/s"), ("decode_tps", "decode tok/s"),
           ("ttft_cpu_ms", "first token, CPU ms"), ("decode_cpu_tps", "decode tok per CPU s"))


def compare(name: str, raw, ours, repeats: int) -> list[tuple]:
    """Alternating raw / zhtune runs; per metric the medians and the median of the per-pair ratios
    (each pair ran back to back, so a load change on a shared machine hits both sides)."""
    raws, zs = [], []
    raw()
    ours()   # warm-up both
    for i in range(repeats):   # alternate which side goes first
        if i % 2:
            zs.append(ours())
            raws.append(raw())
        else:
            raws.append(raw())
            zs.append(ours())
    rows = []
    for key, label in METRICS:
        r = statistics.median(x[key] for x in raws)
        z = statistics.median(x[key] for x in zs)
        pairs = sorted(b[key] / a[key] for a, b in zip(raws, zs))
        rows.append((name, label, r, z, statistics.median(pairs), pairs[len(pairs) // 4], pairs[-1 - len(pairs) // 4]))
    print(f"  {name}: tokens generated raw {raws[0]['tokens']}, zhtune {zs[0]['tokens']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="benchmarks/_work/infer_speed")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for both sides (1: a busy shared machine makes ggml's 2-thread "
                         "barrier spin; use 2+ on an idle one)")
    ap.add_argument("--threads-batch", type=int, default=None,
                    help="llama.cpp threads for multi-token steps, both sides (default: --threads)")
    ap.add_argument("--parallel", type=int, default=16, help="zhtune llamacpp n_parallel (sequence slots)")
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams for the throughput table")
    ap.add_argument("--quants", nargs="*", default=["f16", "q8_0", "q4_k_m"])
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from zhtune.infer.resolve import load_engine

    torch.set_num_threads(args.threads)
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = build(root)
    rows = []
    hf = load_engine(str(model_dir), dtype="fp32")
    n_params = sum(p.numel() for p in hf.model.parameters())
    text = prompt_text(hf)
    ids = hf.tokenize_prompt(text)
    print(f"model {n_params / 1e6:.1f}M params, prompt {len(ids)} tokens, {args.tokens} new tokens, "
          f"{args.threads} threads, {args.repeats} repeats", flush=True)
    raw_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows += compare("hf fp32", lambda m=raw_model: raw_hf(m, ids, args.tokens),
                    lambda: zhtune_run(hf, text, len(ids), args.tokens), args.repeats)
    conc = [("hf fp32", concurrency(hf, text, args.tokens, 1), concurrency(hf, text, args.tokens, args.streams))]
    hf.close()
    del raw_model

    from llama_cpp import Llama

    from zhtune.export.gguf import export_gguf

    for quant in args.quants:
        gguf = root / f"model.{quant}.gguf"
        if not gguf.is_file():
            export_gguf(model_dir, gguf, quant=quant, modelfile=False, log=lambda *a: None)
        batch_threads = args.threads_batch or args.threads
        raw = Llama(str(gguf), n_ctx=2048, n_threads=args.threads, n_threads_batch=batch_threads, verbose=False)
        eng = load_engine(str(gguf), n_ctx=2048, n_threads=args.threads, n_threads_batch=batch_threads,
                          n_parallel=args.parallel)
        cpp_ids = eng.tokenize_prompt(text)
        assert cpp_ids == ids, "llama.cpp and transformers tokenise the prompt differently"
        rows += compare(f"llamacpp {quant}", lambda raw=raw: raw_llama(raw, ids, args.tokens),
                        lambda eng=eng: zhtune_run(eng, text, len(ids), args.tokens), args.repeats)
        if quant == "q8_0":
            conc.append((f"llamacpp {quant}", concurrency(eng, text, args.tokens, 1),
                         concurrency(eng, text, args.tokens, args.streams)))
        eng.close()
        raw.close()

    print("\n| backend | metric | raw library | zhtune | zhtune / raw (median of pairs) | quartiles |\n"
          "|---|---|---:|---:|---:|---|")
    for name, label, r, z, ratio, lo, hi in rows:
        print(f"| {name} | {label} | {r:.1f} | {z:.1f} | {ratio:.3f} | {lo:.3f}-{hi:.3f} |")
    print(f"\n| zhtune backend | total tok/s, 1 stream | total tok/s, {args.streams} streams | ratio |\n"
          "|---|---:|---:|---:|")
    for name, one, many in conc:
        print(f"| {name} | {one:.1f} | {many:.1f} | {many / one:.2f} |")


if __name__ == "__main__":
    main()
