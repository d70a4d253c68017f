"""The engine contract every front end (chat, webui, serve, rag, eval) relies on: messages or a prompt in,
a stream of text deltas out. Backends: hf.py (transformers + adapters), llamacpp.py (GGUF), vllm.py (GPU);
each imports only this module. Which backend and template a path gets: zhtune.infer.resolve.

    from zhtune.infer.resolve import load_engine
    engine = load_engine("out/merged")                       # backend picked from what the path is
    for delta in engine.stream([{"role": "user", "content": "你好"}], GenParams(max_new_tokens=64)):
        print(delta.text, end="", flush=True)

Contract every backend keeps (front ends rely on it):
- prompts are built only by the training template registry (zhtune.data.templates), never here;
- `stream` may be called from several threads at once; the engine queues or batches internally;
- `stream` checks its input when called (before the first delta): bad params raise ZhtuneError naming
  the field, and a prompt that leaves no room in the context raises PromptTooLong (a ZhtuneError
  carrying prompt_tokens / max_new_tokens / max_model_len, so an API can answer 400 with them).
  We refuse rather than silently cut the conversation: the front end decides what to drop;
- a prompt that fits but whose prompt + max_new_tokens exceeds the context stops at the context
  with finish_reason "length";
- closing the iterator `stream` returned (generator.close(), or dropping it) cancels that generation;
- the last Delta of a stream carries finish_reason "stop" (end token / stop string) or "length",
  and the prompt_tokens / completion_tokens counts;
  stop strings are never part of the returned text; text never ends mid-character;
- a prompt may also be a list of token ids: used as is (no template, no BOS added), checked against
  the vocabulary (a ZhtuneError naming "prompt" otherwise);
- with GenParams.logprobs = k (not None) every sampled token, the end token included, reaches the
  caller in some Delta's `logprobs` (in order): its log-probability under the model's raw
  distribution (before sampling parameters) and the k most likely tokens;
- `score` gives the log-probabilities a model assigns to given token sequences (prompt log-probs for
  echo and bits per character; next-token log-probs for answer letters), computed in batches;
- `score_and_complete` (echo with logprobs and max_new_tokens 1: lm-evaluation-harness's log-likelihood
  request) gives what `score` and `stream` would, from one forward per prompt; None where a backend cannot.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

from zhtune.data.templates import Message, Template
from zhtune.errors import ZhtuneError

# raw text (used as is, BOS first), a conversation (rendered by the template) or token ids (used as is)
Prompt = Union[str, list[Message], list[int]]
MAX_TOP_LOGPROBS = 20   # alternatives per token a caller may ask for (vLLM's default cap)


def is_token_ids(prompt) -> bool:
    """A prompt given as token ids (a non-empty list of ints), not a conversation."""
    return (isinstance(prompt, list) and bool(prompt)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt))


@dataclass
class GenParams:
    max_new_tokens: int = 512
    temperature: float = 0.7          # 0 means greedy
    top_p: float = 0.9
    top_k: int = 40                   # 0 disables
    repetition_penalty: float = 1.1   # 1.0 disables (multiplicative, as transformers/llama.cpp)
    frequency_penalty: float = 0.0    # OpenAI-style, -2..2
    presence_penalty: float = 0.0     # OpenAI-style, -2..2
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None       # None: off; k: each sampled token's log-prob and the k most likely

    def validate(self) -> "GenParams":
        def num(x, kind=(int, float)):
            return isinstance(x, kind) and not isinstance(x, bool)

        checks = [
            ("max_new_tokens", num(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= 1_000_000,
             "an integer >= 1"),
            ("temperature", num(self.temperature) and 0.0 <= self.temperature <= 5.0, "a number in [0, 5]"),
            ("top_p", num(self.top_p) and 0.0 < self.top_p <= 1.0, "a number in (0, 1]"),
            ("top_k", num(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("repetition_penalty", num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
             "a number in (0, 10]"),
            ("frequency_penalty", num(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
             "a number in [-2, 2]"),
            ("presence_penalty", num(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
             "a number in [-2, 2]"),
            ("stop", isinstance(self.stop, (list, tuple)) and len(self.stop) <= 16
             and all(isinstance(s, str) and s for s in self.stop), "at most 16 non-empty strings"),
            ("stop_token_ids", isinstance(self.stop_token_ids, (list, tuple))
             and all(num(i, int) and i >= 0 for i in self.stop_token_ids), "a list of token ids >= 0"),
            ("seed", self.seed is None or (num(self.seed, int) and 0 <= self.seed < 2**63), "an integer >= 0"),
            ("logprobs", self.logprobs is None or (num(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
             f"an integer in 0..{MAX_TOP_LOGPROBS} (alternatives per token)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ZhtuneError(f"generation parameter {name}={getattr(self, name)!r} is out of range",
                                  where=name, expected=expected)
        return self


@dataclass
class TokenLogprob:
    """One token's natural-log probability under the model, with the most likely alternatives."""
    id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # (id, logprob), most likely first


