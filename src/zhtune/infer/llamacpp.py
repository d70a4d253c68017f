"""llama.cpp backend: a GGUF file through llama-cpp-python, prompts from our template registry.
Used through zhtune.infer.resolve.load_engine("model.q4_k_m.gguf") (picked by the .gguf suffix).

llama-cpp-python's high-level `Llama` decodes one sequence at a time and is not thread-safe, so we
use it only for the model, vocabulary and metadata, and decode with the low-level API: one worker
thread owns a llama_context with `n_parallel` sequence slots (KV cache: see _open_context) and puts
every running request in one llama_batch per step (each token tagged with its slot's sequence id).
A slot keeps its tokens' KV after a request ends; the next request takes the free slot sharing the
longest prefix with its prompt, so a chat's next turn only evaluates the new tokens. The engine is
here; the decode worker (slots, batches, sampling) is in llamacpp_decode.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from zhtune.data.templates import TEMPLATES, Template
from zhtune.errors import ZhtuneError
from zhtune.infer.engine import (Engine, GenParams, Prompt, PromptTooLong, RequestStream, Scored, StopFilter,
                                 is_token_ids)
from zhtune.infer.llamacpp_decode import Req, ScoreReq, worker_main

ATTR_SPECIAL = (1 << 3) | (1 << 4)   # llama_token_attr CONTROL | USER_DEFINED
KV_SPLIT_BYTES = 1 << 30               # per-sequence KV caches up to this size (see _open_context)


def _check_gguf(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if not path.is_file():
        raise ZhtuneError(f"GGUF file not found: {model}", where="--model", expected="an existing .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ZhtuneError(f"not a GGUF file: {model}", where="--model",
                              expected="a .gguf file written by `zhtune export gguf` or llama.cpp")
    return path


def _check_options(unknown: dict, loras, n_threads, n_threads_batch, n_parallel) -> None:
    """The options, and llama-cpp-python being installed, before the GGUF is looked at."""
    if unknown:
        raise ZhtuneError(f"unknown option(s) for the llamacpp backend: {', '.join(unknown)}",
                          where="options", expected="n_ctx, n_threads, n_threads_batch, n_batch, n_parallel")
    for name, value in (("n_threads", n_threads), ("n_threads_batch", n_threads_batch)):
        if value is not None and not 1 <= int(value) <= 1024:
            raise ZhtuneError(f"{name}={value} is out of range", where=name, expected="1..1024 threads")
    if not 1 <= int(n_parallel) <= 256:
        raise ZhtuneError(f"n_parallel={n_parallel} is out of range", where="n_parallel", expected="1..256")
    if loras:
        raise ZhtuneError("the llamacpp backend runs one merged GGUF; LoRA folders are not applied",
                          where="--lora", expected="no --lora with a .gguf model",
                          hint="zhtune merge the adapters, then zhtune export gguf; or use --backend hf")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ZhtuneError("the llamacpp backend needs llama-cpp-python", where="--backend",
                          hint="CMAKE_ARGS=-DGGML_NATIVE=off pip install 'zhtune[gguf]'") from None


def _open_llama(path: Path, kwargs: dict):
    """llama-cpp-python's Llama over the GGUF, used for the model, vocabulary and metadata only (its own
    small context is for embeddings' settings; decoding has its own: LlamaCppEngine._open_context)."""
    from llama_cpp import Llama   # installed: _check_options made sure
    try:
        return Llama(str(path), **{**kwargs, "n_ctx": 64})
    except (ValueError, RuntimeError) as exc:
        raise ZhtuneError(f"llama.cpp cannot load {path}: {exc}", where="--model",
                          expected="a GGUF of a LLaMA-family model") from None


