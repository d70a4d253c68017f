"""transformers backend: a base model (+ LoRA adapters applied unmerged) decoding concurrent requests
as one batch on a worker thread. Used through zhtune.infer.resolve.load_engine(path, backend="hf").

Why our own decode loop instead of `model.generate`: requests arrive at different times with different
parameters. One worker thread owns the model; new requests are prefilled and joined into the running
batch (left-padded KV cache), finished or cancelled rows leave it, and every row has its own sampling
parameters, stop rules and seed. On 2 CPU cores a batch of 16 gives ~5x the total tokens/s of one.
"""

from __future__ import annotations

import queue
import random
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import (Delta, Engine, GenParams, ModelSpec, Prompt, PromptTooLong, RequestStream, Scored,
                                 StopFilter, fail_pending, hf_token_bytes, prompt_ids, top_logprobs,
                                 worker_loop)

HOLD_LIMIT = 6   # a UTF-8 character is at most 4 byte tokens: release text held longer than this
# score(): padded tokens per forward (activations), and logits kept per forward when every position
# is wanted ([tokens, vocab] floats: 2**27 of them is 512 MiB)
SCORE_TOKENS = 8192
SCORE_LOGITS = 2**27
SCORE_ROWS = 64
SHARED_MIN = 16    # a prefix at least this long shared by a group of sequences runs once (KV cache repeated)
GROUP_MIN = 8      # ... by at least this many (a smaller group would make batches too small to run well)


# --- loading ---------------------------------------------------------------------------------

def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a folder it cannot read
        raise ZhtuneError(f"cannot load the tokenizer from {folder}: {exc}", where=str(folder),
                          expected="tokenizer files (tokenizer.model / tokenizer.json + tokenizer_config.json)",
                          ) from None


def _pick_dtype(dtype: str, cuda: bool):
    import torch

    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype == "auto":
        if not cuda:
            return torch.float32   # fp32 on CPU: bf16 matmuls are not faster for decode everywhere
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in names:
        raise ZhtuneError(f"unknown dtype {dtype!r}", where="--dtype", expected="auto | fp32 | bf16 | fp16")
    return names[dtype]


def _load_base(spec: ModelSpec, dtype: str, load_in_8bit: bool, load_in_4bit: bool,
               num_gpus: int | None, device: str | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.from_pretrained(str(spec.base))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad config.json
        raise ZhtuneError(f"not a transformers model: {spec.base} ({exc})", where="--model",
                          expected="a folder with a valid config.json") from None
    from zhtune.model.load import check_local_model

    check_local_model(spec.base, where="--model")  # a config.json that is not these weights' is named by tensor
    cuda = torch.cuda.is_available() and device != "cpu"
    kwargs: dict = {"dtype": _pick_dtype(dtype, cuda)}
    if load_in_8bit and load_in_4bit:
        raise ZhtuneError("both 8-bit and 4-bit asked for", where="--load-in-8bit/--load-in-4bit",
                          expected="at most one of them")
    if load_in_8bit or load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ZhtuneError("8/4-bit loading needs bitsandbytes", where="--load-in-4bit",
                              hint="pip install 'zhtune[qlora]'") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=kwargs["dtype"], bnb_4bit_use_double_quant=True)
    if cuda:
        n = num_gpus or torch.cuda.device_count()
        if n > torch.cuda.device_count():
            raise ZhtuneError(f"--num-gpus {n} but only {torch.cuda.device_count()} GPUs are visible",
                              where="--num-gpus", expected=f"1..{torch.cuda.device_count()}")
        # device_map="auto" spreads layers over the GPUs we allow (as the seeds' --num_gpus)
        kwargs["device_map"] = {"": 0} if n == 1 else "auto"
        if n > 1:
            kwargs["max_memory"] = {i: torch.cuda.mem_get_info(i)[0] for i in range(n)}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(spec.base), **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for weights it cannot load
        raise ZhtuneError(f"cannot load model {spec.base}: {exc}", where="--model",
                          expected="an HF causal LM folder (config.json + safetensors weights)") from None
    return model


