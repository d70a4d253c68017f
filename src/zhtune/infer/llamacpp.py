"""llama.cpp backend: a GGUF file through llama-cpp-python, prompts from our template registry.
Used through zhtune.infer.engine.load_engine("model.q4_k_m.gguf") (picked by the .gguf suffix).

llama-cpp-python's `Llama` object decodes one sequence at a time and is not thread-safe, so streams
take turns on a lock (a second one waits until the first finishes or is closed). Its KV cache keeps
the previous prompt, so the next turn of a chat only evaluates the new tokens.
"""

from __future__ import annotations

import codecs
import os
import random
import threading
from pathlib import Path

from zhtune.data.templates import TEMPLATES, get_template
from zhtune.errors import ZhtuneError
from zhtune.infer.engine import (Delta, Engine, GenParams, Prompt, PromptTooLong, StopFilter,
                                 match_chat_template)
from zhtune.io import read_run_yaml

ATTR_SPECIAL = (1 << 3) | (1 << 4)   # llama_token_attr CONTROL | USER_DEFINED


def _check_gguf(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if not path.is_file():
        raise ZhtuneError(f"GGUF file not found: {model}", where="--model", expected="an existing .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ZhtuneError(f"not a GGUF file: {model}", where="--model",
                              expected="a .gguf file written by `zhtune export gguf` or llama.cpp")
    return path


def _pick_template(name: str | None, path: Path, metadata: dict):
    if name:
        try:
            return get_template(name)
        except ZhtuneError as exc:
            exc.where = "--template"
            raise
    found = match_chat_template(metadata.get("tokenizer.chat_template"))
    if found:
        return found
    for folder in (path.parent, path.parent.parent):   # run.yaml of the model it was exported from
        run_name = (read_run_yaml(folder).get("config") or {}).get("template")
        if run_name in TEMPLATES:
            return TEMPLATES[run_name]
    return TEMPLATES["default"]


class LlamaCppEngine(Engine):
    backend = "llamacpp"

    def __init__(self, model: str | Path, loras=(), template: str | None = None, n_ctx: int = 0,
                 n_threads: int | None = None, n_batch: int = 512, **unknown):
        if unknown:
            raise ZhtuneError(f"unknown option(s) for the llamacpp backend: {', '.join(unknown)}",
                              where="options", expected="n_ctx, n_threads, n_batch")
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
        self._threads = n_threads or min(8, os.cpu_count() or 1)
        self._kwargs = dict(n_ctx=n_ctx, n_batch=n_batch, n_threads=self._threads, verbose=False)
        try:
            self.llm = Llama(str(self.path), **self._kwargs)
        except (ValueError, RuntimeError) as exc:
            raise ZhtuneError(f"llama.cpp cannot load {self.path}: {exc}", where="--model",
                              expected="a GGUF of a LLaMA-family model") from None
        self._embedder = None
        self.template = _pick_template(template, self.path, self.llm.metadata)
        self.model_name = self.path.stem
        self.max_model_len = self.llm.n_ctx()
        model = self.llm._model
        self.bos_token = model.token_get_text(self.llm.token_bos()) if self.llm.token_bos() >= 0 else ""
        self.eos_token = model.token_get_text(self.llm.token_eos()) if self.llm.token_eos() >= 0 else ""
        self.stop_ids = {t for t in (self.llm.token_eos(), model.token_eot()) if t >= 0}
        self.text_stops = []
        for s in self.template.stop:   # a stop string that is one special token stops by id
            ids = self.llm.tokenize(s.encode(), add_bos=False, special=True)
            if len(ids) == 1 and model.token_get_attr(ids[0]) & ATTR_SPECIAL:
                self.stop_ids.add(ids[0])
            else:
                self.text_stops.append(s)
        self.vocab_size = self.llm.n_vocab()
        self._lock = threading.Lock()
        self._closed = False

    # --- public API ------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: Prompt) -> list[int]:
        """Prompt ids as training built them: template segment by segment (raw text gets BOS)."""
        if isinstance(prompt, str):
            return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        return [i for seg in self.segments(prompt)
                for i in self.llm.tokenize(seg.encode("utf-8"), add_bos=False, special=True)]

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def stream(self, prompt: Prompt, params: GenParams):
        params.validate()
        if self._closed:
            raise ZhtuneError("engine is closed", expected="a live engine")
        bad = [i for i in params.stop_token_ids if i >= self.vocab_size]
        if bad:
            raise ZhtuneError(f"stop token id {bad[0]} is not in the vocabulary ({self.vocab_size})",
                              where="stop_token_ids", expected=f"ids < {self.vocab_size}")
        ids = self.tokenize_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(len(ids), params.max_new_tokens, self.max_model_len)
        return self._run(ids, params)

    def _run(self, ids: list[int], params: GenParams):
        """Generator: holds the lock from the first next() until the last token (or close())."""
        prompt_len, context = len(ids), ids[-8:]   # context: detokenize keeps a leading space right
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a split character
        stops = StopFilter([*params.stop, *self.text_stops])
        ends = self.stop_ids | set(params.stop_token_ids)
        n, reason, tail, hit = 0, "length", "", False
        with self._lock:
            self.llm.set_seed(params.seed if params.seed is not None else random.getrandbits(31))
            tokens = self.llm.generate(
                ids, top_k=params.top_k, top_p=params.top_p, min_p=0.0, temp=params.temperature,
                repeat_penalty=params.repetition_penalty, frequency_penalty=params.frequency_penalty,
                presence_penalty=params.presence_penalty)
            try:
                for token in tokens:
                    n += 1
                    if token in ends:
                        reason = "stop"
                        break
                    piece = self.llm.detokenize([token], prev_tokens=context)
                    context = context[-7:] + [token]
                    emit, hit = stops.feed(utf8.decode(piece))
                    if hit:
                        tail, reason = emit, "stop"
                        break
                    if n >= params.max_new_tokens or prompt_len + n >= self.max_model_len:
                        tail = emit
                        break
                    if emit:
                        yield Delta(emit)
            finally:
                tokens.close()
        if not hit:   # release what was held back: an incomplete character, a stop-string prefix
            rest, hit = stops.feed(utf8.decode(b"", final=True))
            tail += rest + ("" if hit else stops.flush())
            reason = "stop" if hit else reason
        yield Delta(tail, reason, prompt_len, n)

    def embed(self, texts: list[str]) -> list[list[float]]:
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

        with self._lock:
            if self._embedder is None:   # a second context in embedding mode, made on first use
                self._embedder = Llama(str(self.path), embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN,
                                       **self._kwargs)
            return [list(v) for v in self._embedder.embed(list(texts), normalize=True)]

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for llm in (self.llm, self._embedder):
                if llm is not None:
                    llm.close()