@dataclass
class Scored:
    """Engine.score's answer for one token sequence ids."""
    tokens: list[TokenLogprob | None]   # [i]: log P(ids[i] | ids[:i]) (None at 0); [] when prompt=False
    next: dict[int, float]              # log P(t | ids) for the candidates and the top_k most likely t


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None   # None while streaming; "stop" | "length" on the last delta
    prompt_tokens: int = 0             # set on the last delta (usage numbers for the API)
    completion_tokens: int = 0         # set on the last delta: tokens generated (incl. the end token)
    logprobs: list[TokenLogprob] = field(default_factory=list)   # sampled tokens since the last delta


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class PromptTooLong(ZhtuneError):
    """The prompt leaves no room to generate: prompt_tokens >= max_model_len (numbers for an HTTP 400)."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_model_len: int):
        super().__init__(f"prompt is {prompt_tokens} tokens; the model's context is {max_model_len} tokens",
                         where="prompt", expected=f"a prompt shorter than {max_model_len} tokens",
                         hint="shorten the conversation (e.g. /clear in chat) or the document")
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.max_model_len = max_model_len


class StopFilter:
    """Turns generated text pieces into safe deltas: cuts at the first stop string and holds back
    any tail that might be the start of one, so a stop string never reaches the caller."""

    def __init__(self, stops: list[str] | tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.hold = ""          # text not yet released (could start a stop string)
        self.started = False    # has any text of the answer been seen yet

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit)."""
        if not self.started and piece:
            # training tokenised each answer on its own, so its first piece carries sentencepiece's
            # dummy-prefix space ("▁北京"); drop it as tokenizer.decode(answer_ids) does
            self.started = True
            piece = piece[1:] if piece.startswith(" ") else piece
        text = self.hold + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hold = ""
            return text[:cut], True
        keep = 0   # longest suffix of text that is a proper prefix of a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self.hold = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.hold = self.hold, ""
        return text


def fail_pending(requests: queue.SimpleQueue, first) -> None:
    """A backend worker is shutting down: answer `first` and every queued request with an error."""
    items = [first]
    while True:
        try:
            items.append(requests.get_nowait())
        except queue.Empty:
            break
    for r in items:
        if r is not None:
            r.out.put(ZhtuneError("engine was closed", expected="a live engine"))


def worker_loop(engine_ref, requests: queue.SimpleQueue, run_batch: Callable, on_exit: Callable | None = None,
                ) -> None:
    """The decode thread of a worker backend (hf, llamacpp): wait for a request, `run_batch(engine,
    first)` (which takes more from `requests` while it runs), repeat until the engine is closed or
    garbage-collected. Holds only a weak reference between batches so a dropped engine is freed;
    whatever is still queued at the end gets an error, never silence."""
    try:
        while True:
            first = requests.get()
            engine = engine_ref()
            if first is None or engine is None or engine._closed:
                fail_pending(requests, first)
                return
            try:
                run_batch(engine, first)
            except BaseException as exc:  # noqa: BLE001 - never leave a caller waiting forever
                print(f"zhtune {engine.backend} worker error: {exc!r}", file=sys.stderr)
            if engine._closed:     # close() arrived while the batch ran (its None was consumed there)
                fail_pending(requests, None)
                return
            del engine
    finally:
        if on_exit is not None:
            on_exit()


