"""llama.cpp backend: a GGUF file through llama-cpp-python, prompts from our template registry.
Used through zhtune.infer.resolve.load_engine("model.q4_k_m.gguf") (picked by the .gguf suffix).

llama-cpp-python's high-level `Llama` decodes one sequence at a time and is not thread-safe, so we
use it only for the model, vocabulary and metadata, and decode with the low-level API: one worker
thread owns a llama_context with `n_parallel` sequence slots (KV cache: see _open_context) and puts
every running request in one llama_batch per step (each token tagged with its slot's sequence id).
A slot keeps its tokens' KV after a request ends; the next request takes the free slot sharing the
longest prefix with its prompt, so a chat's next turn only evaluates the new tokens.
"""

from __future__ import annotations

import codecs
import os
import queue
import random
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.data.templates import TEMPLATES, Template
from zhtune.errors import ZhtuneError
from zhtune.infer.engine import (Delta, Engine, GenParams, Prompt, PromptTooLong, RequestStream, Scored, StopFilter,
                                 TokenLogprob, is_token_ids, worker_loop)

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
            from llama_cpp import Llama
        except ImportError:
            raise ZhtuneError("the llamacpp backend needs llama-cpp-python", where="--backend",
                              hint="CMAKE_ARGS=-DGGML_NATIVE=off pip install 'zhtune[gguf]'") from None
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
        try:   # this context is only used for embeddings' settings; decoding has its own (_open_context)
            self.llm = Llama(str(self.path), **{**self._kwargs, "n_ctx": 64})
        except (ValueError, RuntimeError) as exc:
            raise ZhtuneError(f"llama.cpp cannot load {self.path}: {exc}", where="--model",
                              expected="a GGUF of a LLaMA-family model") from None
        self._embedder = None
        self.model_name = self.path.stem
        import llama_cpp

        train_ctx = llama_cpp.llama_model_n_ctx_train(self.llm._model.model)
        self.max_model_len = int(n_ctx or train_ctx)
        model = self.llm._model
        self.bos_token = model.token_get_text(self.llm.token_bos()) if self.llm.token_bos() >= 0 else ""
        self.eos_token = model.token_get_text(self.llm.token_eos()) if self.llm.token_eos() >= 0 else ""
        choose = template or (lambda _chat_template, _bos, _eos: TEMPLATES["default"])
        self.template = choose(self.llm.metadata.get("tokenizer.chat_template"), self.bos_token, self.eos_token)
        self.stop_ids = {t for t in (self.llm.token_eos(), model.token_eot()) if t >= 0}
        self.text_stops = []
        for s in self.template.stop:   # a stop string that is one special token stops by id
            ids = self.llm.tokenize(s.encode(), add_bos=False, special=True)
            if len(ids) == 1 and model.token_get_attr(ids[0]) & ATTR_SPECIAL:
                self.stop_ids.add(ids[0])
            else:
                self.text_stops.append(s)
        self.vocab_size = self.llm.n_vocab()
        self._lock = threading.Lock()      # embed() and close()
        self._closed = False
        self.n_parallel = int(n_parallel)
        self.n_batch = max(int(n_batch), self.n_parallel)
        self.ctx = self._open_context()
        self.active = 0
        self._clear = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=_worker_main, args=(weakref.ref(self), self._queue),
                                        name="zhtune-llamacpp-decode", daemon=True)
        self._worker.start()

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
        req = _ScoreReq([list(s) for s in sequences], prompt, top_k, list(candidates))
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
        req = _Req(ids, params, StopFilter([*params.stop, *self.text_stops]),
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


# --- the decode worker -----------------------------------------------------------------------

@dataclass(eq=False)
class _Req:
    ids: list[int]                   # prompt token ids
    params: GenParams
    stops: StopFilter
    ends: set[int]                   # token ids that end the answer
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    pending: list[int] = field(default_factory=list)   # prompt tokens not yet in the KV cache
    n: int = 0                       # tokens generated
    sampler: object = None
    utf8: object = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    context: list[int] = field(default_factory=list)   # last tokens, so detokenize keeps leading spaces
    logprobs: list = field(default_factory=list)      # TokenLogprobs not yet sent (params.logprobs set)


@dataclass(eq=False)
class _ScoreReq:
    sequences: list[list[int]]
    prompt: bool
    top_k: int
    candidates: list[int]
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False


@dataclass(eq=False)
class _Slot:
    seq: int                         # llama.cpp sequence id
    tokens: list[int] = field(default_factory=list)    # what this sequence holds in the KV cache
    req: _Req | None = None
    next: int | None = None          # sampled, to be fed in the next batch


def _worker_main(engine_ref, requests: queue.SimpleQueue) -> None:
    """The decode thread: one _Decoder (its slots keep their KV cache) across batches."""
    decoder: list[_Decoder] = []

    def run_batch(engine: LlamaCppEngine, first: _Req) -> None:
        if not decoder:
            decoder.append(_Decoder(engine))
        decoder[0].run(first, requests)

    worker_loop(engine_ref, requests, run_batch, on_exit=lambda: decoder and decoder[0].batch.close())


class _Decoder:
    """Slots (sequence ids) that persist across requests; one llama_batch per step for all of them."""

    def __init__(self, engine: LlamaCppEngine):
        from llama_cpp import _internals

        self.e = engine
        self.slots = [_Slot(i) for i in range(engine.n_parallel)]
        self.batch = _internals.LlamaBatch(n_tokens=engine.n_batch, embd=0, n_seq_max=1, verbose=False)

    def run(self, first: _Req, requests: queue.SimpleQueue) -> None:
        waiting = [first]
        while True:
            while True:
                try:
                    item = requests.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    for r in waiting + [s.req for s in self.slots if s.req]:
                        r.out.put(ZhtuneError("engine was closed", expected="a live engine"))
                    return
                waiting.append(item)
            waiting = [r for r in waiting if not r.cancelled]
            for s in self.slots:
                if s.req is not None and s.req.cancelled:
                    self._release(s)
            while waiting and any(s.req is None for s in self.slots):
                r = waiting.pop(0)
                if isinstance(r, _ScoreReq):   # runs now, in a free slot, between decode steps
                    self._score(r)
                else:
                    self._assign(r)
            active = [s for s in self.slots if s.req is not None]
            self.e.active = len(active)
            if not active:
                return
            self._step(active)

    def _assign(self, r: _Req) -> None:
        """Give `r` the free slot whose cached tokens share the longest prefix with its prompt."""
        import llama_cpp

        def common(s: _Slot) -> int:
            n = 0
            for a, b in zip(s.tokens, r.ids[:-1]):   # always evaluate >= 1 prompt token (for logits)
                if a != b:
                    break
                n += 1
            return n

        if self.e._clear:
            self.e._clear = False
            for s in self.slots:
                if s.req is None and s.tokens:
                    llama_cpp.llama_memory_seq_rm(self.e.ctx.memory, s.seq, -1, -1)
                    s.tokens = []
        slot = max((s for s in self.slots if s.req is None), key=common)
        keep = common(slot)
        if not llama_cpp.llama_memory_seq_rm(self.e.ctx.memory, slot.seq, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.e.ctx.memory, slot.seq, -1, -1)
            keep = 0
        slot.tokens, slot.req, slot.next = r.ids[:keep], r, None
        r.pending = r.ids[keep:]
        r.context = r.ids[-8:]
        r.sampler = _sampler(r.params, self.e.vocab_size)

    def _score(self, r: _ScoreReq) -> None:
        try:
            slot = next(s for s in self.slots if s.req is None)
            r.out.put([self._score_one(slot, ids, r) for ids in r.sequences])
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            r.out.put(exc)

    def _score_one(self, slot: _Slot, ids: list[int], r: _ScoreReq) -> Scored:
        """Evaluate `ids` in `slot` (prefix kept when only the next token is wanted) and read the
        log-probs from llama.cpp's logits rows."""
        import llama_cpp

        keep = 0
        if not r.prompt:
            for a, b in zip(slot.tokens, ids[:-1]):
                if a != b:
                    break
                keep += 1
        if not llama_cpp.llama_memory_seq_rm(self.e.ctx.memory, slot.seq, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.e.ctx.memory, slot.seq, -1, -1)
            keep = 0
        slot.tokens = ids[:keep]
        tokens: list[TokenLogprob | None] = [None]
        nxt: dict[int, float] = {}
        b = self.batch.batch
        for start in range(keep, len(ids), self.e.n_batch):
            chunk = ids[start:start + self.e.n_batch]
            for i, token in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = token, start + i, 1
                b.seq_id[i][0], b.logits[i] = slot.seq, r.prompt or start + i == len(ids) - 1
            b.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(self.e.ctx.ctx, b)
            if rc != 0:
                llama_cpp.llama_memory_seq_rm(self.e.ctx.memory, slot.seq, -1, -1)
                slot.tokens = []
                raise ZhtuneError(f"llama.cpp decode failed (code {rc}) while scoring",
                                  hint="a shorter text, or a larger --context-length")
            slot.tokens += chunk
            last = start + len(chunk) == len(ids)
            for i in range(len(chunk)) if r.prompt else ([len(chunk) - 1] if last else []):
                lp = _log_softmax(self._logits(i))
                if start + i + 1 < len(ids):     # this row predicts the next token of the sequence
                    tokens.append(_token_logprob(lp, ids[start + i + 1], r.top_k))
                else:                            # the row after the last token
                    nxt = {t: float(lp[t]) for t in r.candidates}
                    if r.top_k:
                        nxt.update(_top(lp, r.top_k))
        return Scored(tokens if r.prompt else [], nxt)

    def _logits(self, index: int):
        """The logits row of batch position `index` of the last decode, as a numpy view [n_vocab]."""
        import llama_cpp
        import numpy as np

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.e.ctx.ctx, index),
                                     shape=(self.e.vocab_size,))

    def _step(self, active: list[_Slot]) -> None:
        import llama_cpp

        b = self.batch.batch
        n, outputs = 0, []

        def add(slot: _Slot, token: int, logits: bool) -> None:
            nonlocal n
            b.token[n], b.pos[n], b.n_seq_id[n] = token, len(slot.tokens), 1
            b.seq_id[n][0], b.logits[n] = slot.seq, logits
            slot.tokens.append(token)
            n += 1

        for s in active:                      # decoding rows: one token each
            if s.next is not None:
                add(s, s.next, True)
                s.next = None
                outputs.append((s, n - 1))
        for s in active:                      # prompts: as much as fits in this batch
            chunk = s.req.pending[: self.e.n_batch - n]
            for i, token in enumerate(chunk):
                add(s, token, i == len(chunk) - 1 and len(chunk) == len(s.req.pending))
            s.req.pending = s.req.pending[len(chunk):]
            if chunk and not s.req.pending:
                outputs.append((s, n - 1))
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self.e.ctx.ctx, b)
        if rc != 0:
            for s in active:
                s.req.out.put(ZhtuneError(f"llama.cpp decode failed (code {rc}): the KV cache is full",
                                          hint="fewer concurrent requests, or a larger n_ctx"))
                llama_cpp.llama_memory_seq_rm(self.e.ctx.memory, s.seq, -1, -1)
                s.tokens = []
                self._release(s)
            return
        for s, idx in outputs:
            k = s.req.params.logprobs
            lp = _log_softmax(self._logits(idx)) if k is not None else None   # the raw distribution
            token = llama_cpp.llama_sampler_sample(s.req.sampler.sampler, self.e.ctx.ctx, idx)
            if lp is not None:
                s.req.logprobs.append(_token_logprob(lp, token, k))
            self._advance(s, token)

    def _advance(self, s: _Slot, token: int) -> None:
        r = s.req
        r.n += 1
        if token in r.ends:
            return self._finish(s, "", "stop")
        piece = self.e.llm.detokenize([token], prev_tokens=r.context)
        r.context = r.context[-7:] + [token]
        emit, hit = r.stops.feed(r.utf8.decode(piece))
        if hit:
            return self._finish(s, emit, "stop", hit=True)
        if r.n >= r.params.max_new_tokens or len(r.ids) + r.n >= self.e.max_model_len:
            return self._finish(s, emit, "length")
        if emit:
            r.out.put(Delta(emit, logprobs=r.logprobs))
            r.logprobs = []
        s.next = token

    def _finish(self, s: _Slot, text: str, reason: str, hit: bool = False) -> None:
        r = s.req
        if not hit:   # release what was held back: an incomplete character, a stop-string prefix
            rest, hit = r.stops.feed(r.utf8.decode(b"", final=True))
            text += rest + ("" if hit else r.stops.flush())
            reason = "stop" if hit else reason
        r.out.put(Delta(text, reason, len(r.ids), r.n, logprobs=r.logprobs))
        r.logprobs = []
        self._release(s)

    def _release(self, s: _Slot) -> None:
        if s.req is not None and s.req.sampler is not None:
            s.req.sampler.close()
        s.req, s.next = None, None