def _adapter_tensors(adapter: Path) -> dict:
    from safetensors import safe_open

    f = adapter / "adapter_model.safetensors"
    if not f.is_file():
        return {}
    with safe_open(str(f), "pt") as h:
        return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}  # noqa: SIM118 - safe_open has keys(), not __iter__


def _adapter_vocab(adapter: Path, shapes: dict) -> int | None:
    """Rows of the embedding this adapter expects (a resized vocabulary), if it carries one."""
    for key, shape in shapes.items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")) and len(shape) == 2:
            return shape[0]
        if "lora_embedding_A" in key:
            return shape[1]
    return None


def _check_adapter(model, adapter: Path, shapes: dict, flag: str) -> None:
    """Every module the adapter touches exists in the base with the shapes it was trained on."""
    modules = dict(model.named_modules())
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if not name.endswith(suffix):
                continue
            mod = modules.get(name[: -len(suffix)])
            if mod is None:
                raise ZhtuneError(f"adapter {adapter} was trained for another base: module "
                                  f"{name[: -len(suffix)]} does not exist in {model.config._name_or_path}",
                                  where=flag, expected="an adapter trained on this base model")
            want = getattr(mod, "in_features", None) if "lora_A" in suffix else getattr(mod, "out_features", None)
            got = shape[1] if "lora_A" in suffix else shape[0]
            if want is not None and want != got:
                raise ZhtuneError(f"adapter {adapter} was trained for another base: {name} has size {got}, "
                                  f"the base's {name[: -len(suffix)]} has {want}",
                                  where=flag, expected="an adapter trained on this base model (same hidden size)")


def _apply_adapters(model, spec: ModelSpec, tokenizer_len: int):
    from peft import PeftModel

    if not spec.loras:
        if tokenizer_len > model.get_input_embeddings().weight.shape[0]:
            raise ZhtuneError(f"tokenizer has {tokenizer_len} tokens but the model's embedding has "
                              f"{model.get_input_embeddings().weight.shape[0]} rows", where="--model",
                              expected="a tokenizer that matches the model (merge the vocab-expanded adapter first)")
        return model
    rows = model.get_input_embeddings().weight.shape[0]
    for i, lo in enumerate(spec.loras):
        shapes = _adapter_tensors(lo)
        vocab = _adapter_vocab(lo, shapes) or (tokenizer_len if lo == spec.tokenizer else None)
        if vocab and vocab != rows:   # a vocab-expanded adapter: grow the base first
            model.resize_token_embeddings(vocab, mean_resizing=False)
            rows = vocab
        _check_adapter(model if i == 0 else model.base_model.model, lo, shapes, f"--lora {lo}")
    try:
        model = PeftModel.from_pretrained(model, str(spec.loras[0]), adapter_name="a0", is_trainable=False)
        for i, lo in enumerate(spec.loras[1:], 1):
            model.load_adapter(str(lo), adapter_name=f"a{i}", is_trainable=False)
        if len(spec.loras) > 1:   # stacked adapters all active: base + sum of their deltas, unmerged
            model.base_model.set_adapter([f"a{i}" for i in range(len(spec.loras))])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ZhtuneError(f"adapter does not fit the base model {spec.base}: {str(exc).splitlines()[0]}",
                          where="--lora", expected="adapters trained on this base model") from None
    return model


