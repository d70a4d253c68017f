"""vLLM backend (CUDA GPUs): vLLM's LLMEngine fed prompt ids built by our template registry, adapters
through LoRA requests. Used through zhtune.infer.resolve.load_engine(path, backend="vllm"); on a machine without vLLM
or a GPU it is a clear ZhtuneError.

One worker thread owns the LLMEngine and calls step(); every request has a handler that receives its
outputs (a stream's queue, or score's collector). vLLM batches the requests itself (continuous
batching, paged KV cache, prefix caching); closing a stream aborts its request. Log-probs are vLLM's
(raw, before sampling parameters); a candidate's next-token log-prob is the prompt log-prob of the
sequence with the candidate appended (prefix caching makes that one extra token of work).
"""

from __future__ import annotations

import itertools
import queue
import threading

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import (Delta, Engine, GenParams, ModelSpec, Prompt, PromptTooLong, Scored, TokenLogprob,
                                 hf_token_bytes, prompt_ids)


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ZhtuneError("the vllm backend needs vLLM, which is not installed", where="--backend vllm",
                          expected="a Linux machine with CUDA GPUs and `pip install 'zhtune[gpu]'`",
                          hint="on CPU use --backend hf, or export a GGUF and use llamacpp") from None
    import torch

    if not torch.cuda.is_available():
        raise ZhtuneError("the vllm backend needs a CUDA GPU and none is visible", where="--backend vllm",
                          hint="use --backend hf (CPU) or a .gguf model (llama.cpp)")


