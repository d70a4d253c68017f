"""vLLM backend (CUDA GPUs): vLLM's LLMEngine fed prompt ids built by our template registry, adapters
through LoRA requests. Used through zhtune.infer.resolve.load_engine(path, backend="vllm"); on a machine without vLLM
or a GPU it is a clear ZhtuneError.

One worker thread owns the LLMEngine and calls step(); every stream has a queue. vLLM batches the
requests itself (continuous batching, paged KV cache); closing a stream aborts its request.
"""

from __future__ import annotations

import itertools
import queue
import threading

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import Delta, Engine, GenParams, ModelSpec, Prompt, PromptTooLong, prompt_ids


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
        except Exception as exc:  # vLLM raises many types for a model it cannot serve
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
        self._worker = threading.Thread(target=self._loop, name="zhtune-vllm", daemon=True)
        self._worker.start()

    def tokenize_prompt(self, prompt: Prompt) -> list[int]:
        return prompt_ids(self, prompt)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _sampling(self, p: GenParams):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or -1,
            repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty, stop=[*p.stop, *self.text_stops] or None,
            stop_token_ids=[*p.stop_token_ids, *self.stop_ids] or None, seed=p.seed,
            include_stop_str_in_output=False, skip_special_tokens=True)

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
        self._new.put((rid, ids, self._sampling(params), out))
        return self._drain(rid, out, len(ids))

    def _drain(self, rid: str, out: queue.SimpleQueue, n_prompt: int):
        sent = ""
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                text, reason, n_gen = item
                if reason:
                    yield Delta(text[len(sent):], "length" if reason == "length" else "stop", n_prompt, n_gen)
                    return
                if not text.endswith("\ufffd") and len(text) > len(sent):   # a split character waits
                    yield Delta(text[len(sent):])
                    sent = text
        finally:
            self._new.put(("abort", rid, None, None))

    def _loop(self) -> None:
        while not self._closed:
            try:
                while True:
                    item = self._new.get(block=not self.llm.has_unfinished_requests())
                    if item is None:
                        return
                    rid, ids, sampling, out = item
                    if rid == "abort":
                        if self._streams.pop(ids, None) is not None:
                            self.llm.abort_request([ids])
                        continue
                    self._streams[rid] = out
                    self.llm.add_request(rid, {"prompt_token_ids": ids}, sampling, lora_request=self.lora)
            except queue.Empty:
                pass
            try:
                for o in self.llm.step():
                    q = self._streams.get(o.request_id)
                    if q is None:
                        continue
                    c = o.outputs[0]
                    q.put((c.text, c.finish_reason if o.finished else None, len(c.token_ids)))
                    if o.finished:
                        self._streams.pop(o.request_id, None)
            except Exception as exc:
                for q in self._streams.values():
                    q.put(exc)
                self._streams.clear()

    def embed(self, texts: list[str]) -> list[list[float]]:
        raise ZhtuneError("embeddings are not served by the vllm backend", where="--backend vllm",
                          hint="use --backend hf for /v1/embeddings")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._new.put(None)