def _cache_arg(model) -> str:
    """The keyword the model's forward takes its KV cache by: `cache` since transformers 5.25 (there
    `past_key_values` still works, with a FutureWarning on every call), `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model   # peft's forward is **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _prefix_groups(sequences: list[list[int]]) -> list[tuple[list[int], int]]:
    """Indices of `sequences` in groups that share a prefix, each with that prefix's length (0: rows with no
    prefix worth sharing, pooled). Sorted by ids, sequences with a common prefix are neighbours; a run of at
    least GROUP_MIN whose neighbours share >= SHARED_MIN tokens is one group, split further where that saves
    more prefix tokens (a benchmark: each subject's questions share its header and worked examples)."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    # lcp[k]: tokens order[k] and order[k + 1] share, each row keeping at least one token of its own
    lcp = [min(_common(sequences[a], sequences[b]), len(sequences[a]) - 1, len(sequences[b]) - 1)
           for a, b in zip(order, order[1:])]

    def best(lo: int, hi: int, depth: int = 0) -> tuple[list[tuple[list[int], int]], int]:
        """Groups of order[lo:hi] (neighbours share >= SHARED_MIN) and the prefix tokens they save."""
        if hi - lo < GROUP_MIN:
            return [(order[lo:hi], 0)], 0
        shared = min(lcp[lo:hi - 1])
        whole = [(order[lo:hi], shared)], (hi - lo - 1) * shared
        cuts = [k + 1 for k in range(lo, hi - 1) if lcp[k] == shared]
        if depth > 32:   # nested deeper than any benchmark's prompts: stop looking
            return whole
        split: list[tuple[list[int], int]] = []
        saved = 0
        for a, b in zip([lo, *cuts], [*cuts, hi]):
            groups, s = best(a, b, depth + 1)
            split += groups
            saved += s
        return (split, saved) if saved > whole[1] else whole

    groups, pool, lo = [], [], 0
    for hi in [k + 1 for k, n in enumerate(lcp) if n < SHARED_MIN] + [len(order)]:
        for rows, shared in best(lo, hi)[0]:
            if shared:
                groups.append((rows, shared))
            else:
                pool += rows
        lo = hi
    return groups + ([(pool, 0)] if pool else [])


def _batches(rows: list[int], lengths: list[int], shared: int, budget: int) -> list[list[int]]:
    """`rows` (lengths: tokens after the shared prefix) sorted by length and cut into batches of at most
    SCORE_ROWS rows and `budget` tokens, the prefix counted in every row (its KV cache is repeated per row):
    neighbours have similar lengths, so little of a batch is padding."""
    ranked = sorted(zip(lengths, rows))
    out: list[list[int]] = []
    for length, row in ranked:
        if not out or len(out[-1]) >= SCORE_ROWS or (len(out[-1]) + 1) * (shared + length) > budget:
            out.append([])
        out[-1].append(row)
    return out


def _next_scores(torch, logprobs, top_k: int, candidates: list[int]) -> list[Scored]:
    """logprobs [B, V] (log-softmaxed): each row's candidates and top_k next tokens, as Scored (no tokens)."""
    out = [Scored([], {}) for _ in range(logprobs.shape[0])]
    if candidates:
        picked = logprobs[:, candidates].tolist()                                               # [B, C]
        for scored, values in zip(out, picked):
            scored.next.update(zip(candidates, values))
    if top_k:
        values, indices = logprobs.topk(top_k, dim=-1)
        for scored, i, v in zip(out, indices.tolist(), values.tolist()):
            scored.next.update(zip(i, v))
    return out


# --- per-request state -------------------------------------------------------------------------

@dataclass(eq=False)   # identity, not field, equality: rows are looked up by object
class _Request:
    ids: list[int]                   # prompt token ids
    params: GenParams
    stops: list[str]
    out: "queue.SimpleQueue" = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    # decode state (worker thread only)
    generated: list[int] = field(default_factory=list)
    all_ids: object = None           # LongTensor [1, prompt + generated] for repetition penalty
    counts: object = None            # FloatTensor [vocab]: how often each token was generated
    rng: object = None               # torch.Generator for this request's seed
    window: list[int] = field(default_factory=list)   # ids being detokenized incrementally
    prefix: int = 0                  # window[:prefix] is context only
    read: int = 0                    # window[:read] has been emitted
    stop_filter: StopFilter | None = None
    logprobs: list = field(default_factory=list)      # TokenLogprobs not yet sent (params.logprobs set)


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
        self.tokenizer = _load_tokenizer(spec.tokenizer)
        model = _load_base(spec, dtype, load_in_8bit, load_in_4bit, num_gpus, device)
        self.model = _apply_adapters(model, spec, len(self.tokenizer)).eval()
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
        self.cache_arg = _cache_arg(self.model)
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
        self._worker = threading.Thread(target=_worker_main, args=(weakref.ref(self), self._queue),
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
        sampling, end/stop rules and detokenizing (_Batch.step)."""
        if any(params.max_new_tokens != 1 for _, params in jobs):
            return None
        for ids, params in jobs:
            self.check_request(params)
            if len(ids) >= self.max_model_len:
                raise PromptTooLong(len(ids), params.max_new_tokens, self.max_model_len)
        self.check_score([ids for ids, _ in jobs], top_k, ())
        results: list = [None] * len(jobs)
        tokens = _Batch(self, queue.SimpleQueue())    # no rows, no cache: only its per-token code
        for i, scored, logits in self._scored([ids for ids, _ in jobs], True, top_k, []):
            r = self._request(*jobs[i])
            with self._lock, self._torch.inference_mode():
                tokens._start(r)
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
        groups = [(list(range(len(sequences))), 0)] if prompt else _prefix_groups(sequences)
        for rows, shared in groups:
            prefix = self._prefix_cache(sequences[rows[0]][:shared]) if shared else None
            for batch in _batches(rows, [len(sequences[i]) - shared for i in rows], shared, budget):
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
                return _next_scores(torch, last.log_softmax(-1), top_k, candidates), last
            logits = head(hidden)                                                                # [B, W, V]
            out = []
            for b, row in enumerate(chunk):
                lp = logits[b, :len(row)].float().log_softmax(-1)                                # [len, V]
                [nxt] = _next_scores(torch, lp[-1:], top_k, candidates)
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

    def _request(self, ids: list[int], params: GenParams) -> _Request:
        """A generation of `ids`: its stop strings are the caller's and the template's that are no token."""
        return _Request(ids, params, [*params.stop, *(s for s in self.template.stop
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


# --- the decode worker -----------------------------------------------------------------------

def _worker_main(engine_ref, requests: queue.SimpleQueue) -> None:
    """The decode thread: each batch starts from one request and takes more as it runs."""
    worker_loop(engine_ref, requests, lambda engine, first: _Batch(engine, requests).run([first]))


class _Batch:
    """One continuous batch: rows join (prefill + merge into the left-padded cache) and leave."""

    def __init__(self, engine: HFEngine, requests: queue.SimpleQueue):
        self.e = engine
        self.torch = engine._torch
        self.requests = requests
        self.rows: list[_Request] = []
        self.cache = None
        self.mask = None             # LongTensor [B, L]: 1 for real tokens, 0 for left padding
        self.stopped = False
        self.joinable = True         # plain tensor caches can take new rows mid-flight

    def run(self, first: list[_Request]) -> None:
        pending = first
        while True:
            pending += self._take_new(self.e.max_batch_size - len(self.rows) - len(pending))
            pending = [r for r in pending if not r.cancelled]
            if not self.rows and not pending:
                return
            join, pending = (pending, []) if pending and (not self.rows or self.joinable) else ([], pending)
            with self.e._lock, self.torch.inference_mode():
                try:
                    logits = self._prefill(join) if join else self._decode()
                    self._sample_and_emit(join or self.rows, logits)
                except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                    for r in {id(r): r for r in self.rows + join + pending}.values():
                        r.out.put(exc)
                    return
            if self.stopped:
                for r in pending:
                    r.out.put(ZhtuneError("engine was closed", expected="a live engine"))
                return

    def _take_new(self, room: int) -> list[_Request]:
        new = []
        while room > len(new):
            try:
                item = self.requests.get_nowait()
            except queue.Empty:
                break
            if item is None:       # close(): finish nothing more; fail what is waiting
                self.stopped = True
                fail_pending(self.requests, None)
                for r in self.rows:
                    r.out.put(ZhtuneError("engine was closed", expected="a live engine"))
                self.rows = []
                break
            new.append(item)
        return new

    # --- model calls -----------------------------------------------------------------------
    def _prefill(self, new: list[_Request]):
        torch = self.torch
        from transformers import DynamicCache

        width = max(len(r.ids) for r in new)
        ids = torch.tensor([[self.e.pad_id] * (width - len(r.ids)) + r.ids for r in new], device=self.e.device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in new], device=self.e.device)
        cache = DynamicCache(config=self.e.model.config)
        out = self.e.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           use_cache=True, logits_to_keep=1, **{self.e.cache_arg: cache})   # fills `cache`
        for r in new:
            self._start(r)
        if self.rows:
            self._merge(cache, mask)
        else:   # sliding-window or other cache types: new rows wait until this batch is done
            self.cache, self.mask = cache, mask
            self.joinable = self._mergeable(self.cache)
        self.rows += new
        return out.logits[:, -1, :].float()

    def _mergeable(self, cache) -> bool:
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in cache.layers)

    def _merge(self, cache, mask) -> None:
        """Concatenate a new batch's cache to the running one, left-padding the shorter."""
        torch = self.torch
        width = max(self.mask.shape[1], mask.shape[1])

        def lpad(t, dim):   # t: [b, heads, len, head_dim] (dim=2) or mask [b, len] (dim=1)
            missing = width - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([lpad(old.keys, 2), lpad(new.keys, 2)], 0)
            old.values = torch.cat([lpad(old.values, 2), lpad(new.values, 2)], 0)
        self.mask = torch.cat([lpad(self.mask, 1), lpad(mask, 1)], 0)

    def _decode(self):
        torch = self.torch
        ids = torch.tensor([[r.generated[-1]] for r in self.rows], device=self.e.device)   # [B, 1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)       # [B, L+1]
        pos = self.mask.sum(-1, keepdim=True) - 1                                          # [B, 1]
        out = self.e.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True,
                           **{self.e.cache_arg: self.cache})
        return out.logits[:, -1, :].float()

    def _drop(self, keep: list[int]) -> None:
        torch = self.torch
        self.e.active = len(keep)
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        idx = torch.tensor(keep, device=self.e.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        # columns that are padding in every remaining row are dead weight: trim them
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if lead and self.joinable:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self.mask = self.mask[:, lead:]

    # --- sampling and text ------------------------------------------------------------------
    def _start(self, r: _Request) -> None:
        torch = self.torch
        p = r.params
        r.all_ids = torch.tensor([r.ids], device=self.e.device)
        if p.frequency_penalty or p.presence_penalty:
            r.counts = torch.zeros(self.e.vocab_size, device=self.e.device)
        if p.temperature > 0:
            r.rng = torch.Generator(device=self.e.device)
            r.rng.manual_seed(p.seed if p.seed is not None else random.getrandbits(63))
        # detokenize relative to the prompt's last tokens so a leading space is kept right
        r.window = list(r.ids[-4:])
        r.prefix = 0
        r.read = len(r.window)
        r.stop_filter = StopFilter(r.stops)

    def _sample_and_emit(self, rows: list[_Request], logits) -> None:
        """logits [len(rows), vocab]: one next token for each of `rows` (all rows, or the new ones)."""
        where = {id(r): i for i, r in enumerate(rows)}
        keep = []
        for i, r in enumerate(self.rows):
            if id(r) in where and self.step(r, logits[where[id(r)]]):
                continue
            if not r.cancelled:
                keep.append(i)
        self._drop(keep)

    def step(self, r: _Request, logits) -> bool:
        """r's next token from the logits after its ids ([vocab], changed in place), emitted; True when r is
        finished (or cancelled). Also HFEngine.score_and_complete's one token, from its scoring forward."""
        # the raw distribution, before _sample applies penalties and temperature in place
        lp = logits.log_softmax(-1) if r.params.logprobs is not None else None
        token = _sample(self.torch, r, logits)
        if lp is not None:
            r.logprobs += top_logprobs(self.torch, lp[None], lp.new_tensor([token]).long(), r.params.logprobs)
        return self._advance(r, token)

    def _advance(self, r: _Request, token: int) -> bool:
        """Record `token` for `r`, emit text; True when `r` is finished (or cancelled)."""
        if r.cancelled:
            return True
        r.generated.append(token)
        if r.counts is not None:
            r.counts[token] += 1
        if r.params.repetition_penalty != 1.0:
            r.all_ids = self.torch.cat([r.all_ids, r.all_ids.new_tensor([[token]])], 1)
        n = len(r.generated)
        if token in self.e.stop_ids or token in r.params.stop_token_ids:
            return self._finish(r, self._text(r, flush=True), "stop")
        emit, hit = r.stop_filter.feed(self._text(r, flush=False))
        if hit:
            return self._finish(r, emit, "stop", filtered=True)
        if n >= r.params.max_new_tokens or len(r.ids) + n >= self.e.max_model_len:
            return self._finish(r, emit + r.stop_filter.feed(self._text(r, flush=True))[0], "length",
                                filtered=True)
        if emit:
            r.out.put(Delta(emit, logprobs=r.logprobs))
            r.logprobs = []
        return False

    def _finish(self, r: _Request, text: str, reason: str, filtered: bool = False) -> bool:
        if not filtered:
            text, hit = r.stop_filter.feed(text)
        else:
            hit = False
        if not hit:
            text += r.stop_filter.flush()
        r.out.put(Delta(text, reason, len(r.ids), len(r.generated), logprobs=r.logprobs))
        r.logprobs = []
        return True

    def _text(self, r: _Request, flush: bool) -> str:
        """New text of r's generated tokens (incremental decode; holds an incomplete character)."""
        tok = self.e.tokenizer
        if not flush and r.generated[-1] not in self.e.stop_ids:
            r.window.append(r.generated[-1])
        before = tok.decode(r.window[r.prefix:r.read], skip_special_tokens=True)
        after = tok.decode(r.window[r.prefix:], skip_special_tokens=True)
        if not flush and (after.endswith("\ufffd") and len(r.window) - r.read < HOLD_LIMIT):
            return ""
        if len(after) <= len(before) and not flush:
            return ""
        r.prefix, r.read = r.read, len(r.window)
        return after[len(before):] if after.startswith(before) else after


def _sample(torch, r: _Request, logits) -> int:
    """logits [vocab] -> next token id under r's parameters (never raises on extreme values)."""
    p = r.params
    if p.repetition_penalty != 1.0:   # transformers' rule: over prompt + generated tokens
        seen = r.all_ids[0]
        scores = logits[seen]
        logits[seen] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
    if r.counts is not None:          # OpenAI's frequency/presence penalties (generated tokens only)
        logits -= p.frequency_penalty * r.counts + p.presence_penalty * (r.counts > 0).float()
    # penalties like 1e-30 overflow to inf: keep the order, drop the infinities
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    if p.temperature < 1e-5:          # 0 (and anything this close to it) is greedy
        return int(logits.argmax())
    greedy = int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs_sorted = sorted_logits.softmax(-1)
        remove = probs_sorted.cumsum(-1) - probs_sorted > p.top_p   # keep the smallest set reaching top_p
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = logits.softmax(-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return greedy
    return int(torch.multinomial(probs, 1, generator=r.rng))