def _log_softmax(row):
    """A logits row (numpy) as natural-log probabilities (float64, so sums over a text stay exact)."""
    import numpy as np

    row = row.astype(np.float64)
    top = row.max()
    return row - (top + np.log(np.exp(row - top).sum()))


def _top(lp, k: int) -> list[tuple[int, float]]:
    import numpy as np

    idx = np.argpartition(-lp, k - 1)[:k]
    idx = idx[np.argsort(-lp[idx], kind="stable")]
    return [(int(i), float(lp[i])) for i in idx]


def _token_logprob(lp, token: int, k: int) -> TokenLogprob:
    return TokenLogprob(int(token), float(lp[token]), _top(lp, k) if k else [])


def _sampler(p: GenParams, n_vocab: int):
    """llama.cpp's sampler chain for one request, in the order llama-cpp-python's `generate` builds it."""
    from llama_cpp import _internals

    smp = _internals.LlamaSampler()
    if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
        smp.add_penalties(n_vocab, 64, p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
    if p.temperature == 0:
        smp.add_greedy()
    else:
        if p.top_k:
            smp.add_top_k(p.top_k)
        smp.add_top_p(p.top_p, 1)
        smp.add_temp(p.temperature)
        smp.add_dist(p.seed if p.seed is not None else random.getrandbits(31))
    return smp