class VllmEngine(Engine):
    backend = "vllm"

    def __init__(self, spec: ModelSpec, num_gpus: int | None = None, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None, **unknown):
        if unknown:
            raise ZhtuneError(f"unknown option(s) for the vllm backend: {', '.join(unknown)}", where="options",
                              expected="num_gpus, dtype, gpu_memory_utilization, max_model_len")
        _require_vllm()
        from transformers import AutoTokenizer
        from vllm import EngineArgs, LLMEngine

        if len(spec.loras) > 1:
            raise ZhtuneError("vLLM applies one LoRA per request", where="--lora",
                              expected="at most one adapter with --backend vllm",
                              hint="zhtune merge the earlier adapters into the base first")
        self.spec, self.template = spec, spec.template
        self.tokenizer = AutoTokenizer.from_pretrained(str(spec.tokenizer))
        self.bos_token = self.tokenizer.bos_token or ""
        self.eos_token = self.tokenizer.eos_token or ""
        args = EngineArgs(model=str(spec.base), tokenizer=str(spec.tokenizer), dtype=dtype,
                          tensor_parallel_size=num_gpus or 1, gpu_memory_utilization=gpu_memory_utilization,
                          max_model_len=max_model_len, enable_lora=bool(spec.loras), max_lora_rank=64)
        try:
            self.llm = LLMEngine.from_engine_args(args)
        except Exception as exc:  # noqa: BLE001 - vLLM raises many types for a model it cannot serve
            raise ZhtuneError(f"vLLM cannot load {spec.base}: {exc}", where="--model") from None
        self.lora = None
        if spec.loras:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest(spec.loras[0].name, 1, str(spec.loras[0]))
        self.model_name = (spec.loras[-1] if spec.loras else spec.base).name
        self.max_model_len = self.llm.model_config.max_model_len
        vocab = self.tokenizer.get_vocab()
        self.stop_ids = [vocab[s] for s in self.template.stop if s in vocab]
        self.text_stops = [s for s in self.template.stop if s not in vocab]
        self._ids = itertools.count()
        self._new: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, queue.SimpleQueue] = {}
        self._closed = False
        self._token_bytes = None
        self._worker = threading.Thread(target=self._loop, name="zhtune-vllm", daemon=True)
        self._worker.start()

    def tokenize_prompt(self, prompt: Prompt) -> list[int]:
        return prompt_ids(self, prompt)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=bos)["input_ids"]

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        if self._token_bytes is None:
            self._token_bytes = hf_token_bytes(self.tokenizer)
        return self._token_bytes(ids)

    def score(self, sequences: list[list[int]], prompt: bool = True, top_k: int = 0,
              candidates: list[int] | tuple[int, ...] = ()) -> list[Scored]:
        from vllm import SamplingParams

        self.check_score(sequences, top_k, candidates)
        if self._closed:
            raise ZhtuneError("engine is closed", expected="a live engine")
        jobs = []   # (sequence index, candidate id or None, SamplingParams)
        for n, ids in enumerate(sequences):
            if prompt or top_k:
                jobs.append((n, None, ids, SamplingParams(max_tokens=1, temperature=0, logprobs=top_k,
                                                          prompt_logprobs=top_k if prompt else None)))
            for c in candidates:
                jobs.append((n, c, [*ids, c], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)))
        done: queue.SimpleQueue = queue.SimpleQueue()
        for j, (_, _, ids, sampling) in enumerate(jobs):
            def handler(o, j=j):
                if isinstance(o, BaseException) or o.finished:
                    done.put((j, o))
            self._new.put((f"zhtune-score-{next(self._ids)}", ids, sampling, handler))
        outputs = {}
        while len(outputs) < len(jobs):
            j, o = done.get()
            if isinstance(o, BaseException):
                raise o
            outputs[j] = o
        results = [Scored([], {}) for _ in sequences]
        for j, (n, c, ids, _) in enumerate(jobs):
            o = outputs[j]
            if c is not None:
                results[n].next[c] = o.prompt_logprobs[-1][c].logprob
                continue
            if prompt:
                results[n].tokens = [None] + [_token_logprob(d, t, top_k)
                                              for d, t in zip(o.prompt_logprobs[1:], ids[1:])]
            if top_k:
                first = o.outputs[0].logprobs[0]
                results[n].next.update((t, lp.logprob) for t, lp in first.items() if lp.rank <= top_k)
        return results

    def _sampling(self, p: GenParams):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or -1,
            repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty, stop=[*p.stop, *self.text_stops] or None,
            stop_token_ids=[*p.stop_token_ids, *self.stop_ids] or None, seed=p.seed,
            include_stop_str_in_output=False, skip_special_tokens=True, logprobs=p.logprobs)

    def stream(self, prompt: Prompt, params: GenParams):
        params.validate()
        if self._closed:
            raise ZhtuneError("engine is closed", expected="a live engine")
        ids = self.tokenize_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(len(ids), params.max_new_tokens, self.max_model_len)
        params = GenParams(**{**params.__dict__,
                              "max_new_tokens": min(params.max_new_tokens, self.max_model_len - len(ids))})
        rid = f"zhtune-{next(self._ids)}"
        out: queue.SimpleQueue = queue.SimpleQueue()
        self._new.put((rid, ids, self._sampling(params), _stream_handler(out, params.logprobs)))
        return self._drain(rid, out, len(ids))

    def _drain(self, rid: str, out: queue.SimpleQueue, n_prompt: int):
        sent, logprobs = "", []
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                text, reason, n_gen, new_logprobs = item
                logprobs += new_logprobs
                if reason:
                    yield Delta(text[len(sent):], "length" if reason == "length" else "stop", n_prompt, n_gen,
                                logprobs=logprobs)
                    return
                if not text.endswith("\ufffd") and len(text) > len(sent):   # a split character waits
                    yield Delta(text[len(sent):], logprobs=logprobs)
                    sent, logprobs = text, []
        finally:
            self._new.put(("abort", rid, None, None))

    def _loop(self) -> None:
        while not self._closed:
            try:
                while True:
                    item = self._new.get(block=not self.llm.has_unfinished_requests())
                    if item is None:
                        return
                    rid, ids, sampling, handler = item
                    if rid == "abort":
                        if self._streams.pop(ids, None) is not None:
                            self.llm.abort_request([ids])
                        continue
                    self._streams[rid] = handler
                    self.llm.add_request(rid, {"prompt_token_ids": ids}, sampling, lora_request=self.lora)
            except queue.Empty:
                pass
            try:
                for o in self.llm.step():
                    handler = self._streams.get(o.request_id)
                    if handler is None:
                        continue
                    handler(o)
                    if o.finished:
                        self._streams.pop(o.request_id, None)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for handler in self._streams.values():
                    handler(exc)
                self._streams.clear()

    def embed(self, texts: list[str]) -> list[list[float]]:
        raise ZhtuneError("embeddings are not served by the vllm backend", where="--backend vllm",
                          hint="use --backend hf for /v1/embeddings")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._new.put(None)


def _token_logprob(entries: dict, token: int, k: int) -> TokenLogprob:
    """vLLM's {token id: Logprob} at one position as our TokenLogprob (the k best by rank)."""
    top = sorted(((t, lp.logprob, lp.rank) for t, lp in entries.items() if lp.rank is not None and lp.rank <= k),
                 key=lambda x: x[2])
    return TokenLogprob(token, entries[token].logprob, [(t, v) for t, v, _ in top[:k]])


def _stream_handler(out: queue.SimpleQueue, k: int | None):
    """A stream's handler: (text so far, finish reason, tokens generated, new TokenLogprobs) per step."""
    seen = [0]

    def handle(o) -> None:
        if isinstance(o, BaseException):
            out.put(o)
            return
        c = o.outputs[0]
        new = []
        if k is not None and c.logprobs:
            new = [_token_logprob(d, t, k) for d, t in zip(c.logprobs[seen[0]:], c.token_ids[seen[0]:])]
            seen[0] = len(c.token_ids)
        out.put((c.text, c.finish_reason if o.finished else None, len(c.token_ids), new))

    return handle
