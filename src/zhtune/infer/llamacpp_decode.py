"""The llama.cpp backend's decode worker (zhtune.infer.llamacpp): one thread owns a llama_context with
n_parallel sequence slots and puts every running request in one llama_batch per step (each token tagged with
its slot's sequence id); scoring runs in a free slot between steps. A slot keeps its tokens' KV after a request
ends; the next request takes the free slot sharing the longest prefix with its prompt."""

from __future__ import annotations

import codecs
import queue
import random
from dataclasses import dataclass, field

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import Delta, Engine, GenParams, Scored, StopFilter, TokenLogprob, worker_loop


@dataclass(eq=False)
class Req:
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
class ScoreReq:
    sequences: list[list[int]]
    prompt: bool
    top_k: int
    candidates: list[int]
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False


@dataclass(eq=False)
class Slot:
    seq: int                         # llama.cpp sequence id
    tokens: list[int] = field(default_factory=list)    # what this sequence holds in the KV cache
    req: Req | None = None
    next: int | None = None          # sampled, to be fed in the next batch


def worker_main(engine_ref, requests: queue.SimpleQueue) -> None:
    """The decode thread: one Decoder (its slots keep their KV cache) across batches."""
    decoder: list[Decoder] = []

    def run_batch(engine: Engine, first: Req) -> None:
        if not decoder:
            decoder.append(Decoder(engine))
        decoder[0].run(first, requests)

    worker_loop(engine_ref, requests, run_batch, on_exit=lambda: decoder and decoder[0].batch.close())


class Decoder:
    """Slots (sequence ids) that persist across requests; one llama_batch per step for all of them."""

    def __init__(self, engine: Engine):
        from llama_cpp import _internals

        self.e = engine
        self.slots = [Slot(i) for i in range(engine.n_parallel)]
        self.batch = _internals.LlamaBatch(n_tokens=engine.n_batch, embd=0, n_seq_max=1, verbose=False)

    def run(self, first: Req, requests: queue.SimpleQueue) -> None:
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
                if isinstance(r, ScoreReq):   # runs now, in a free slot, between decode steps
                    self._score(r)
                else:
                    self._assign(r)
            active = [s for s in self.slots if s.req is not None]
            self.e.active = len(active)
            if not active:
                return
            self._step(active)

    def _assign(self, r: Req) -> None:
        """Give `r` the free slot whose cached tokens share the longest prefix with its prompt."""
        import llama_cpp

        def common(s: Slot) -> int:
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

    def _score(self, r: ScoreReq) -> None:
        try:
            slot = next(s for s in self.slots if s.req is None)
            r.out.put([self._score_one(slot, ids, r) for ids in r.sequences])
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            r.out.put(exc)

    def _score_one(self, slot: Slot, ids: list[int], r: ScoreReq) -> Scored:
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

    def _step(self, active: list[Slot]) -> None:
        import llama_cpp

        b = self.batch.batch
        n, outputs = 0, []

        def add(slot: Slot, token: int, logits: bool) -> None:
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

    def _advance(self, s: Slot, token: int) -> None:
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

    def _finish(self, s: Slot, text: str, reason: str, hit: bool = False) -> None:
        r = s.req
        if not hit:   # release what was held back: an incomplete character, a stop-string prefix
            rest, hit = r.stops.feed(r.utf8.decode(b"", final=True))
            text += rest + ("" if hit else r.stops.flush())
            reason = "stop" if hit else reason
        r.out.put(Delta(text, reason, len(r.ids), r.n, logprobs=r.logprobs))
        r.logprobs = []
        self._release(s)

    def _release(self, s: Slot) -> None:
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
