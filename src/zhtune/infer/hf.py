"""transformers backend: a base model (+ LoRA adapters applied unmerged) decoding concurrent requests
as one batch on a worker thread. Used through zhtune.infer.resolve.load_engine(path, backend="hf").

Why our own decode loop instead of `model.generate`: requests arrive at different times with different
parameters. One worker thread owns the model; new requests are prefilled and joined into the running
batch (left-padded KV cache), finished or cancelled rows leave it, and every row has its own sampling
parameters, stop rules and seed. On 2 CPU cores a batch of 16 gives ~5x the total tokens/s of one.
The engine is here; loading is in hf_load, the decode worker in hf_decode, score()'s batching in hf_score.
"""

from __future__ import annotations

import queue
import threading
import weakref

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import (Engine, GenParams, ModelSpec, Prompt, PromptTooLong, RequestStream, Scored,
                                 hf_token_bytes, prompt_ids, top_logprobs)
from zhtune.infer.hf_decode import Batch, Request, worker_main
from zhtune.infer.hf_load import apply_adapters, cache_arg, load_base, load_tokenizer
from zhtune.infer.hf_score import SCORE_LOGITS, SCORE_TOKENS, batches, next_scores, prefix_groups


# --- the engine ------------------------------------------------------------------------------

class HFEngine(Engine):
    backend = "hf"

    def __init__(self, spec: ModelSpec, dtype: str = "auto", load_in_8bit: bool = False,
                 load_in_4bit: bool = False, num_gpus: int | None = None, device: str | None = None,
                 max_batch_size: int = 16, max_model_len: int | None = None, **unknown):
        """max_model_len: shortens the model's context (max_position_embeddings), never stretches it."""
        if unknown:
            raise ZhtuneError(f"unknown option(s) for the hf backend: {', '.join(unknown)}", where="options",
                              expected="dtype, load_in_8bit, load_in_4bit, num_gpus, device, max_batch_size, "
                                       "max_model_len")
        import torch

        self.spec = spec
        self.template = spec.template
        self.tokenizer = load_tokenizer(spec.tokenizer)
        model = load_base(spec, dtype, load_in_8bit, load_in_4bit, num_gpus, device)
        self.model = apply_adapters(model, spec, len(self.tokenizer)).eval()
        self.device = next(self.model.parameters()).device
        self.model_name = (spec.loras[-1] if spec.loras else spec.base).name
        cfg = self.model.config
        self.max_model_len = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        if max_model_len:
            if max_model_len > self.max_model_len:
                raise ZhtuneError(f"--context-length {max_model_len} is more than the model's {self.max_model_len} "
                                  "tokens", where="--context-length", expected=f"at most {self.max_model_len}")
            self.max_model_len = int(max_model_len)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.cache_arg = cache_arg(self.model)
        self.bos_token = self.tokenizer.bos_token or ""
        self.eos_token = self.tokenizer.eos_token or ""
        self.stop_ids = self._end_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_batch_size = max(1, int(max_batch_size))
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()    # held by the worker per step and by embed()
        self._tok_lock = threading.Lock()  # the Rust tokenizer may not be entered from threads at once
        self._closed = False
        self._token_bytes = None         # made on first use (reads the whole vocabulary)
        self.active = 0                  # rows in the running batch (for tests and /metrics)
        self._worker = threading.Thread(target=worker_main, args=(weakref.ref(self), self._queue),
                                        name="zhtune-hf-decode", daemon=True)
        self._worker.start()
        self._torch = torch

    def _end_ids(self) -> set[int]:
        """eos, the model's generation eos ids, and template stop strings that are single tokens."""
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            ids.update(source if isinstance(source, list) else [source] if source is not None else [])
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[s] for s in self.template.stop if s in vocab)
        return ids

    # --- public API ------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: Prompt) -> list[int]:
        return prompt_ids(self, prompt)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str, bos: bool = True) -> list[int]:
        with self._tok_lock:
            return self.tokenizer(text, add_special_tokens=bos)["input_ids"]

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        if self._token_bytes is None:
            self._token_bytes = hf_token_bytes(self.tokenizer)
        with self._tok_lock:
            return self._token_bytes(ids)

    def score(self, sequences: list[list[int]], prompt: bool = True, top_k: int = 0,
              candidates: list[int] | tuple[int, ...] = ()) -> list[Scored]:
        self.check_score(sequences, top_k, candidates)
        results: list[Scored | None] = [None] * len(sequences)
        for i, scored, _ in self._scored(sequences, prompt, top_k, list(candidates)):
            results[i] = scored
        return results  # type: ignore[return-value]

    def score_and_complete(self, jobs: list[tuple[list[int], GenParams]], top_k: int):
        """One forward per prompt: its log-probs, and from the same last position the one token stream()
        would generate (max_new_tokens 1 needs no KV cache after it), through the decode worker's own
        sampling, end/stop rules and detokenizing (Batch.step)."""
        if any(params.max_new_tokens != 1 for _, params in jobs):
            return None
        for ids, params in jobs:
            self.check_request(params)
            if len(ids) >= self.max_model_len:
                raise PromptTooLong(len(ids), params.max_new_tokens, self.max_model_len)
        self.check_score([ids for ids, _ in jobs], top_k, ())
        results: list = [None] * len(jobs)
        tokens = Batch(self, queue.SimpleQueue())    # no rows, no cache: only its per-token code
        for i, scored, logits in self._scored([ids for ids, _ in jobs], True, top_k, []):
            r = self._request(*jobs[i])
            with self._lock, self._torch.inference_mode():
                tokens.start(r)
                tokens.step(r, logits)
            deltas = []
            while not r.out.empty():
                deltas.append(r.out.get())
            results[i] = (scored, deltas)
        return results

    def _scored(self, sequences: list[list[int]], prompt: bool, top_k: int, candidates: list[int]):
        """(index, Scored, the logits after the sequence [vocab]) for every sequence, a batch at a time.
        Batches hold sequences of similar lengths (little padding). Next-token scores (prompt=False):
        sequences that share a prefix (a benchmark's header and worked examples) form a group whose prefix
        runs once, its KV cache repeated for every row of the group's batches. A forward holds the model lock
        between decode steps, as embed() does, so scoring and serving share the model."""
        budget = SCORE_TOKENS if not prompt else max(1, min(SCORE_TOKENS, SCORE_LOGITS // self.vocab_size))
        groups = [(list(range(len(sequences))), 0)] if prompt else prefix_groups(sequences)
        for rows, shared in groups:
            prefix = self._prefix_cache(sequences[rows[0]][:shared]) if shared else None
            for batch in batches(rows, [len(sequences[i]) - shared for i in rows], shared, budget):
                chunk = [sequences[i][shared:] for i in batch]
                yield from zip(batch, *self._score_batch(chunk, prefix, prompt, top_k, candidates))

    def _prefix_cache(self, ids: list[int]) -> list:
        """The decoder's keys and values for `ids` (one row): [(keys, values)] per layer."""
        from transformers import DynamicCache

        torch = self._torch
        decoder, _ = self._decoder_and_head()
        cache = DynamicCache(config=self.model.config)
        with self._lock, torch.inference_mode():
            decoder(input_ids=torch.tensor([ids], device=self.device), use_cache=True, **{self.cache_arg: cache})
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _score_batch(self, chunk: list[list[int]], prefix: list | None, prompt: bool, top_k: int,
                     candidates: list[int]) -> tuple[list[Scored], object]:
        """One forward over right-padded rows (after `prefix`, whose cache is shared by every row): causal
        attention keeps the padding after each row out of its real positions, so no attention mask is needed
        (attention's fast path). The decoder's last hidden states go through the output head only where
        logits are wanted (each row's last position, or all). Returns the Scored and the logits after each
        row ([B, vocab] floats)."""
        torch = self._torch
        width = max(len(r) for r in chunk)
        ids = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in chunk], device=self.device)
        decoder, head = self._decoder_and_head()
        with self._lock, torch.inference_mode():
            kwargs: dict = {"use_cache": False}
            if prefix:   # expanded views; the cache copies them once as it appends this batch's keys
                from transformers import DynamicCache

                kv = [(k.expand(len(chunk), -1, -1, -1), v.expand(len(chunk), -1, -1, -1)) for k, v in prefix]
                kwargs = {self.cache_arg: DynamicCache(kv, config=self.model.config), "use_cache": True}
            hidden = decoder(input_ids=ids, **kwargs).last_hidden_state                         # [B, W, H]
            ends = torch.tensor([len(r) - 1 for r in chunk], device=self.device)
            rows = torch.arange(len(chunk), device=self.device)
            if not prompt:
                last = head(hidden[rows, ends]).float()                                          # [B, V]
                return next_scores(torch, last.log_softmax(-1), top_k, candidates), last
            logits = head(hidden)                                                                # [B, W, V]
            out = []
            for b, row in enumerate(chunk):
                lp = logits[b, :len(row)].float().log_softmax(-1)                                # [len, V]
                [nxt] = next_scores(torch, lp[-1:], top_k, candidates)
                nxt.tokens = [None, *top_logprobs(torch, lp[:-1], ids[b, 1:len(row)], top_k)]
                out.append(nxt)
            return out, logits[rows, ends].float()

    def _decoder_and_head(self):
        """The transformer body and the output head of the (possibly adapter-wrapped) causal LM: logits
        are head(last hidden state) in every family we load (llama, mistral, qwen2, qwen3)."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.get_decoder(), base.get_output_embeddings()

    def stream(self, prompt: Prompt, params: GenParams):
        self.check_request(params)
        with self._tok_lock:
            ids = self.tokenize_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(len(ids), params.max_new_tokens, self.max_model_len)
        req = self._request(ids, params)
        self._queue.put(req)
        return RequestStream(req)

    def _request(self, ids: list[int], params: GenParams) -> Request:
        """A generation of `ids`: its stop strings are the caller's and the template's that are no token."""
        return Request(ids, params, [*params.stop, *(s for s in self.template.stop
                                                      if s not in self.tokenizer.get_vocab())])

    def embed(self, texts: list[str]) -> list[list[float]]:
        torch = self._torch
        if not texts:
            return []
        with self._tok_lock:
            enc = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        enc = [e[: self.max_model_len] for e in enc]
        width = max(len(e) for e in enc)
        ids = torch.tensor([e + [self.pad_id] * (width - len(e)) for e in enc], device=self.device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=self.device)
        with self._lock, torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1].float()                      # [n, width, hidden]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().tolist()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            if threading.current_thread() is not self._worker:
                self._worker.join(timeout=30)

    def __del__(self):
        if not getattr(self, "_closed", True):
            self._closed = True
            self._queue.put(None)