class RequestStream:
    """The iterator a worker-thread backend's `stream` returns: deltas from `req.out` (a queue);
    close() or dropping it sets `req.cancelled`, which the worker checks every step."""

    def __init__(self, req):
        self._req = req
        self._done = False

    def __iter__(self):
        return self

    def __next__(self) -> Delta:
        if self._done:
            raise StopIteration
        item = self._req.out.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason:
            self._done = True
        return item

    def close(self) -> None:
        self._req.cancelled = True
        self._done = True

    def __del__(self):
        self._req.cancelled = True


class Engine:
    """What every backend provides. Backends live in hf.py, llamacpp.py, vllm.py."""

    backend: str = ""
    model_name: str = ""            # shown by /v1/models
    template: Template
    max_model_len: int = 0          # context length in tokens
    bos_token: str = "<s>"          # the literal special-token strings the template writes
    eos_token: str = "</s>"

    def format(self, prompt: Prompt) -> str:
        """A conversation rendered by the template (or raw text as is)."""
        if isinstance(prompt, str):
            return prompt
        if not isinstance(prompt, list):
            raise ZhtuneError(f"prompt is a {type(prompt).__name__}", where="prompt",
                              expected="a string or a list of {role, content} messages")
        return self.template.render(prompt, self.bos_token, self.eos_token)

    def segments(self, prompt: Prompt) -> list[str]:
        """The prompt as training tokenised it: each template segment (a turn's prompt, an answer)
        is tokenised on its own and the ids concatenated (zhtune.data.sft does the same)."""
        if isinstance(prompt, str):
            return [prompt]
        self.format(prompt)   # type checks
        return [seg for pair in self.template.encode_pairs(prompt, self.bos_token, self.eos_token)
                for seg in pair if seg]

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of raw text as the backend's tokenizer gives them (BOS first when `bos`)."""
        raise NotImplementedError

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        """The bytes each token adds to the text, in order (special tokens: their literal text)."""
        raise NotImplementedError

    def check_ids(self, ids: list[int], where: str = "prompt") -> None:
        """Token ids given by a caller are in the vocabulary (a ZhtuneError naming `where` otherwise)."""
        vocab = getattr(self, "vocab_size", 0) or 0
        for i, t in enumerate(ids):
            if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab):
                raise ZhtuneError(f"token id {t!r} at position {i} is not in the vocabulary ({vocab} tokens)",
                                  where=where, expected=f"token ids in 0..{vocab - 1}")

    def score(self, sequences: list[list[int]], prompt: bool = True, top_k: int = 0,
              candidates: list[int] | tuple[int, ...] = ()) -> list[Scored]:
        """The log-probabilities the model gives each token sequence, in batches the backend chooses.
        prompt: every position's log P(ids[i] | ids[:i]) with the top_k alternatives (else only the
        next token, which costs one position of logits); candidates: next-token ids whose log-probs
        are wanted whatever their rank (answer letters). Sequences must fit the context."""
        raise NotImplementedError

    def score_and_complete(self, jobs: list[tuple[list[int], GenParams]],
                           top_k: int) -> list[tuple[Scored, list[Delta]]] | None:
        """For each (prompt ids, params) with params.max_new_tokens == 1: score(ids, prompt=True, top_k)'s
        answer and the deltas stream(ids, params) yields, both from the forward that scores the prompt.
        None where the backend cannot (any max_new_tokens > 1, or this default): score, then stream."""
        return None

    def check_score(self, sequences: list[list[int]], top_k: int, candidates) -> None:
        """score's input checks every backend shares: ids in the vocabulary, lengths within the context."""
        if not isinstance(top_k, int) or not 0 <= top_k <= MAX_TOP_LOGPROBS:
            raise ZhtuneError(f"top_k={top_k!r} is out of range", where="top_k", expected=f"0..{MAX_TOP_LOGPROBS}")
        self.check_ids(list(candidates), where="candidates")
        for n, ids in enumerate(sequences):
            if not ids or len(ids) > self.max_model_len:
                raise ZhtuneError(f"sequence {n} has {len(ids)} tokens", where="prompt",
                                  expected=f"1..{self.max_model_len} tokens (the model's context)")
            self.check_ids(ids)

    def check_request(self, params: GenParams) -> None:
        """What every backend checks before a generation: parameters, a live engine, stop ids in range."""
        params.validate()
        if getattr(self, "_closed", False):
            raise ZhtuneError("engine is closed", expected="a live engine")
        vocab = getattr(self, "vocab_size", None)
        bad = [i for i in params.stop_token_ids if vocab is not None and i >= vocab]
        if bad:
            raise ZhtuneError(f"stop token id {bad[0]} is not in the vocabulary ({vocab})",
                              where="stop_token_ids", expected=f"ids < {vocab}")

    def stream(self, prompt: Prompt, params: GenParams) -> Iterator[Delta]:
        raise NotImplementedError

    def generate(self, prompts: list[Prompt], params: GenParams) -> list[Completion]:
        """Batch form: one Completion per prompt. Runs the streams concurrently so backends that
        batch (hf) decode them together; prompt/completion token counts are measured, not guessed."""
        streams = [self.stream(p, params) for p in prompts]   # validates every prompt up front
        results: list[Completion | BaseException | None] = [None] * len(prompts)

        def run(i: int) -> None:
            try:
                text, last = "", Delta("")
                for last in streams[i]:
                    text += last.text
                results[i] = Completion(text, last.finish_reason or "length", last.prompt_tokens,
                                        last.completion_tokens)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled last hidden states, L2-normalised (as Chinese-LLaMA-Alpaca-2's server)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model (and any worker threads)."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ModelSpec:
    """What a transformers-side backend (hf, vllm) is given: base model folder, adapters, template.
    zhtune.infer.resolve.resolve_model works it out from what earlier stages wrote."""
    base: Path
    loras: list[Path]
    template: Template
    template_source: str            # "--template" | "run.yaml" | "chat_template" | "default"
    tokenizer: Path                 # folder whose tokenizer to use (the last adapter carrying one)


def prompt_ids(engine: Engine, prompt: Prompt) -> list[int]:
    """Prompt ids exactly as training built them, with the engine's transformers tokenizer (hf and
    vllm backends): a conversation segment by segment, raw text with BOS, token ids as given."""
    if is_token_ids(prompt):
        engine.check_ids(prompt)
        return list(prompt)
    if isinstance(prompt, str):
        return engine.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return [i for ids in engine.tokenizer(engine.segments(prompt), add_special_tokens=False)["input_ids"]
            for i in ids]


def hf_token_bytes(tokenizer) -> Callable[[list[int]], list[bytes]]:
    """Engine.token_bytes for a transformers tokenizer (hf and vllm backends): each piece's bytes,
    read from the vocabulary: SentencePiece pieces ("▁" is a space, "<0xE4>" a byte) or byte-level
    BPE pieces (GPT-2's printable stand-ins for bytes)."""
    import json

    try:
        decoder = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
    except Exception:  # noqa: BLE001 - a slow tokenizer: no byte-level decoder to find
        decoder = ""
    byte_of = {}
    if "ByteLevel" in decoder:   # the inverse of GPT-2's bytes_to_unicode
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        extra = [b for b in range(256) if b not in printable]
        byte_of = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(extra)}
    special = set(tokenizer.all_special_ids)

    def piece_bytes(token_id: int, piece: str | None) -> bytes:
        if piece is None:
            return b""
        if token_id in special:
            return piece.encode("utf-8")
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        if byte_of and all(c in byte_of for c in piece):
            return bytes(byte_of[c] for c in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_bytes(ids: list[int]) -> list[bytes]:
        return [piece_bytes(i, p) for i, p in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)))]

    return token_bytes


def top_logprobs(torch, logprobs, ids, k: int) -> list[TokenLogprob]:
    """logprobs [n, vocab] (log-softmaxed rows), ids [n]: each id's log-prob and the k most likely."""
    chosen = logprobs.gather(-1, ids[:, None])[:, 0].tolist()
    if k:
        values, indices = logprobs.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(ids.tolist(), chosen, tops)]
