"""Load on `zhtune serve` (loopback): requests/s, output tokens/s and time to first token (p50/p95)
at 1, 4 and 16 concurrent streams, for each backend this machine has (hf; llamacpp on a GGUF export
of the same model), against the same engine driven directly (no HTTP) at the same concurrency.

    python benchmarks/serve_load.py                          # ~17M-param random LLaMA, 48 new tokens
    python benchmarks/serve_load.py --backends hf --levels 1 4 16 --tokens 64 --rounds 2

The server is the real CLI (`python -m zhtune serve`) in its own process; the client streams with
httpx (`stream_options.include_usage`, so output tokens are the server's own counts). "direct" runs
engine.stream in threads inside this process (same prompts, same concurrency, alternating with the
served runs): the ratio served / direct is what HTTP + SSE + the server's scheduling cost. Every level
runs `rounds` x concurrency requests (distinct prompts, greedy); medians over `--repeats` passes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def build(root: Path, hidden: int, layers: int) -> Path:
    """A random LLaMA with a 4000-piece Chinese+English SentencePiece tokenizer (k-quant friendly widths)."""
    import torch
    from transformers import LlamaForCausalLM

    from zhtune import tiny
    from zhtune.vocab.hf import write_hf_tokenizer

    sp = tiny.train_base_sp(tiny.asset_lines("zh_corpus.txt") + tiny.asset_lines("en_corpus.txt"),
                            root / "sp.model", vocab_size=4000)
    torch.manual_seed(0)
    cfg = tiny.tiny_llama_config(4000, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                                 num_kv_heads=hidden // 64, intermediate_size=hidden * 3, max_position=1024)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    write_hf_tokenizer(sp, root / "model")
    return root / "model"


def prompts(n: int) -> list[str]:
    from zhtune import tiny

    lines = [line for line in tiny.asset_lines("zh_heldout.txt") if len(line) > 20]
    return [f"{lines[i % len(lines)][:60]} ({i})" for i in range(n)]


def summarize(results: list[tuple[float, int]], wall: float) -> dict:
    """results: (ttft seconds, output tokens) per request."""
    ttfts = sorted(r[0] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    return {"req_s": len(results) / wall, "tok_s": sum(r[1] for r in results) / wall,
            "ttft_p50": 1000 * statistics.median(ttfts), "ttft_p95": 1000 * p95}


# --- through the server --------------------------------------------------------------------------
async def _one_stream(client, url: str, prompt: str, tokens: int) -> tuple[float, int]:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, used, done = time.perf_counter(), None, 0, False
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    return (first or time.perf_counter()) - start, used


async def _served_level(url: str, texts: list[str], concurrency: int, tokens: int) -> dict:
    import httpx

    queue = list(texts)
    results = []
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker() -> None:
            while queue:
                results.append(await _one_stream(client, url, queue.pop(), tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summarize(results, wall)


def start_server(model: str, backend: str, max_concurrency: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the server; a pipe nobody reads would block it

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "zhtune", "serve", "--model", model, "--backend", backend,
                             "--port", str(port), "--served-model-name", "bench", "--max-concurrency",
                             str(max_concurrency), "--log-level", "warning", *extra],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"zhtune serve exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("zhtune serve did not start in 300 s")


def run_backend(model: str, backend: str, levels: list[int], rounds: int, tokens: int, repeats: int,
                threads_batch: int | None = None) -> dict:
    """{(level, "served" | "direct"): medians over repeats}; served and direct alternate level by level
    so both see the same machine load (this machine is shared and noisy)."""
    from zhtune.infer.resolve import load_engine

    cpp = backend == "llamacpp"
    extra = ["--threads-batch", str(threads_batch)] if cpp and threads_batch else []
    proc, url = start_server(model, backend, max(levels), extra)
    options = ({"n_parallel": max(levels), "n_threads_batch": threads_batch} if cpp
               else {"max_batch_size": max(levels)})
    engine = load_engine(model, backend=backend, **options)
    runs: dict = {}
    try:
        asyncio.run(_served_level(url, prompts(2), 1, 4))   # warm-up both
        _direct_level(engine, prompts(2), 1, 4)
        for _ in range(repeats):
            for c in levels:
                texts = prompts(rounds * c)
                runs.setdefault((c, "served"), []).append(asyncio.run(_served_level(url, texts, c, tokens)))
                runs.setdefault((c, "direct"), []).append(_direct_level(engine, texts, c, tokens))
    finally:
        engine.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}


# --- the same engine, no HTTP ------------------------------------------------------------------------
def _direct_level(engine, texts: list[str], concurrency: int, tokens: int) -> dict:
    from zhtune.infer.engine import GenParams

    queue, results, lock = list(texts), [], threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                text = queue.pop()
            start, first, used = time.perf_counter(), None, 0
            for delta in engine.stream([{"role": "user", "content": text}], GenParams(max_new_tokens=tokens,
                                                                                       temperature=0)):
                if first is None and delta.text:
                    first = time.perf_counter()
                if delta.finish_reason:
                    used = delta.completion_tokens
            with lock:
                results.append(((first or time.perf_counter()) - start, used))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(results, time.perf_counter() - start)


# --- what llama.cpp itself can do: decode steps of k rows, no engine ------------------------------
def raw_decode_rate(gguf: str, levels: list[int], threads_batch: int | None = None, prompt_len: int = 32,
                    steps: int = 24) -> dict:
    """Tokens/s of bare llama_decode steps that advance k sequences by one token each (k in levels),
    after a prompt_len-token prompt per sequence: the library's own ceiling for batched decoding on
    this CPU, with the engine's default thread counts. Runs in a child process (see main)."""
    import llama_cpp
    from llama_cpp import Llama, _internals

    cpus = os.cpu_count() or 1
    llm = Llama(gguf, n_ctx=64, verbose=False)
    n = max(levels)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n * (prompt_len + steps * len(levels) + 8)   # a multiple of n: one stream each
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = n
    params.n_threads = max(1, cpus // 2)   # the engine's defaults
    params.n_threads_batch = threads_batch or params.n_threads
    ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    batch = _internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)
    b, pos, rates = batch.batch, [0] * n, {}

    def decode(rows: list[tuple[int, int]]) -> float:   # rows: (sequence, token)
        for i, (seq, token) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos[seq], 1, True
            b.seq_id[i][0] = seq
            pos[seq] += 1
        b.n_tokens = len(rows)
        start = time.perf_counter()
        if llama_cpp.llama_decode(ctx.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - start

    for seq in range(n):
        decode([(seq, 100 + (seq + j) % 1000) for j in range(prompt_len)][:1])   # first token alone
        for chunk in range(1, prompt_len, 256):
            decode([(seq, 100 + (seq + j) % 1000) for j in range(chunk, min(prompt_len, chunk + 256))])
    for k in levels:
        times = [decode([(seq, 200 + step) for seq in range(k)]) for step in range(steps)]
        rates[k] = k / statistics.median(times[2:])
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["hf", "llamacpp"], choices=["hf", "llamacpp"])
    ap.add_argument("--levels", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x concurrency")
    ap.add_argument("--tokens", type=int, default=48, help="max_tokens per request")
    ap.add_argument("--repeats", type=int, default=3, help="medians over this many passes")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quant", default="q8_0", help="GGUF quantization for the llamacpp backend")
    ap.add_argument("--threads-batch", type=int, default=None,
                    help="llamacpp: threads for batched steps (server, direct engine and the bare library)")
    ap.add_argument("--raw-rate", metavar="GGUF", help=argparse.SUPPRESS)   # child process mode
    args = ap.parse_args()
    if args.raw_rate:
        print(json.dumps(raw_decode_rate(args.raw_rate, args.levels, args.threads_batch)))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory(prefix="zhtune-serve-bench-") as tmp:
        model_dir = build(Path(tmp), args.hidden, args.layers)
        n_params = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 4 / 1e6
        models = {"hf": str(model_dir)}
        if "llamacpp" in args.backends:
            # exported in a child process: llama.cpp's threads left in this process slowed the server
            # subprocess ~10x and sped up the in-process baseline (observed), skewing the comparison
            out = Path(tmp) / f"m.{args.quant}.gguf"
            code = ("import sys; from zhtune.export.gguf import export_gguf; "
                    "export_gguf(sys.argv[1], sys.argv[2], sys.argv[3], modelfile=False, log=lambda *_: None)")
            done = subprocess.run([sys.executable, "-c", code, str(model_dir), str(out), args.quant],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                models["llamacpp"] = str(out)
            else:  # no llama.cpp here: measure what we can
                print(f"llamacpp skipped: {done.stderr[-1000:]}", file=sys.stderr)
        rows = []
        for backend in args.backends:
            if backend not in models:
                continue
            print(f"[{backend}] ...", file=sys.stderr, flush=True)
            r = run_backend(models[backend], backend, args.levels, args.rounds, args.tokens, args.repeats,
                            args.threads_batch)
            first = r[(args.levels[0], "served")]["tok_s"]
            rows += [(backend, c, r[(c, "served")], r[(c, "direct")], r[(c, "served")]["tok_s"] / first)
                     for c in args.levels]
        raw = None
        if "llamacpp" in models:   # a child process, for the reason above
            extra = ["--threads-batch", str(args.threads_batch)] if args.threads_batch else []
            done = subprocess.run([sys.executable, __file__, "--raw-rate", models["llamacpp"], "--levels",
                                   *map(str, args.levels), *extra], capture_output=True, text=True)
            raw = {int(k): v for k, v in json.loads(done.stdout).items()} if done.returncode == 0 else None

    label = {"hf": "hf (transformers fp32)", "llamacpp": f"llamacpp ({args.quant})"}
    print(f"\n{n_params:.0f}M-parameter random LLaMA (hidden {args.hidden}, {args.layers} layers), "
          f"{args.tokens} max new tokens, greedy, {args.rounds} x concurrency requests per level, "
          f"median of {args.repeats}; "
          f"{os.cpu_count()} CPU cores shared by the server and the client")
    print("| backend | streams | req/s | output tok/s | TTFT p50 (ms) | TTFT p95 (ms) | direct tok/s | "
          "served / direct | tok/s vs 1 stream |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for backend, c, s, d, scale in rows:
        print(f"| {label[backend]} | {c} | {s['req_s']:.2f} | {s['tok_s']:.0f} | {s['ttft_p50']:.0f} | "
              f"{s['ttft_p95']:.0f} | {d['tok_s']:.0f} | {s['tok_s'] / d['tok_s']:.2f}x | {scale:.2f}x |")
    if raw:
        one = raw[args.levels[0]]
        print("\nllama.cpp alone (llama_decode steps advancing k sequences by one token; no prompts, no "
              "sampling, no engine), same threads:")
        print("| streams | tok/s | vs 1 stream |\n|---:|---:|---:|")
        for c in args.levels:
            print(f"| {c} | {raw[c]:.0f} | {raw[c] / one:.2f}x |")


if __name__ == "__main__":
    main()