class LlamaCppEngine(Engine):
    backend = "llamacpp"

    def __init__(self, model: str | Path, loras=(), template: Callable[[str | None, str, str], Template] | None = None,
                 n_ctx: int = 0,
                 n_threads: int | None = None, n_threads_batch: int | None = None, n_batch: int = 512,
                 n_parallel: int = 8, **unknown):
        """template: called with the GGUF's embedded chat_template, BOS and EOS text, returns the registry
        template to use (zhtune.infer.resolve.gguf_template; default: the "default" template);
        n_ctx: context per sequence (0: the model's); n_parallel: sequences decoded together;
        n_threads: threads for a step of one token (one stream decoding); n_threads_batch: for steps
        of several tokens (prompts, several streams at once)."""
        _check_options(unknown, loras, n_threads, n_threads_batch, n_parallel)
        self.path = _check_gguf(model)
        # Default: half the logical CPUs (one per physical core: llama.cpp's own server default) for
        # every step. Not all CPUs for batched steps (llama-cpp-python's n_threads_batch default):
        # ggml's threads spin at a barrier, and when they outnumber free cores (our HTTP server and
        # its clients also need one) steps take several times longer (measured: 16 served streams
        # on 2 cores shared with a training job fell from ~400 to 61 tokens/s with 2 batch threads).
        # n_threads_batch raises it where cores are free.
        cpus = os.cpu_count() or 1
        self._threads = int(n_threads or max(1, cpus // 2))
        self._threads_batch = int(n_threads_batch or self._threads)
        self._kwargs = dict(n_ctx=n_ctx, n_batch=n_batch, n_threads=self._threads,
                            n_threads_batch=self._threads_batch, verbose=False)
        self.llm = _open_llama(self.path, self._kwargs)
        self._embedder = None
        self.model_name = self.path.stem
        import llama_cpp

        self.max_model_len = int(n_ctx or llama_cpp.llama_model_n_ctx_train(self.llm._model.model))
        self._read_vocabulary(template)
        self._lock = threading.Lock()      # embed() and close()
        self._closed = False
        self.n_parallel = int(n_parallel)
        self.n_batch = max(int(n_batch), self.n_parallel)
        self.ctx = self._open_context()
        self.active = 0
        self._clear = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=worker_main, args=(weakref.ref(self), self._queue),
                                        name="zhtune-llamacpp-decode", daemon=True)
        self._worker.start()

    def _read_vocabulary(self, template) -> None:
        """BOS/EOS text, the chat template (chosen from the GGUF's own), the ids and strings that end an
        answer (a template stop string that is one special token stops by id), the vocabulary size."""
        model = self.llm._model
        self.bos_token = model.token_get_text(self.llm.token_bos()) if self.llm.token_bos() >= 0 else ""
        self.eos_token = model.token_get_text(self.llm.token_eos()) if self.llm.token_eos() >= 0 else ""
        choose = template or (lambda _chat_template, _bos, _eos: TEMPLATES["default"])
        self.template = choose(self.llm.metadata.get("tokenizer.chat_template"), self.bos_token, self.eos_token)
        self.stop_ids = {t for t in (self.llm.token_eos(), model.token_eot()) if t >= 0}
        self.text_stops = []
        for s in self.template.stop:
            ids = self.llm.tokenize(s.encode(), add_bos=False, special=True)
            if len(ids) == 1 and model.token_get_attr(ids[0]) & ATTR_SPECIAL:
                self.stop_ids.add(ids[0])
            else:
                self.text_stops.append(s)
        self.vocab_size = self.llm.n_vocab()

    def _open_context(self):
        """A llama_context with n_parallel sequences. When a full context for every sequence fits in
        KV_SPLIT_BYTES, each sequence gets its own KV stream (kv_unified off): a token then attends
        only to its own sequence's cells, where in one shared cache every token of a batched step
        scans all sequences' cells under a mask (at 16 streams that made each step ~2x slower).
        Otherwise one unified cache (a long chat may use what short ones leave) of n_parallel *
        context cells, capped at max(context, 8192) so a 7B model's f16 cache stays near 4 GB; when
        it is full, the requests in that step get an error."""
        import llama_cpp
        from llama_cpp import _internals

        params = llama_cpp.llama_context_default_params()
        split = self.max_model_len * self.n_parallel * self._kv_cell_bytes() <= KV_SPLIT_BYTES
        if split:
            params.n_ctx = self.max_model_len * self.n_parallel
        else:
            params.n_ctx = min(self.max_model_len * self.n_parallel, max(self.max_model_len, 8192))
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = self.n_parallel
        params.n_threads, params.n_threads_batch = self._threads, self._threads_batch
        params.kv_unified = not split
        params.no_perf = True
        from llama_cpp._utils import suppress_stdout_stderr

        try:   # quiet: llama.cpp warns that the unified cache exceeds one sequence's trained context
            with suppress_stdout_stderr(disable=False):
                return _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
        except ValueError as exc:
            raise ZhtuneError(f"llama.cpp cannot make a context of {params.n_ctx} tokens: {exc}",
                              where="n_ctx / n_parallel", hint="lower --n-parallel or n_ctx") from None

    def _kv_cell_bytes(self) -> int:
        """f16 K and V bytes one token takes in the cache: 2 * layers * n_embd * kv_heads / heads * 2."""
        import llama_cpp

        m = self.llm._model.model
        heads = max(1, llama_cpp.llama_model_n_head(m))
        kv_width = llama_cpp.llama_model_n_embd(m) * llama_cpp.llama_model_n_head_kv(m) // heads
        return 4 * llama_cpp.llama_model_n_layer(m) * kv_width

    # --- public API ------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: Prompt) -> list[int]:
        """Prompt ids as training built them: template segment by segment (raw text gets BOS)."""
        if is_token_ids(prompt):
            self.check_ids(prompt)
            return list(prompt)
        if isinstance(prompt, str):
            return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        return [i for seg in self.segments(prompt)
                for i in self.llm.tokenize(seg.encode("utf-8"), add_bos=False, special=True)]

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=True)

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        return [self.llm._model.detokenize([t], special=True) for t in ids]

    def score(self, sequences: list[list[int]], prompt: bool = True, top_k: int = 0,
              candidates: list[int] | tuple[int, ...] = ()) -> list[Scored]:
        """Run by the decode worker between steps, one sequence at a time in a free slot (a sequence
        sharing a prefix with what the slot holds only evaluates the rest when prompt=False)."""
        self.check_score(sequences, top_k, candidates)
        if self._closed:
            raise ZhtuneError("engine is closed", expected="a live engine")
        req = ScoreReq([list(s) for s in sequences], prompt, top_k, list(candidates))
        self._queue.put(req)
        result = req.out.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def stream(self, prompt: Prompt, params: GenParams):
        self.check_request(params)
        ids = self.tokenize_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(len(ids), params.max_new_tokens, self.max_model_len)
        req = Req(ids, params, StopFilter([*params.stop, *self.text_stops]),
                   self.stop_ids | set(params.stop_token_ids))
        self._queue.put(req)
        return RequestStream(req)

    def clear_cache(self) -> None:
        """Forget the prompts kept in idle slots (the next request evaluates its whole prompt)."""
        self._clear = True

    def embed(self, texts: list[str]) -> list[list[float]]:
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

        with self._lock:
            if self._embedder is None:   # a second context in embedding mode, made on first use
                self._embedder = Llama(str(self.path), embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN,
                                       **self._kwargs)
            return [list(v) for v in self._embedder.embed(list(texts), normalize=True)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout=30)
        with self._lock:
            self.ctx.close()
            for llm in (self.llm, self._embedder):
                if llm is not None:
                    llm.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self._closed = True
            self._queue.put(None)
