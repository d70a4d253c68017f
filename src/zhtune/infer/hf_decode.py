"""The transformers backend's decode worker (zhtune.infer.hf): one thread owns the model and runs a
continuous batch; new requests are prefilled and joined into the running batch (left-padded KV cache),
finished or cancelled rows leave it, and every row has its own sampling parameters, stop rules and seed."""

from __future__ import annotations

import queue
import random
from dataclasses import dataclass, field

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import Delta, Engine, GenParams, StopFilter, fail_pending, top_logprobs, worker_loop

HOLD_LIMIT = 6   # a UTF-8 character is at most 4 byte tokens: release text held longer than this


@dataclass(eq=False)   # identity, not field, equality: rows are looked up by object
class Request:
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



def worker_main(engine_ref, requests: queue.SimpleQueue) -> None:
    """The decode thread: each batch starts from one request and takes more as it runs."""
    worker_loop(engine_ref, requests, lambda engine, first: Batch(engine, requests).run([first]))


class Batch:
    """One continuous batch: rows join (prefill + merge into the left-padded cache) and leave."""

    def __init__(self, engine: Engine, requests: queue.SimpleQueue):
        self.e = engine
        self.torch = engine._torch
        self.requests = requests
        self.rows: list[Request] = []
        self.cache = None
        self.mask = None             # LongTensor [B, L]: 1 for real tokens, 0 for left padding
        self.stopped = False
        self.joinable = True         # plain tensor caches can take new rows mid-flight

    def run(self, first: list[Request]) -> None:
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

    def _take_new(self, room: int) -> list[Request]:
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
    def _prefill(self, new: list[Request]):
        torch = self.torch
        from transformers import DynamicCache

        width = max(len(r.ids) for r in new)
        ids = torch.tensor([[self.e.pad_id] * (width - len(r.ids)) + r.ids for r in new], device=self.e.device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in new], device=self.e.device)
        cache = DynamicCache(config=self.e.model.config)
        out = self.e.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           use_cache=True, logits_to_keep=1, **{self.e.cache_arg: cache})   # fills `cache`
        for r in new:
            self.start(r)
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
    def start(self, r: Request) -> None:
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

    def _sample_and_emit(self, rows: list[Request], logits) -> None:
        """logits [len(rows), vocab]: one next token for each of `rows` (all rows, or the new ones)."""
        where = {id(r): i for i, r in enumerate(rows)}
        keep = []
        for i, r in enumerate(self.rows):
            if id(r) in where and self.step(r, logits[where[id(r)]]):
                continue
            if not r.cancelled:
                keep.append(i)
        self._drop(keep)

    def step(self, r: Request, logits) -> bool:
        """r's next token from the logits after its ids ([vocab], changed in place), emitted; True when r is
        finished (or cancelled). Also HFEngine.score_and_complete's one token, from its scoring forward."""
        # the raw distribution, before sample applies penalties and temperature in place
        lp = logits.log_softmax(-1) if r.params.logprobs is not None else None
        token = sample(self.torch, r, logits)
        if lp is not None:
            r.logprobs += top_logprobs(self.torch, lp[None], lp.new_tensor([token]).long(), r.params.logprobs)
        return self._advance(r, token)

    def _advance(self, r: Request, token: int) -> bool:
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

    def _finish(self, r: Request, text: str, reason: str, filtered: bool = False) -> bool:
        if not filtered:
            text, hit = r.stop_filter.feed(text)
        else:
            hit = False
        if not hit:
            text += r.stop_filter.flush()
        r.out.put(Delta(text, reason, len(r.ids), len(r.generated), logprobs=r.logprobs))
        r.logprobs = []
        return True

    def _text(self, r: Request, flush: bool) -> str:
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


def sample(torch, r: Request, logits) -> int:
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
