"""Bits per character of held-out text over the engine (`zhtune eval --task ppl`): each non-empty line
is scored alone, BOS first, and its tokens' negative log2-probabilities are summed and divided by the
line's characters. Per character, not per token, so a base and its vocabulary-expanded child (fewer,
longer tokens) are compared honestly. Lines are streamed: memory does not grow with the file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import Engine

LINES_PER_CALL = 64


def read_lines(path: Path, limit: int | None = None) -> Iterator[tuple[str, str]]:
    """(file:line, text) of each non-empty line; a file that is not UTF-8 is named by line."""
    if not path.is_file():
        raise ZhtuneError(f"not a file: {path}", where="--data", expected="a UTF-8 text file, one passage per line")
    n = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise ZhtuneError(f"line is not UTF-8 ({exc.reason} at byte {exc.start})", where=f"{path}:{lineno}",
                                  expected="UTF-8 text") from None
            if text.strip():
                yield f"{path}:{lineno}", text
                n += 1
                if limit and n >= limit:
                    return


def windows(engine: Engine, text: str, bos: list[int]) -> list[list[int]]:
    """The line's ids, BOS first; a line longer than the context is cut into windows that each start
    again from BOS (so every token is scored once). `bos`: [BOS id], or [] for a tokenizer without one
    (then a line's first token is given, not scored)."""
    ids = engine.encode(text, bos=True)
    bos = bos if ids[:len(bos)] == bos else []
    body = ids[len(bos):]
    room = engine.max_model_len - len(bos)
    return [bos + body[i:i + room] for i in range(0, len(body), room)] or [ids]


def bits_per_char(engine: Engine, path: Path, limit: int | None, progress) -> dict:
    """{"lines", "chars", "tokens", "bits", "bits_per_char", "tokens_per_char"} over the file."""
    lines = chars = tokens = 0
    nats = 0.0
    batch: list[str] = []
    bos = engine.encode("", bos=True)[:1]

    def flush() -> None:
        nonlocal lines, chars, tokens, nats
        seqs = [w for text in batch for w in windows(engine, text, bos)]
        for scored in engine.score(seqs, prompt=True):
            nats -= sum(t.logprob for t in scored.tokens[1:])
            tokens += len(scored.tokens) - 1
        lines += len(batch)
        chars += sum(len(t) for t in batch)
        progress.update(len(batch))
        batch.clear()

    for _, text in read_lines(path, limit):
        batch.append(text)
        if len(batch) == LINES_PER_CALL:
            flush()
    if batch:
        flush()
    if not lines:
        raise ZhtuneError(f"no text in {path}", where="--data", expected="non-empty lines of held-out text")
    bits = nats / math.log(2)
    return {"lines": lines, "chars": chars, "tokens": tokens, "bits": bits, "bits_per_char": bits / chars,
            "tokens_per_char": tokens / chars}
